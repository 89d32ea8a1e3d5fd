/// Figures pinned to references: the paper's ResNet-34 (SPEC), the ELF patch, and the describe JSON.
module EarlyExit.Tests.Golden.Tests

open System
open System.IO
open System.Text.Json
open Expecto
open EarlyExit.Models
open EarlyExit.Flops
open EarlyExit.Native
open EarlyExit.Tests.Support

let private resnet34 (options: ModelOptions) =
    TorchSharp.torch.manual_seed 0L |> ignore
    ModelRegistry.Create("resnet34", options)

let resnet34Paper =
    testList "resnet34 (SPEC reference figures)" [
        let net = lazy (resnet34 ModelOptions.Default)
        let cost = lazy (MacCounter.Count(net.Value))

        test "21,328,292 parameters without internal classifiers (100 classes)" {
            Expect.equal cost.Value.BackboneParameters 21_328_292L "backbone parameters"
        }
        test "1,159,448,576 conv+linear MACs at 32x32" {
            Expect.equal cost.Value.BackboneMacs 1_159_448_576L "backbone MACs"
        }
        test "8 exits" { Expect.equal net.Value.ExitCount 8 "exit count" }
        test "cumulative backbone MACs after blocks 2..16: 13.2/24.8/37.8/49.4/62.4/75.4/87.0/100%" {
            let percents =
                cost.Value.Exits
                |> Seq.map (fun e -> Math.Round(100.0 * float e.CumulativeBackboneMacs / float cost.Value.BackboneMacs, 1))
                |> Seq.toList
            Expect.equal percents [ 13.2; 24.8; 37.8; 49.4; 62.4; 75.4; 87.0; 100.0 ] "percent of the backbone"
        }
        test "SDN head parameters are C*1600+101 for C = 64,128,128,256,256,256,512; the final head 512*100+100" {
            let heads = cost.Value.Exits |> Seq.map (fun e -> e.HeadParameters) |> Seq.toList
            let expected = ([ 64; 128; 128; 256; 256; 256; 512 ] |> List.map (fun c -> int64 c * 1600L + 101L)) @ [ 51_300L ]
            Expect.equal heads expected "head parameters"
        }
        test "exit cost includes every earlier head" {
            let exits = cost.Value.Exits |> Seq.toArray
            for e in exits do
                let expected = (exits |> Seq.take e.Exit |> Seq.sumBy (fun x -> x.SegmentMacs + x.HeadMacs))
                Expect.equal e.CumulativeMacs expected $"exit {e.Exit}"
            Expect.equal exits[7].CumulativeMacs (1_159_448_576L + (exits |> Seq.take 7 |> Seq.sumBy (fun x -> x.HeadMacs))) "last exit = backbone + 7 ICs"
        }
        test "total parameters = backbone + the seven SDN heads" {
            let icParams = [ 64; 128; 128; 256; 256; 256; 512 ] |> List.sumBy (fun c -> int64 c * 1600L + 101L)
            Expect.equal cost.Value.TotalParameters (21_328_292L + icParams) "all parameters"
        }
    ]

let msdnetPaper =
    testList "msdnet (SPEC reference figures, CIFAR-100 at 32x32)" [
        let cost = lazy (
            TorchSharp.torch.manual_seed 0L |> ignore
            use net = ModelRegistry.Create("msdnet", ModelOptions.Default)
            MacCounter.Count(net, MacConvention.MsdnetReference))
        let within (expected: float) (actual: float) = abs (actual - expected) <= 0.005 * expected
        test "seven exits" { Expect.equal cost.Value.Exits.Count 7 "exits" }
        test "cumulative MACs per exit within 0.5% of 15.14, 25.51, 37.10, 46.33, 57.34, 66.96, 75.94 million (reference convention)" {
            let expected = [ 15.14; 25.51; 37.10; 46.33; 57.34; 66.96; 75.94 ]
            let actual = cost.Value.Exits |> Seq.map (fun e -> float e.CumulativeMacs / 1e6) |> Seq.toList
            for (e, a) in List.zip expected actual do
                Expect.isTrue (within e a) $"{a:F3}M against {e}M"
        }
        test "cumulative parameters per exit within 0.5% of 0.434, 0.877, 1.275, 1.696, 2.178, 2.603, 3.068 million" {
            let expected = [ 0.434; 0.877; 1.275; 1.696; 2.178; 2.603; 3.068 ]
            let actual = cost.Value.Exits |> Seq.map (fun e -> float e.CumulativeParameters / 1e6) |> Seq.toList
            for (e, a) in List.zip expected actual do
                Expect.isTrue (within e a) $"{a:F4}M against {e}M"
        }
        test "our conv-linear convention counts less (no ReLU, pooling or biases) on the same modules" {
            TorchSharp.torch.manual_seed 0L |> ignore
            use net = ModelRegistry.Create("msdnet", ModelOptions.Default)
            let ours = MacCounter.Count(net, MacConvention.ConvLinear)
            for (a, b) in Seq.zip ours.Exits cost.Value.Exits do
                Expect.isLessThan a.CumulativeMacs b.CumulativeMacs $"exit {a.Exit}"
            Expect.equal ours.Exits[6].CumulativeMacs 75_487_744L "conv-linear MACs of the last exit, pinned"
        }
    ]

