/// Benchmarks as ratios measured side by side in one process (so they hold on a noisy machine), medians over
/// repeated runs. `dotnet run -c Release --project bench/EarlyExit.Bench -- [--quick] [--out results/bench]`
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
open EarlyExit.Training
open EarlyExit.Experiments.Recipes
open EarlyExit.Experiments.Runner
open EarlyExit.Experiments.Reports

type Figure =
    { Name: string
      Value: float
      Target: string
      /// None for a figure given for scale only (no target).
      Met: bool option
      Detail: string }

let median (xs: float list) = xs |> List.sort |> fun s -> s[s.Length / 2]

/// Times the steps of a stage (first batch excluded as warm-up) through the loop's observer.
type StepClock() =
    let times = ResizeArray<float>()
    let clock = Stopwatch()
    member _.PerStepSeconds = if times.Count = 0 then nan else median (List.ofSeq times)
    interface ITrainingObserver with
        member _.OnStageStart(_, _, _) = clock.Restart()
        member _.OnBatch(_, _, batch, _, _) =
            if batch > 0 then times.Add clock.Elapsed.TotalSeconds
            clock.Restart()

let model () =
    torch.manual_seed 0L |> ignore
    ModelRegistry.Create("resnet34", ModelOptions(NumClasses = 10, InputShape = [| 1L; 28L; 28L |], BaseWidth = 16, Blocks = [| 2; 2; 2; 2 |], ExitPositions = [| 1; 2; 4; 6; 8 |]))

let basePlan (name: string) (m: int) (steps: int) (batch: int) =
    StagePlan(
        Name = name, LossExits = [| 1..m |], LossWeights = Array.create m (1.0 / float m),
        TrainableGroups = [| for k in 1..m do yield $"segment{k}"; yield $"head{k}" |],
        BatchSize = batch, MaxEpochs = 1, MaxStepsPerEpoch = steps, CropPadding = 0, HorizontalFlip = false,
        Schedule = LrSchedule.Constant, LearningRate = 1e-3, EvalBatchSize = 256)

/// A bare TorchSharp loop over the same data source, model, batch and optimiser: seconds per step.
let bareLoop (net: MultiExitNetwork) (data: ImageDataset) (steps: int) (batch: int) =
    use opt = torch.optim.AdamW(net.parameters(), lr = 1e-3)
    net.train() |> ignore
    let m = net.ExitCount
    let times = ResizeArray<float>()
    let clock = Stopwatch.StartNew()
    for s in 0 .. steps - 1 do
        use scope = torch.NewDisposeScope()
        let idx = [| for i in 0 .. batch - 1 -> (s * batch + i) % data.Count |]
        let x = data.Images(ReadOnlySpan idx)
        let y = data.LabelTensor(ReadOnlySpan idx)
        let logits = net.forward x
        let mutable loss = torch.nn.functional.cross_entropy(logits[0], y) * (1.0 / float m)
        for e in 1 .. m - 1 do
            loss <- loss + torch.nn.functional.cross_entropy(logits[e], y) * (1.0 / float m)
        opt.zero_grad()
        loss.backward()
        opt.step() |> ignore
        if s > 0 then times.Add clock.Elapsed.TotalSeconds
        clock.Restart()
    median (List.ofSeq times)

let rssMiB () =
    use p = Process.GetCurrentProcess()
    p.Refresh()
    float p.WorkingSet64 / float (1 <<< 20)

