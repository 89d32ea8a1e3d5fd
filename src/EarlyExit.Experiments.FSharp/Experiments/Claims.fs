/// claims.md: every claim of the two papers that our tables can test, with our paired difference over seeds, its 95%
/// confidence interval and n, the paper's figure where the paper gives one, and a verdict: reproduced (our CI lies on
/// the claimed side of 0), reversed (on the other side) or inconclusive (the CI contains 0). Written from whatever
/// results exist; a claim whose runs do not exist says which command makes them.
module EarlyExit.Experiments.Experiments.Claims

open System
open System.IO
open EarlyExit.Experiments.Runner
open EarlyExit.Experiments.Reports

/// Where a claim's numbers come from, and how a seed's difference is computed from the rows of that folder.
type Claim =
    { Paper: string
      Text: string
      /// Experiment and model of the results folder: ("table1", "resnet34"), ...
      Experiment: string
      Model: string
      /// The claimed sign: true when the paper says the difference is positive.
      Positive: bool
      PaperFigure: string
      /// What we compare, in words.
      Measure: string
      /// Per-seed differences from the rows by name (None when a row is missing).
      Differences: Map<string, Table1.Row> -> (int * float) list option }

let private valueAt (r: Table1.Row) (f: Table1.SeedRun -> float option) = r.Runs |> List.choose (fun s -> f s |> Option.map (fun v -> s.Seed, v))

/// Per seed a − b for the seeds both have.
let private diff (a: (int * float) list) (b: (int * float) list) =
    let bs = Map.ofList b
    a |> List.choose (fun (k, x) -> bs.TryFind k |> Option.map (fun y -> k, x - y))

let private rows (names: string list) (m: Map<string, Table1.Row>) = names |> List.map m.TryFind |> (fun l -> if List.forall Option.isSome l then Some(List.choose id l) else None)

let private budget b (s: Table1.SeedRun) = s.Budgets[b]
let private exitAt e (s: Table1.SeedRun) = Some s.ExitAccuracy[if e < 0 then s.ExitAccuracy.Length + e else e]
let private meanBudgets (s: Table1.SeedRun) = s.Budgets |> Array.choose id |> fun xs -> if xs.Length = 0 then None else Some(Array.average xs)
let private meanExits (s: Table1.SeedRun) = Some(Array.average s.ExitAccuracy)

/// a − b of one measure.
let private compare (a: string) (b: string) (f: Table1.SeedRun -> float option) (m: Map<string, Table1.Row>) =
    rows [ a; b ] m |> Option.map (fun rs -> diff (valueAt rs[0] f) (valueAt rs[1] f))

/// Per seed, the mean over pairs (a_i − b_i) of one measure.
let private compareMean (pairs: (string * string) list) (f: Table1.SeedRun -> float option) (m: Map<string, Table1.Row>) =
    let ds = pairs |> List.map (fun (a, b) -> compare a b f m)
    if ds |> List.exists Option.isNone then None
    else
        let ds = ds |> List.choose id
        let seeds = ds |> List.map (List.map fst >> Set.ofList) |> Set.intersectMany
        Some [ for k in seeds -> k, ds |> List.averageBy (fun d -> d |> List.find (fst >> (=) k) |> snd) ]

let private t2 (reg: string) (strength: string) (warm: bool) = $"""{reg}-{strength}-{if warm then "warmup" else "nowarmup"}"""