let describeJson =
    testList "earlyexit describe --json" [
        test "has parameters, macs and the exits in order with cumulative macs and parameters" {
            use net = resnet34 ModelOptions.Default
            let cost = MacCounter.Count net
            use doc = JsonDocument.Parse(EarlyExit.Experiments.Reports.Describe.toJson "resnet34" net cost)
            let root = doc.RootElement
            Expect.equal (root.GetProperty("parameters").GetInt64()) 21_328_292L "parameters"
            Expect.equal (root.GetProperty("macs").GetInt64()) 1_159_448_576L "macs"
            let exits = root.GetProperty("exits").EnumerateArray() |> Seq.toArray
            Expect.equal exits.Length 8 "eight exits"
            let macs = exits |> Array.map (fun e -> e.GetProperty("macs").GetInt64())
            Expect.isTrue (macs |> Array.pairwise |> Array.forall (fun (a, b) -> a < b)) "cumulative MACs increase"
            Expect.equal (exits[0].GetProperty("macs").GetInt64()) (152_764_416L + 102_400L) "exit 1 = blocks 1-2 and the stem + head 1"
            Expect.equal (exits[7].GetProperty("parameters").GetInt64()) cost.TotalParameters "last exit's cumulative parameters = whole network"
        }
        test "Fashion-MNIST shape: 1x28x28, 10 classes, narrow widths" {
            use net = resnet34 (ModelOptions(NumClasses = 10, InputShape = [| 1L; 28L; 28L |], BaseWidth = 16, Blocks = [| 2; 2; 2; 2 |]))
            let cost = MacCounter.Count net
            Expect.equal net.ExitCount 4 "exits after blocks 2,4,6,8"
            // stem 1->16 at 28x28: 16*9*784; blocks 1-2: 4 convs 16->16 at 28x28.
            let stem = 16L * 9L * 784L
            let block12 = 4L * 16L * 16L * 9L * 784L
            Expect.equal cost.Exits[0].SegmentMacs (stem + block12) "segment 1 MACs"
            Expect.equal cost.Exits[0].HeadMacs (16L * 16L * 10L) "SDN head MACs = C*16*classes"
        }
    ]

/// The JSON that results, run folders and sweeps are written with: readable text, still valid JSON.
let readableJson =
    testList "JSON for people (Markdown.jsonOptions)" [
        test "'+', apostrophes, '<', '&' and non-ASCII text are written as themselves; quotes and control characters escaped; it reads back" {
            let name = "sequential + LwF's teachers < 1.60 & Δ μ – \"quoted\"\tend"
            let text = JsonSerializer.Serialize({| name = name |}, EarlyExit.Experiments.Reports.Markdown.jsonOptions false)
            Expect.stringContains text "sequential + LwF's teachers < 1.60 & Δ μ –" "printable text as itself"
            Expect.isFalse (text.Contains "\\u00") $"no \\u00XX escapes of printable characters: {text}"
            Expect.stringContains text "\\\"quoted\\\"\\tend" "a quote and a tab still escaped"
            use doc = JsonDocument.Parse text
            Expect.equal (doc.RootElement.GetProperty("name").GetString()) name "reads back to the same string"
            // The default encoder, for contrast: what the files held before.
            Expect.stringContains (JsonSerializer.Serialize({| name = name |})) "\\u002B" "System.Text.Json's default escapes '+'"
        }
        test "named floats: NaN and Infinity written with namedFloats, refused without" {
            let text = JsonSerializer.Serialize([| nan; infinity |], EarlyExit.Experiments.Reports.Markdown.jsonOptions true)
            Expect.stringContains text "\"NaN\"" "NaN"
            Expect.stringContains text "\"Infinity\"" "Infinity"
            Expect.throws (fun () -> JsonSerializer.Serialize([| nan |], EarlyExit.Experiments.Reports.Markdown.jsonOptions false) |> ignore) "strict numbers refuse NaN"
        }
    ]

