/// Early-exit evaluation from cached per-exit outputs: threshold sweeps, budgeted accuracy, exit ratios, speed-up.
/// Everything is a pure function of (confidence, prediction) per exit and sample, the labels, and the exit costs.
module EarlyExit.Experiments.Evaluation.Budget

open System

/// Per exit and sample: maximum softmax probability and predicted class (first index on ties).
type ExitOutputs =
    { Confidence: float32[][]
      Prediction: int[][]
      Labels: int[]
      /// Cumulative MACs of each exit (including the earlier heads a sample went through).
      ExitMacs: int64[]
      /// The 100% budget: the backbone without internal classifiers.
      BackboneMacs: int64 }

    member o.Exits = o.Confidence.Length
    member o.Samples = o.Labels.Length

/// One point of a threshold sweep.
type SweepPoint =
    { Threshold: float
      Accuracy: float
      /// Average MACs per sample.
      AverageMacs: float
      /// Share of samples leaving at each exit.
      ExitRatios: float[] }

/// Softmax maxima and argmax from logits [exit][sample][class].
let fromLogits (logits: float32[][][]) (labels: int[]) (exitMacs: int64[]) (backboneMacs: int64) =
    if logits.Length <> exitMacs.Length then invalidArg "exitMacs" $"{logits.Length} exits of logits but {exitMacs.Length} exit costs"
    let conf = Array.init logits.Length (fun _ -> Array.zeroCreate labels.Length)
    let pred = Array.init logits.Length (fun _ -> Array.zeroCreate labels.Length)
    for e in 0 .. logits.Length - 1 do
        if logits[e].Length <> labels.Length then invalidArg "logits" $"exit {e + 1} has {logits[e].Length} samples, labels {labels.Length}"
        for i in 0 .. labels.Length - 1 do
            let row = logits[e][i]
            let mutable arg = 0
            for c in 1 .. row.Length - 1 do
                if row[c] > row[arg] then arg <- c
            let m = row[arg]
            let mutable z = 0.0
            for c in 0 .. row.Length - 1 do
                z <- z + exp (float (row[c] - m))
            conf[e][i] <- float32 (1.0 / z)
            pred[e][i] <- arg
    { Confidence = conf; Prediction = pred; Labels = labels; ExitMacs = exitMacs; BackboneMacs = backboneMacs }

/// Exit of each sample at a threshold: the first exit whose confidence is strictly greater, else the last (0-based).
let exitsAt (o: ExitOutputs) (threshold: float) =
    Array.init o.Samples (fun i ->
        let mutable e = 0
        while e < o.Exits - 1 && not (float (o.Confidence[e][i]) > threshold) do
            e <- e + 1
        e)

let pointAt (o: ExitOutputs) (threshold: float) =
    let exits = exitsAt o threshold
    let n = float o.Samples
    let correct = exits |> Array.mapi (fun i e -> if o.Prediction[e][i] = o.Labels[i] then 1 else 0) |> Array.sum
    let macs = exits |> Array.sumBy (fun e -> float (o.ExitMacs[e]))
    let ratios = Array.init o.Exits (fun k -> float (exits |> Array.filter ((=) k) |> Array.length) / n)
    { Threshold = threshold; Accuracy = float correct / n; AverageMacs = macs / n; ExitRatios = ratios }

/// The reference sweep: `count` evenly spaced thresholds over [0, 1] (default 100).
let thresholds (count: int) =
    if count < 2 then invalidArg "count" "a sweep needs at least two thresholds"
    Array.init count (fun k -> float k / float (count - 1))

let sweep (o: ExitOutputs) (ts: float[]) = ts |> Array.map (pointAt o)

/// Accuracy at the last threshold (in sweep order) whose average cost is at most `fraction` of the backbone; None ("–") where none is.
let budgetedAccuracy (o: ExitOutputs) (points: SweepPoint[]) (fraction: float) =
    let budget = fraction * float o.BackboneMacs
    points |> Array.filter (fun p -> p.AverageMacs <= budget) |> Array.tryLast |> Option.map (fun p -> p.Accuracy)

/// Accuracy of each exit alone.
let exitAccuracy (o: ExitOutputs) =
    Array.init o.Exits (fun e ->
        let correct = Array.init o.Samples (fun i -> if o.Prediction[e][i] = o.Labels[i] then 1 else 0) |> Array.sum
        float correct / float o.Samples)

/// Speed-up needed to reach a target accuracy: backbone cost / the smallest average cost of a sweep point that reaches it.
let speedUp (o: ExitOutputs) (points: SweepPoint[]) (target: float) =
    points
    |> Array.filter (fun p -> p.Accuracy >= target)
    |> Array.sortBy (fun p -> p.AverageMacs)
    |> Array.tryHead
    |> Option.map (fun p -> float o.BackboneMacs / p.AverageMacs)

let standardBudgets = [| 0.25; 0.5; 0.75; 1.0 |]

/// "81.23" or "–".
let percent (v: float option) =
    match v with
    | Some a -> (100.0 * a).ToString("F2", Globalization.CultureInfo.InvariantCulture)
    | None -> "–"
