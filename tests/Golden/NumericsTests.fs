/// The numerics guard: the convolution check, the order of backends per CPU, and the guard's switch seen from the
/// command line (with simulated faults, so that it is exercised on machines whose kernels are correct too).
module EarlyExit.Tests.Golden.NumericsTests

open System
open System.Diagnostics
open System.IO
open Expecto
open TorchSharp
open EarlyExit.Native
open EarlyExit.Tests.Support

/// /proc/cpuinfo blocks of the two EPYCs this project has met (flags abridged to what matters and a few others).
let zen3 =
    "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\nstepping\t: 1\n" +
    "flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni vaes\n\nprocessor\t: 1\nflags\t\t: nothing\n"
let zen5 =
    "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC 9B45\nstepping\t: 1\n" +
    "flags\t\t: fpu sse sse2 fma sse4_1 avx avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16 avx_vnni\n"
let skylake =
    "vendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 85\nmodel name\t: Intel(R) Xeon(R) Gold 6148\nstepping\t: 4\n" +
    "flags\t\t: sse4_1 avx avx2 fma avx512f avx512dq avx512bw avx512vl\n"

let private names (ladder: NumericsBackend seq) = ladder |> Seq.map (fun b -> b.Name) |> List.ofSeq

let ladder =
    testList "backends in the order the guard tries them" [
        test "/proc/cpuinfo: the first processor's model and only the flags that choose kernels" {
            let c = CpuInfo.Parse zen3
            Expect.equal (c.Vendor, c.ModelName, c.Family, c.Model, c.Stepping) ("AuthenticAMD", "AMD EPYC", 25, 1, 1) "identity"
            Expect.equal (List.ofSeq c.Flags) [ "sse4_1"; "avx"; "avx2"; "fma" ] "kernel flags, in KernelFlags order"
            Expect.equal c.Summary "AVX2, no AVX-512, no AMX" "summary"
            Expect.equal (CpuInfo.Parse zen5).Summary "AVX-512 (VNNI, BF16), no AMX" "AVX-512 with extensions"
        }
        test "an AVX2 EPYC (family 25): default, default on NCHW inputs, then AVX and SSE4.1 (AVX2 is the default), then oneDNN off" {
            Expect.equal (names (NumericsBackend.Ladder(CpuInfo.Parse zen3))) [ "default"; "default-nchw"; "onednn-avx"; "onednn-sse41"; "no-onednn" ] "ladder"
        }
        test "an AVX-512 EPYC with VNNI and BF16 (family 26): every plain ISA below its default" {
            Expect.equal (names (NumericsBackend.Ladder(CpuInfo.Parse zen5)))
                [ "default"; "default-nchw"; "onednn-avx512_core"; "onednn-avx2"; "onednn-avx"; "onednn-sse41"; "no-onednn" ] "ladder"
        }
        test "a plain AVX-512 Xeon: AVX-512 core is its default and is not tried twice" {
            Expect.equal (names (NumericsBackend.Ladder(CpuInfo.Parse skylake))) [ "default"; "default-nchw"; "onednn-avx2"; "onednn-avx"; "onednn-sse41"; "no-onednn" ] "ladder"
        }
        test "an unknown backend name is refused with the list of known ones" {
            let msg = try NumericsBackend.Parse "avx9" |> ignore; "" with :? ArgumentException as e -> e.Message
            Expect.stringContains msg "unknown numerics backend 'avx9'" "names it"
            Expect.stringContains msg "onednn-sse41, no-onednn" "lists the others"
        }
    ]

let libtorchInfo =
    testList "libtorch's own description" [
        test "at::show_config of the bundled libtorch: version 2.10.0 with oneDNN v3.7.1" {
            let info = LibTorchControls.Info()
            Expect.equal info.TorchVersion "2.10.0" "libtorch"
            Expect.stringStarts info.OneDnnVersion "v3.7.1" "oneDNN"
            Expect.equal info.TorchSharpVersion "0.107.0" "TorchSharp"
            Expect.isTrue (info.CpuCapability <> "unknown") "ATen's CPU capability"
        }
        test "parsing: versions, oneDNN's commit, and 'unknown' for what is absent" {
            let text = "PyTorch built with:\n  - Intel(R) MKL-DNN v3.7.1 (Git Hash 8d263e693366ef8db40acc569cc7d8edf644556d)\n  - CPU capability usage: AVX512\n  - Build settings: BLAS_INFO=mkl, TORCH_VERSION=2.10.0, USE_CUDA=0,\n"
            Expect.equal (LibTorchInfo.Parse(text, "x")) (LibTorchInfo("2.10.0", "v3.7.1 (8d263e6)", "AVX512", "x")) "parsed"
            Expect.equal (LibTorchInfo.Parse("", "x")).TorchVersion "unknown" "absent"
        }
    ]

