/// Benchmarks as ratios measured side by side in one process (so they hold on a noisy machine), medians over
/// repeated runs, on the device that training would use (`EARLYEXIT_DEVICE`, or CUDA when present, else the CPU).
/// `dotnet run -c Release --project bench/EarlyExit.Bench -- [--quick | --smoke] [--only SECTIONS] [--out results/bench] [--numerics NAME]`
/// (`--smoke`: one repeat of a few steps, seconds; checks that every figure is produced, its numbers mean nothing.)
module EarlyExit.Bench.Program

open System
open System.Diagnostics
open System.IO
open System.Text.Json
open TorchSharp
open EarlyExit.Data
open EarlyExit.Inference
open EarlyExit.Losses
open EarlyExit.Models
open EarlyExit.Native
open EarlyExit.Regularisers
open EarlyExit.Training
open EarlyExit.Experiments.Recipes
open EarlyExit.Experiments.Runner
open EarlyExit.Experiments.Reports

type Figure =
    { Name: string
      Value: float
      Target: string
      /// None for a figure given for scale only (no target); else whether the median meets the target.
      Met: bool option
      /// For a figure measured in repeats: the 95% confidence interval of the repeats' geometric mean (Student t on
      /// the logs of the per-repeat ratios), low and high; None for a single measurement or a figure without a target.
      Ci95: float[] option
      /// How many repeats the figure is the median of (1 for a single measurement).
      Repeats: int
      /// "met" or "not met": for a figure measured in repeats, only where its whole 95% interval lies on one side of
      /// the target, and "inconclusive" where the interval spans it; for a single measurement, the median's; "–" without a target.
      Verdict: string
      Detail: string }

let median = EarlyExit.Experiments.Reports.Statistics.median

/// Where one batch-1 forward spends its time (µs, medians): the whole forward, its convolutions each timed alone at
/// their inputs in the network (summed, and how many), one trivial op; and the oneDNN build that ran them.
type LatencyProfile = { Forward: float; Convolutions: float; Count: int; Op: float; OneDnn: string }

/// Waits for queued GPU work so that a wall clock measures it (no-op on the CPU).
let sync (device: torch.Device) =
    if device.``type`` = DeviceType.CUDA then torch.cuda.synchronize device

/// Batches of every timed loop left out as warm-up (allocator and oneDNN caches fill on the first ones).
let warmupSteps = 2

/// Times the steps of a stage (the first `warmupSteps` excluded) through the loop's observer.
type StepClock(device: torch.Device) =
    let times = ResizeArray<float>()
    let clock = Stopwatch()
    member _.PerStepSeconds = if times.Count = 0 then nan else median (List.ofSeq times)
    interface ITrainingObserver with
        member _.OnStageStart(_, _, _) = clock.Restart()
        member _.OnBatch(_, _, batch, _, _) =
            sync device
            if batch >= warmupSteps then times.Add clock.Elapsed.TotalSeconds
            clock.Restart()

/// The cpu-scale ResNet of Table 1 (width 8, [2,2,2,2], exits after blocks 1,2,4,6,8) on Fashion-MNIST's shape.
let model (device: torch.Device) =
    torch.manual_seed 0L |> ignore
    let net = ModelRegistry.Create("resnet34", ModelOptions(NumClasses = 10, InputShape = [| 1L; 28L; 28L |], BaseWidth = 8, Blocks = [| 2; 2; 2; 2 |], ExitPositions = [| 1; 2; 4; 6; 8 |]))
    net.``to``(device) |> ignore
    net

/// Joint training of every exit (equal weights) for `epochs` epochs of `steps` steps; `augment`: crop, flip and
/// Mixup/CutMix, with a cosine schedule (plain tensors and a constant rate otherwise).
let basePlan (name: string) (m: int) (steps: int) (batch: int) (epochs: int) (augment: bool) =
    StagePlan(
        Name = name, LossExits = [| 1..m |], LossWeights = Array.create m (1.0 / float m),
        TrainableGroups = [| for k in 1..m do yield $"segment{k}"; yield $"head{k}" |],
        BatchSize = batch, MaxEpochs = epochs, MaxStepsPerEpoch = steps, CropPadding = (if augment then 2 else 0), HorizontalFlip = augment,
        Mix = (if augment then MixSettings() else null), Schedule = (if augment then LrSchedule.Cosine else LrSchedule.Constant),
        LearningRate = 1e-3, EvalBatchSize = 256)

/// The joint loss in plain TorchSharp (the mean of the exits' cross-entropies), as the bare loops and the PyTorch peer
/// compute it.
let bareJointLoss (logits: torch.Tensor[]) (y: torch.Tensor) =
    let m = logits.Length
    let mutable loss = torch.nn.functional.cross_entropy(logits[0], y) * (1.0 / float m)
    for e in 1 .. m - 1 do
        loss <- loss + torch.nn.functional.cross_entropy(logits[e], y) * (1.0 / float m)
    loss

/// A bare TorchSharp loop over the same data source, model, batch and optimiser: seconds per step. Like the
/// trainer, it reads the loss back every step (the trainer checks it for NaN); that is also what synchronises a GPU.
let bareLoop (net: MultiExitNetwork) (data: ImageDataset) (steps: int) (batch: int) (device: torch.Device) =
    use opt = torch.optim.AdamW(net.parameters(), lr = 1e-3)
    net.train() |> ignore
    let times = ResizeArray<float>()
    let clock = Stopwatch.StartNew()
    for s in 0 .. steps - 1 do
        use scope = torch.NewDisposeScope()
        let idx = [| for i in 0 .. batch - 1 -> (s * batch + i) % data.Count |]
        let x = data.Images(ReadOnlySpan idx, device)
        let y = data.LabelTensor(ReadOnlySpan idx, device)
        let logits = net.forward x
        let loss = bareJointLoss logits y
        loss.item<float32>() |> ignore
        opt.zero_grad()
        loss.backward()
        opt.step() |> ignore
        sync device
        if s >= warmupSteps then times.Add clock.Elapsed.TotalSeconds
        clock.Restart()
    median (List.ofSeq times)

/// A bare joint step split into its phases, as the PyTorch peer's `train` splits its own (medians in ms, the first
/// `warmupSteps` left out): forward with the loss; zero_grad and backward; AdamW's step and the loss read back. One fixed
/// random batch (as the peer's), so that data loading is in neither.
let stepPhases (net: MultiExitNetwork) (steps: int) (batch: int) (device: torch.Device) =
    use opt = torch.optim.AdamW(net.parameters(), lr = 1e-3)
    net.train() |> ignore
    torch.manual_seed 1L |> ignore
    use x = torch.randn([| int64 batch; 1L; 28L; 28L |], device = device)
    use y = torch.randint(0L, 10L, [| int64 batch |], device = device)
    let forward, backward, optimizer = ResizeArray<float>(), ResizeArray<float>(), ResizeArray<float>()
    for s in 0 .. warmupSteps + steps - 1 do
        use scope = torch.NewDisposeScope()
        let clock = Stopwatch.StartNew()
        let logits = net.forward x
        let loss = bareJointLoss logits y
        sync device
        let t1 = clock.Elapsed.TotalMilliseconds
        opt.zero_grad()
        loss.backward()
        sync device
        let t2 = clock.Elapsed.TotalMilliseconds
        opt.step() |> ignore
        loss.item<float32>() |> ignore
        let t3 = clock.Elapsed.TotalMilliseconds
        if s >= warmupSteps then
            forward.Add t1
            backward.Add(t2 - t1)
            optimizer.Add(t3 - t2)
    median (List.ofSeq forward), median (List.ofSeq backward), median (List.ofSeq optimizer)

let rssMiB () =
    use p = Process.GetCurrentProcess()
    p.Refresh()
    float p.WorkingSet64 / float (1 <<< 20)

let sections = [ "numerics"; "allocator"; "layout"; "threads"; "trainer"; "regularisers"; "fisher"; "inference"; "pipeline"; "memory"; "pytorch" ]

/// Debian's PyTorch (python3-torch 1.13), when /usr/bin/python3 can import it: its version line, else why not.
let pytorchPeer () =
    let python = "/usr/bin/python3"
    if not (File.Exists python) then Error "no /usr/bin/python3"
    else
        let psi = ProcessStartInfo(python, [| "-c"; "import torch; print(torch.__version__)" |], RedirectStandardOutput = true, RedirectStandardError = true)
        use p = Process.Start psi
        let out = p.StandardOutput.ReadToEnd().Trim()
        p.WaitForExit()
        if p.ExitCode = 0 then Ok(python, out) else Error "/usr/bin/python3 cannot import torch (apt-get install -y python3-torch libopenblas0-pthread)"

