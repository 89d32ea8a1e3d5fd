/// Statistics over seeds: mean and the half-width of a 95% confidence interval (Student t), paired differences
/// between methods trained with the same seeds, and verdicts that say what a difference shows.
module EarlyExit.Experiments.Reports.Statistics

open System

/// The p-quantile of Student's t distribution with `df` degrees of freedom (MathNet.Numerics).
let tQuantile (df: int) (p: float) =
    if df < 1 then invalidArg (nameof df) "a t quantile needs at least one degree of freedom"
    MathNet.Numerics.Distributions.StudentT.InvCDF(0.0, 1.0, float df, p)

/// n values summarised: mean, sample standard deviation, and the half-width of the two-sided 95% confidence interval
/// of the mean (t_{0.975, n−1} · s / √n); NaN for the spread where n < 2.
type Summary =
    { N: int
      Mean: float
      Std: float
      HalfWidth: float
      Values: float list }

let summarize (values: float list) : Summary =
    let n = values.Length
    if n = 0 then { N = 0; Mean = nan; Std = nan; HalfWidth = nan; Values = [] }
    else
        let mean = List.average values
        if n < 2 then { N = n; Mean = mean; Std = nan; HalfWidth = nan; Values = values }
        else
            let std = sqrt ((values |> List.sumBy (fun v -> (v - mean) ** 2.0)) / float (n - 1))
            { N = n; Mean = mean; Std = std; HalfWidth = tQuantile (n - 1) 0.975 * std / sqrt (float n); Values = values }

/// The paired differences a_k − b_k over the seeds both have, summarised (methods trained with the same seed k share
/// initial weights, validation split and data order, so the pairing removes what the seed alone moves).
let paired (a: (int * float) list) (b: (int * float) list) : Summary =
    let bs = Map.ofList b
    a |> List.choose (fun (seed, x) -> Map.tryFind seed bs |> Option.map (fun y -> x - y)) |> summarize

/// What a difference shows: its 95% confidence interval lies above 0, below 0, or contains it (or n < 2).
type Verdict =
    | Better
    | Worse
    | Indistinguishable
    | TooFewSeeds

let verdict (d: Summary) =
    if d.N < 2 || Double.IsNaN d.HalfWidth then TooFewSeeds
    elif d.Mean - d.HalfWidth > 0.0 then Better
    elif d.Mean + d.HalfWidth < 0.0 then Worse
    else Indistinguishable

let verdictName =
    function
    | Better -> "better"
    | Worse -> "worse"
    | Indistinguishable -> "indistinguishable"
    | TooFewSeeds -> "n < 2"

/// A claim of a paper against our paired difference: reproduced (our CI on the claimed side of 0), reversed (on the
/// other side), or inconclusive (the CI contains 0, or n < 2).
let claimVerdict (claimedPositive: bool) (d: Summary) =
    match verdict d, claimedPositive with
    | Better, true | Worse, false -> "reproduced"
    | Worse, true | Better, false -> "reversed"
    | _ -> "inconclusive"

/// Timings: the median of repeated measurements (for an even count the upper of the two middle values).
let median (xs: float list) = xs |> List.sort |> fun s -> s[s.Length / 2]

/// Timings (the benchmark): the 95% confidence interval of the geometric mean of positive per-repeat ratios (Student t on their logs, so a
/// ratio and its inverse get mirrored intervals); None for fewer than 2 repeats or a ratio that is not positive.
let ratioInterval (xs: float list) =
    if xs.Length < 2 || xs |> List.exists (fun x -> not (x > 0.0) || Double.IsInfinity x) then None
    else
        let s = summarize (xs |> List.map log)
        Some [| exp (s.Mean - s.HalfWidth); exp (s.Mean + s.HalfWidth) |]

/// A target's verdict over repeats: met or not met where the whole interval is on one side of the bound,
/// inconclusive where it spans it; the median's verdict where there is no interval.
let repeatedVerdict (meets: float -> bool) (value: float) (ci: float[] option) =
    match ci with
    | Some [| lo; hi |] when meets lo && meets hi -> "met"
    | Some [| lo; hi |] when not (meets lo) && not (meets hi) -> "not met"
    | Some _ -> "inconclusive"
    | None -> if meets value then "met" else "not met"

let private inv = Globalization.CultureInfo.InvariantCulture

/// "88.12 ± 0.45" (values scaled by `scale`, e.g. 100 for accuracies in %); "88.12" when n < 2; "–" when n = 0.
let format (scale: float) (s: Summary) =
    if s.N = 0 || Double.IsNaN s.Mean then "–"
    elif s.N < 2 then (scale * s.Mean).ToString("F2", inv)
    else (scale * s.Mean).ToString("F2", inv) + " ± " + (scale * s.HalfWidth).ToString("F2", inv)

/// A signed difference: "+1.23 ± 0.45".
let formatSigned (scale: float) (s: Summary) =
    if s.N = 0 || Double.IsNaN s.Mean then "–"
    else (if s.Mean >= 0.0 then "+" else "") + format scale s