let check =
    testList "convolution check (float32 against float64)" [
        test "relative error and bitwise identity on constructed tensors" {
            use scope = torch.NewDisposeScope()
            let b = torch.tensor([| 3.0f; 4.0f |])
            Expect.floatClose Accuracy.veryHigh (ConvolutionCheck.RelativeError(torch.tensor([| 3.0f; 4.5f |]), b)) 0.1 "0.5 / 5"
            Expect.equal (ConvolutionCheck.RelativeError(torch.tensor([| nanf; 4.0f |]), b)) infinity "NaN is infinitely wrong"
            Expect.isTrue (ConvolutionCheck.SameBits(b, b.clone())) "a copy has the same bits"
            Expect.isFalse (ConvolutionCheck.SameBits(torch.tensor([| 0.0f |]), torch.tensor([| -0.0f |]))) "0 and -0 differ in bits"
            Expect.isTrue (ConvolutionCheck.SameBits(torch.tensor([| nanf |]), torch.tensor([| nanf |]))) "the same NaN has the same bits"
        }
        test "a dead probe is described by its last line that is not one of libtorch's warnings" {
            let nnpack = "[W1207 21:45:06.047995277 NNPACK.cpp:56] Could not initialize NNPACK! Reason: Unsupported hardware."
            Expect.equal (NumericsGuard.LastMessage $"{nnpack}\nfree(): invalid next size (fast)\n{nnpack}\n{nnpack}\n") "free(): invalid next size (fast)" "the allocator's message, not the warning after it"
            Expect.equal (NumericsGuard.LastMessage $"{nnpack}\n") nnpack "only warnings: the last one"
            Expect.equal (NumericsGuard.LastMessage "\n  \n") "" "nothing"
        }
        test "the kernels the guard chose for this process pass the check here" {
            let r = ConvolutionCheck.Run(NumericsGuard.Current.Backend)
            Expect.isTrue r.Passed (r.Summary())
            for c in r.Cases do Expect.isLessThanOrEqual c.WorstError 1e-5 $"{c.Case}: within rounding (measured ≤ 5e-7 on correct kernels)"
        }
        test "a simulated fault (one weight gradient scaled by 1.3, as a broken kernel would) fails the check, and says where" {
            let r = ConvolutionCheck.Run(NumericsGuard.Current.Backend, simulateFault = true)
            Expect.isFalse r.Passed "fails"
            Expect.floatClose Accuracy.medium r.Cases[0].WeightGrad 0.3 "the error of the scaled gradient"
            Expect.stringContains (r.Summary()) "failed (simulated fault): weight gradient off by 0.3" "says what is wrong"
            Expect.isTrue (r.Cases |> Seq.skip 1 |> Seq.forall (fun c -> c.Passed)) "only that case"
        }
        test "the cases cover 1x1 and 3x3, strides 1 and 2, both layouts and their mix, batch 1, tiny and real channel counts, and counts off the kernels' blocks of 8 and 16" {
            let cs = ConvolutionCheck.Cases
            Expect.containsAll (cs |> Seq.map (fun c -> c.Kernel) |> set) [ 1; 3 ] "kernels"
            Expect.containsAll (cs |> Seq.map (fun c -> c.Stride) |> set) [ 1; 2 ] "strides"
            Expect.containsAll (cs |> Seq.map (fun c -> c.InputChannelsLast, c.GradChannelsLast) |> set) [ (false, false); (true, true); (false, true); (true, false) ] "layouts"
            Expect.exists cs (fun c -> c.Batch = 1) "batch 1"
            Expect.exists cs (fun c -> c.In <= 2) "tiny"
            Expect.exists cs (fun c -> c.In >= 32) "real"
            // The Zen 5 fault of 2026-12-07 (oneDNN capped at AVX): 3x3 convolutions from more than 8 channels that are
            // not a multiple of 8, at both strides, and the default kernels' from a multiple of 8 that is not one of 16.
            for stride in [ 1; 2 ] do
                Expect.exists cs (fun c -> c.Kernel = 3 && c.Stride = stride && c.In > 8 && c.In % 8 <> 0) $"3x3/{stride} from a channel count above 8 and not a multiple of 8"
            Expect.exists cs (fun c -> c.Kernel = 3 && c.In % 16 = 8 && c.In > 8) "3x3 from a multiple of 8 that is not one of 16"
            Expect.exists cs (fun c -> c.Kernel = 3 && c.In < 8 && c.In > 4) "3x3 from 5-7 channels"
            Expect.exists cs (fun c -> c.Kernel = 1 && c.In > 8 && c.In % 8 <> 0) "1x1 from a channel count above 8 and not a multiple of 8"
        }
        test "default-nchw is checked on every case with its input NCHW, output gradients in both layouts" {
            let cs = ConvolutionCheck.CasesFor NumericsBackend.DefaultNchw
            Expect.isTrue (cs |> Seq.forall (fun c -> not c.InputChannelsLast)) "NCHW inputs only"
            Expect.containsAll (cs |> Seq.map (fun c -> c.GradChannelsLast) |> set) [ false; true ] "both gradient layouts"
            Expect.equal (cs |> Seq.map (fun c -> c.In, c.Out, c.Kernel, c.Stride, c.Side, c.Batch) |> set)
                (ConvolutionCheck.Cases |> Seq.map (fun c -> c.In, c.Out, c.Kernel, c.Stride, c.Side, c.Batch) |> set) "every shape"
            Expect.sequenceEqual (ConvolutionCheck.CasesFor NumericsBackend.Default) ConvolutionCheck.Cases "the others: every case"
        }
        test "default-nchw's layout hook: a network's convolutions see a channels-last input as NCHW, with the same values" {
            use scope = torch.NewDisposeScope()
            torch.manual_seed 3L |> ignore
            let options = EarlyExit.Models.ModelOptions(NumClasses = 10, InputShape = [| 3L; 12L; 12L |], BaseWidth = 4, Blocks = [| 1; 1 |], ExitPositions = [| 1; 2 |])
            use net = EarlyExit.Models.ModelRegistry.Create("resnet34", options)
            net.eval() |> ignore
            let convs = net.modules() |> Seq.choose (function :? TorchSharp.Modules.Conv2d as c -> Some c | _ -> None) |> List.ofSeq
            let seen = Collections.Generic.List<bool>()
            let removers = [ for c in convs -> c.register_forward_hook(fun _ input _ -> seen.Add(input.is_contiguous()); null) ]
            let x = torch.randn(2L, 3L, 12L, 12L)
            let cl = x.permute(0L, 2L, 3L, 1L).contiguous().permute(0L, 3L, 1L, 2L)
            Expect.isFalse (cl.is_contiguous()) "the input is channels-last"
            use _ = torch.no_grad()
            let before = net.forward(x)
            let hookedBefore = ConvolutionLayout.HookedCount
            ConvolutionLayout.Attach(net, always = true)
            ConvolutionLayout.Attach(net, always = true)
            Expect.equal (ConvolutionLayout.HookedCount - hookedBefore) (if ConvolutionLayout.NchwInputs then 0 else convs.Length) "each convolution hooked once"
            seen.Clear()
            let after = net.forward(cl)
            Expect.equal seen.Count convs.Length "every convolution ran"
            Expect.isTrue (seen |> Seq.forall id) "each saw a contiguous (NCHW) input"
            for a, b in Array.zip before after do
                Expect.isLessThanOrEqual (ConvolutionCheck.RelativeError(b, a)) 1e-5 "the same logits as on the NCHW input"
            for r in removers do r.remove()
        }
    ]