let all: Claim list =
    let icml = "ICML 2025 (How to Train Your Multi-Exit Model?)"
    let p26 = "2026 (Balancing Stability and Plasticity...)"
    [ { Paper = p26; Text = "sequential EWC beats separate training at the 25% budget (ResNet-34)"; Experiment = "table1"; Model = "resnet34"
        Positive = true; PaperFigure = "+4.25"; Measure = "sequential-ewc − separate, accuracy at 25%"
        Differences = compare "sequential-ewc" "separate" (budget 0) }
      { Paper = p26; Text = "sequential LwF beats separate training at the 25% budget (ResNet-34)"; Experiment = "table1"; Model = "resnet34"
        Positive = true; PaperFigure = "+4.46"; Measure = "sequential-lwf − separate, accuracy at 25%"
        Differences = compare "sequential-lwf" "separate" (budget 0) }
      { Paper = p26; Text = "on ResNet-34, EWC slightly beats LwF at the deepest exit"; Experiment = "table1"; Model = "resnet34"
        Positive = true; PaperFigure = "(slightly)"; Measure = "sequential-ewc − sequential-lwf, last exit"
        Differences = compare "sequential-ewc" "sequential-lwf" (exitAt -1) }
      { Paper = p26; Text = "on MSDNet, LwF beats EWC at early exits"; Experiment = "table1"; Model = "msdnet"
        Positive = true; PaperFigure = ""; Measure = "sequential-lwf − sequential-ewc, exit 1"
        Differences = compare "sequential-lwf" "sequential-ewc" (exitAt 0) }
      { Paper = p26; Text = "on MSDNet, LwF beats EWC at late exits"; Experiment = "table1"; Model = "msdnet"
        Positive = true; PaperFigure = ""; Measure = "sequential-lwf − sequential-ewc, last exit"
        Differences = compare "sequential-lwf" "sequential-ewc" (exitAt -1) }
      { Paper = p26; Text = "a larger λ helps early exits (Table 2)"; Experiment = "table2"; Model = ""
        Positive = true; PaperFigure = ""; Measure = "EWC λ=1000 − λ=10 with warm-up, exit 1"
        Differences = compare (t2 "ewc" "lambda1000" true) (t2 "ewc" "lambda10" true) (exitAt 0) }
      { Paper = p26; Text = "a larger λ slightly hurts the last exit (Table 2)"; Experiment = "table2"; Model = ""
        Positive = false; PaperFigure = "(slightly)"; Measure = "EWC λ=1000 − λ=10 with warm-up, last exit"
        Differences = compare (t2 "ewc" "lambda1000" true) (t2 "ewc" "lambda10" true) (exitAt -1) }
      { Paper = p26; Text = "without the warm-up EWC is worse (Table 2)"; Experiment = "table2"; Model = ""
        Positive = true; PaperFigure = ""; Measure = "warm-up − no warm-up, mean accuracy over exits, mean over λ ∈ {10, 100, 1000}"
        Differences = compareMean [ for l in [ "lambda10"; "lambda100"; "lambda1000" ] -> t2 "ewc" l true, t2 "ewc" l false ] meanExits }
      { Paper = p26; Text = "without the warm-up LwF is worse (Table 2)"; Experiment = "table2"; Model = ""
        Positive = true; PaperFigure = ""; Measure = "warm-up − no warm-up, mean accuracy over exits, mean over ρ ∈ {0.2, 0.5, 0.7}"
        Differences = compareMean [ for r in [ "rho0.2"; "rho0.5"; "rho0.7" ] -> t2 "lwf" r true, t2 "lwf" r false ] meanExits }
      { Paper = icml; Text = "mixed training beats joint training"; Experiment = "table1"; Model = "resnet34"
        Positive = true; PaperFigure = ""; Measure = "mixed − joint, accuracy averaged over the 25/50/75/100% budgets"
        Differences = compare "mixed" "joint" meanBudgets }
      { Paper = icml; Text = "mixed training beats disjoint training"; Experiment = "table1"; Model = "resnet34"
        Positive = true; PaperFigure = ""; Measure = "mixed − disjoint, accuracy averaged over the 25/50/75/100% budgets"
        Differences = compare "mixed" "disjoint" meanBudgets } ]

/// The results folder a claim reads: RESULTS/EXPERIMENT/MODEL-DATA-SCALE (Table 2: MSDNet's when it exists, as in the
/// paper, else ResNet's).
let folderOf (resultsRoot: string) (data: string) (scale: string) (c: Claim) =
    let at model = Path.Combine(resultsRoot, c.Experiment, $"{model}-{data}-{scale}")
    if c.Model <> "" then at c.Model
    elif Directory.Exists(Path.Combine(at "msdnet", "runs")) then at "msdnet"
    else at "resnet34"

/// Evaluates every claim from the results under RESULTS for one data set and scale; writes RESULTS/claims-DATA-SCALE.md
/// and returns its text.
let write (resultsRoot: string) (data: string) (scale: string) =
    let cache = Collections.Generic.Dictionary<string, Map<string, Table1.Row> option>()
    let rowsOf (folder: string) =
        match cache.TryGetValue folder with
        | true, r -> r
        | _ ->
            let r =
                if Directory.Exists(Path.Combine(folder, "runs")) then
                    Some(Table1.loadRows folder [] None |> List.map (fun r -> r.Strategy, r) |> Map.ofList)
                else None
            cache[folder] <- r
            r
    let lines =
        [ for c in all ->
            let folder = folderOf resultsRoot data scale c
            let where = Path.GetRelativePath(resultsRoot, folder)
            let command =
                let model = if c.Model = "" then "resnet34 (or msdnet)" else c.Model
                $"dotnet fsi experiments/{c.Experiment}.fsx --model {model} --data {data} --scale {scale}"
            match rowsOf folder |> Option.bind c.Differences with
            | None -> [ c.Paper; c.Text; c.Measure; $"not run: `{command}`"; "–"; c.PaperFigure; "–" ]
            | Some [] -> [ c.Paper; c.Text; c.Measure; where; "no seed has a value (e.g. no threshold fits the budget)"; c.PaperFigure; "–" ]
            | Some d ->
                let s = Statistics.summarize (List.map snd d)
                [ c.Paper; c.Text; c.Measure; where; $"{Statistics.formatSigned 100.0 s} (n = {s.N})"; c.PaperFigure; Statistics.claimVerdict c.Positive s ] ]
    let md =
        $"# The papers' claims against our results ({data}, {scale} scale)\n\n" +
        "Each line: the paired difference over seeds (same seed, same initial weights, validation split and data order), in " +
        "accuracy points, mean ± half-width of the 95% confidence interval (Student t), and n. Verdict: reproduced where the " +
        "interval lies on the side of 0 the paper claims, reversed where it lies on the other side, inconclusive where it " +
        "contains 0 (or n < 2). The papers' figures are on CIFAR-100 at full scale; ours are at the scale named above, so a " +
        "verdict says what this scale shows, not what the paper's would.\n\n" +
        Markdown.table [ "paper"; "claim"; "what we compare"; "results"; "ours (points)"; "paper"; "verdict" ] lines +
        "\nWritten " + DateTime.UtcNow.ToString("yyyy-MM-dd HH:mm") + " UTC from the run folders under " + resultsRoot + ".\n"
    let path = Path.Combine(resultsRoot, $"claims-{data}-{scale}.md")
    Markdown.writeAtomic path md
    md
