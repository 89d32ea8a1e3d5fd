/// `earlyexit eval RUN_DIR`: per-exit accuracy, the budget table, the accuracy-MACs curve and exit ratios from the
/// cached test logits, plus the wall-clock time of real early-exit inference next to what the MACs predict.
module EarlyExit.Experiments.Evaluation.Eval

open System
open System.Diagnostics
open System.IO
open System.Text.Json
open Spectre.Console
open TorchSharp
open EarlyExit.Models
open EarlyExit.Native
open EarlyExit.Inference
open EarlyExit.Training
open EarlyExit.Experiments.Recipes
open EarlyExit.Experiments.Runner
open EarlyExit.Experiments.Evaluation
open EarlyExit.Experiments.Reports

type Timing =
    { BatchSize: int
      Threshold: float
      Samples: int
      PredictedSpeedUp: float
      MeasuredSpeedUp: float
      EarlyExitMsPerSample: float
      FullMsPerSample: float
      /// Streamed early exit (EarlyExitInference.RunStreamed: a queue per segment, every segment at full batches),
      /// the same samples and exits: ms per sample, and its speed-up over the full network (the median of the speed-ups
      /// of runs paired with full runs of their own, so not exactly FullMsPerSample / StreamedMsPerSample).
      StreamedMsPerSample: float
      StreamedSpeedUp: float }

/// The final network of a finished run: recipe.json rebuilt, the last stage's state loaded.
let loadFinalNetwork (dir: string) (recipe: Recipe) =
    let last = recipe.Stages.Length - 1
    let stage = recipe.Stages[last]
    let path = Path.Combine(dir, "stages", $"%02d{last}-{stage.Name}.done.model")
    if not (File.Exists path) then failwithf "%s: the final model state is missing (%s)" dir path
    torch.manual_seed (int64 recipe.Seed) |> ignore
    let net = ModelRegistry.Create(recipe.Model.Name, Validation.modelOptions recipe.Model)
    let tensors = TensorStore.Load path
    try TensorStore.LoadInto(net, tensors)
    finally for t in tensors.Values do t.Dispose()
    net.eval() |> ignore
    // Its forward and gradients under this process's kernels, against float64 (oneDNN is switched off where they fail).
    NetworkCheck.EnsureUnlessSkipped net |> ignore
    net

let inferencePolicy =
    function
    | Budget.Softmax -> ExitPolicy.Softmax
    | Budget.Entropy -> ExitPolicy.Entropy
    | Budget.Patience -> ExitPolicy.Patience

/// One pass of batch-by-batch inference (EarlyExitInference.Run) over all of `images` in batches of `batch`: ms per
/// sample, each batch's exits handed to `record` (its offset in `images` and the result).
let private batchByBatch (net: MultiExitNetwork) (images: torch.Tensor) (batch: int) (policy: ExitPolicy) (parameter: float) (record: int -> EarlyExitResult -> unit) =
    let n = int images.shape[0]
    let clock = Stopwatch.StartNew()
    let mutable i = 0
    while i < n do
        let len = min batch (n - i)
        use scope = torch.NewDisposeScope()
        record i (EarlyExitInference.Run(net, images.narrow(0L, int64 i, int64 len), policy, parameter))
        i <- i + len
    clock.Elapsed.TotalMilliseconds / float n

/// The same path with no early exit (softmax above 1: no sample leaves before the last exit): ms per sample.
let private fullPass net images batch = batchByBatch net images batch ExitPolicy.Softmax 1.0 (fun _ _ -> ())

/// Warms a timed pair of passes up until the JIT is quiet: with tiered compilation on (the .NET default), a method runs
/// unoptimised code for its first 30 calls and is then recompiled on a background thread, beside torch's threads; the
/// early-exit path does more managed work per batch (the exit decisions, compaction) than the full pass, so timing it
/// before that settles understated its speed-up (`earlyexit eval`'s batch-64 speed-up, one warm-up pair: 1.05-1.13 with
/// tiering on, 1.18-1.19 with DOTNET_TieredCompilation=0, three runs each). Runs the pair, idles `idleMs` (the runtime's
/// tiering delay is 100 ms), and stops after two rounds in a row in which no method was compiled, or after `maxRounds`.
/// Returns the rounds run.
let warmUpWith (maxRounds: int) (idleMs: int) (pair: unit -> unit) =
    let compiled () = System.Runtime.JitInfo.GetCompiledMethodCount(false)
    let mutable rounds = 0
    let mutable quiet = 0
    while quiet < 2 && rounds < maxRounds do
        let before = compiled ()
        pair ()
        Threading.Thread.Sleep idleMs
        rounds <- rounds + 1
        quiet <- if compiled () = before then quiet + 1 else 0
    rounds