/// oneDNN#6035: the backward-weights of a strided 1x1 convolution of fewer channels than oneDNN's block, on a
/// channels-last input, writes past its workspace (aborts here on 2 threads); a network's such convolutions read NCHW.
let stridedPointwise =
    testList "strided 1x1 convolutions of few channels (oneDNN#6035)" [
        test "only they are hooked; they read NCHW inputs; weight gradients on channels-last inputs run, and match float64" {
            use scope = torch.NewDisposeScope()
            torch.manual_seed 11L |> ignore
            let m (c: TorchSharp.Modules.Conv2d) = c :> torch.nn.Module<torch.Tensor, torch.Tensor>
            // Without the hook, these twelve (batch 5, 14x14, 2 threads) aborted this AMD EPYC's process in 5 runs of 5
            // ("free(): invalid next size", segmentation faults); with it, 0 of 4.
            let small = [ for ic in [ 5L; 9L; 12L; 15L ] do for oc in [ 6L; 8L; 16L ] -> torch.nn.Conv2d(ic, oc, 1L, stride = 2L, bias = false) ]
            let wide = torch.nn.Conv2d(16L, 8L, 1L, stride = 2L, bias = false)
            let plain = torch.nn.Conv2d(8L, 8L, 3L, padding = 1L, bias = false)
            Expect.isTrue (small |> List.forall ConvolutionLayout.IsSmallStridedPointwise) "5-15 channels, 1x1, stride 2"
            Expect.isFalse (ConvolutionLayout.IsSmallStridedPointwise wide) "16 channels"
            Expect.isFalse (ConvolutionLayout.IsSmallStridedPointwise plain) "3x3"
            use net = torch.nn.Sequential([| for i, c in List.indexed (small @ [ wide; plain ]) -> string i, m c |])
            let before = ConvolutionLayout.HookedCount
            ConvolutionLayout.Attach(net)
            ConvolutionLayout.Attach(net)
            Expect.equal (ConvolutionLayout.HookedCount - before) (if ConvolutionLayout.NchwInputs then 14 else 12) "hooked once each: the small ones (all under a backend that needs NCHW)"
            let seen = Collections.Generic.List<bool>()
            let removers = [ for c in small -> c.register_forward_hook(fun _ input _ -> seen.Add(input.is_contiguous()); null) ]
            let input (c: TorchSharp.Modules.Conv2d) = ConvolutionLayout.ToChannelsLast(torch.randn(5L, c.in_channels, 14L, 14L))
            for _ in 1 .. 3 do
                for c in small do
                    use step = torch.NewDisposeScope()
                    c.zero_grad()
                    c.call(input c).square().sum().backward()
            for r in removers do r.remove()
            Expect.isTrue (seen.Count = 36 && Seq.forall id seen) "each read NCHW every time"
            // The weight gradient of one of them against float64.
            let c = small[4]
            let x = input c
            c.zero_grad()
            c.call(x).square().sum().backward()
            let w64 = c.weight.detach().to_type(torch.float64).requires_grad_(true)
            torch.nn.functional.conv2d(x.to_type torch.float64, w64, strides = [| 2L; 2L |]).square().sum().backward()
            Expect.isLessThanOrEqual (ConvolutionCheck.RelativeError(c.weight.grad, w64.grad)) 1e-4 "9 -> 8 channels: the weight gradient"
        }
    ]

