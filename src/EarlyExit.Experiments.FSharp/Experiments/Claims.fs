/// claims.md: every claim of the two papers that our tables can test, with our paired difference over seeds, its 95%
/// confidence interval and n, the paper's figure where the paper gives one, and a verdict: reproduced (our CI lies on
/// the claimed side of 0), reversed (on the other side) or inconclusive (the CI contains 0). Written from whatever
/// results exist: the run folders, or, where a checkout holds the tables but not the runs, the per-seed values of the
/// tables' CSVs; a claim whose results do not exist says which command makes them.
module EarlyExit.Experiments.Experiments.Claims

open System
open System.IO
open EarlyExit.Experiments.Runner
open EarlyExit.Experiments.Evaluation
open EarlyExit.Experiments.Reports

/// What a claim reads of one run: its seed, its accuracy at each budget and of each exit.
type ClaimRun = { Seed: int; Budgets: float option[]; ExitAccuracy: float[] }

/// A results folder's rows by name.
type ClaimRows = Map<string, ClaimRun list>

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
      Differences: ClaimRows -> (int * float) list option }

let private valueAt (r: ClaimRun list) (f: ClaimRun -> float option) = r |> List.choose (fun s -> f s |> Option.map (fun v -> s.Seed, v))

/// Per seed a − b for the seeds both have.
let private diff (a: (int * float) list) (b: (int * float) list) =
    let bs = Map.ofList b
    a |> List.choose (fun (k, x) -> bs.TryFind k |> Option.map (fun y -> k, x - y))

let private rows (names: string list) (m: ClaimRows) = names |> List.map m.TryFind |> (fun l -> if List.forall Option.isSome l then Some(List.choose id l) else None)

let private budget b (s: ClaimRun) = s.Budgets[b]
let private exitAt e (s: ClaimRun) = Some s.ExitAccuracy[if e < 0 then s.ExitAccuracy.Length + e else e]
let private meanBudgets (s: ClaimRun) = s.Budgets |> Array.choose id |> fun xs -> if xs.Length = 0 then None else Some(Array.average xs)
let private meanExits (s: ClaimRun) = Some(Array.average s.ExitAccuracy)

/// a − b of one measure.
let private compare (a: string) (b: string) (f: ClaimRun -> float option) (m: ClaimRows) =
    rows [ a; b ] m |> Option.map (fun rs -> diff (valueAt rs[0] f) (valueAt rs[1] f))

/// Per seed, the mean over pairs (a_i − b_i) of one measure.
let private compareMean (pairs: (string * string) list) (f: ClaimRun -> float option) (m: ClaimRows) =
    let ds = pairs |> List.map (fun (a, b) -> compare a b f m)
    if ds |> List.exists Option.isNone then None
    else
        let ds = ds |> List.choose id
        let seeds = ds |> List.map (List.map fst >> Set.ofList) |> Set.intersectMany
        Some [ for k in seeds -> k, ds |> List.averageBy (fun d -> d |> List.find (fst >> (=) k) |> snd) ]

/// Splits one CSV line (fields may be quoted, with "" for a quote).
let private csvFields (line: string) =
    let fields = Collections.Generic.List<string>()
    let sb = Text.StringBuilder()
    let mutable quoted = false
    let mutable i = 0
    while i < line.Length do
        let c = line[i]
        if quoted then
            if c = '"' && i + 1 < line.Length && line[i + 1] = '"' then (sb.Append '"' |> ignore; i <- i + 1)
            elif c = '"' then quoted <- false
            else sb.Append c |> ignore
        elif c = '"' then quoted <- true
        elif c = ',' then (fields.Add(sb.ToString()); sb.Clear() |> ignore)
        else sb.Append c |> ignore
        i <- i + 1
    fields.Add(sb.ToString())
    List.ofSeq fields

/// The rows of a table's CSV (Table1.writeCsv's long form): per row and seed, the budgets and exit accuracies.
let rowsOfCsv (path: string) : ClaimRows =
    let inv = Globalization.CultureInfo.InvariantCulture
    let lines = File.ReadAllLines path |> Array.skip 1 |> Array.map csvFields
    let perSeed (cell: string) =
        cell.Split(';', StringSplitOptions.RemoveEmptyEntries)
        |> Array.map (fun kv -> let p = kv.Split(':') in int p[0], Double.Parse(p[1], inv))
        |> Map.ofArray
    lines
    |> Array.groupBy (fun f -> f[0])
    |> Array.map (fun (name, rs) ->
        let budgetMaps = [| for b in Budget.standardBudgets -> rs |> Array.tryFind (fun f -> f[1] = $"accuracy at {int (100.0 * b)}%% budget") |> Option.map (fun f -> perSeed f[6]) |]
        let exits = rs |> Array.filter (fun f -> f[1].StartsWith "accuracy of exit ") |> Array.sortBy (fun f -> int (f[1].Substring 17)) |> Array.map (fun f -> perSeed f[6])
        let seeds = exits |> Array.collect (fun m -> m |> Map.keys |> Array.ofSeq) |> Array.distinct |> Array.sort
        name,
        [ for k in seeds ->
            { Seed = k
              Budgets = budgetMaps |> Array.map (Option.bind (Map.tryFind k))
              ExitAccuracy = exits |> Array.map (fun m -> defaultArg (m.TryFind k) nan) } ])
    |> Map.ofArray