/// A minimal ELF64 with a .gnu.version_r section naming libstdc++.so.6 and two versions, built byte by byte.
let syntheticElf (weak: bool) =
    let strtab = Text.Encoding.ASCII.GetBytes("\000libstdc++.so.6\000GLIBCXX_3.4.30\000GLIBCXX_3.4.32\000")
    let nameFile, name30, name32 = 1, 16, 31
    let le16 (v: int) = [| byte v; byte (v >>> 8) |]
    let le32 (v: int) = BitConverter.GetBytes(v)
    let le64 (v: int64) = BitConverter.GetBytes(v)
    // Verneed (16 bytes) + two Vernaux (16 bytes each)
    let verneed = Array.concat [ le16 1; le16 2; le32 nameFile; le32 16; le32 0 ]
    let aux1 = Array.concat [ le32 0; le16 0; le16 2; le32 name30; le32 16 ]
    let aux2 = Array.concat [ le32 0; le16 (if weak then 2 else 0); le16 3; le32 name32; le32 0 ]
    let verr = Array.concat [ verneed; aux1; aux2 ]
    let strOff, verOff = 64L, 64L + int64 strtab.Length
    let shoff = verOff + int64 verr.Length
    let section (typ: int) (offset: int64) (size: int64) (link: int) (info: int) =
        Array.concat [ le32 0; le32 typ; le64 0L; le64 0L; le64 offset; le64 size; le32 link; le32 info; le64 1L; le64 0L ]
    let header =
        Array.concat [
            [| 0x7fuy; byte 'E'; byte 'L'; byte 'F'; 2uy; 1uy; 1uy; 0uy |]; Array.zeroCreate 8
            le16 3; le16 0x3e; le32 1; le64 0L; le64 0L; le64 shoff; le32 0; le16 64; le16 0; le16 0; le16 64; le16 3; le16 0 ]
    Array.concat [ header; strtab; verr; section 0 0L 0L 0 0; section 3 strOff (int64 strtab.Length) 0 0; section 0x6ffffffe verOff (int64 verr.Length) 1 1 ]