/// The training layout (ConvolutionLayout.Training): what each setting makes a ResNet's convolutions see, and that the
/// layout changes nothing but the order of float sums.
let layout =
    testList "training layout (channels-last on 1 thread, and from 16 channels)" [
        test "the variable: auto, nchw, channels-last, and a clear error for anything else" {
            Expect.equal (ConvolutionLayout.ParseTraining null) TrainingLayout.Auto "unset"
            Expect.equal (ConvolutionLayout.ParseTraining " Auto ") TrainingLayout.Auto "auto"
            Expect.equal (ConvolutionLayout.ParseTraining "nchw") TrainingLayout.Nchw "nchw"
            Expect.equal (ConvolutionLayout.ParseTraining "channels-last") TrainingLayout.ChannelsLast "channels-last"
            let e = Expect.throwsC (fun () -> ConvolutionLayout.ParseTraining "nhcw" |> ignore) id
            Expect.stringContains e.Message "EARLYEXIT_TRAINING_LAYOUT=nhcw: use auto (the default), nchw or channels-last" "names the variable and the choices"
        }
        test "auto trains channels-last on 1 thread, on more from 16 channels, and never under kernels that need NCHW inputs" {
            let before, threads = ConvolutionLayout.Training, torch.get_num_threads()
            try
                let allowed = not ConvolutionLayout.NchwInputs
                ConvolutionLayout.Training <- TrainingLayout.Auto
                torch.set_num_threads 1
                Expect.equal (ConvolutionLayout.TrainsChannelsLast 8L) allowed "1 thread, 8 channels"
                Expect.stringContains ConvolutionLayout.TrainingStatus (if allowed then "(now 1 thread(s))" else "need NCHW inputs") "the status says so"
                torch.set_num_threads 2
                Expect.isFalse (ConvolutionLayout.TrainsChannelsLast 8L) "2 threads, 8 channels"
                Expect.isFalse (ConvolutionLayout.TrainsChannelsLast 15L) "2 threads, 15 channels"
                Expect.equal (ConvolutionLayout.TrainsChannelsLast 16L) allowed "2 threads, 16 channels"
                ConvolutionLayout.Training <- TrainingLayout.ChannelsLast
                Expect.equal (ConvolutionLayout.TrainsChannelsLast 8L) allowed "forced"
                ConvolutionLayout.Training <- TrainingLayout.Nchw
                torch.set_num_threads 1
                Expect.isFalse (ConvolutionLayout.TrainsChannelsLast 64L) "nchw"
            finally
                ConvolutionLayout.Training <- before
                torch.set_num_threads threads
        }
        test "auto on 2 threads: a ResNet of width 16 trains channels-last, one of width 8 NCHW" {
            use scope = torch.NewDisposeScope()
            let before, threads = ConvolutionLayout.Training, torch.get_num_threads()
            try
                ConvolutionLayout.Training <- TrainingLayout.Auto
                torch.set_num_threads 2
                for width, expected in [ 16, not ConvolutionLayout.NchwInputs; 8, false ] do
                    let options = EarlyExit.Models.ModelOptions(NumClasses = 10, InputShape = [| 1L; 8L; 8L |], BaseWidth = width, Blocks = [| 1; 1 |], ExitPositions = [| 1; 2 |])
                    use net = EarlyExit.Models.ModelRegistry.Create("resnet34", options)
                    net.train() |> ignore
                    let seen = Collections.Generic.List<bool>()
                    let convs = net.modules() |> Seq.choose (function :? TorchSharp.Modules.Conv2d as c -> Some c | _ -> None) |> List.ofSeq
                    let removers = [ for c in convs -> c.register_forward_hook(fun _ _ output -> seen.Add(ConvolutionLayout.IsChannelsLast output); null) ]
                    net.forward(torch.randn(3L, 1L, 8L, 8L)) |> ignore
                    for r in removers do r.remove()
                    Expect.equal (seen |> Seq.skip 1 |> Seq.forall id) expected $"width {width}: the blocks' convolutions write channels-last maps: {expected}"
                    Expect.isTrue (seen |> Seq.skip 1 |> Seq.forall ((=) expected)) $"width {width}: all of them alike"
            finally
                ConvolutionLayout.Training <- before
                torch.set_num_threads threads
        }
        test "a ResNet trained channels-last: its blocks see channels-last maps, with NCHW's loss and gradients; eval stays NCHW" {
            use scope = torch.NewDisposeScope()
            let before = ConvolutionLayout.Training
            try
                torch.manual_seed 5L |> ignore
                let options = EarlyExit.Models.ModelOptions(NumClasses = 10, InputShape = [| 3L; 12L; 12L |], BaseWidth = 4, Blocks = [| 1; 1 |], ExitPositions = [| 1; 2 |])
                use net = EarlyExit.Models.ModelRegistry.Create("resnet34", options)
                net.train() |> ignore
                let convs = net.modules() |> Seq.choose (function :? TorchSharp.Modules.Conv2d as c -> Some c | _ -> None) |> List.ofSeq
                let seen = Collections.Generic.List<bool>()
                let removers = [ for c in convs -> c.register_forward_hook(fun _ input output -> seen.Add(input.stride()[1] = 1L && ConvolutionLayout.IsChannelsLast output); null) ]
                let x = torch.randn(6L, 3L, 12L, 12L)
                let y = torch.tensor([| 0L; 1L; 2L; 3L; 4L; 5L |])
                let step layout =
                    ConvolutionLayout.Training <- layout
                    seen.Clear()
                    for p in net.parameters() do p.grad <- null
                    let loss = net.forward(x) |> Array.map (fun l -> torch.nn.functional.cross_entropy(l, y)) |> Array.reduce (+)
                    loss.backward()
                    loss.item<float32>(), [ for p in net.parameters() -> p.grad.clone() ], List.ofSeq seen
                // Batch norm in train mode updates its running statistics: both steps start from the same ones.
                let buffers = [ for b in net.buffers() -> b, b.clone() ]
                let lossN, gradsN, seenN = step TrainingLayout.Nchw
                for b, saved in buffers do b.copy_(saved) |> ignore
                let lossC, gradsC, seenC = step TrainingLayout.ChannelsLast
                Expect.isTrue (seenN |> List.forall not) "NCHW: no convolution sees a channels-last map"
                if ConvolutionLayout.NchwInputs then
                    Expect.isTrue (seenC |> List.forall not) "kernels that need NCHW inputs: never channels-last"
                else
                    Expect.isFalse seenC.Head "the stem reads the NCHW input"
                    Expect.isTrue (seenC.Tail |> List.forall id) $"every later convolution reads channels innermost (the strided shortcut a subsampled view) and writes a channels-last map: %A{seenC}"
                Expect.floatClose { absolute = 1e-5; relative = 1e-5 } (float lossC) (float lossN) "the same loss"
                for gn, gc in List.zip gradsN gradsC do
                    Expect.isLessThanOrEqual (ConvolutionCheck.RelativeError(gc, gn)) 1e-4 "the same gradients"
                net.eval() |> ignore
                seen.Clear()
                using (torch.no_grad()) (fun _ -> net.forward(x) |> ignore)
                Expect.isTrue (seen |> Seq.forall not) "eval mode: NCHW"
                for r in removers do r.remove()
            finally
                ConvolutionLayout.Training <- before
        }
    ]

/// Runs the CLI of this test's output folder with a private verdict cache and extra environment.
let private runCli (cache: string) (env: (string * string) list) (args: string list) =
    let psi = ProcessStartInfo("dotnet", Path.Combine(AppContext.BaseDirectory, "earlyexit.dll") :: args)
    psi.RedirectStandardOutput <- true
    psi.RedirectStandardError <- true
    psi.Environment["XDG_CACHE_HOME"] <- cache
    for k in [ NumericsGuard.Variable; NumericsGuard.SimulateVariable; "ONEDNN_MAX_CPU_ISA"; "DNNL_MAX_CPU_ISA"; NativeAllocator.Variable; "MALLOC_TOP_PAD_"; OneDnnCaches.Variable ] do psi.Environment.Remove k |> ignore
    // A fixed thread count: verdicts are cached per thread count, and the automatic choice follows the load (the
    // other tests of this suite run beside these), so two runs with auto threads may look for different verdicts.
    psi.Environment[TorchThreads.Variable] <- "2"
    for k, v in env do psi.Environment[k] <- v
    use p = Process.Start psi
    let out = p.StandardOutput.ReadToEndAsync()
    let err = p.StandardError.ReadToEnd()
    p.WaitForExit()
    p.ExitCode, out.Result, err

