/// Early-exit evaluation from cached per-exit outputs: threshold sweeps, budgeted accuracy, exit ratios, speed-up.
/// Everything is a pure function of (confidence, prediction) per exit and sample, the labels, and the exit costs.
module EarlyExit.Experiments.Evaluation.Budget

open System

/// Per exit and sample: maximum softmax probability, predicted class (first index on ties) and the entropy of the
/// softmax distribution (nats).
type ExitOutputs =
    { Confidence: float32[][]
      Prediction: int[][]
      Entropy: float32[][]
      /// Classes of every exit.
      Classes: int
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
    let entropy = Array.init logits.Length (fun _ -> Array.zeroCreate labels.Length)
    for e in 0 .. logits.Length - 1 do
        if logits[e].Length <> labels.Length then invalidArg "logits" $"exit {e + 1} has {logits[e].Length} samples, labels {labels.Length}"
        for i in 0 .. labels.Length - 1 do
            // The same function real early exit decides with (EarlyExitInference.Run and RunStreamed), so the two agree
            // bit for bit: maximum softmax probability, first argmax, entropy in nats.
            let struct (c, p, h) = EarlyExit.Inference.EarlyExitInference.Confidence(ReadOnlySpan logits[e][i], true)
            conf[e][i] <- c
            pred[e][i] <- int p
            entropy[e][i] <- h
    let classes = if logits.Length > 0 && labels.Length > 0 then (logits[0][0]).Length else 0
    { Confidence = conf; Prediction = pred; Entropy = entropy; Classes = classes; Labels = labels; ExitMacs = exitMacs; BackboneMacs = backboneMacs }

/// When a sample leaves the network.
type Policy =
    /// At the first exit whose maximum softmax probability is strictly greater than t (the papers' rule).
    | Softmax
    /// At the first exit whose softmax entropy is strictly below t (nats).
    | Entropy
    /// At the first exit where the prediction has stayed the same for t consecutive exits (PBEE, Zhou et al. 2020:
    /// the counter grows by one when an exit agrees with the one before and resets otherwise; t = 0 leaves at exit 1).
    | Patience

let policyName =
    function
    | Softmax -> "softmax"
    | Entropy -> "entropy"
    | Patience -> "patience"

let parsePolicy (s: string) =
    match s.Trim().ToLowerInvariant() with
    | "softmax" | "max-softmax" -> Ok Softmax
    | "entropy" -> Ok Entropy
    | "patience" | "pbee" -> Ok Patience
    | other -> Error $"unknown exit policy '{other}' (softmax, entropy, patience)"

/// Exit of each sample (0-based) under a policy with parameter t; a sample the rule never lets go takes the last exit.
let exitsWith (o: ExitOutputs) (policy: Policy) (t: float) =
    Array.init o.Samples (fun i ->
        match policy with
        | Softmax ->
            let mutable e = 0
            while e < o.Exits - 1 && not (float (o.Confidence[e][i]) > t) do
                e <- e + 1
            e
        | Entropy ->
            let mutable e = 0
            while e < o.Exits - 1 && not (float (o.Entropy[e][i]) < t) do
                e <- e + 1
            e
        | Patience ->
            let k = int (round t)
            let mutable e = 0
            let mutable count = 0
            while e < o.Exits - 1 && count < k do
                e <- e + 1
                count <- if o.Prediction[e][i] = o.Prediction[e - 1][i] then count + 1 else 0
            e)

/// Exit of each sample at a threshold: the first exit whose confidence is strictly greater, else the last (0-based).
let exitsAt (o: ExitOutputs) (threshold: float) =
    Array.init o.Samples (fun i ->
        let mutable e = 0
        while e < o.Exits - 1 && not (float (o.Confidence[e][i]) > threshold) do
            e <- e + 1
        e)

let pointWith (o: ExitOutputs) (policy: Policy) (threshold: float) =
    let exits = exitsWith o policy threshold
    let n = float o.Samples
    let correct = exits |> Array.mapi (fun i e -> if o.Prediction[e][i] = o.Labels[i] then 1 else 0) |> Array.sum
    let macs = exits |> Array.sumBy (fun e -> float (o.ExitMacs[e]))
    let ratios = Array.init o.Exits (fun k -> float (exits |> Array.filter ((=) k) |> Array.length) / n)
    { Threshold = threshold; Accuracy = float correct / n; AverageMacs = macs / n; ExitRatios = ratios }

let pointAt (o: ExitOutputs) (threshold: float) = pointWith o Softmax threshold

/// The reference sweep: `count` evenly spaced thresholds over [0, 1] (default 100).
let thresholds (count: int) =
    if count < 2 then invalidArg "count" "a sweep needs at least two thresholds"
    Array.init count (fun k -> float k / float (count - 1))

let sweep (o: ExitOutputs) (ts: float[]) = ts |> Array.map (pointAt o)

/// A policy's parameters to sweep: softmax 100 thresholds over [0, 1]; entropy 100 over [0, ln C] (C classes, the
/// entropy's range); patience 0..M−1.
let parametersOf (o: ExitOutputs) (policy: Policy) =
    match policy with
    | Softmax -> thresholds 100
    | Entropy -> thresholds 100 |> Array.map (fun t -> t * log (float (max 2 o.Classes)))
    | Patience -> Array.init o.Exits float

let sweepWith (o: ExitOutputs) (policy: Policy) = parametersOf o policy |> Array.map (pointWith o policy)

/// The sweep point a budget selects: the one that spends the most within `fraction` of the backbone (the last
/// threshold within it, for a rule whose cost grows with its parameter, as every policy's does in one direction).
let budgetPoint (o: ExitOutputs) (points: SweepPoint[]) (fraction: float) =
    let budget = fraction * float o.BackboneMacs
    let within = points |> Array.filter (fun p -> p.AverageMacs <= budget)
    if within.Length = 0 then None
    else Some(within |> Array.fold (fun (best: SweepPoint) p -> if p.AverageMacs >= best.AverageMacs then p else best) within[0])

/// Accuracy at the point a budget selects; None ("–") where no point fits.
let budgetedAccuracy (o: ExitOutputs) (points: SweepPoint[]) (fraction: float) =
    budgetPoint o points fraction |> Option.map (fun p -> p.Accuracy)

/// The honest protocol: the parameter is chosen on the validation split (the point a budget selects there), then
/// applied once to the test split; returns the test point (whose cost may exceed the budget a little).
let fittedOnValidation (validation: ExitOutputs) (test: ExitOutputs) (policy: Policy) (fraction: float) =
    budgetPoint validation (sweepWith validation policy) fraction |> Option.map (fun p -> pointWith test policy p.Threshold)

/// Expected calibration error of one exit: Σ_b (n_b/N)·|accuracy_b − mean confidence_b| over `bins` equal-width
/// bins of the maximum softmax probability (a confidence of exactly 1 falls in the last bin); and the bins
/// (count, accuracy, mean confidence) for a reliability diagram.
let calibration (o: ExitOutputs) (exit: int) (bins: int) =
    let counts = Array.zeroCreate<int> bins
    let correct = Array.zeroCreate<int> bins
    let confidence = Array.zeroCreate<float> bins
    for i in 0 .. o.Samples - 1 do
        let c = float (o.Confidence[exit][i])
        let b = min (bins - 1) (int (c * float bins))
        counts[b] <- counts[b] + 1
        confidence[b] <- confidence[b] + c
        if o.Prediction[exit][i] = o.Labels[i] then correct[b] <- correct[b] + 1
    let n = float o.Samples
    let ece =
        Array.init bins (fun b -> if counts[b] = 0 then 0.0 else float counts[b] / n * abs (float correct[b] / float counts[b] - confidence[b] / float counts[b]))
        |> Array.sum
    ece, Array.init bins (fun b -> counts[b], (if counts[b] = 0 then nan else float correct[b] / float counts[b]), (if counts[b] = 0 then nan else confidence[b] / float counts[b]))

/// The bins of the calibration error and the reliability diagrams.
let calibrationBins = 15

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