let elfPatch =
    testList "ELF version-needs patch" [
        test "marks GLIBCXX_3.4.32 weak and leaves GLIBCXX_3.4.30 alone" {
            let elf = syntheticElf false
            let before = Array.copy elf
            Expect.equal (ElfVersionNeedPatcher.MarkVersionNeedWeak(elf, "GLIBCXX_3.4.32")) ElfPatchOutcome.Patched "patched"
            let diff = Array.zip before elf |> Array.indexed |> Array.filter (fun (_, (a, b)) -> a <> b) |> Array.map fst
            Expect.equal diff.Length 1 "exactly one byte changes"
            Expect.equal elf[diff[0]] 2uy "the flag byte becomes VER_FLG_WEAK"
            Expect.equal (ElfVersionNeedPatcher.MarkVersionNeedWeak(elf, "GLIBCXX_3.4.32")) ElfPatchOutcome.AlreadyWeak "idempotent"
        }
        test "an entry already weak is reported so" {
            Expect.equal (ElfVersionNeedPatcher.MarkVersionNeedWeak(syntheticElf true, "GLIBCXX_3.4.32")) ElfPatchOutcome.AlreadyWeak "weak"
        }
        test "a version the library does not need is reported so" {
            Expect.equal (ElfVersionNeedPatcher.MarkVersionNeedWeak(syntheticElf false, "GLIBCXX_9.9")) ElfPatchOutcome.VersionNotNeeded "absent"
        }
        test "not an ELF file, or a truncated one, is a clear error naming the file" {
            let e = Expect.throwsT<InvalidDataException> (fun () -> ElfVersionNeedPatcher.MarkVersionNeedWeak(Array.zeroCreate 100, "X", "lib.so") |> ignore)
            ()
            let truncated = (syntheticElf false)[.. 120]
            let ex = try ElfVersionNeedPatcher.MarkVersionNeedWeak(truncated, "GLIBCXX_3.4.32", "cut.so") |> ignore; "" with :? InvalidDataException as x -> x.Message
            Expect.stringContains ex "cut.so" "names the file"
            Expect.stringContains ex "truncated" "says what is wrong"
        }
        test "patching through a hard link replaces the link and leaves the other name untouched" {
            use dir = new TempDir()
            let original = dir.File "cache-original.so"
            File.WriteAllBytes(original, syntheticElf false)
            let link = dir.File "output-copy.so"
            let rc = Diagnostics.Process.Start("ln", [| original; link |])
            rc.WaitForExit()
            Expect.equal rc.ExitCode 0 "ln made a hard link"
            ElfVersionNeedPatcher.PatchFile(link, link, "GLIBCXX_3.4.32") |> ignore
            Expect.equal (File.ReadAllBytes original) (syntheticElf false) "the linked original is unchanged"
            Expect.equal (ElfVersionNeedPatcher.MarkVersionNeedWeak(File.ReadAllBytes link, "GLIBCXX_3.4.32")) ElfPatchOutcome.AlreadyWeak "the output copy is patched"
        }
        test "the shipped libLibTorchSharp.so in the NuGet cache is left as shipped by the build" {
            let nuget =
                match Environment.GetEnvironmentVariable "NUGET_PACKAGES" with
                | null | "" -> Path.Combine(Environment.GetFolderPath Environment.SpecialFolder.UserProfile, ".nuget", "packages")
                | p -> p
            let shipped = Path.Combine(nuget, "torchsharp", "0.107.0", "runtimes", "linux-x64", "native", "libLibTorchSharp.so")
            Expect.isTrue (File.Exists shipped) $"restored package at {shipped}"
            let bytes = File.ReadAllBytes shipped
            Expect.equal (ElfVersionNeedPatcher.MarkVersionNeedWeak(bytes, "GLIBCXX_3.4.32", shipped)) ElfPatchOutcome.Patched "the cache copy still asks for GLIBCXX_3.4.32 strictly"
        }
        test "the build patched the copy in this test's output folder where the system libstdc++ is old" {
            let copy = Path.Combine(AppContext.BaseDirectory, "libLibTorchSharp.so")
            let outcome = ElfVersionNeedPatcher.MarkVersionNeedWeak(File.ReadAllBytes copy, "GLIBCXX_3.4.32", copy)
            if ElfVersionNeedPatcher.SystemLibstdcxxProvides "GLIBCXX_3.4.32" then
                Expect.equal outcome ElfPatchOutcome.Patched "left as shipped where libstdc++ is new enough"
            else
                Expect.equal outcome ElfPatchOutcome.AlreadyWeak "patched in the output folder"
        }
    ]