let private ladderHere () = NumericsBackend.Ladder(CpuInfo.Read()) |> names
/// Whether this process's own guard found the default kernels broken on this machine (then a simulated fault on them
/// may be preceded by the real one).
let private defaultBrokenHere () =
    NumericsGuard.Current.Checked |> Seq.exists (fun c -> c.Backend = "default" && not c.Passed)
let private oneDnnBackends () = ladderHere () |> List.filter (fun n -> n <> "no-onednn")

let guard =
    testList "the guard's switch, from the command line" [
        test "a fault on the default kernels: the guard says so in one line, switches to the next backend that passes, and caches the verdict" {
            use dir = new TempDir()
            let code, out, err = runCli dir.Path [ NumericsGuard.SimulateVariable, "default" ] [ "doctor" ]
            Expect.equal code 0 $"doctor succeeds:\n{out}{err}"
            let lines = err.Split('\n') |> Array.filter (fun l -> l.StartsWith "numerics:")
            Expect.equal lines.Length 1 $"one line on standard error:\n{err}"
            // The simulation scales a gradient of kernels that really run: where the default kernels are broken
            // (this process's own guard found so), their real failure or crash may come first, and is what to say.
            if defaultBrokenHere () then
                Expect.isTrue (lines[0].Contains "default: failed" || lines[0].Contains "default: crashed") $"what it found: {lines[0]}"
            else Expect.stringContains lines[0] "default: failed (simulated fault)" "what it found"
            let used = out.Split('\n') |> Array.find (fun l -> l.StartsWith "convolution kernels in use: ")
            let chosen = used.Substring("convolution kernels in use: ".Length).Split(' ')[0]
            Expect.notEqual chosen "default" "switched"
            Expect.contains (ladderHere ()) chosen "to a backend of this CPU's ladder"
            Expect.stringContains lines[0] $"using {chosen}" "what it chose"
            Expect.isNonEmpty (Directory.GetFiles(Path.Combine(dir.Path, "earlyexit", "numerics"), "*.json")) "verdict cached"
            let code2, out2, err2 = runCli dir.Path [ NumericsGuard.SimulateVariable, "default" ] [ "doctor" ]
            Expect.equal code2 0 "second run"
            Expect.stringContains out2 $"convolution kernels in use: {chosen}" "same choice"
            Expect.stringContains out2 "cached verdict" "from the cache"
            Expect.stringContains err2 "cached verdict" "and says so"
        }
        test "faults on every oneDNN backend: the guard turns oneDNN off" {
            use dir = new TempDir()
            let code, out, err = runCli dir.Path [ NumericsGuard.SimulateVariable, String.Join(",", oneDnnBackends ()) ] [ "doctor" ]
            Expect.equal code 0 $"doctor succeeds:\n{out}{err}"
            Expect.stringContains out "convolution kernels in use: no-onednn" "oneDNN off"
            for b in oneDnnBackends () do
                if b = "default" && defaultBrokenHere () then
                    Expect.isTrue (out.Contains "default: failed" || out.Contains "default: crashed") "default tried and failed"
                else Expect.stringContains out $"{b}: failed (simulated fault)" $"{b} tried and failed"
        }
        test "faults on every backend above oneDNN capped at SSE4.1: the guard times the fallbacks that pass and takes the fastest" {
            use dir = new TempDir()
            let above = ladderHere () |> List.filter (fun n -> n <> "onednn-sse41" && n <> "no-onednn")
            let code, out, err = runCli dir.Path [ NumericsGuard.SimulateVariable, String.Join(",", above) ] [ "doctor" ]
            Expect.equal code 0 $"doctor succeeds:\n{out}{err}"
            let row name = out.Split('\n') |> Array.find (fun l -> l.StartsWith $"  {name} ")
            let rate name =
                let m = Text.RegularExpressions.Regex.Match(row name, "trains at ([0-9]+) images/s")
                if m.Success then Some(float m.Groups[1].Value) else None
            let used = out.Split('\n') |> Array.find (fun l -> l.StartsWith "convolution kernels in use: ")
            let chosen = used.Substring("convolution kernels in use: ".Length).Split(' ')[0]
            if (row "onednn-sse41").Contains "passed" then
                // Two fallbacks pass: both timed, the faster kept, and the decision says so.
                let sse, off = rate "onednn-sse41", rate "no-onednn"
                Expect.isSome sse $"oneDNN at SSE4.1 timed:\n{out}"
                Expect.isSome off $"oneDNN off timed:\n{out}"
                let fastest = if sse.Value >= off.Value then "onednn-sse41" else "no-onednn"
                Expect.equal chosen fastest $"the faster of the two ({sse.Value} against {off.Value} images/s)"
                Expect.stringContains out $"of the fallbacks that pass, {chosen} trains fastest here" "the decision names it"
                Expect.stringContains err $"using {chosen}, the fastest backend that passes" "and the line on standard error"
            else
                // Where SSE4.1's kernels are really broken, oneDNN off passes alone, untimed.
                Expect.equal chosen "no-onednn" "the only fallback that passes"
                Expect.isNone (rate "no-onednn") "a lone fallback is not timed"
            for b in above do Expect.isNone (rate b) $"{b} failed: not timed"
        }
        test "a network check that fails with oneDNN on: oneDNN is switched off, the run trains and says why; one that fails without it stops the run" {
            // The guard's own cache (no recalibration), oneDNN capped at SSE4.1 forced (oneDNN on, on any x86 CPU).
            let cache = Path.GetDirectoryName(UserCache.Root())
            use dir = new TempDir()
            let env fault = [ NumericsGuard.Variable, "onednn-sse41"; NetworkCheck.SimulateVariable, fault ]
            let train out = [ "train"; "--strategy"; "joint"; "--scale"; "smoke"; "--out"; out ]
            let code, out, err = runCli cache (env "onednn") (train (dir.File "switched"))
            Expect.equal code 0 $"trains:\n{out}{err}"
            let lines = err.Split('\n') |> Array.filter (fun l -> l.Contains "oneDNN switched off in this process")
            Expect.equal lines.Length 1 $"one line says so:\n{err}"
            Expect.stringContains lines[0] "the network check of resnet34" "names the network"
            use doc = Text.Json.JsonDocument.Parse(File.ReadAllText(Path.Combine(dir.File "switched", "run.json")))
            let n = doc.RootElement.GetProperty "numerics"
            Expect.equal (n.GetProperty("kernels").GetString()) "no-onednn" "the run records the kernels it trained with"
            Expect.stringContains (n.GetProperty("decision").GetString()) "switched in this process from onednn-sse41" "and why"
            Expect.stringStarts (doc.RootElement.GetProperty("networkCheck").GetString()) "passed" "the check it passed"
            let code2, out2, err2 = runCli cache (env "always") (train (dir.File "stopped"))
            Expect.equal code2 1 $"stops:\n{out2}{err2}"
            Expect.stringContains err2 "does not compute correct gradients on this machine under no-onednn" "says what and under which kernels"
            Expect.isFalse (File.Exists(Path.Combine(dir.File "stopped", "run.json"))) "before anything is written"
        }
        test "no backend passes: exit code 1 and one message that lists what was tried and how to force one" {
            use dir = new TempDir()
            let code, out, err = runCli dir.Path [ NumericsGuard.SimulateVariable, String.Join(",", ladderHere ()) ] [ "doctor" ]
            Expect.equal code 1 $"exit code 1:\n{out}{err}"
            Expect.stringContains err "error: no convolution backend computes correct gradients on this machine" "says so"
            Expect.stringContains err "no-onednn: failed (simulated fault)" "lists what was tried"
            Expect.stringContains err NumericsGuard.Variable "how to force one"
        }
        test "--numerics forces a backend (and says what its check found); an unknown one is a usage error" {
            use dir = new TempDir()
            let code, out, err = runCli dir.Path [] [ "--numerics"; "no-onednn"; "doctor" ]
            Expect.equal code 0 $"doctor:\n{out}{err}"
            Expect.stringContains out "convolution kernels in use: no-onednn (forced by EARLYEXIT_NUMERICS=no-onednn)" "forced"
            Expect.stringContains err "numerics: no-onednn forced; its convolution check passed" "checked and reported"
            let code2, _, err2 = runCli dir.Path [ NumericsGuard.Variable, "bogus" ] [ "doctor" ]
            Expect.equal code2 2 "usage error"
            Expect.stringContains err2 "unknown numerics backend 'bogus'" "names it"
        }
        test "a backend reaches oneDNN: capped at SSE4.1 the convolutions run SSE4.1 kernels; with oneDNN off none runs" {
            let verbose = dict [ "ONEDNN_VERBOSE", "1" ] |> Collections.Generic.Dictionary
            let struct (code, out, err) = NumericsGuard.RunProbe([ "check"; "--backend"; "onednn-sse41" ], verbose)
            Expect.equal code 0 err
            Expect.stringContains out "isa:Intel SSE4.1" "oneDNN reports the capped ISA"
            let convs = out.Split('\n') |> Array.filter (fun l -> l.Contains "primitive,exec,cpu,convolution")
            Expect.isNonEmpty convs "oneDNN ran the convolutions"
            Expect.isTrue (convs |> Array.forall (fun l -> not (l.Contains "avx"))) "none with AVX kernels"
            let struct (code2, out2, err2) = NumericsGuard.RunProbe([ "check"; "--backend"; "no-onednn" ], verbose)
            Expect.equal code2 0 err2
            Expect.isFalse (out2.Contains "primitive,exec,cpu,convolution") "no oneDNN convolution"
            Expect.stringContains out2 "\"Backend\":\"no-onednn\"" "the check ran"
        }
        test "NNPACK that does not initialise on this CPU is switched off at load, and convolutions that ask for it log nothing" {
            // Batch-1 and one-thread 1x1 convolutions ask ATen for NNPACK; where it failed to initialise (an AMD EPYC
            // family 26 model 2), libtorch logged a warning at every one: ~150,000 lines in one test run.
            let available = LibTorchControls.NnpackAvailable()
            Expect.equal Nnpack.SwitchedOff (not available) "switched off exactly where unavailable"
            Expect.equal LibTorchControls.NnpackEnabled available "ATen's switch"
            Expect.stringContains (TorchNativeLoader.Describe(TorchNativeLoader.LoadNatives())) $"NNPACK: {Nnpack.Status}" "the loader's line says what it did"
            // oneDNN off: every convolution of the check (batch 1 among them) goes through ATen's choice of NNPACK.
            let struct (code, _, err) = NumericsGuard.RunProbe([ "check"; "--backend"; "no-onednn" ])
            Expect.equal code 0 err
            Expect.isFalse (err.Contains "NNPACK") $"no NNPACK warning (NNPACK here: {Nnpack.Status})"
        }
        test "the probe's throughput runs the backend and the threads it is asked for, not the cached verdict or the automatic count" {
            // Model code calls TorchNativeLoader.EnsureLoaded, which applied the automatic thread count and the cached
            // verdict over the probe's own (--threads 1 ran on 2 threads; "default" ran the cached backend's kernels).
            let verbose = dict [ "ONEDNN_VERBOSE", "1" ] |> Collections.Generic.Dictionary
            for threads in [ 1; 2 ] do
                let struct (code, out, err) = NumericsGuard.RunProbe([ "throughput"; "--backend"; "onednn-sse41"; "--threads"; string threads; "--steps"; "1" ], verbose)
                Expect.equal code 0 err
                let json = out.Split('\n') |> Array.findBack (fun l -> l.StartsWith "{")
                Expect.stringContains json $"\"threads\":{threads}," "the threads asked for"
                Expect.stringContains json "\"backend\":\"onednn-sse41\"" "the backend asked for"
                let convs = out.Split('\n') |> Array.filter (fun l -> l.Contains "primitive,exec,cpu,convolution")
                Expect.isNonEmpty convs "oneDNN ran the convolutions"
                Expect.isTrue (convs |> Array.forall (fun l -> not (l.Contains "avx"))) "with SSE4.1 kernels only"
            let struct (code, _, err) = NumericsGuard.RunProbe([ "throughput"; "--backend"; "default"; "--threads"; "0" ])
            Expect.equal code 2 "a bad thread count is a usage error"
            Expect.stringContains err "give a positive number of threads" "says what to give"
        }
    ]