/// `warmUpWith` 20 rounds at most, 200 ms idle after each.
let warmUp pair = warmUpWith 20 200 pair

/// Times real early-exit inference at a threshold against the same path with no early exit (threshold 1: every
/// sample runs every segment and head), median of `repeats`, in ms per sample; with the exit each sample took.
let time (net: MultiExitNetwork) (images: torch.Tensor) (batch: int) (policy: Budget.Policy) (threshold: float) (repeats: int) =
    let exits = Array.zeroCreate<int> (int images.shape[0])
    let early () = batchByBatch net images batch (inferencePolicy policy) threshold (fun i r -> Array.blit r.Exits 0 exits i r.Exits.Length)
    warmUp (fun () -> early () |> ignore; fullPass net images batch |> ignore) |> ignore
    // Interleaved, so that a change in machine load hits both alike.
    let pairs = [ for _ in 1..repeats -> (let e = early () in e, fullPass net images batch) ]
    Statistics.median (List.map fst pairs), Statistics.median (List.map snd pairs), exits

/// Times streamed early exit (a queue per segment, full batches of `batch`) over all of `images`, each run paired with
/// a run of the full network batch by batch right after it (threshold 1, as `time` runs it), so that a change in
/// machine speed between the two hits both: (ms per sample streamed, ms per sample full, the median of the pairs'
/// speed-ups full / streamed), medians of `repeats` pairs after the warm-up (`warmUp`).
let timeStreamed (net: MultiExitNetwork) (images: torch.Tensor) (batch: int) (policy: Budget.Policy) (threshold: float) (repeats: int) =
    let n = int images.shape[0]
    let streamed () =
        let clock = Stopwatch.StartNew()
        EarlyExitInference.RunStreamed(net, images, inferencePolicy policy, threshold, batch) |> ignore
        clock.Elapsed.TotalMilliseconds / float n
    warmUp (fun () -> streamed () |> ignore; fullPass net images batch |> ignore) |> ignore
    let pairs = [ for _ in 1..repeats -> (let s = streamed () in s, fullPass net images batch) ]
    Statistics.median (List.map fst pairs), Statistics.median (List.map snd pairs), Statistics.median [ for s, f in pairs -> f / s ]

/// The speed-up MACs predict for samples that left at `exits` (1-based): cost of the last exit ÷ their mean cost.
let predictedSpeedUp (exitMacs: int64[]) (exits: int[]) =
    float exitMacs[exitMacs.Length - 1] / (exits |> Array.averageBy (fun e -> float exitMacs[e - 1]))