/// Runs the CLI from a copy of this test's output folder whose libLibTorchSharp.so is
/// the one shipped in the NuGet package, unpatched: the runtime loader must cope by itself.
let private runCliFromUnpatchedCopy (leaveOut: string list) =
    let nuget =
        match Environment.GetEnvironmentVariable "NUGET_PACKAGES" with
        | null | "" -> Path.Combine(Environment.GetFolderPath Environment.SpecialFolder.UserProfile, ".nuget", "packages")
        | p -> p
    let shipped = Path.Combine(nuget, "torchsharp", "0.107.0", "runtimes", "linux-x64", "native", "libLibTorchSharp.so")
    let hashBefore = Security.Cryptography.SHA256.HashData(File.ReadAllBytes shipped)
    let dir = new TempDir()
    let bin = Path.Combine(dir.Path, "bin")
    Directory.CreateDirectory bin |> ignore
    for f in Directory.GetFiles AppContext.BaseDirectory do
        let name = Path.GetFileName f
        if name <> "libLibTorchSharp.so" && not (List.contains name leaveOut) then
            // The host resolves the real path of managed assemblies, so those are copied; the large natives are linked.
            if name.Contains ".so" then File.CreateSymbolicLink(Path.Combine(bin, name), f) |> ignore
            else File.Copy(f, Path.Combine(bin, name))
    File.Copy(shipped, Path.Combine(bin, "libLibTorchSharp.so"))
    let psi = Diagnostics.ProcessStartInfo("dotnet", [| Path.Combine(bin, "earlyexit.dll"); "doctor" |])
    psi.RedirectStandardOutput <- true
    psi.RedirectStandardError <- true
    psi.Environment["XDG_CACHE_HOME"] <- Path.Combine(dir.Path, "cache")
    psi.Environment.Remove "EARLYEXIT_TORCH_NATIVE_DIR" |> ignore
    use p = Diagnostics.Process.Start psi
    let out = p.StandardOutput.ReadToEndAsync()
    let err = p.StandardError.ReadToEnd()
    p.WaitForExit()
    let hashAfter = Security.Cryptography.SHA256.HashData(File.ReadAllBytes shipped)
    dir, p.ExitCode, out.Result + err, (hashBefore = hashAfter)

let runtimeLoader =
    testList "runtime loader (unpatched natives)" [
        test "the CLI loads TorchSharp from an output folder the build did not patch, without touching the NuGet cache" {
            let dir, code, output, cacheUntouched = runCliFromUnpatchedCopy []
            use _ = dir
            Expect.equal code 0 $"earlyexit doctor succeeds:\n{output}"
            Expect.isTrue cacheUntouched "the NuGet cache's libLibTorchSharp.so is unchanged"
            if ElfVersionNeedPatcher.SystemLibstdcxxProvides "GLIBCXX_3.4.32" then
                Expect.stringContains output "loaded as shipped" "nothing to do where libstdc++ is new enough"
            else
                Expect.stringContains output "marked weak" "a patched copy was loaded"
                let copies = Directory.GetFiles(Path.Combine(dir.Path, "cache", "earlyexit", "native"), "libLibTorchSharp.so", SearchOption.AllDirectories)
                Expect.equal copies.Length 1 "one patched copy in the per-user cache"
                Expect.isFalse (File.Exists(Path.Combine(dir.Path, "bin", "cpu", "libLibTorchSharp.so"))) "TorchSharp's own fallback copy was not made"
        }
        test "when a native dependency is missing the CLI ends with one clear message and exit code 1" {
            let dir, code, output, _ = runCliFromUnpatchedCopy [ "libtorch_cpu.so" ]
            use _ = dir
            Expect.equal code 1 $"exit code 1:\n{output}"
            Expect.stringContains output "error: " "one error line"
            Expect.stringContains output "libtorch_cpu.so" "names what is missing"
        }
    ]

let registry =
    testList "model registry (every family)" [
        for family in ModelRegistry.Families do
            test $"{family.Name}: builds at Fashion-MNIST scale and every exit gives [N, classes] logits" {
                TorchSharp.torch.manual_seed 1L |> ignore
                use net = family.Create.Invoke(ModelOptions(NumClasses = 10, InputShape = [| 1L; 28L; 28L |], BaseWidth = 8))
                net.eval() |> ignore
                use scope = TorchSharp.torch.NewDisposeScope()
                let x = TorchSharp.torch.randn(3L, 1L, 28L, 28L)
                let logits = net.forward x
                Expect.equal logits.Length net.ExitCount "one logits tensor per exit"
                for l in logits do Expect.equal (l.shape |> Array.toList) [ 3L; 10L ] "shape"
                let cost = MacCounter.Count net
                Expect.equal cost.Exits.Count net.ExitCount "cost per exit"
            }
    ]