/// The record oneDNN 3.7.1's Xbyak filled on the EPYC VM here (AuthenticAMD family 26 model 2 stepping 1, CPUID leaf
/// 0x8000001D all zeros), as 36 words read from libtorch_cpu's memory: flags, three topology words, ten cache sizes
/// (1, 1, 1 bytes), ten sharing counts (1, 1, 1), the level count (3), the AVX10 version, then model, family, stepping,
/// extended model and family, display family (26) and model (2).
let private emptyLeafRecord =
    [| 1592850431; -939684034; 50339854; 0; 1; 1; 1; 1; 1; 1; 0; 0; 0; 0; 0; 0; 0; 1; 1; 1; 0; 0; 0; 0; 0; 0; 0; 3; 0
       2; 15; 1; 0; 11; 26; 2 |]
let private zen5Leaf1 = 0x00B00F21u
let private bytesOf (words: int[]) = words |> Array.collect BitConverter.GetBytes

/// A minimal ELF64 file: a string table whose "foo" is the tail of "xfoo" (as linkers share tails), and a symbol
/// table with a function "xfoo", an object "foo" and an undefined "bar".
let private tinyElf () =
    let strtab = Text.Encoding.ASCII.GetBytes "\000xfoo\000bar\000"
    let symbol (name: int) (info: int) (shndx: int) (value: uint64) (size: uint64) =
        Array.concat [ BitConverter.GetBytes(uint32 name); [| byte info; 0uy |]; BitConverter.GetBytes(uint16 shndx)
                       BitConverter.GetBytes value; BitConverter.GetBytes size ]
    let symtab = Array.concat [ Array.zeroCreate 24; symbol 1 0x12 1 0x1000UL 10UL; symbol 2 0x01 1 0x2000UL 144UL; symbol 6 0x12 0 0UL 0UL ]
    let strOffset, symOffset = 64, 64 + strtab.Length
    let shoff = symOffset + symtab.Length
    let section (kind: uint32) (offset: int) (size: int) (link: uint32) (entsize: uint64) =
        Array.concat [ BitConverter.GetBytes 0u; BitConverter.GetBytes kind; Array.zeroCreate 16
                       BitConverter.GetBytes(uint64 offset); BitConverter.GetBytes(uint64 size); BitConverter.GetBytes link
                       BitConverter.GetBytes 0u; BitConverter.GetBytes 8UL; BitConverter.GetBytes entsize ]
    let header = Array.zeroCreate<byte> 64
    Array.blit [| 0x7fuy; byte 'E'; byte 'L'; byte 'F'; 2uy; 1uy; 1uy |] 0 header 0 7
    Array.blit (BitConverter.GetBytes(uint64 shoff)) 0 header 0x28 8
    Array.blit (BitConverter.GetBytes 64us) 0 header 0x3A 2
    Array.blit (BitConverter.GetBytes 3us) 0 header 0x3C 2
    Array.concat [ header; strtab; symtab; Array.zeroCreate 64; section 2u symOffset symtab.Length 2u 24UL; section 3u strOffset strtab.Length 0u 0UL ]