let run (dir: string) (asJson: bool) (timingSamples: int) (policy: Budget.Policy) =
    let info = RunFolder.readInfo dir
    let outputs = RunFolder.readOutputs dir info
    let sweep = Budget.sweepWith outputs policy
    let budgets = Budget.standardBudgets |> Array.map (Budget.budgetedAccuracy outputs sweep)
    // The honest protocol: the parameter fitted on the validation split, applied once to the test split.
    let validation = RunFolder.readValidationOutputs dir info
    let fitted = Budget.standardBudgets |> Array.map (fun f -> validation |> Option.bind (fun v -> Budget.fittedOnValidation v outputs policy f))
    let calibration = Array.init outputs.Exits (fun e -> Budget.calibration outputs e Budget.calibrationBins)
    let exitAcc = Budget.exitAccuracy outputs
    let last = outputs.Exits - 1
    // The threshold at which about half the samples leave before the last exit.
    let half = sweep |> Array.minBy (fun p -> abs (1.0 - p.ExitRatios[last] - 0.5))
    let timings =
        if timingSamples <= 0 then []
        else
            TorchNativeLoader.EnsureLoaded() |> ignore
            let recipe =
                match RecipeJson.load (Path.Combine(dir, "recipe.json")) with
                | Ok r -> r
                | Error e -> failwithf "%s" (String.Join("; ", e))
            use net = loadFinalNetwork dir recipe
            let data = Interpreter.loadData recipe
            let k = min timingSamples data.Test.Count
            use images = data.Test.Images(ReadOnlySpan<int>([| 0 .. k - 1 |]))
            [ for batch in [ 1; 64 ] ->
                let early, full, exits = time net images batch policy half.Threshold 3
                let streamed, _, streamedSpeedUp = timeStreamed net images batch policy half.Threshold 3
                // Predicted for the timed images themselves (the threshold was chosen on the whole test set).
                let predicted = predictedSpeedUp outputs.ExitMacs exits
                { BatchSize = batch
                  Threshold = half.Threshold
                  Samples = k
                  PredictedSpeedUp = predicted
                  MeasuredSpeedUp = full / early
                  EarlyExitMsPerSample = early
                  FullMsPerSample = full
                  StreamedMsPerSample = streamed
                  StreamedSpeedUp = streamedSpeedUp } ]
    if asJson then
        let doc =
            {| run = dir
               recipe = info.Recipe
               scale = info.Scale
               device = info.Device
               data = info.Data
               codeVersion = info.CodeVersion
               exitAccuracy = exitAcc
               exitMacs = info.ExitMacs
               backboneMacs = info.BackboneMacs
               budgets = Budget.standardBudgets
               policy = Budget.policyName policy
               budgetedAccuracy = budgets |> Array.map Option.toNullable
               fittedOnValidation =
                 fitted |> Array.map (fun p -> p |> Option.map (fun p -> {| threshold = p.Threshold; testAccuracy = p.Accuracy; testAverageMacs = p.AverageMacs |}) |> Option.toObj)
               calibrationBins = Budget.calibrationBins
               expectedCalibrationError = calibration |> Array.map fst
               curve = sweep |> Array.map (fun p -> {| threshold = p.Threshold; accuracy = p.Accuracy; averageMacs = p.AverageMacs; exitRatios = p.ExitRatios |})
               timing = timings |}
        Console.Out.WriteLine(JsonSerializer.Serialize(doc, Markdown.jsonOptions false))
    else
        let c = AnsiConsole.Console
        c.MarkupLine($"[bold]{Markup.Escape info.Recipe}[/] ({Markup.Escape info.Data}, scale {info.Scale}, {Markup.Escape info.Device}, code {info.CodeVersion})")
        let t = Table(Border = TableBorder.Simple)
        t.AddColumns("exit", "cumulative MACs", "% of backbone", "test accuracy (%)", $"ECE ({Budget.calibrationBins} bins)") |> ignore
        for e in 0..last do
            t.AddRow(string (e + 1), info.ExitMacs[e].ToString("N0"), Markdown.f2 (100.0 * float info.ExitMacs[e] / float info.BackboneMacs), Markdown.f2 (100.0 * exitAcc[e]),
                     (fst calibration[e]).ToString("F4", Globalization.CultureInfo.InvariantCulture)) |> ignore
        c.Write t
        c.MarkupLine($"exit policy: [bold]{Budget.policyName policy}[/]")
        let b = Table(Border = TableBorder.Simple)
        b.AddColumns("budget", "25%", "50%", "75%", "100%") |> ignore
        b.AddRow(Array.append [| "top-1 (%), best on the test sweep" |] (budgets |> Array.map Budget.percent)) |> ignore
        match validation with
        | Some _ ->
            b.AddRow(Array.append [| "top-1 (%), fitted on validation" |] (fitted |> Array.map (Option.map (fun p -> p.Accuracy) >> Budget.percent))) |> ignore
            b.AddRow(Array.append [| "  its test MACs (% of backbone)" |] (fitted |> Array.map (function Some p -> Markdown.f2 (100.0 * p.AverageMacs / float info.BackboneMacs) | None -> "–"))) |> ignore
        | None -> ()
        c.Write b
        if validation.IsNone then c.MarkupLine "(no validation logits in this run folder: it predates them, so no budget fitted on validation)"
        let curve = Table(Border = TableBorder.Simple)
        let parameter = match policy with Budget.Softmax | Budget.Entropy -> "threshold" | Budget.Patience -> "patience"
        curve.AddColumns(Array.append [| parameter; "accuracy (%)"; "avg MACs"; "% of backbone" |] [| for e in 1 .. outputs.Exits -> $"exit {e} (%%)" |]) |> ignore
        let shown = if sweep.Length <= 12 then sweep else sweep |> Array.indexed |> Array.filter (fun (k, _) -> k % 11 = 0 || k = sweep.Length - 1) |> Array.map snd
        for p in shown do
            curve.AddRow(
                Array.append
                    [| p.Threshold.ToString("F2"); Markdown.f2 (100.0 * p.Accuracy); p.AverageMacs.ToString("N0"); Markdown.f2 (100.0 * p.AverageMacs / float info.BackboneMacs) |]
                    (p.ExitRatios |> Array.map (fun r -> Markdown.f2 (100.0 * r))))
            |> ignore
        c.Write curve
        for tm in timings do
            c.MarkupLine(
                $"real early exit ({Budget.policyName policy}), batch {tm.BatchSize}, parameter {tm.Threshold:F2} ({tm.Samples} test images): {tm.EarlyExitMsPerSample:F3} ms/sample vs {tm.FullMsPerSample:F3} without early exit; " +
                $"measured speed-up {tm.MeasuredSpeedUp:F2}x, predicted by MACs {tm.PredictedSpeedUp:F2}x (ratio {tm.MeasuredSpeedUp / tm.PredictedSpeedUp:F2}); " +
                $"streamed (a queue per segment, full batches): {tm.StreamedMsPerSample:F3} ms/sample, speed-up {tm.StreamedSpeedUp:F2}x")
    0