/// Hand-made outputs of 3 exits on 4 samples (2 classes), with answers worked out by hand:
///   exit costs 10/25/45 MACs, backbone 40; confidences .9/.6/.5 (a tie, predicting class 0).
let budgetFixture () =
    let l9, l15 = float32 (log 9.0), float32 (log 1.5)
    let logits =
        [| [| [| l9; 0.0f |]; [| l15; 0.0f |]; [| 0.0f; 0.0f |]; [| 0.0f; l15 |] |]
           [| [| l9; 0.0f |]; [| 0.0f; l9 |]; [| 0.0f; l15 |]; [| 0.0f; l15 |] |]
           [| [| l9; 0.0f |]; [| 0.0f; l9 |]; [| 0.0f; l15 |]; [| l9; 0.0f |] |] |]
    EarlyExit.Experiments.Evaluation.Budget.fromLogits logits [| 0; 1; 1; 0 |] [| 10L; 25L; 45L |] 40L

let budgets =
    let open' = EarlyExit.Experiments.Evaluation.Budget.pointAt
    testList "budget and curve computations (worked by hand)" [
        test "per-exit accuracy, and a tie predicts the first class" {
            let o = budgetFixture ()
            Expect.equal (EarlyExit.Experiments.Evaluation.Budget.exitAccuracy o) [| 0.25; 0.75; 1.0 |] "exit accuracies"
            Expect.equal (o.Prediction[0][2]) 0 "tie -> class 0"
            Expect.equal (o.Confidence[0][2]) 0.5f "tie confidence"
        }
        test "the exit decision of real early exit and of the evaluation (EarlyExitInference.Confidence), by hand" {
            let at (row: float32[]) = EarlyExit.Inference.EarlyExitInference.Confidence(ReadOnlySpan row, true)
            // [ln 3, 0]: z = 1 + 1/3, p = (3/4, 1/4); H = −(3/4 ln 3/4 + 1/4 ln 1/4) = ln 4 − (3/4) ln 3.
            let struct (c, p, h) = at [| float32 (log 3.0); 0.0f |]
            Expect.floatClose Accuracy.high (float c) 0.75 "confidence 3/4"
            Expect.equal p 0L "class 0"
            Expect.floatClose Accuracy.high (float h) (log 4.0 - 0.75 * log 3.0) "entropy"
            let struct (c, p, h) = at [| 1.0f; 1.0f; 0.0f |]
            Expect.equal p 0L "a tie predicts the first class"
            Expect.floatClose Accuracy.high (float c) (1.0 / (2.0 + exp -1.0)) "confidence of a tie"
            let struct (c, _, h) = at [| 0.0f; 0.0f |]
            Expect.equal (c, h) (0.5f, float32 (log 2.0)) "uniform over 2: 1/2 and ln 2"
            let struct (_, p, h) = EarlyExit.Inference.EarlyExitInference.Confidence(ReadOnlySpan [| -2.0f; 5.0f; 1.0f |], false)
            Expect.equal (p, h) (1L, 0.0f) "no entropy asked: 0"
            Expect.throwsT<ArgumentException> (fun () -> at [||] |> ignore) "an empty row"
        }
        test "threshold 0: every sample leaves at exit 1" {
            let p = open' (budgetFixture ()) 0.0
            Expect.equal (p.Accuracy, p.AverageMacs, p.ExitRatios) (0.25, 10.0, [| 1.0; 0.0; 0.0 |]) "t = 0"
        }
        test "threshold 0.5 is strict: the tied sample (confidence exactly 0.5) does not leave at exit 1" {
            let p = open' (budgetFixture ()) 0.5
            Expect.equal (p.Accuracy, p.AverageMacs, p.ExitRatios) (0.5, 13.75, [| 0.75; 0.25; 0.0 |]) "t = 0.5"
        }
        test "threshold 0.65: samples spread over the three exits" {
            let p = open' (budgetFixture ()) 0.65
            Expect.equal (p.Accuracy, p.AverageMacs, p.ExitRatios) (1.0, 31.25, [| 0.25; 0.25; 0.5 |]) "t = 0.65"
        }
        test "a threshold nothing passes sends every sample to the last exit" {
            let p = open' (budgetFixture ()) 0.95
            Expect.equal (p.Accuracy, p.AverageMacs, p.ExitRatios) (1.0, 45.0, [| 0.0; 0.0; 1.0 |]) "t = 0.95"
        }
        test "budgeted accuracy: the last threshold within 25/50/75/100% of the backbone, '–' below the first exit" {
            let o = budgetFixture ()
            let sweep = EarlyExit.Experiments.Evaluation.Budget.sweep o [| 0.0; 0.5; 0.55; 0.65; 0.95 |]
            let at f = EarlyExit.Experiments.Evaluation.Budget.budgetedAccuracy o sweep f
            Expect.equal (at 0.25) (Some 0.25) "25% = 10 MACs: only t = 0"
            Expect.equal (at 0.5) (Some 0.5) "50% = 20 MACs: t = 0.55"
            Expect.equal (at 0.75) (Some 0.5) "75% = 30 MACs: 31.25 does not fit"
            Expect.equal (at 1.0) (Some 1.0) "100% = 40 MACs: t = 0.65"
            Expect.equal (at 0.2) None "8 MACs: below exit 1"
            Expect.equal (EarlyExit.Experiments.Evaluation.Budget.percent (at 0.2)) "–" "printed as a dash"
        }
        test "speed-up to reach an accuracy: backbone cost over the cheapest point that reaches it" {
            let o = budgetFixture ()
            let sweep = EarlyExit.Experiments.Evaluation.Budget.sweep o [| 0.0; 0.5; 0.55; 0.65; 0.95 |]
            Expect.equal (EarlyExit.Experiments.Evaluation.Budget.speedUp o sweep 1.0) (Some(40.0 / 31.25)) "1.28x"
            Expect.equal (EarlyExit.Experiments.Evaluation.Budget.speedUp o sweep 0.5) (Some(40.0 / 13.75)) "from t = 0.5"
        }
        test "the MACs-predicted speed-up of timed samples: last exit's cost over the mean cost of the exits they took" {
            // Exits cost 10, 20, 40 MACs; four samples left at exits 1, 3, 3, 1: mean 25 MACs, 40 / 25 = 1.6x.
            Expect.equal (EarlyExit.Experiments.Evaluation.Eval.predictedSpeedUp [| 10L; 20L; 40L |] [| 1; 3; 3; 1 |]) 1.6 "1.6x"
            Expect.equal (EarlyExit.Experiments.Evaluation.Eval.predictedSpeedUp [| 10L; 20L; 40L |] [| 3; 3 |]) 1.0 "nobody leaves early"
        }
        test "timing warm-up: ends once two rounds in a row compile nothing, or at its cap" {
            let mutable calls = 0
            let quiet = EarlyExit.Experiments.Evaluation.Eval.warmUpWith 20 10 (fun () -> calls <- calls + 1)
            Expect.isTrue (quiet >= 2 && quiet <= 4) $"a pair that compiles nothing: 2 quiet rounds after at most two that JIT the loop itself ({quiet})"
            Expect.equal calls quiet "the pair runs once a round"
            // A fresh dynamic method every round: the JIT compiles one each time, so the warm-up never goes quiet.
            let compileOne () =
                let m = System.Reflection.Emit.DynamicMethod("warm", typeof<int>, [||])
                let il = m.GetILGenerator()
                il.Emit(System.Reflection.Emit.OpCodes.Ldc_I4, calls)
                il.Emit(System.Reflection.Emit.OpCodes.Ret)
                calls <- calls + 1
                (m.CreateDelegate(typeof<Func<int>>) :?> Func<int>).Invoke() |> ignore
            calls <- 0
            Expect.equal (EarlyExit.Experiments.Evaluation.Eval.warmUpWith 5 10 compileOne) 5 "capped at 5 rounds"
            Expect.equal calls 5 "the pair ran every round"
        }
        test "entropy policy: leave where the softmax entropy is below t (H(.9,.1) = 0.325, H(.6,.4) = 0.673, H(.5,.5) = ln 2)" {
            let o = budgetFixture ()
            let at t = EarlyExit.Experiments.Evaluation.Budget.pointWith o EarlyExit.Experiments.Evaluation.Budget.Entropy t
            Expect.floatClose Accuracy.medium (float (o.Entropy[0][0])) 0.3250829733914482 "H(0.9, 0.1)"
            let p = at 0.5
            Expect.equal (p.Accuracy, p.AverageMacs, p.ExitRatios) (1.0, 31.25, [| 0.25; 0.25; 0.5 |]) "t = 0.5"
            let p = at 0.7
            Expect.equal (p.Accuracy, p.AverageMacs, p.ExitRatios) (0.25, 10.0, [| 1.0; 0.0; 0.0 |]) "t = 0.7: every entropy at exit 1 is below"
            let p = at 0.0
            Expect.equal (p.Accuracy, p.AverageMacs) (1.0, 45.0) "t = 0: nothing is below, all take the last exit"
        }
        test "patience policy (PBEE): leave once the prediction stayed the same for k consecutive exits" {
            let o = budgetFixture ()
            let at k = EarlyExit.Experiments.Evaluation.Budget.pointWith o EarlyExit.Experiments.Evaluation.Budget.Patience k
            let p = at 0.0
            Expect.equal (p.Accuracy, p.AverageMacs, p.ExitRatios) (0.25, 10.0, [| 1.0; 0.0; 0.0 |]) "k = 0: exit 1"
            // Predictions per sample over exits: 0,0,0 / 0,1,1 / 0,1,1 / 1,1,0; labels 0,1,1,0.
            let p = at 1.0
            Expect.equal (p.Accuracy, p.AverageMacs, p.ExitRatios) (0.75, 35.0, [| 0.0; 0.5; 0.5 |]) "k = 1"
            let p = at 2.0
            Expect.equal (p.Accuracy, p.AverageMacs) (1.0, 45.0) "k = 2: never before the last exit"
            Expect.equal (EarlyExit.Experiments.Evaluation.Budget.parametersOf o EarlyExit.Experiments.Evaluation.Budget.Patience) [| 0.0; 1.0; 2.0 |] "k = 0..M−1"
        }
        test "expected calibration error (15 bins): exit 1 is 0.45" {
            // Bins of exit 1: 0.9 (right) alone, 0.6 twice (both wrong), 0.5 (wrong): 1/4·0.1 + 2/4·0.6 + 1/4·0.5.
            let ece, bins = EarlyExit.Experiments.Evaluation.Budget.calibration (budgetFixture ()) 0 15
            Expect.floatClose Accuracy.medium ece 0.45 "ECE"
            let count, accuracy, _ = bins[9]
            Expect.equal (count, accuracy) (2, 0.0) "the 0.6 bin"
            let ece3, _ = EarlyExit.Experiments.Evaluation.Budget.calibration (budgetFixture ()) 2 15
            Expect.floatClose Accuracy.medium ece3 ((3.0 * 0.1 + 0.4) / 4.0) "exit 3: three at 0.9 right, one at 0.6 right"
        }
        test "budgets fitted on the validation split, applied once to the test split" {
            let validation = budgetFixture ()
            // The test split: the same outputs, the second sample's label changed to 0.
            let test = { validation with Labels = [| 0; 0; 1; 0 |] }
            match EarlyExit.Experiments.Evaluation.Budget.fittedOnValidation validation test EarlyExit.Experiments.Evaluation.Budget.Softmax 0.5 with
            | None -> failtest "a threshold fits 50% on validation"
            | Some p ->
                // On validation, the most MACs within 20 is 13.75 (t in [0.5, 0.6)); the last such threshold is 59/99.
                Expect.floatClose Accuracy.high p.Threshold (59.0 / 99.0) "threshold chosen on validation"
                Expect.equal (p.AverageMacs, p.Accuracy) (13.75, 0.75) "its test cost and accuracy"
            Expect.isNone (EarlyExit.Experiments.Evaluation.Budget.fittedOnValidation validation test EarlyExit.Experiments.Evaluation.Budget.Softmax 0.2) "nothing fits 8 MACs"
        }
        test "the reference sweep is 100 evenly spaced thresholds from 0 to 1" {
            let ts = EarlyExit.Experiments.Evaluation.Budget.thresholds 100
            Expect.equal (ts.Length, ts[0], ts[99]) (100, 0.0, 1.0) "ends"
        }
    ]

let all = testList "golden" [ budgets; msdnetPaper; resnet34Paper; describeJson; readableJson; elfPatch; runtimeLoader; registry; NumericsTests.all; AnalyzerTests.all; StatisticsTests.all; SchemaTests.all; SlurmTests.all ]