[<EntryPoint>]
let main argv =
    let quick = Array.contains "--quick" argv
    let outDir =
        match Array.tryFindIndex ((=) "--out") argv with
        | Some i when i + 1 < argv.Length -> argv[i + 1]
        | _ -> Path.Combine("results", "bench")
    let loader = TorchNativeLoader.EnsureLoaded()
    let device = Devices.Choose()
    let repeats = if quick then 3 else 5
    let steps = if quick then 8 else 20
    let batch = 128
    let log (s: string) = Console.Out.WriteLine s
    let kind = if quick then "quick" else "full"
    log $"EarlyExit benchmarks ({kind}): {Devices.Describe device}; natives {TorchNativeLoader.Describe loader}"
    let splits = DataCatalog.Load("fashion-mnist")
    let train = splits.Train.Take(6000, 0)
    let data = DataSplits(train, splits.Validation.Take(256, 0), splits.Test.Take(2000, 0), splits.Source)
    let figures = ResizeArray<Figure>()
    let add name value (target: string) met detail =
        figures.Add { Name = name; Value = value; Target = target; Met = Some met; Detail = detail }
        log $"  {name}: {value:F3} (target {target}) {detail}"
    let info name value detail =
        figures.Add { Name = name; Value = value; Target = "–"; Met = None; Detail = detail }
        log $"  {name}: {value:F3} {detail}"

    // 1. Trainer step vs a bare loop.
    let trainerVsBare =
        [ for _ in 1..repeats ->
            use netA = model ()
            let bare = bareLoop netA data.Train steps batch
            use netB = model ()
            use regs = new RegularizerState()
            let clock = StepClock()
            StageTrainer.Run(netB, basePlan "joint" netB.ExitCount steps batch, data, regs, torch.CPU, clock) |> ignore
            bare / clock.PerStepSeconds ]
    let r1 = median trainerVsBare
    add "trainer step throughput / bare TorchSharp loop" r1 ">= 0.95" (r1 >= 0.95) $"(joint, batch {batch}, AdamW)"

    // 2-4. Sequential stage μ = M with EWC, with LwF, and plain; the Fisher against a training pass.
    use net = model ()
    let m = net.ExitCount
    use regs = new RegularizerState()
    for nu in 1 .. m - 1 do
        let f = FisherInformation.Compute(net, nu, data.Train, FisherEstimator.PerSampleEmpirical, 512, 128, 0)
        regs.Ewc.Accumulate(nu, f)
        for t in f.Values do t.Dispose()
        regs.Teachers[nu] <- net.FrozenCopy()
    regs.Ewc.SetAnchor net
    let stagePlan (lambda: float) (rho: float) =
        let heads = if rho > 0.0 then [| for k in 1..m -> $"head{k}" |] else [| $"head{m}" |]
        let groups = Array.append [| for k in 1..m -> $"segment{k}" |] heads
        StagePlan(
            Name = "seq", LossExits = [| m |], LossWeights = [| 1.0 |],
            TrainableGroups = groups,
            EwcLambda = lambda, LwfRho = rho, StageExit = m, ProtectedExits = [| 1 .. m - 1 |],
            BatchSize = batch, MaxEpochs = 1, MaxStepsPerEpoch = steps, CropPadding = 0, HorizontalFlip = false,
            Schedule = LrSchedule.Constant, LearningRate = 1e-4, EvalBatchSize = 256)
    let stepOf (plan: StagePlan) =
        let clock = StepClock()
        let snapshot = net.state_dict() |> Seq.map (fun kv -> kv.Key, kv.Value.clone()) |> Seq.toList
        StageTrainer.Run(net, plan, data, regs, torch.CPU, clock) |> ignore
        use _ = torch.no_grad()
        let sd = net.state_dict()
        for (k, v) in snapshot do
            sd[k].copy_(v) |> ignore
            v.Dispose()
        clock.PerStepSeconds
    let trios = [ for _ in 1..repeats -> stepOf (stagePlan 0.0 0.0), stepOf (stagePlan 100.0 0.0), stepOf (stagePlan 0.0 0.7) ]
    let plain = median (trios |> List.map (fun (a, _, _) -> a))
    let ewcRatio = median (trios |> List.map (fun (a, b, _) -> b / a))
    let lwfRatio = median (trios |> List.map (fun (a, _, c) -> c / a))
    add "sequential + EWC step / plain step" ewcRatio "<= 1.10" (ewcRatio <= 1.10) $"(stage μ={m}, {m - 1} protected exits)"
    add "sequential + LwF step (with teachers' forward) / plain step" lwfRatio "<= 1.5" (lwfRatio <= 1.5) $"({m - 1} teachers)"

    let n = if quick then 512 else 2048
    let fisherTimes =
        [ for _ in 1..repeats ->
            let clock = Stopwatch.StartNew()
            let f = FisherInformation.Compute(net, m, data.Train, FisherEstimator.PerSampleEmpirical, n, 128, 1)
            let t = clock.Elapsed.TotalSeconds
            for v in f.Values do v.Dispose()
            t ]
    let fisherRatio = median fisherTimes / (plain * float n / float batch)
    add "per-sample Fisher over N samples / one training pass over N" fisherRatio "<= 3" (fisherRatio <= 3.0) $"(N = {n}; plain step {plain * 1000.0:F1} ms)"
    let naiveN = 64
    let naive =
        let clock = Stopwatch.StartNew()
        let f = FisherInformation.Compute(net, m, data.Train, FisherEstimator.PerSampleEmpiricalNaive, naiveN, 128, 1)
        for v in f.Values do v.Dispose()
        clock.Elapsed.TotalSeconds / float naiveN * float n
    info "for scale: one backward pass per sample / one training pass" (naive / (plain * float n / float batch)) "(the naive oracle, extrapolated from 64 samples)"

    // 5. Early-exit inference at the threshold where about half the test samples leave early (timing needs no training).
    net.eval() |> ignore
    let outputs =
        use logits = Evaluator.CollectLogits(net, data.Test, 256, torch.CPU)
        let cost = EarlyExit.Flops.MacCounter.Count net
        EarlyExit.Experiments.Evaluation.RunFolder.outputsOfLogits logits data.Test.Labels (cost.Exits |> Seq.map (fun e -> e.CumulativeMacs) |> Seq.toArray) cost.BackboneMacs
    let sweep = EarlyExit.Experiments.Evaluation.Budget.sweep outputs (EarlyExit.Experiments.Evaluation.Budget.thresholds 100)
    let half = sweep |> Array.minBy (fun p -> abs (1.0 - p.ExitRatios[m - 1] - 0.5))
    let predicted = float outputs.ExitMacs[m - 1] / half.AverageMacs
    let samples = if quick then 128 else 512
    use images = data.Test.Images(ReadOnlySpan [| 0 .. samples - 1 |])
    for b in [ 1; 64 ] do
        let ratios =
            [ for _ in 1..repeats ->
                let early, full = EarlyExit.Experiments.Cli.Eval.time net images b half.Threshold 1
                (full / early) / predicted ]
        let r = median ratios
        add $"early-exit inference, batch {b}: measured speed-up / MACs-predicted speed-up" r ">= 0.9" (r >= 0.9)
            $"(threshold {half.Threshold:F2}: {100.0 * (1.0 - half.ExitRatios[m - 1]):F0}%% leave early; predicted {predicted:F2}x)"

    // 6. Data pipeline against training throughput.
    let pipeline =
        [ for _ in 1..repeats ->
            let cf = CropFlip(2, true, 1L)
            let mix = MixupCutmix(MixSettings(), 10, 1)
            let clock = Stopwatch.StartNew()
            for s in 0 .. steps - 1 do
                use scope = torch.NewDisposeScope()
                let idx = [| for i in 0 .. batch - 1 -> (s * batch + i) % data.Train.Count |]
                let x = cf.Apply(data.Train.Images(ReadOnlySpan idx))
                mix.Apply(x, data.Train.LabelTensor(ReadOnlySpan idx)) |> ignore
            float (steps * batch) / clock.Elapsed.TotalSeconds ]
    let trainRate = float batch / plain
    let pipeRatio = median pipeline / trainRate
    add "data pipeline (read + crop/flip + Mixup/CutMix) images/s / training images/s" pipeRatio ">= 10" (pipeRatio >= 10.0) $"({median pipeline:F0} vs {trainRate:F0} images/s)"

    // 7. Memory: live tensors and resident memory after epoch 10 against epoch 1.
    let counts = ResizeArray<int64 * float>()
    let memoryObserver =
        { new ITrainingObserver with
            member _.OnEpochEnd(_, _) =
                GC.Collect()
                GC.WaitForPendingFinalizers()
                counts.Add(torch.Tensor.TotalCount, rssMiB ()) }
    use netM = model ()
    use regsM = new RegularizerState()
    let p = basePlan "memory" netM.ExitCount (if quick then 3 else 10) 64
    StageTrainer.Run(netM, StagePlan(Name = p.Name, LossExits = p.LossExits, LossWeights = p.LossWeights, TrainableGroups = p.TrainableGroups,
                                     BatchSize = 64, MaxEpochs = 10, MaxStepsPerEpoch = p.MaxStepsPerEpoch, CropPadding = 2, HorizontalFlip = true,
                                     Mix = MixSettings(), Schedule = LrSchedule.Cosine, LearningRate = 1e-3, EvalBatchSize = 256),
                     data, regsM, torch.CPU, memoryObserver) |> ignore
    let (t1, r1m), (t10, r10m) = counts[0], counts[counts.Count - 1]
    add "live tensors after epoch 10 / after epoch 1" (float t10 / float t1) "1.0" (t10 = t1) $"({t1} -> {t10})"
    add "resident memory after epoch 10 / after epoch 1" (r10m / r1m) "1.0 (no growth)" (r10m / r1m <= 1.05) $"({r1m:F0} -> {r10m:F0} MiB)"

    Directory.CreateDirectory outDir |> ignore
    let code = Provenance.codeVersion ()
    let machine = Provenance.machine ()
    let doc =
        {| kind = (if quick then "quick" else "full")
           device = Devices.Describe device
           machine = machine
           codeVersion = code
           date = DateTime.UtcNow.ToString("o")
           repeats = repeats
           figures = figures |}
    Markdown.writeAtomic (Path.Combine(outDir, "bench.json")) (JsonSerializer.Serialize(doc, JsonSerializerOptions(WriteIndented = true)))
    let md =
        "# EarlyExit benchmarks\n\n" +
        $"Ratios measured side by side in one process, medians of {repeats} runs ({kind}). " +
        $"Device: {Devices.Describe device}. Machine: {machine}. Code: {code}. " + DateTime.UtcNow.ToString("yyyy-MM-dd HH:mm") + " UTC.\n\n" +
        Markdown.table [ "figure"; "measured"; "target"; "met"; "detail" ]
            [ for f in figures ->
                let met =
                    match f.Met with
                    | Some true -> "yes"
                    | Some false -> "**no**"
                    | None -> "–"
                [ f.Name; f.Value.ToString("F3"); f.Target; met; f.Detail ] ] +
        "\nCommand: `dotnet run -c Release --project bench/EarlyExit.Bench -- " + (if quick then "--quick" else "") + "`\n"
    Markdown.writeAtomic (Path.Combine(outDir, "bench.md")) md
    let mdPath = Path.Combine(outDir, "bench.md")
    log $"wrote {mdPath} and bench.json"
    0
