/// Weights that leave .NET and come back: a cpu-scale run exported as safetensors and as torch.save's format
/// reproduces every exit's logits on 64 test images within 1e-4 in a PyTorch twin written in the tests
/// (tests/Interop/multiexit_resnet.py, Debian's python3-torch 1.13); the twin's own random weights, imported, give its
/// logits here within 1e-4; bad files and mismatched state dicts are clear errors.
module EarlyExit.Tests.Properties.ExchangeTests

open System
open System.Diagnostics
open System.IO
open System.Text.Json
open Expecto
open TorchSharp
open EarlyExit.Data
open EarlyExit.Interop
open EarlyExit.Training
open EarlyExit.Tests.Support
open EarlyExit.Experiments.Recipes
open EarlyExit.Experiments.Runner

let private python = "/usr/bin/python3"

/// True when Debian's python3-torch is installed (.ci/run installs it).
let private hasTorch =
    lazy
        (File.Exists python
         && (try
                 use p = Process.Start(ProcessStartInfo(python, "-c \"import torch, numpy\"", RedirectStandardError = true, RedirectStandardOutput = true))
                 p.WaitForExit()
                 p.ExitCode = 0
             with _ -> false))

let private twin =
    let rec up (dir: string) =
        let candidate = Path.Combine(dir, "tests", "Interop", "multiexit_resnet.py")
        if File.Exists candidate then candidate
        else
            match Path.GetDirectoryName dir with
            | null -> failwith "tests/Interop/multiexit_resnet.py not found above the test binary"
            | parent -> up parent
    lazy (up AppContext.BaseDirectory)

/// Runs the twin; returns its JSON line.
let private runTwin (args: string list) =
    let psi = ProcessStartInfo(python, RedirectStandardOutput = true, RedirectStandardError = true)
    psi.ArgumentList.Add twin.Value
    for a in args do psi.ArgumentList.Add a
    psi.Environment["OMP_NUM_THREADS"] <- "1"
    use p = Process.Start psi
    let out = p.StandardOutput.ReadToEnd()
    let err = p.StandardError.ReadToEnd()
    p.WaitForExit()
    if p.ExitCode <> 0 then failtestf "the PyTorch twin failed (%d): %s" p.ExitCode err
    JsonDocument.Parse(out.Trim().Split('\n') |> Array.last)

let private quiet: Interpreter.RunOptions =
    { OutDir = ""; Resume = false; PrefixCache = None; Scale = "cpu"; Device = Some "cpu"; Log = ignore }

/// The cpu-scale network (width 8, [2,2,2,2], exits after blocks 1,2,4,6,8, Fashion-MNIST), trained for a few steps.
let private cpuRecipe () =
    let r = Scales.recipe Scales.Cpu Builders.Joint "resnet34" "fashion-mnist" 0
    { r with
        Data = { r.Data with TrainLimit = 256; TestLimit = 128 }
        Stages = r.Stages |> List.map (fun s -> { s with MaxEpochs = 1; MaxStepsPerEpoch = 3 }) }

/// The first 64 test images (normalised, as the network sees them) and the run's cached logits for them.
let private imagesAndLogits (recipe: Recipe) (runDir: string) (dir: TempDir) =
    let data = Interpreter.loadData recipe
    use images = data.Test.Images(ReadOnlySpan [| 0 .. 63 |])
    let imagesFile = dir.File "images.npy"
    let shape = images.shape
    NpyFormat.Write(imagesFile, "<f4", shape, ReadOnlySpan(images.data<float32>().ToArray() |> Array.collect BitConverter.GetBytes))
    let cached = TensorStore.Load(Path.Combine(runDir, "test-logits.tensors"))
    try
        use first = cached["logits"].narrow(1L, 0L, 64L).contiguous()
        let logitsFile = dir.File "ours.npy"
        NpyFormat.Write(logitsFile, "<f4", first.shape, ReadOnlySpan(first.data<float32>().ToArray() |> Array.collect BitConverter.GetBytes))
        imagesFile, logitsFile, first.data<float32>().ToArray(), first.shape
    finally
        for t in cached.Values do t.Dispose()