let caches =
    testList "oneDNN's cache sizes (a VM that hides them)" [
        test "Xbyak's identification words from CPUID leaf 1: this Zen 5, and an Intel Skylake" {
            Expect.equal (List.ofArray (OneDnnCaches.XbyakSignature(zen5Leaf1, false))) [ 2; 15; 1; 0; 11; 26; 2 ] "family 26 model 2 stepping 1"
            Expect.equal (List.ofArray (OneDnnCaches.XbyakSignature(0x00050654u, true))) [ 5; 6; 4; 5; 0; 6; 85 ] "family 6 model 85 stepping 4"
        }
        test "the 1-byte reading is found in the record as read on the VM, and nothing else is taken for it" {
            let signature = OneDnnCaches.XbyakSignature(zen5Leaf1, false)
            let found = OneDnnCaches.LocateEmptyLeafReading(bytesOf emptyLeafRecord, signature)
            Expect.isNotNull found "found"
            Expect.equal (found.LevelsOffset, found.Levels, List.ofArray found.Sizes, List.ofArray found.Sharing) (108, 3u, [ 1u; 1u; 1u ], [ 1u; 1u; 1u ]) "the level count at byte 108"
            // Real caches (48 KB, 1 MB, 32 MB shared by 8): nothing to correct.
            let real = Array.copy emptyLeafRecord
            real[7] <- 49152; real[8] <- 1048576; real[9] <- 33554432; real[19] <- 8
            Expect.isNull (OneDnnCaches.LocateEmptyLeafReading(bytesOf real, signature)) "real caches are left alone"
            Expect.isNull (OneDnnCaches.LocateEmptyLeafReading(bytesOf emptyLeafRecord, OneDnnCaches.XbyakSignature(0x00A00F11u, false))) "another processor's signature: not this record"
            Expect.isNull (OneDnnCaches.LocateEmptyLeafReading(bytesOf (Array.append emptyLeafRecord signature), signature)) "a signature seen twice: layout unknown"
            // An older Xbyak without the AVX10 word: the level count right before the identification.
            let older = Array.append emptyLeafRecord[.. 27] emptyLeafRecord[29 ..]
            let olderFound = OneDnnCaches.LocateEmptyLeafReading(bytesOf older, signature)
            Expect.isNotNull olderFound "found without the AVX10 word"
            Expect.equal olderFound.LevelsOffset 108 "the level count"
        }
        test "ELF symbols: exact names only (a shared string tail is not a match), undefined ones left out" {
            let elf = tinyElf ()
            let found = ElfSymbols.Find(elf, [| "foo"; "bar"; "baz" |])
            Expect.equal (found |> Seq.map (fun s -> s.Name, s.Value, s.Size, s.IsFunction, s.IsObject) |> List.ofSeq) [ "foo", 0x2000UL, 144UL, false, true ] "foo only"
            let x = ElfSymbols.Find(elf, [| "xfoo" |]) |> List.ofSeq
            Expect.equal (x |> List.map (fun s -> s.Name, s.Value, s.IsFunction)) [ "xfoo", 0x1000UL, true ] "xfoo, the function"
            Expect.throwsT<InvalidDataException> (fun () -> ElfSymbols.Find(Array.zeroCreate<byte> 128, [| "foo" |]) |> ignore) "not ELF"
        }
        test "the shipped libtorch_cpu lists oneDNN's CPU record and the function that fills it" {
            let dir = TorchNativeLoader.LoadNatives().NativeDirectory
            let lib = Path.Combine(dir, "libtorch_cpu.so")
            let found = ElfSymbols.Find(lib, [| "_ZN4dnnl4impl3cpu3x643cpuEv"; "_ZZN4dnnl4impl3cpu3x643cpuEvE4cpu_"; "_ZN2at13globalContextEv" |])
            let one name = found |> Seq.filter (fun s -> s.Name = name) |> List.ofSeq
            Expect.equal (one "_ZN4dnnl4impl3cpu3x643cpuEv" |> List.map (fun s -> s.IsFunction)) [ true ] "dnnl::impl::cpu::x64::cpu()"
            Expect.equal (one "_ZZN4dnnl4impl3cpu3x643cpuEvE4cpu_" |> List.map (fun s -> s.IsObject, s.Size >= 64UL)) [ true, true ] "its static record"
            Expect.equal (one "_ZN2at13globalContextEv").Length 1 "the exported anchor"
        }
        test "this process: corrected exactly where the CPU hides its caches, and the record says so" {
            match OneDnnCaches.ReadCpuid() |> Option.ofNullable with
            | Some c when c.Amd && c.LeafEmpty ->
                Expect.isTrue OneDnnCaches.Corrected OneDnnCaches.Status
                Expect.equal (OneDnnCaches.LevelsNow() |> Option.ofNullable) (Some 0) "no cache levels read: oneDNN's defaults"
                Expect.stringContains (TorchNativeLoader.Describe(TorchNativeLoader.LoadNatives())) $"oneDNN caches: {OneDnnCaches.Status}" "the loader's line says so"
            | _ ->
                Expect.isFalse OneDnnCaches.Corrected OneDnnCaches.Status
                Expect.isTrue (OneDnnCaches.Status.StartsWith "left alone" || OneDnnCaches.Status.StartsWith "not checked") OneDnnCaches.Status
        }
        test "from the command line: a bad setting is an error; as-read leaves the record (and, where the CPU hides its caches, the default kernels fail again)" {
            use dir = new TempDir()
            let code, _, err = runCli dir.Path [ OneDnnCaches.Variable, "bogus" ] [ "doctor" ]
            Expect.notEqual code 0 "refused"
            Expect.stringContains err $"{OneDnnCaches.Variable}=bogus: use auto (the default) or as-read" "says what to give"
            let code2, out2, err2 = runCli dir.Path [] [ "doctor" ]
            Expect.equal code2 0 err2
            Expect.stringContains out2 $"oneDNN's cache sizes: {OneDnnCaches.Status}" "doctor says what was done"
            if OneDnnCaches.Corrected then
                let code3, out3, err3 = runCli dir.Path [ OneDnnCaches.Variable, "as-read" ] [ "doctor" ]
                Expect.equal code3 0 err3
                Expect.stringContains out3 "oneDNN's cache sizes: left as read" "left as read"
                let used = out3.Split('\n') |> Array.find (fun l -> l.StartsWith "convolution kernels in use: ")
                Expect.isFalse (used.StartsWith "convolution kernels in use: default ") $"with 1-byte caches the default kernels fail the check here:\n{out3}{err3}"
        }
    ]