/// The last non-empty line of a process's output (what a failing one said last).
let lastLine (text: string) = text.Split('\n') |> Array.filter (fun l -> l.Trim() <> "") |> Array.tryLast |> Option.defaultValue ""

/// The last line of a standard output that is a JSON object: the answer of the peer and of the probe.
let lastJsonLine (out: string) = EarlyExit.Native.NumericsGuard.LastJsonLine out |> Option.ofObj

/// Runs the PyTorch peer (bench/pytorch/peer.py) with `env` added: its exit code, standard output and standard error.
let execPeer (python: string) (script: string) (args: string list) (env: (string * string) list) =
    let psi = ProcessStartInfo(python, RedirectStandardOutput = true, RedirectStandardError = true)
    psi.ArgumentList.Add script
    for a in args do psi.ArgumentList.Add a
    // The peer's own OpenMP pool sized like ours (libgomp reads it when it loads).
    psi.Environment["OMP_NUM_THREADS"] <- (match List.tryFindIndex ((=) "--threads") args with Some i -> args[i + 1] | None -> "1")
    for k, v in env do psi.Environment[k] <- v
    use p = Process.Start psi
    let err = p.StandardError.ReadToEndAsync()
    let out = p.StandardOutput.ReadToEnd()
    p.WaitForExit()
    p.ExitCode, out, err.Result

/// One measurement by the PyTorch peer: its JSON answer.
let runPeer (python: string) (script: string) (args: string list) =
    match execPeer python script args [] with
    | 0, out, _ when (lastJsonLine out).IsSome -> JsonDocument.Parse((lastJsonLine out).Value).RootElement.Clone()
    | code, _, err -> failwithf "the PyTorch peer failed (exit code %d): %s" code (lastLine err)

/// The PyTorch peer's whole standard output, with `env` added (its verbose lines, then its JSON answer).
let runPeerRaw (python: string) (script: string) (args: string list) (env: (string * string) list) =
    match execPeer python script args env with
    | 0, out, _ -> out
    | code, _, err -> failwithf "the PyTorch peer failed (exit code %d): %s" code (lastLine err)

/// oneDNN's own execution time per training step (ms) from `ONEDNN_VERBOSE=1` lines over `steps` steps: every
/// convolution primitive, and the backward-data of the strided ones with how many there are (distinct shapes) and the
/// implementations that ran them. Reads
/// oneDNN 3.x lines (`onednn_verbose,v1,primitive,exec,cpu,convolution,IMPL,PROP,...,TIME`) and MKL-DNN 2.x ones
/// (`onednn_verbose,exec,cpu,convolution,...`) alike.
let convolutionProfile (verbose: string) (steps: int) =
    let mutable all, strided = 0.0, 0.0
    let impls = Collections.Generic.SortedSet<string>()
    let shapes = Collections.Generic.HashSet<string>()
    for line in verbose.Split('\n') do
        let f = line.Trim().Split(',')
        match Array.tryFindIndex ((=) "exec") f with
        | Some i when f.Length > i + 4 && f[0].EndsWith "_verbose" && f[i + 2] = "convolution" ->
            match Double.TryParse(f[f.Length - 1], Globalization.NumberStyles.Float, Globalization.CultureInfo.InvariantCulture) with
            | true, ms ->
                all <- all + ms
                let shape = f |> Array.tryFind (fun x -> x.StartsWith "mb") |> Option.defaultValue ""
                if f[i + 4] = "backward_data" && (shape.Contains "sh2" || shape.Contains "sw2") then
                    strided <- strided + ms
                    shapes.Add shape |> ignore
                    impls.Add(f[i + 3]) |> ignore
            | _ -> ()
        | _ -> ()
    all / float steps, strided / float steps, $"{shapes.Count} convolutions, by " + (if impls.Count = 0 then "none" else String.Join(", ", impls))

/// Runs the probe's training-throughput mode under this process's kernels: images/s and minor page faults per step.
let probeThroughput (backend: string) (threads: string) (steps: int) (env: (string * string) list) =
    let struct (code, out, err) =
        NumericsGuard.RunProbe([ "throughput"; "--backend"; backend; "--threads"; string threads; "--steps"; string steps ], dict env |> Collections.Generic.Dictionary)
    match code, lastJsonLine out with
    | 0, Some line ->
        use doc = JsonDocument.Parse line
        Ok(doc.RootElement.GetProperty("imagesPerSecond").GetDouble(), doc.RootElement.GetProperty("minorFaultsPerStep").GetDouble())
    | _ -> Error($"exit code {code}: " + lastLine err)

let usage = """EarlyExit benchmarks: ratios timed side by side in one process, medians over repeats.

usage: dotnet run -c Release --project bench/EarlyExit.Bench -- [--quick | --smoke] [--only SECTIONS] [--out DIR] [--numerics NAME]

  --quick            fewer steps and 5 repeats (a few minutes here); the default is 9 repeats (21-38 minutes here)
  --smoke            one repeat of a few steps (seconds): checks that every figure is produced; its numbers mean nothing
  --only SECTIONS    comma-separated subset of: numerics, allocator, layout, threads, trainer, regularisers, fisher, inference, pipeline, memory, pytorch
                     (a partial run writes nothing)
  --out DIR          where bench.md and bench.json go (default results/bench)
  --numerics NAME    force the convolution kernels of this process (default: what the numerics check chose)
  --help             this text
"""