let private readNpyFloats (file: string) =
    let bytes = File.ReadAllBytes file
    let h = NpyFormat.ReadHeader(file, ReadOnlySpan bytes)
    Expect.equal h.Descr "<f4" "float32 logits"
    Array.init (int h.Count) (fun i -> BitConverter.ToSingle(bytes, h.DataOffset + 4 * i)), h.Shape

let exchange =
    testList "weights to and from PyTorch" [
        test "export (safetensors, pt) reproduces every exit's logits in PyTorch within 1e-4; import of PyTorch's weights reproduces its logits here" {
            if not hasTorch.Value then skiptest "Debian's python3-torch is not installed (.ci/run installs it)"
            use dir = new TempDir()
            let recipe = cpuRecipe ()
            let run = dir.File "run"
            Interpreter.run { quiet with OutDir = run } recipe |> ignore
            let imagesFile, oursFile, _, _ = imagesAndLogits recipe run dir
            for format in [ WeightFormat.Safetensors; WeightFormat.PyTorch ] do
                let file = EarlyExit.Experiments.Cli.Weights.export run format None
                Expect.isTrue (File.Exists(file + ".json")) "the description is written beside the weights"
                use doc = runTwin [ "check"; file; file + ".json"; imagesFile; oursFile ]
                let diffs = doc.RootElement.GetProperty("maxAbsDiff").EnumerateArray() |> Seq.map (fun d -> d.GetDouble()) |> Array.ofSeq
                eprintfn "export %A: max |logit difference| per exit in PyTorch: %s" format (String.Join(" ", diffs |> Array.map (fun d -> d.ToString("G3"))))
                Expect.equal diffs.Length 5 "five exits"
                for e, d in Array.indexed diffs do
                    Expect.isLessThanOrEqual d 1e-4 $"{format}: exit {e + 1} differs by {d}"
            // The other way: PyTorch's own random weights (and BatchNorm statistics), imported.
            let sidecar = Path.Combine(run, "export", "model.safetensors.json")
            for ext, seed in [ ".pt", 11; ".safetensors", 12 ] do
                let weights = dir.File $"theirs{ext}"
                let theirsLogits = dir.File $"theirs{ext}.npy"
                runTwin [ "make"; weights; sidecar; imagesFile; theirsLogits; string seed ] |> ignore
                let out = dir.File $"imported{ext}"
                let acc = EarlyExit.Experiments.Cli.Weights.import weights recipe out (Some "cpu")
                Expect.equal acc.Length 5 "every exit evaluated"
                let _, _, ours, _ = imagesAndLogits recipe out dir
                let theirs, shape = readNpyFloats theirsLogits
                Expect.equal shape [| 5L; 64L; 10L |] "exits × images × classes"
                let worst = Array.map2 (fun (a: float32) (b: float32) -> abs (float a - float b)) ours theirs |> Array.max
                eprintfn "import %s: max |logit difference| against PyTorch: %.3g" ext worst
                Expect.isLessThanOrEqual worst 1e-4 $"{ext}: imported logits differ by {worst}"
                // Not the run's own weights: the logits differ from the trained run's.
                let _, _, trained, _ = imagesAndLogits recipe run dir
                Expect.isGreaterThan (Array.map2 (fun (a: float32) (b: float32) -> abs (float a - float b)) trained ours |> Array.max) 1e-2 "the imported network is PyTorch's"
                // eval reads the imported run.
                let saved = Console.Out
                Console.SetOut TextWriter.Null
                let code = try EarlyExit.Experiments.Evaluation.Eval.run out true 0 EarlyExit.Experiments.Evaluation.Budget.Softmax finally Console.SetOut saved
                Expect.equal code 0 "eval of the imported run"
        }

        test "round trip in .NET: every format gives back the same tensors bit for bit" {
            use dir = new TempDir()
            let r = cpuRecipe ()
            torch.manual_seed 3L |> ignore
            use a = EarlyExit.Models.ModelRegistry.Create(r.Model.Name, Validation.modelOptions r.Model)
            for format in [ WeightFormat.Safetensors; WeightFormat.PyTorch; WeightFormat.EarlyExit ] do
                let file = dir.File("w" + WeightFiles.Extension format)
                WeightFiles.Save(a, file, format)
                torch.manual_seed 4L |> ignore
                use b = EarlyExit.Models.ModelRegistry.Create(r.Model.Name, Validation.modelOptions r.Model)
                let state = WeightFiles.Load file
                try WeightFiles.LoadInto(b, state, file)
                finally for t in state.Values do t.Dispose()
                for kv in a.state_dict() do
                    use eq = kv.Value.eq(b.state_dict()[kv.Key])
                    use all = eq.all()
                    Expect.isTrue (all.item<bool>()) $"{format}: {kv.Key} equal"
        }

        test "mismatched or unreadable weights are errors that name the file and say what differs; nothing is written" {
            use dir = new TempDir()
            let r = cpuRecipe ()
            use net = EarlyExit.Models.ModelRegistry.Create(r.Model.Name, Validation.modelOptions r.Model)
            let file = dir.File "w.safetensors"
            WeightFiles.Save(net, file, WeightFormat.Safetensors)
            let state = WeightFiles.Load file
            let message (s: Collections.Generic.IReadOnlyDictionary<string, torch.Tensor>) =
                try WeightFiles.LoadInto(net, s, file); "" with :? WeightFileException as e -> e.Message
            let without = state |> Seq.filter (fun kv -> kv.Key <> "heads.0.alpha") |> Seq.map (fun kv -> kv.Key, kv.Value) |> dict
            let m1 = message (Collections.Generic.Dictionary without)
            Expect.stringContains m1 file "names the file"
            Expect.stringContains m1 "1 tensor(s) of the network are not in the file: heads.0.alpha" "the missing tensor"
            let extra = Collections.Generic.Dictionary state
            extra["heads.9.linear.weight"] <- torch.zeros(2)
            Expect.stringContains (message extra) "1 tensor(s) of the file are not in the network: heads.9.linear.weight" "the unexpected one"
            let wrong = Collections.Generic.Dictionary state
            wrong["heads.0.linear.bias"] <- torch.zeros(3)
            Expect.stringContains (message wrong) "heads.0.linear.bias: file [3], network [10]" "the shape"
            // DataParallel's "module." prefix is dropped.
            let prefixed = dir.File "dp.safetensors"
            TorchSharp.PyBridge.Safetensors.SaveStateDict(prefixed, Collections.Generic.Dictionary(state |> Seq.map (fun kv -> Collections.Generic.KeyValuePair("module." + kv.Key, kv.Value))))
            let back = WeightFiles.Load prefixed
            Expect.equal (Set.ofSeq back.Keys) (Set.ofSeq state.Keys) "the module. prefix is dropped"
            for t in back.Values do t.Dispose()
            for t in state.Values do t.Dispose()
            let junk = dir.File "junk.pt"
            File.WriteAllText(junk, "not a zip")
            let m4 = try WeightFiles.Load junk |> ignore; "" with :? WeightFileException as e -> e.Message
            Expect.stringContains m4 junk "names the unreadable file"
            Expect.stringContains m4 "zip-format torch.save file" "says what it expected"
            let m5 = try WeightFiles.Load(dir.File "w.onnx") |> ignore; "" with :? WeightFileException as e -> e.Message
            Expect.stringContains m5 "file not found" "a missing file"
            // import refuses a folder that holds something, and writes nothing there
            let busy = dir.File "busy"
            Directory.CreateDirectory busy |> ignore
            File.WriteAllText(Path.Combine(busy, "keep.txt"), "mine")
            let m6 = try EarlyExit.Experiments.Cli.Weights.import file r busy (Some "cpu") |> ignore; "" with Failure m -> m
            Expect.stringContains m6 "already exists and is not empty" "refused"
            Expect.equal (Directory.GetFileSystemEntries busy).Length 1 "nothing written"
        }
    ]

let all = testList "interop" [ exchange ]