let allocator =
    testList "glibc malloc settings (page faults)" [
        test "this process runs with EarlyExit's settings, and getrusage counts the faults of fresh pages" {
            if isNull (Environment.GetEnvironmentVariable "MALLOC_TOP_PAD_") && isNull (Environment.GetEnvironmentVariable NativeAllocator.Variable) then
                Expect.isTrue NativeAllocator.Tuned NativeAllocator.Status
                Expect.stringContains NativeAllocator.Status "mmap threshold 32 MiB, trim threshold 2 GiB, top pad 256 MiB" "what was set"
            let before = NativeAllocator.MinorPageFaults()
            let pages = Runtime.InteropServices.Marshal.AllocHGlobal(64n <<< 20)
            for i in 0 .. 4096 .. (64 <<< 20) - 1 do Runtime.InteropServices.Marshal.WriteByte(pages, i, 1uy)
            let after = NativeAllocator.MinorPageFaults()
            Runtime.InteropServices.Marshal.FreeHGlobal pages
            Expect.isGreaterThanOrEqual (after - before) 8192L "64 MiB of fresh pages fault at least once per 2 pages (4 KiB pages, some huge)"
        }
        test "EARLYEXIT_MALLOC=system and the user's own MALLOC_ settings leave glibc alone; a bad value is a usage error" {
            use dir = new TempDir()
            let _, out, _ = runCli dir.Path [ NativeAllocator.Variable, "system" ] [ "doctor" ]
            Expect.stringContains out "allocator: glibc's defaults (EARLYEXIT_MALLOC=system)" "left alone"
            let _, out2, _ = runCli dir.Path [ "MALLOC_TOP_PAD_", "1048576" ] [ "doctor" ]
            Expect.stringContains out2 "allocator: the user's settings (MALLOC_TOP_PAD_); EarlyExit set nothing" "the user's choice"
            let _, out3, _ = runCli dir.Path [] [ "doctor" ]
            Expect.stringContains out3 "allocator: glibc malloc with mmap threshold 32 MiB" "set by default"
            let code, _, err = runCli dir.Path [ NativeAllocator.Variable, "jemalloc" ] [ "doctor" ]
            Expect.equal code 2 "usage error"
            Expect.stringContains err "EARLYEXIT_MALLOC=jemalloc: use tuned (the default) or system" "says what to use"
        }
    ]

let all = testList "numerics guard" [ ladder; libtorchInfo; check; stridedPointwise; layout; guard; caches; allocator ]