[<EntryPoint>]
let main argv =
    if argv |> Array.exists (fun a -> a = "--help" || a = "-h") then
        printf "%s" usage
        exit 0
    let flags = set [ "--smoke"; "--quick" ]
    let valued = set [ "--out"; "--only"; "--numerics" ]
    let rec check =
        function
        | [] -> ()
        | (a: string) :: rest when flags.Contains a -> check rest
        | a :: _ :: rest when valued.Contains a -> check rest
        | [ a ] when valued.Contains a -> eprintfn "error: missing value after %s" a; exit 2
        | a :: _ -> eprintfn "error: unknown argument '%s'\n\n%s" a usage; exit 2
    check (List.ofArray argv)
    let smoke = Array.contains "--smoke" argv
    let quick = smoke || Array.contains "--quick" argv
    let argAfter name = Array.tryFindIndex ((=) name) argv |> Option.filter (fun i -> i + 1 < argv.Length) |> Option.map (fun i -> argv[i + 1])
    let outDir = argAfter "--out" |> Option.defaultValue (Path.Combine("results", "bench"))
    let only = argAfter "--only" |> Option.map (fun s -> s.Split(',', StringSplitOptions.RemoveEmptyEntries ||| StringSplitOptions.TrimEntries) |> Set.ofArray)
    match only |> Option.map (fun o -> Set.difference o (set sections)) with
    | Some unknown when not unknown.IsEmpty ->
        eprintfn "error: unknown section(s) %s; known: %s" (String.Join(", ", unknown)) (String.Join(", ", sections))
        exit 2
    | _ -> ()
    let runs name = match only with
                    | None -> true
                    | Some o -> o.Contains name
    argAfter "--numerics" |> Option.iter (fun b -> NumericsGuard.Requested <- b)
    let loader =
        try TorchNativeLoader.EnsureLoaded()
        with
        | :? TorchUnavailableException | :? NumericsException | :? ArgumentException as e ->
            eprintfn "error: %s" e.Message
            exit 1
    let device = Devices.Choose()
    let repeats = if smoke then 1 elif quick then 5 else 9
    let steps = warmupSteps + (if smoke then 2 elif quick then 16 else 30)
    let batch = 128
    let log (s: string) = Console.Out.WriteLine s
    let kind = if smoke then "smoke" elif quick then "quick" else "full"
    log $"EarlyExit benchmarks ({kind}): {Devices.Describe device}; natives {TorchNativeLoader.Describe loader}"
    let numerics = Provenance.numericsRecord ()
    log $"numerics: {numerics.summary}"
    let splits = DataCatalog.Load("fashion-mnist")
    let train = splits.Train.Take(6000, 0)
    let data = DataSplits(train, splits.Validation.Take(256, 0), splits.Test.Take(2000, 0), splits.Source)
    let figures = ResizeArray<Figure>()
    let add name value (target: string) met detail =
        figures.Add { Name = name; Value = value; Target = target; Met = Some met; Ci95 = None; Repeats = 1; Verdict = (if met then "met" else "not met"); Detail = detail }
        log $"  {name}: {value:F3} (target {target}) {detail}"
    /// A figure measured as one ratio per repeat against a bound (`atMost`: the ratio must not exceed it): the median,
    /// and the verdict from the 95% interval of the repeats (`repeatedVerdict`).
    let addRepeats name (ratios: float list) (bound: float) (atMost: bool) (target: string) detail =
        let value = median ratios
        let meets v = if atMost then v <= bound else v >= bound
        let ci = EarlyExit.Experiments.Reports.Statistics.ratioInterval ratios
        let verdict = EarlyExit.Experiments.Reports.Statistics.repeatedVerdict meets value ci
        figures.Add { Name = name; Value = value; Target = target; Met = Some (meets value); Ci95 = ci; Repeats = ratios.Length; Verdict = verdict; Detail = detail }
        let interval = match ci with
                       | Some [| lo; hi |] -> $"95%% CI {lo:F3}-{hi:F3} over {ratios.Length} repeats: "
                       | _ -> ""
        log $"  {name}: {value:F3} (target {target}; {interval}{verdict}) {detail}"
    let info name value detail =
        figures.Add { Name = name; Value = value; Target = "–"; Met = None; Ci95 = None; Repeats = 1; Verdict = "–"; Detail = detail }
        log $"  {name}: {value:F3} {detail}"

    // 0. Training throughput under every convolution backend of this CPU, each in a fresh probe process (oneDNN
    // fixes its instruction set when it first runs), beside what the numerics check found for each: the cost of the
    // kernels the guard chose, measured where it runs.
    if runs "numerics" && device.``type`` = DeviceType.CPU then
        // A fresh check of every backend (seconds) except at smoke size, which reuses this process's verdict.
        let verdicts = if smoke then NumericsGuard.Current.Checked else NumericsGuard.Recheck(true).Checked
        let stepsN = if smoke then 1 elif quick then 8 else 16
        let threads = torch.get_num_threads()
        for backend in NumericsBackend.Ladder(CpuInfo.Read()) do
            let check = verdicts |> Seq.tryFind (fun v -> v.Backend = backend.Name)
            let outcome = match check with
                          | Some v -> v.Outcome
                          | None -> "not checked"
            let chosen = if backend.Name = numerics.kernels then "; the kernels in use" else ""
            match probeThroughput backend.Name (string threads) stepsN [] with
            | Ok (ips, _) ->
                info $"training images/s with {backend.Name} kernels" ips $"(cpu-scale ResNet, batch 128, {threads} thread(s), median of {stepsN} steps; check {outcome}{chosen})"
            | Error e ->
                info $"training images/s with {backend.Name} kernels" nan $"(the probe process died, {e}; check {outcome}{chosen})"

    // 0b. The allocator: glibc's defaults against EarlyExit's settings (NativeAllocator), each in a fresh probe process
    // (they are read when a process starts), alternating, at this process's thread count and kernels.
    if runs "allocator" && device.``type`` = DeviceType.CPU then
        let threads = torch.get_num_threads()
        let stepsA = if smoke then 2 elif quick then 10 else 20
        let pairs =
            [ for r in 1..repeats ->
                let system () = probeThroughput numerics.kernels (string threads) stepsA [ NativeAllocator.Variable, "system" ]
                let tuned () = probeThroughput numerics.kernels (string threads) stepsA [ NativeAllocator.Variable, "tuned" ]
                let s, t = if r % 2 = 1 then (let s = system () in s, tuned ()) else (let t = tuned () in system (), t)
                match s, t with
                | Ok s, Ok t -> Some(s, t)
                | _ -> None ]
            |> List.choose id
        if pairs.IsEmpty then
            info "minor page faults per training step: glibc's defaults / EarlyExit's settings" nan "(a probe process failed)"
            info "training images/s: EarlyExit's allocator settings / glibc's defaults" nan "(a probe process failed)"
        else
            let faults = median (pairs |> List.map (fun ((_, fs), (_, ft)) -> fs / max ft 1.0))
            let speed = median (pairs |> List.map (fun ((is, _), (it, _)) -> it / is))
            let each f = pairs |> List.map f |> List.map (sprintf "%.0f") |> String.concat " "
            info "minor page faults per training step: glibc's defaults / EarlyExit's settings" faults
                $"(glibc's defaults: {each (fun ((_, f), _) -> f)}; EarlyExit's: {each (fun (_, (_, f)) -> f)}; cpu-scale ResNet, batch 128, {threads} thread(s), {numerics.kernels} kernels)"
            let ratios = pairs |> List.map (fun ((is, _), (it, _)) -> sprintf "%.2f" (it / is)) |> String.concat " "
            info "training images/s: EarlyExit's allocator settings / glibc's defaults" speed
                $"(glibc's defaults: {each (fun ((i, _), _) -> i)}; EarlyExit's: {each (fun (_, (i, _)) -> i)} images/s; runs {ratios})"

    // 0b'. The training layout (ConvolutionLayout.Training): channels-last against NCHW, each in a fresh probe process,
    // alternating, on 1 thread (where auto trains channels-last) and on all cores (where it trains NCHW).
    if runs "layout" && device.``type`` = DeviceType.CPU then
        let cores = Environment.ProcessorCount
        let stepsL = if smoke then 2 elif quick then 20 else 30
        for t in List.distinct [ 1; cores ] do
            let pairs =
                [ for r in 1..repeats ->
                    let run layout = probeThroughput numerics.kernels (string t) stepsL [ ConvolutionLayout.TrainingVariable, layout ]
                    let n, c = if r % 2 = 1 then (let n = run "nchw" in n, run "channels-last") else (let c = run "channels-last" in run "nchw", c)
                    match n, c with
                    | Ok (n, _), Ok (c, _) -> Some(n, c)
                    | _ -> None ]
                |> List.choose id
            let name = $"training images/s on {t} thread(s): channels-last / NCHW"
            if pairs.IsEmpty then info name nan "(a probe process failed)"
            else
                let ratios = pairs |> List.map (fun (n, c) -> c / n)
                let each f = pairs |> List.map f |> List.map (sprintf "%.0f") |> String.concat " "
                let autoPicks = if t = 1 then "channels-last" else "NCHW"
                let detail = $"(cpu-scale ResNet, batch 128, {numerics.kernels} kernels, median of {stepsL} steps per run; NCHW: {each fst}; channels-last: {each snd} images/s; auto trains {autoPicks} here)"
                // The verdict says whether auto's choice is the faster one on this machine.
                if t = 1 then addRepeats name ratios 1.0 false ">= 1.0 (auto's choice)" detail
                else addRepeats name ratios 1.0 true "<= 1.0 (auto's choice)" detail

    // 0c. Threads: N one-thread runs at once against one run on N threads (the executor's default against one big run),
    // and the slowdown of a run with the default thread choice (auto) beside a busy process; each in probe processes.
    if runs "threads" && device.``type`` = DeviceType.CPU then
        let cores = Environment.ProcessorCount
        let stepsT = if smoke then 2 elif quick then 8 else 16
        let rounds = if smoke then 1 else min repeats 3
        let ips r = match r with
                    | Ok (i, _) -> i
                    | Error _ -> nan
        let one threads env = ips (probeThroughput numerics.kernels threads stepsT env)
        let together () =
            [ for _ in 1..cores -> Threading.Tasks.Task.Run(fun () -> one "1" []) ] |> List.sumBy (fun t -> t.Result)
        let busyProcess () =
            let p = Process.Start(ProcessStartInfo("sh", [| "-c"; "while :; do :; done" |]))
            Threading.Thread.Sleep 500
            p
        let parallelRatios = [ for _ in 1..rounds -> let single = one (string cores) [] in together () / single ]
        let slowdowns, fixedSlowdowns =
            [ for _ in 1..rounds ->
                let alone, aloneFixed = one "auto" [], one (string cores) []
                use busy = busyProcess ()
                let beside, besideFixed =
                    try one "auto" [], one (string cores) []
                    finally busy.Kill true
                alone / beside, aloneFixed / besideFixed ] |> List.unzip
        let each xs = xs |> List.map (sprintf "%.2f") |> String.concat " "
        addRepeats $"throughput of {cores} one-thread runs at once / one run on {cores} threads" parallelRatios 1.5 false ">= 1.5"
            $"(the executor's default; cpu-scale ResNet, batch 128, {numerics.kernels} kernels; runs {each parallelRatios})"
        addRepeats "slowdown of a training run beside a busy process, default threads (auto)" slowdowns 2.0 true "<= 2"
            $"(alone / beside one process spinning on a core; auto takes the cores minus the runnable processes at start; runs {each slowdowns})"
        info $"slowdown of a training run beside a busy process, fixed at {cores} threads" (median fixedSlowdowns) $"(OpenMP threads wait for a sibling the busy process descheduled; runs {each fixedSlowdowns})"

    // 1. Trainer step vs a bare loop, in alternating order (so that drift in machine load favours neither).
    if runs "trainer" then
        let trainerFaults = ResizeArray<float>()
        let trainerVsBare =
            [ for r in 1..repeats ->
                let bare () =
                    use netA = model device
                    bareLoop netA data.Train steps batch device
                let trainer () =
                    use netB = model device
                    use regs = new RegulariserSet()
                    let clock = StepClock device
                    let faults = NativeAllocator.MinorPageFaults()
                    StageTrainer.Run(netB, basePlan "joint" netB.ExitCount steps batch 1 false, data, regs, device, clock) |> ignore
                    trainerFaults.Add(float (NativeAllocator.MinorPageFaults() - faults) / float steps)
                    clock.PerStepSeconds
                if r % 2 = 1 then
                    let b = bare ()
                    b / trainer ()
                else
                    let t = trainer ()
                    bare () / t ]
        let each = trainerVsBare |> List.map (fun v -> v.ToString "F2") |> String.concat " "
        addRepeats "trainer step throughput / bare TorchSharp loop" trainerVsBare 0.95 false ">= 0.95" $"(joint, batch {batch}, AdamW; runs {each})"
        info "minor page faults per trainer step (this process)" (median (List.ofSeq trainerFaults))
            $"(includes the stage's validation pass; allocator: {NativeAllocator.Status})"

    // 2-4. Sequential stage μ = M with EWC, with LwF, and plain; the Fisher against a training pass.
    use net = model device
    let m = net.ExitCount
    // The state stage μ = M reads: EWC's Fisher of exits 1..M−1 and the anchor, and LwF teachers under each policy
    // (per-exit: one per earlier exit; previous-stage: the one of exit M−1). The two sets share the EWC regulariser.
    let ewcReg = RegulariserRegistry.Create("ewc") :?> EwcRegulariser
    let lwfPerExit = RegulariserRegistry.Create("lwf", readOnlyDict [ "teachers", "per-exit" ]) :?> LwfRegulariser
    let lwfPrevious = RegulariserRegistry.Create("lwf", readOnlyDict [ "teachers", "previous-stage" ]) :?> LwfRegulariser
    use regsPerExit = new RegulariserSet([ ewcReg :> IRegulariser; lwfPerExit ])
    use regsPrevious = new RegulariserSet([ ewcReg :> IRegulariser; lwfPrevious ])
    let needsStage = runs "regularisers" || runs "fisher" || runs "pipeline"
    if needsStage then
        for nu in 1 .. m - 1 do
            let f = FisherInformation.Compute(net, nu, data.Train, FisherEstimator.PerSampleEmpirical, 512, 128, 0, device)
            ewcReg.State.Accumulate(nu, f)
            for t in f.Values do t.Dispose()
            lwfPerExit.Teachers[nu] <- net.FrozenCopy()
        lwfPrevious.Teachers[m - 1] <- net.FrozenCopy()
        ewcReg.State.SetAnchor net
    /// Stage μ = M of a sequential recipe, `stepsPerEpoch` steps, with or without EWC and LwF.
    let stagePlanOf (stepsPerEpoch: int) (lambda: float) (rho: float) (teachers: LwfTeacherPolicy) =
        let heads = if rho > 0.0 then [| for k in 1..m -> $"head{k}" |] else [| $"head{m}" |]
        let groups = Array.append [| for k in 1..m -> $"segment{k}" |] heads
        let uses = [| if lambda > 0.0 then RegulariserUse("ewc", lambda)
                      if rho > 0.0 then RegulariserUse("lwf", rho) |]
        StagePlan(
            Name = "seq", LossExits = [| m |], LossWeights = [| 1.0 |],
            TrainableGroups = groups,
            Regularisers = uses, StageExit = m, ProtectedExits = [| 1 .. m - 1 |],
            BatchSize = batch, MaxEpochs = 1, MaxStepsPerEpoch = stepsPerEpoch, CropPadding = 0, HorizontalFlip = false,
            Schedule = LrSchedule.Constant, LearningRate = 1e-4, EvalBatchSize = 256),
        teachers
    let stagePlan = stagePlanOf steps
    let stepOf (plan: StagePlan, teachers: LwfTeacherPolicy) =
        let clock = StepClock device
        let snapshot = net.state_dict() |> Seq.map (fun kv -> kv.Key, kv.Value.clone()) |> Seq.toList
        let regs = if teachers = LwfTeacherPolicy.PerExit then regsPerExit else regsPrevious
        StageTrainer.Run(net, plan, data, regs, device, clock) |> ignore
        use _ = torch.no_grad()
        let sd = net.state_dict()
        for (k, v) in snapshot do
            sd[k].copy_(v) |> ignore
            v.Dispose()
        clock.PerStepSeconds
    let plainRuns = ResizeArray<float>()
    if runs "regularisers" then
        // The per-exit teachers' forwards alone (eval mode, no gradients, one batch): what LwF must add to a step.
        let teacherForwardSeconds () =
            use _ = torch.no_grad()
            use x = data.Train.Images(ReadOnlySpan [| 0 .. batch - 1 |], device)
            let once () =
                use scope = torch.NewDisposeScope()
                for nu in 1 .. m - 1 do lwfPerExit.Teachers[nu].ForwardExit(x, nu) |> ignore
                sync device
            once ()
            median [ for _ in 1..5 -> (let c = Stopwatch.StartNew() in once (); c.Elapsed.TotalSeconds) ]
        let teacherRuns = ResizeArray<float>()
        let runsOf =
            [ for _ in 1..repeats ->
                let plain = stepOf (stagePlan 0.0 0.0 LwfTeacherPolicy.PerExit)
                plainRuns.Add plain
                let lwf = stepOf (stagePlan 0.0 0.7 LwfTeacherPolicy.PerExit)
                teacherRuns.Add(lwf / (plain + teacherForwardSeconds ()))
                plain,
                stepOf (stagePlan 100.0 0.0 LwfTeacherPolicy.PerExit),
                lwf,
                stepOf (stagePlan 0.0 0.7 LwfTeacherPolicy.PreviousStage) ]
        let ratiosOf pick = runsOf |> List.map (fun (a, e, l, p) -> pick (e, l, p) / a)
        addRepeats "sequential + EWC step / plain step" (ratiosOf (fun (e, _, _) -> e)) 1.10 true "<= 1.10" $"(stage μ={m}, {m - 1} protected exits)"
        // What the per-exit teachers cost by MACs: Σ_ν (cost up to exit ν) against a training step (≈ 3 forward passes).
        let cost = EarlyExit.Flops.MacCounter.Count net
        let cum = cost.Exits |> Seq.map (fun e -> float e.CumulativeMacs) |> Seq.toArray
        let teacherForwards = (Array.sum cum[.. m - 2]) / cum[m - 1]
        // The floor by MACs: a step (≈ 3 forward passes) plus the teachers' forwards. The target is within 5% of it.
        let floor = 1.0 + teacherForwards / 3.0
        addRepeats "sequential + LwF step, per-exit teachers (the paper's definition) / plain step" (ratiosOf (fun (_, l, _) -> l)) (1.05 * floor) true $"<= {1.05 * floor:F3} (5%% above its MACs floor)"
            $"(by MACs: the {m - 1} teacher forwards cost {teacherForwards:F2} full forwards and a training step about 3, so a floor of {floor:F2} before the earlier heads' own gradients)"
        let teacherEach = teacherRuns |> Seq.map (fun v -> v.ToString "F2") |> String.concat " "
        info "sequential + LwF step, per-exit teachers / (plain step + the teachers' forwards, timed)" (median (List.ofSeq teacherRuns))
            $"(what is left above 1: the earlier exits' heads forward and backward, their gradients through the backbone, and the KL terms; runs {teacherEach})"
        addRepeats "sequential + LwF step, one previous-stage teacher (--lwf-teachers previous-stage) / plain step" (ratiosOf (fun (_, _, p) -> p)) 1.5 true "<= 1.5"
            $"(one teacher forward up to exit {m - 1})"

    let plainStep () =
        if plainRuns.Count = 0 then
            for _ in 1..repeats do plainRuns.Add(stepOf (stagePlan 0.0 0.0 LwfTeacherPolicy.PerExit))
        median (List.ofSeq plainRuns)

    if runs "fisher" then
        let n = if smoke then 128 elif quick then 512 else 2048
        // Side by side: a training pass over N samples (the plain sequential step, N / batch steps), then the Fisher
        // of the same network over N samples; one ratio per repeat.
        let trainingPass () =
            stepOf (stagePlanOf (warmupSteps + n / batch) 0.0 0.0 LwfTeacherPolicy.PerExit) * float n / float batch
        let fisher (estimator: FisherEstimator) (samples: int) =
            let clock = Stopwatch.StartNew()
            let f = FisherInformation.Compute(net, m, data.Train, estimator, samples, 128, 1, device)
            sync device
            let t = clock.Elapsed.TotalSeconds
            for v in f.Values do v.Dispose()
            t
        let pairs = [ for _ in 1..repeats -> let pass = trainingPass () in pass, fisher FisherEstimator.PerSampleEmpirical n ]
        let pass = median (pairs |> List.map fst)
        addRepeats "per-sample Fisher over N samples / one training pass over N" (pairs |> List.map (fun (pass, f) -> f / pass)) 3.0 true "<= 3" $"(N = {n}; training pass {pass:F2} s)"
        let naiveN = if smoke then 8 else 64
        let naive = fisher FisherEstimator.PerSampleEmpiricalNaive naiveN / float naiveN * float n
        info "for scale: one backward pass per sample / one training pass" (naive / trainingPass ()) $"(the naive oracle, extrapolated from {naiveN} samples)"
        // The other importance estimators on the same samples, each against the empirical Fisher, side by side.
        let mas () =
            let clock = Stopwatch.StartNew()
            let f = EarlyExit.Regularisers.MasRegulariser.Compute(net, m, data.Train, n, 128, 1, device)
            sync device
            let t = clock.Elapsed.TotalSeconds
            for v in f.Values do v.Dispose()
            t
        let classes = data.Train.NumClasses
        for label, other, expected in
            [ "exact Fisher", (fun () -> fisher FisherEstimator.Exact n), $"C = {classes} gradient passes per batch: about {classes}x by construction"
              "sampled Fisher", (fun () -> fisher FisherEstimator.Sampled n), "one more forward pass to draw the labels"
              "MAS importances", mas, "the same passes, |g| instead of g²" ] do
            let ratios = [ for _ in 1..repeats -> let e = fisher FisherEstimator.PerSampleEmpirical n in other () / e ]
            info $"{label} / empirical Fisher (time, N samples)" (median ratios) $"(N = {n}; {expected})"

    // 5. Early-exit inference at the threshold where about half the test samples leave early (timing needs no training).
    if runs "inference" then
        net.eval() |> ignore
        let cost = EarlyExit.Flops.MacCounter.Count net
        let exitMacs = cost.Exits |> Seq.map (fun e -> e.CumulativeMacs) |> Seq.toArray
        let outputs =
            use logits = Evaluator.CollectLogits(net, data.Test, 256, device)
            EarlyExit.Experiments.Evaluation.RunFolder.outputsOfLogits logits data.Test.Labels exitMacs cost.BackboneMacs
        let sweep = EarlyExit.Experiments.Evaluation.Budget.sweep outputs (EarlyExit.Experiments.Evaluation.Budget.thresholds 100)
        let half = sweep |> Array.minBy (fun p -> abs (1.0 - p.ExitRatios[m - 1] - 0.5))
        let samples = if smoke then 64 elif quick then 512 else 1024
        use images = data.Test.Images(ReadOnlySpan [| 0 .. samples - 1 |], device)
        let threads = torch.get_num_threads()
        let threadNote () = if device.``type`` = DeviceType.CUDA then "" else $"; {torch.get_num_threads()} CPU thread(s)"
        for b in [ 1; 64 ] do
            // One sample at a time runs about twice as fast on one thread as on two here (thread wake-ups per op
            // outweigh the split work), so batch 1 is timed as it would be deployed: on one thread.
            torch.set_num_threads(if b = 1 then 1 else threads)
            // Latency of every exit at this batch size, without early exit (segments and heads 1..μ): what the exits
            // cost on this machine, where MACs of shallow layers (few channels, large maps) run slower than deep ones.
            // Timed again in every repeat, beside that repeat's early-exit run, so that a change in machine speed
            // between the two (runs of this VM drift by 2x over minutes on 2 threads) moves both.
            // One forward (ms) of network n up to exit μ on the first b images.
            let forwardOnce (n: EarlyExit.Models.MultiExitNetwork) mu =
                use _ = torch.no_grad()
                use scope = torch.NewDisposeScope()
                let c = Stopwatch.StartNew()
                n.ForwardUpTo(images.narrow(0L, 0L, int64 b), mu) |> ignore
                sync device
                c.Elapsed.TotalMilliseconds
            // The median time (ms) of `timings` forwards of network n up to exit μ, after 3 warm-ups.
            let forwardMs n mu timings =
                for _ in 1..3 do forwardOnce n mu |> ignore
                median [ for _ in 1..timings -> forwardOnce n mu ]
            // Every exit's median latency, timed round-robin (each round times every exit once), so that a change in
            // machine speed during the measurement moves every exit alike and their ratios keep.
            let exitLatencies () =
                let timings = if b = 1 then 41 else 15
                for _ in 1..3 do for mu in 1..m do forwardOnce net mu |> ignore
                let rounds = [ for _ in 1..timings -> [| for mu in 1..m -> forwardOnce net mu |] ]
                [| for mu in 0 .. m - 1 -> median [ for r in rounds -> r[mu] ] |]
            let streamed = ResizeArray<float>()
            let streamedDetail = ResizeArray<string>()
            let oracle = ResizeArray<float>()
            let latencies = ResizeArray<float[]>()
            let runs =
                [ for _ in 1..repeats ->
                    let latency = exitLatencies ()
                    latencies.Add latency
                    let early, full, exits = EarlyExit.Experiments.Evaluation.Eval.time net images b EarlyExit.Experiments.Evaluation.Budget.Softmax half.Threshold 3
                    let byMacs = EarlyExit.Experiments.Evaluation.Eval.predictedSpeedUp exitMacs exits
                    let byLatency = latency[m - 1] / (exits |> Array.averageBy (fun e -> latency[e - 1]))
                    let measured = full / early
                    if b > 1 then
                        // Streamed runs paired with full runs of their own (drift between the two moves both).
                        let _, _, speedUp = EarlyExit.Experiments.Evaluation.Eval.timeStreamed net images b EarlyExit.Experiments.Evaluation.Budget.Softmax half.Threshold 3
                        streamed.Add(speedUp / byLatency)
                        streamedDetail.Add $"{speedUp / byLatency:F2} ({speedUp:F2}x/{byLatency:F2}x)"
                        // The ceiling of any batched early exit: the same samples sorted by the exit they take, batch
                        // by batch, so that nearly every batch leaves whole at one exit (no compaction, no carried
                        // samples, each segment on the one before's output).
                        let order = exits |> Array.indexed |> Array.sortBy (fun (_, e) -> -e) |> Array.map (fst >> int64)
                        use orderIndex = torch.tensor(order, device = device)
                        use sorted = images.index_select(0L, orderIndex)
                        let early, full, _ = EarlyExit.Experiments.Evaluation.Eval.time net sorted b EarlyExit.Experiments.Evaluation.Budget.Softmax half.Threshold 3
                        oracle.Add((full / early) / byLatency)
                    measured / byMacs, measured / byLatency, byMacs, byLatency, exits, measured ]
            let latency = [| for mu in 0 .. m - 1 -> median [ for l in latencies -> l[mu] ] |]
            let r = median (runs |> List.map (fun (a, _, _, _, _, _) -> a))
            let rl = median (runs |> List.map (fun (_, l, _, _, _, _) -> l))
            let (_, _, byMacs, byLatency, exits, _) = runs.Head
            // The batches shrink as samples leave: segment μ of a batch runs on the samples still in it, and a smaller
            // batch costs more per sample. Predicted from segment μ + head μ timed at each batch size that occurs.
            let chunks = [ for i in 0 .. b .. samples - 1 -> exits[i .. min (i + b) samples - 1] ]
            let aliveFull (chunk: int[]) (_: int) = chunk.Length
            let aliveEarly (chunk: int[]) mu = chunk |> Array.filter (fun e -> e >= mu) |> Array.length
            // Every size that occurs is timed in one chained pass (segment μ on segment μ−1's output, then head μ, each
            // timed on its own, nothing computed twice), and the passes run round-robin over the sizes, so that a change
            // in machine speed during the measurement moves every size alike (timing each size once, at its own moment,
            // had predicted 0.71x in one run and 1.42x in another).
            let segmentLatency =
                let sizes =
                    [ for chunk in chunks do
                        for mu in 1..m do
                            for k in [ aliveFull chunk mu; aliveEarly chunk mu ] do
                                if k > 0 then yield k ]
                    |> List.distinct |> List.sort |> Array.ofList
                let pass (size: int) =
                    use _ = torch.no_grad()
                    use scope = torch.NewDisposeScope()
                    let mutable state = [| images.narrow(0L, 0L, int64 size) |]
                    [| for mu in 1..m ->
                        let c = Stopwatch.StartNew()
                        state <- net.Segment(mu).call(state)
                        sync device
                        let segment = c.Elapsed.TotalMilliseconds
                        let c = Stopwatch.StartNew()
                        net.Head(mu).call(state) |> ignore
                        sync device
                        segment + c.Elapsed.TotalMilliseconds |]
                for _ in 1..2 do for size in sizes do pass size |> ignore
                // rounds[r][i][μ−1]: round r's time of segment μ + head μ at sizes[i].
                let rounds = [ for _ in 1..(if smoke then 3 else 9) -> sizes |> Array.map pass ]
                let table = dict [ for i, size in Array.indexed sizes -> size, [| for mu in 0 .. m - 1 -> median [ for r in rounds -> r[i][mu] ] |] ]
                fun (size: int) -> table[size]
            let modelled (alive: int[] -> int -> int) =
                chunks |> List.sumBy (fun chunk -> Seq.sum (seq { for mu in 1..m do let k = alive chunk mu in if k > 0 then yield (segmentLatency k)[mu - 1] }))
            let byShrinking = modelled aliveFull / modelled aliveEarly
            let measuredSpeedUps = runs |> List.map (fun (_, _, _, _, _, measured) -> measured)
            let rShrink = median (measuredSpeedUps |> List.map (fun s -> s / byShrinking))
            let early = exits |> Array.filter (fun e -> e < m) |> Array.length
            let latencies = latency |> Array.map (fun t -> t.ToString "F2") |> String.concat " "
            let macsDetail = $"(threshold {half.Threshold:F2}: {100.0 * float early / float samples:F0}%% of {samples} leave early; predicted {byMacs:F2}x{threadNote ()})"
            let latencyDetail = $"(predicted {byLatency:F2}x; exit latencies at batch {b}: {latencies} ms)"
            // At batch 64, MACs mispredict time on this CPU (shallow layers run fewer MACs per second): the target is
            // against each exit's measured latency, with the MACs figure beside it.
            if b = 1 then
                addRepeats $"early-exit inference, batch {b}: measured speed-up / MACs-predicted speed-up" (runs |> List.map (fun (a, _, _, _, _, _) -> a)) 0.9 false ">= 0.9" macsDetail
                info $"early-exit inference, batch {b}: measured speed-up / speed-up predicted by each exit's measured latency" rl latencyDetail
            else
                info $"early-exit inference, batch {b}: measured speed-up / MACs-predicted speed-up" r macsDetail
                // Batch by batch (Run), a batch of 64 shrinks as its samples leave, and segment μ then runs on fewer
                // samples, at a higher cost per sample than the batch-64 latencies assume.
                info $"early-exit inference, batch {b}, batch by batch (EarlyExitInference.Run): measured speed-up / speed-up predicted by each exit's measured latency" rl
                    (latencyDetail.TrimEnd(')') + "; the batches shrink as samples leave)")
                info $"early-exit inference, batch {b}, batch by batch: measured speed-up / speed-up predicted by each segment's latency at the batch sizes it ran at" rShrink
                    $"(predicted {byShrinking:F2}x: segment μ + head μ timed at every size that occurs; measured {median measuredSpeedUps:F2}x; what is left is the cost of deciding and compacting, and drift between the two timings)"
                let each = String.Join(", ", streamedDetail)
                addRepeats $"early-exit inference, batch {b}, streamed (EarlyExitInference.RunStreamed: a queue per segment, full batches): measured speed-up / speed-up predicted by each exit's measured latency" (List.ofSeq streamed) 0.95 false ">= 0.95"
                    $"(the same samples, threshold and exits; every segment runs batches of {b} but the tail; a batch in which at most {EarlyExitInference.DefaultMaxHoleShare:F3} have left is queued whole, its holes filled later; runs, as measured/predicted: {each})"
                let oracleEach = oracle |> Seq.map (fun r -> r.ToString "F2") |> String.concat " "
                info $"early-exit inference, batch {b}, the same samples sorted by their exit, batch by batch: measured speed-up / speed-up predicted by each exit's measured latency" (median (List.ofSeq oracle))
                    $"(the ceiling of batched early exit, which needs each sample's exit in advance: nearly every batch leaves whole at one exit; runs {oracleEach})"
                // Both against the same prediction, timed a second apart: their ratio per repeat cancels what the machine's
                // drift between the exit latencies' timing and the runs puts into both.
                let againstCeiling = Seq.map2 (fun s o -> s / o) streamed oracle |> List.ofSeq
                let againstEach = againstCeiling |> List.map (fun r -> r.ToString "F2") |> String.concat " "
                info $"early-exit inference, batch {b}, streamed / the same samples sorted by their exit (paired per repeat)" (median againstCeiling)
                    $"(runs {againstEach})"
            // What a deployment gains from a frozen copy (MultiExitNetwork.FrozenCopy: batch norms folded into the
            // convolutions, the LwF teachers' path): every exit's logits at this batch size, the frozen copy against the
            // network as trained in eval mode, in alternating order.
            use frozen = net.FrozenCopy()
            let everyExit n = forwardMs n m (if smoke then 5 elif b = 1 then 101 else 21)
            let folds =
                [ for r in 1..repeats ->
                    if r % 2 = 1 then
                        let f = everyExit frozen
                        f, everyExit net
                    else
                        let u = everyExit net
                        everyExit frozen, u ]
            let foldEach = folds |> List.map (fun (f, u) -> (f / u).ToString "F2") |> String.concat " "
            info $"inference, batch {b}, every exit: frozen copy (batch norms folded) / eval mode as trained" (median (folds |> List.map (fun (f, u) -> f / u)))
                $"(time per batch: {median (List.map fst folds):F3} against {median (List.map snd folds):F3} ms{threadNote ()}; runs {foldEach})"

        torch.set_num_threads threads

    // 6. Data pipeline against training throughput.
    if runs "pipeline" then
        let pipeline =
            [ for _ in 1..repeats ->
                let cf = CropFlip(2, true, 1L)
                let mix = MixupCutmix(MixSettings(), 10, 1)
                let clock = Stopwatch.StartNew()
                for s in 0 .. steps - 1 do
                    use scope = torch.NewDisposeScope()
                    let idx = [| for i in 0 .. batch - 1 -> (s * batch + i) % data.Train.Count |]
                    let x = cf.Apply(data.Train.Images(ReadOnlySpan idx, device))
                    mix.Apply(x, data.Train.LabelTensor(ReadOnlySpan idx, device)) |> ignore
                sync device
                float (steps * batch) / clock.Elapsed.TotalSeconds ]
        let trainRate = float batch / plainStep ()
        let pipeRatio = median pipeline / trainRate
        add "data pipeline (read + crop/flip + Mixup/CutMix) images/s / training images/s" pipeRatio ">= 10" (pipeRatio >= 10.0) $"({median pipeline:F0} vs {trainRate:F0} images/s)"

    // 8. PyTorch itself (Debian's 1.13) side by side: the same network, batch and threads, alternating run by run.
    if runs "pytorch" && device.``type`` = DeviceType.CPU then
        match pytorchPeer () with
        | Error why -> log $"  pytorch: skipped ({why})"
        | Ok (python, version) ->
            let script = Path.Combine(AppContext.BaseDirectory, "pytorch", "peer.py")
            let described = runPeer python script [ "describe" ]
            use ours = model device
            let ourParameters = ours.parameters() |> Seq.sumBy (fun p -> p.numel())
            let theirs = described.GetProperty("parameters").GetInt64()
            let blas = described.GetProperty("blas").GetString()
            add "PyTorch peer: parameters / ours" (float theirs / float ourParameters) "1.0 (the same network)" (theirs = ourParameters)
                $"({theirs} against {ourParameters}; PyTorch {version}, BLAS {blas}; ours libtorch {numerics.libtorch} with oneDNN {numerics.onednn}, kernels {numerics.kernels})"
            let processThreads = torch.get_num_threads()
            let threadCounts = if smoke then [ 1 ] else List.distinct [ 1; processThreads ]
            let n = if smoke then 128 elif quick then 512 else 2048
            let trainSteps = if smoke then 2 elif quick then 10 else 20
            for t in threadCounts do
                torch.set_num_threads t
                let label = $"{t} thread(s)"
                // The peer's training steps: throughput and its own split by phase, in one JSON line.
                let peerTrain () = runPeer python script [ "train"; "--threads"; string t; "--batch"; string batch; "--steps"; string trainSteps; "--warmup"; string warmupSteps ]
                // Training: our trainer's joint step against PyTorch's (same batch, AdamW, the loss read back every step).
                let train =
                    [ for _ in 1..repeats ->
                        let oursStep () =
                            use netA = model device
                            use regs = new RegulariserSet()
                            let clock = StepClock device
                            StageTrainer.Run(netA, basePlan "joint" netA.ExitCount (warmupSteps + trainSteps) batch 1 false, data, regs, device, clock) |> ignore
                            float batch / clock.PerStepSeconds
                        let theirsStep () =
                            (peerTrain ()).GetProperty("imagesPerSecond").GetDouble()
                        let a = oursStep ()
                        let b = theirsStep ()
                        a / b, a, b ]
                addRepeats $"training images/s, ours / PyTorch {version} ({label})" (train |> List.map (fun (x, _, _) -> x)) 1.0 false ">= 1.0"
                    $"(cpu-scale ResNet, batch {batch}, joint loss, AdamW; ours {median (train |> List.map (fun (_, a, _) -> a)):F0}, PyTorch {median (train |> List.map (fun (_, _, b) -> b)):F0} images/s)"
                // Where a step's time goes, by phase: a bare loop of ours on one fixed batch against the peer's own
                // split, in alternating rounds (medians of the rounds' medians).
                let rounds = if smoke then 1 elif quick then 2 else 3
                let phases =
                    [ for _ in 1..rounds ->
                        let o = (use netC = model device in stepPhases netC trainSteps batch device)
                        let p = peerTrain ()
                        o, (p.GetProperty("forwardMs").GetDouble(), p.GetProperty("backwardMs").GetDouble(), p.GetProperty("optimizerMs").GetDouble()) ]
                for name, pick, what in
                        [ "forward", (fun (f, _, _) -> f), "the exits' logits and the joint loss"
                          "backward", (fun (_, b, _) -> b), "zero_grad and backward"
                          "optimizer", (fun (_, _, o) -> o), "AdamW's step and the loss read back" ] do
                    let mine = median (phases |> List.map (fst >> pick))
                    let theirs = median (phases |> List.map (snd >> pick))
                    info $"training step's {name}, ours / PyTorch ({label})" (mine / theirs)
                        $"({what}; ours {mine:F2}, PyTorch {theirs:F2} ms per step, batch {batch}, one fixed random batch each, medians of {rounds} alternated round(s) of {trainSteps} steps)"
                // Where the convolutions' time goes, by oneDNN's own account (1 thread, one run per side): the kernels
                // libtorch picks differ by version, the strided backward-data most (see the README).
                if t = 1 then
                    let steps = if smoke then 2 else 10
                    let verbose = [ "ONEDNN_VERBOSE", "1"; "DNNL_VERBOSE", "1" ]
                    let struct (code, oursOut, oursErr) =
                        NumericsGuard.RunProbe([ "throughput"; "--backend"; numerics.kernels; "--threads"; "1"; "--steps"; string steps ], dict verbose |> Collections.Generic.Dictionary)
                    if code <> 0 then failwithf "the probe failed under ONEDNN_VERBOSE (exit code %d): %s" code (lastLine oursErr)
                    let theirsOut = runPeerRaw python script [ "train"; "--threads"; "1"; "--batch"; string batch; "--steps"; string steps; "--warmup"; string warmupSteps ] verbose
                    // Both run `steps` timed steps after two warm-up steps; every one of them executes the primitives.
                    let oAll, oStrided, oImpls = convolutionProfile oursOut (steps + 2)
                    let pAll, pStrided, pImpls = convolutionProfile theirsOut (steps + warmupSteps)
                    let theirOneDnn =
                        match lastJsonLine theirsOut with
                        | Some line -> (use doc = JsonDocument.Parse line in doc.RootElement.GetProperty("onednn").GetString())
                        | None -> "its oneDNN"
                    info "oneDNN time per training step in convolutions, ours / PyTorch (1 thread(s))" (oAll / pAll)
                        $"(ONEDNN_VERBOSE, one run each, {steps + 2} steps: ours {oAll:F1} ms with oneDNN {numerics.onednn}, PyTorch {pAll:F1} ms with {theirOneDnn}; every convolution primitive's execution)"
                    info "… of which the strided convolutions' backward-data, ours / PyTorch (1 thread(s))" (oStrided / pStrided)
                        $"(ours {oStrided:F2} ms, {oImpls}; PyTorch {pStrided:F2} ms, {pImpls}; the kernels each libtorch picks; our strided shortcuts are stride-1 convolutions of a subsampled input)"
                // Inference latency: every exit, eval mode, no gradients.
                for b in [ 1; 64 ] do
                    let iterations = if smoke then 5 elif b = 1 then 200 else 30
                    let lat =
                        [ for _ in 1..repeats ->
                            ours.eval() |> ignore
                            use x = torch.randn([| int64 b; 1L; 28L; 28L |], device = device)
                            let once () =
                                use scope = torch.NewDisposeScope()
                                use _ = torch.no_grad()
                                let out = ours.forward x
                                out[out.Length - 1].sum().item<float32>() |> ignore
                            for _ in 1..5 do once ()
                            let clock = Stopwatch.StartNew()
                            for _ in 1..iterations do once ()
                            let mine = clock.Elapsed.TotalMilliseconds / float iterations
                            let other = (runPeer python script [ "latency"; "--threads"; string t; "--batch"; string b; "--iterations"; string iterations; "--warmup"; "5" ]).GetProperty("msPerBatch").GetDouble()
                            mine / other, mine, other ]
                    let r = median (lat |> List.map (fun (x, _, _) -> x))
                    let detail = $"(every exit, eval mode; ours {median (lat |> List.map (fun (_, a, _) -> a)):F3}, PyTorch {median (lat |> List.map (fun (_, _, c) -> c)):F3} ms per batch)"
                    if b = 1 then addRepeats $"batch-1 latency, ours / PyTorch ({label})" (lat |> List.map (fun (x, _, _) -> x)) 1.0 true "<= 1.0" detail
                    else info $"batch-64 latency, ours / PyTorch ({label})" r detail
                // What batch-1 inference spends its time on, both sides alike: the whole forward, each convolution alone
                // at the input it gets in the network (summed: the kernels, libtorch 2.10's oneDNN against 1.13's), the
                // rest (batch norm, ReLU, adds, pooling, linear and the per-op cost of the framework), and one trivial op.
                if t = 1 then
                    let iterations = if smoke then 20 elif quick then 100 else 300
                    let medianUs (f: unit -> unit) =
                        for _ in 1..20 do f ()
                        median [ for _ in 1..iterations -> (let c = Stopwatch.StartNew() in f (); c.Elapsed.TotalMilliseconds * 1000.0) ]
                    let profileOurs () =
                        ours.eval() |> ignore
                        use _ = torch.no_grad()
                        use x = torch.randn([| 1L; 1L; 28L; 28L |], device = device)
                        let convs = ours.modules() |> Seq.choose (function :? TorchSharp.Modules.Conv2d as c -> Some c | _ -> None) |> List.ofSeq
                        let inputs = ResizeArray<TorchSharp.Modules.Conv2d * torch.Tensor>()
                        let removers =
                            [ for c in convs ->
                                c.register_forward_hook(fun m input _ ->
                                    inputs.Add((m :?> TorchSharp.Modules.Conv2d), input.clone().DetachFromDisposeScope())
                                    null) ]
                        (use scope = torch.NewDisposeScope()
                         ours.forward x |> ignore)
                        for r in removers do r.remove()
                        let forward = medianUs (fun () -> use scope = torch.NewDisposeScope() in let out = ours.forward x in out[out.Length - 1].sum().item<float32>() |> ignore)
                        let conv = inputs |> Seq.sumBy (fun (c, i) -> medianUs (fun () -> use scope = torch.NewDisposeScope() in c.call i |> ignore))
                        use one = torch.randn([| 1L |], device = device)
                        let op = medianUs (fun () -> use y = one.relu() in ())
                        for _, i in inputs do i.Dispose()
                        { Forward = forward; Convolutions = conv; Count = inputs.Count; Op = op; OneDnn = numerics.onednn }
                    let profileTheirs () =
                        let p = runPeer python script [ "profile"; "--threads"; string t; "--iterations"; string iterations ]
                        let g (k: string) = p.GetProperty(k).GetDouble()
                        { Forward = g "forwardUs"; Convolutions = g "convolutionsUs"; Count = p.GetProperty("convolutions").GetInt32(); Op = g "opUs"
                          OneDnn = p.GetProperty("onednn").GetString() }
                    let profiles = [ for _ in 1..repeats -> let o = profileOurs () in o, profileTheirs () ]
                    let mine f = median (profiles |> List.map (fst >> f))
                    let theirs f = median (profiles |> List.map (snd >> f))
                    let ratio f = median (profiles |> List.map (fun (o, p) -> f o / f p))
                    let rest (p: LatencyProfile) = p.Forward - p.Convolutions
                    let usMs (v: float) = (v / 1000.0).ToString "F3"
                    info $"batch-1 profile ({label}): whole forward, ours / PyTorch" (ratio _.Forward)
                        $"(median per forward: ours {usMs (mine _.Forward)}, PyTorch {usMs (theirs _.Forward)} ms; every exit, eval mode)"
                    info $"batch-1 profile ({label}): convolutions alone, ours / PyTorch" (ratio _.Convolutions)
                        $"({(fst profiles.Head).Count} against {(snd profiles.Head).Count} convolutions, each timed alone at its input in the network, summed: ours {usMs (mine _.Convolutions)} ms with libtorch {numerics.libtorch}, PyTorch {usMs (theirs _.Convolutions)} ms with {version}; at batch 1 neither runs them through oneDNN ({(fst profiles.Head).OneDnn} and {(snd profiles.Head).OneDnn} sit idle: libtorch sends a batch-1 convolution of a map this small to its own im2col and GEMM, with the MKL linked into libtorch against PyTorch's BLAS {blas}); {100.0 * mine _.Convolutions / mine _.Forward:F0}%% and {100.0 * theirs _.Convolutions / theirs _.Forward:F0}%% of each forward)"
                    info $"batch-1 profile ({label}): the rest of the forward, ours / PyTorch" (ratio rest)
                        $"(the forward minus its convolutions: batch norm, ReLU, adds, pooling, linear and each framework's cost per op: ours {usMs (mine _.Forward - mine _.Convolutions)}, PyTorch {usMs (theirs _.Forward - theirs _.Convolutions)} ms)"
                    info $"batch-1 profile ({label}): one trivial op (ReLU of one element), ours / PyTorch" (ratio _.Op)
                        $"(ours {mine _.Op:F2} µs through TorchSharp, PyTorch {theirs _.Op:F2} µs through Python)"
                // The per-sample empirical Fisher of the last exit over N samples: ours against functorch's vmap(grad).
                let fisherRuns =
                    [ for _ in 1..(if smoke then 1 else 3) ->
                        ours.eval() |> ignore
                        let clock = Stopwatch.StartNew()
                        let f = FisherInformation.Compute(ours, ours.ExitCount, data.Train, FisherEstimator.PerSampleEmpirical, n, 128, 1, device)
                        let mine = clock.Elapsed.TotalSeconds
                        for v in f.Values do v.Dispose()
                        let other = (runPeer python script [ "fisher"; "--threads"; string t; "--samples"; string n; "--chunk"; "128" ]).GetProperty("seconds").GetDouble()
                        mine / other, mine, other ]
                addRepeats $"per-sample Fisher over N = {n}, ours / PyTorch functorch ({label})" (fisherRuns |> List.map (fun (x, _, _) -> x)) 1.0 true "<= 1.0"
                    $"(ours {median (fisherRuns |> List.map (fun (_, a, _) -> a)):F2} s, functorch vmap(grad) in chunks of 128: {median (fisherRuns |> List.map (fun (_, _, c) -> c)):F2} s)"
            torch.set_num_threads processThreads

    // 7. Memory: live tensors and resident memory after epoch 10 against epoch 1.
    if runs "memory" then
        let counts = ResizeArray<int64 * float>()
        let memoryObserver =
            { new ITrainingObserver with
                member _.OnEpochEnd(_, _) =
                    GC.Collect()
                    GC.WaitForPendingFinalizers()
                    counts.Add(torch.Tensor.TotalCount, rssMiB ()) }
        use netM = model device
        use regsM = new RegulariserSet()
        let p = basePlan "memory" netM.ExitCount (if smoke then 1 elif quick then 3 else 10) 64 10 true
        StageTrainer.Run(netM, p, data, regsM, device, memoryObserver) |> ignore
        let (t1, r1m), (t10, r10m) = counts[0], counts[counts.Count - 1]
        add "live tensors after epoch 10 / after epoch 1" (float t10 / float t1) "1.0" (t10 = t1) $"({t1} -> {t10})"
        add "resident memory after epoch 10 / after epoch 1" (r10m / r1m) "1.0 (no growth)" (r10m / r1m <= 1.05) $"({r1m:F0} -> {r10m:F0} MiB)"

    if only.IsSome then
        log "(a partial run (--only) writes nothing to results/bench)"
        exit 0
    Directory.CreateDirectory outDir |> ignore
    let code = Provenance.codeVersion ()
    let machine = Provenance.machine ()
    let doc =
        {| kind = kind
           device = Devices.Describe device
           machine = machine
           numerics = numerics
           allocator = NativeAllocator.Status
           nativeScalars = NativeScalars.Status
           codeVersion = code
           date = DateTime.UtcNow.ToString("o")
           repeats = repeats
           figures = figures |}
    Markdown.writeAtomic (Path.Combine(outDir, "bench.json")) (JsonSerializer.Serialize(doc, Markdown.jsonOptions false))
    let md =
        "# EarlyExit benchmarks\n\n" +
        $"Ratios measured side by side in one process, medians of {repeats} runs ({kind}) unless the interval column says fewer. " +
        "Met: for a figure measured in repeats, yes or no only where the 95% confidence interval of the repeats' geometric mean " +
        "(Student t on the logs of the per-repeat ratios) lies wholly on one side of the target, inconclusive where it spans it; " +
        "for a single measurement, the measured value's. " +
        $"Device: {Devices.Describe device}. Machine: {machine}. Code: {code}. " + DateTime.UtcNow.ToString("yyyy-MM-dd HH:mm") + " UTC.\n\n" +
        $"Numerics: {numerics.summary}.\n\nAllocator: {NativeAllocator.Status}. Native scalars: {NativeScalars.Status}. NNPACK: {EarlyExit.Native.Nnpack.Status}. oneDNN caches: {EarlyExit.Native.OneDnnCaches.Status}.\n\n" +
        Markdown.table [ "figure"; "measured"; "95% CI (repeats)"; "target"; "met"; "detail" ]
            [ for f in figures ->
                let met =
                    match f.Verdict with
                    | "met" -> "yes"
                    | "not met" -> "**no**"
                    | v -> v
                let ci = match f.Ci95 with
                         | Some [| lo; hi |] -> $"{lo:F3}–{hi:F3} ({f.Repeats})"
                         | _ -> "–"
                [ f.Name; f.Value.ToString("F3"); ci; f.Target; met; f.Detail ] ] +
        "\nCommand: `dotnet run -c Release --project bench/EarlyExit.Bench -- " + (if smoke then "--smoke" elif quick then "--quick" else "") + "`\n"
    Markdown.writeAtomic (Path.Combine(outDir, "bench.md")) md
    let mdPath = Path.Combine(outDir, "bench.md")
    log $"wrote {mdPath} and bench.json"
    0