let private ofTableRows (rs: Table1.Row list) : ClaimRows =
    rs |> List.map (fun r -> r.Strategy, r.Runs |> List.map (fun s -> { Seed = s.Seed; Budgets = s.Budgets; ExitAccuracy = s.ExitAccuracy })) |> Map.ofList

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

/// The results folder a claim reads: ROOT(EXPERIMENT)/MODEL-DATA-SCALE, where `experimentRoot` names each experiment's
/// folder (Table 2: MSDNet's when it exists, as in the paper, else ResNet's).
let folderIn (experimentRoot: string -> string) (data: string) (scale: string) (c: Claim) =
    let at model = Path.Combine(experimentRoot c.Experiment, $"{model}-{data}-{scale}")
    if c.Model <> "" then at c.Model
    elif Directory.Exists(Path.Combine(at "msdnet", "runs")) || File.Exists(Path.Combine(at "msdnet", $"{c.Experiment}.csv")) then at "msdnet"
    else at "resnet34"

/// Evaluates every claim for one data set and scale, each experiment's results read from `experimentRoot EXPERIMENT`;
/// writes RESULTS/claims-DATA-SCALE.md and returns its text.
let writeWith (resultsRoot: string) (experimentRoot: string -> string) (data: string) (scale: string) =
    let cache = Collections.Generic.Dictionary<string, ClaimRows option>()
    // Run folders when they are there; else the table's CSV (a checkout holds the tables, not the runs). Where both
    // are, the CSV's rows fill in what the runs lack (rows of an earlier run whose folders are gone).
    let rowsOf (folder: string) (experiment: string) =
        match cache.TryGetValue folder with
        | true, r -> r
        | _ ->
            let csv = Path.Combine(folder, $"{experiment}.csv")
            let fromCsv = if File.Exists csv then Some(rowsOfCsv csv) else None
            let fromRuns =
                if Directory.Exists(Path.Combine(folder, "runs")) then
                    let rs = Table1.loadRows folder [] None
                    if rs.IsEmpty then None else Some(ofTableRows rs)
                else None
            let r =
                match fromRuns, fromCsv with
                | Some runs, Some table -> Some(Map.fold (fun acc k v -> if Map.containsKey k acc then acc else Map.add k v acc) runs table)
                | Some runs, None -> Some runs
                | None, t -> t
            cache[folder] <- r
            r
    let lines =
        [ for c in all ->
            let folder = folderIn experimentRoot data scale c
            let where = Path.GetRelativePath(resultsRoot, folder)
            let command =
                let model = if c.Model = "" then "resnet34 (or msdnet)" else c.Model
                $"dotnet fsi experiments/{c.Experiment}.fsx --model {model} --data {data} --scale {scale}"
            match rowsOf folder c.Experiment |> Option.bind c.Differences with
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
        "\nWritten " + DateTime.UtcNow.ToString("yyyy-MM-dd HH:mm") + " UTC from the run folders under " + resultsRoot + " (and, where a folder holds a table but not its runs, from the per-seed values of the table's CSV).\n"
    let path = Path.Combine(resultsRoot, $"claims-{data}-{scale}.md")
    Markdown.writeAtomic path md
    md

/// `writeWith` in the default layout: every experiment under RESULTS/EXPERIMENT.
let write (resultsRoot: string) (data: string) (scale: string) =
    writeWith resultsRoot (fun e -> Path.Combine(resultsRoot, e)) data scale

/// The claims after an experiment wrote to `outRoot` (its --out, any name): that experiment's claims read `outRoot`
/// (the regularisers script's tables are Table 2's), the others RESULTS/EXPERIMENT beside it, RESULTS being its parent,
/// where the claims file goes.
let writeAfter (experiment: string) (outRoot: string) (data: string) (scale: string) =
    let outRoot = Path.GetFullPath outRoot
    let resultsRoot = Path.GetDirectoryName outRoot
    let own = if experiment = "regularisers" then "table2" else experiment
    writeWith resultsRoot (fun e -> if e = own then outRoot else Path.Combine(resultsRoot, e)) data scale
