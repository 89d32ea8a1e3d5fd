/// Table 1 of the 2026 paper (every strategy × top-1 at 25/50/75/100% of the backbone's MACs) with Fig. 2 and Fig. 3,
/// over several seeds, on the data and scale the machine allows. Seed k gives every strategy the same initial
/// weights, validation split and data order wherever their stages coincide, so strategies are compared by paired
/// differences over seeds, with 95% confidence intervals and a verdict. Runs go through the local executor (N at a
/// time), are resumable and shared: finished runs are not redone and a warm-up is trained once per seed.
module EarlyExit.Experiments.Experiments.Table1

open System
open System.IO
open System.Text.Json
open EarlyExit.Data
open EarlyExit.Experiments.Recipes
open EarlyExit.Experiments.Recipes.Builders
open EarlyExit.Experiments.Runner
open EarlyExit.Experiments.Evaluation
open EarlyExit.Experiments.Reports

/// Where an experiment's runs go: the local executor, a Slurm job array, nowhere (plan only: the sweep is written),
/// or nowhere with the tables written from whatever finished (collect).
type Backend =
    | LocalBackend
    | SlurmBackend of Slurm.Options
    | PlanOnly
    | CollectOnly

/// An experiment's runs went to a scheduler (or were only planned): what to do next, instead of tables.
exception Submitted of string

type Options =
    { Scale: Scales.Scale
      /// None: CIFAR-100 when its files are present, else Fashion-MNIST.
      Data: string option
      DataRoot: string option
      Model: string
      Seeds: int list
      OutRoot: string
      Device: string option
      Strategies: Strategy list option
      /// LwF teacher policies to run every LwF strategy with (one row each); the first is the plain name's.
      LwfTeachers: LwfTeachers list
      /// Runs at a time, and torch threads of each.
      Jobs: int
      Threads: int
      Deterministic: bool
      /// Every strategy gets the same total of optimiser steps (Cost.equalSteps).
      EqualSteps: bool
      /// Kernels forced on every run (None: the numerics guard's choice).
      Numerics: string option
      /// A second setting: epochs of every stage after the warm-up (None: the scale's).
      StageEpochs: int option
      /// Table 2 only: the regularisers whose half of the grid to run ("ewc", "lwf"; None: both).
      Regularisers: string list option
      /// regularisers.fsx only: the parts of its grid to run ("schedules", "fisher", "mas"; None: all).
      Parts: string list option
      Backend: Backend
      /// The exit policy the budget tables, curves and exit ratios use (the papers': softmax).
      Policy: Budget.Policy
      /// The experiment's name and its script options, recorded in the sweep (for `earlyexit sweep collect`).
      Experiment: string
      Arguments: string list
      Log: string -> unit }

/// The scale's settings as the options adjust them (a second setting).
let adjust (o: Options) =
    match o.StageEpochs with
    | Some n -> Scales.withStageEpochs n
    | None -> id

/// The recipe of a strategy for these options.
let recipeOf (o: Options) (strategy: Strategy) (data: string) = Scales.recipeWith (adjust o) o.Scale strategy o.Model data 0

/// The scale's description for these options.
let describeScale (o: Options) (data: string) = (adjust o (Scales.settings o.Scale o.Model data)).Description

/// The (row name, recipe) pairs of strategies: one per LwF teacher policy for strategies with LwF, the paper's
/// per-exit policy under the strategy's own name and any other as "NAME-POLICY-teacher".
let recipesOf (o: Options) (data: string) (strategies: Strategy list) =
    [ for strategy in strategies do
        let recipe = recipeOf o strategy data
        if not (recipe.Stages |> List.exists (Penalties.uses "lwf")) then yield strategyName strategy, recipe
        else
            for t in o.LwfTeachers do
                let label = if t = PerExitTeachers then strategyName strategy else $"{strategyName strategy}-{Names.lwfTeachers t}-teacher"
                yield label, Scales.withLwfTeachers t recipe ]

/// "EWC", "LwF", "MAS", "EWC+LwF": how tables name a stage's regularisers.
let regulariserLabel (ps: Penalty list) =
    ps |> List.map (fun p -> match p.Name with
                             | "ewc" -> "EWC"
                             | "lwf" -> "LwF"
                             | other -> other.ToUpperInvariant())
    |> String.concat "+"

/// "λ=100", "ρ=0.7", "λ=geometric:10,2": the strengths as tables show them.
let strengthLabel (ps: Penalty list) =
    ps
    |> List.map (fun p ->
        let symbol = match Penalties.kind p.Name |> Option.map (fun k -> k.StrengthName) with
                     | Some "lambda" -> "λ"
                     | Some "rho" -> "ρ"
                     | Some other -> other
                     | None -> "strength"
        $"{symbol}={Strength.format p.Strength}")
    |> String.concat ", "

/// The paper's published differences at the 25% budget (2026 paper, section 3.2, CIFAR-100), beside ours.
let publishedDeltaVsSeparateAt25 = [ "sequential-ewc", 4.25; "sequential-lwf", 4.46 ]

let chooseData (o: Options) =
    match o.Data with
    | Some d -> DataCatalog.Normalise d, $"{DataCatalog.Normalise d} (asked for)"
    | None ->
        if DataCatalog.IsPresent("cifar100", Option.toObj o.DataRoot) then "cifar100", "cifar100 (its binary files were found)"
        else
            let cifarFolder = DataCatalog.FolderOf("cifar100", Option.toObj o.DataRoot)
            let fashionFolder = DataCatalog.FolderOf("fashion-mnist", Option.toObj o.DataRoot)
            "fashion-mnist", $"fashion-mnist (CIFAR-100 not found in {cifarFolder}; Fashion-MNIST from {fashionFolder})"

/// One finished run: one strategy, one seed.
type SeedRun =
    { Seed: int
      Info: RunFolder.RunInfo
      Budgets: float option[]
      /// The honest protocol at each budget: the parameter fitted on the validation split, then the test accuracy and
      /// average MACs there (None: nothing fits, or the run has no validation logits).
      Fitted: Budget.SweepPoint option[]
      ExitAccuracy: float[]
      /// Expected calibration error of each exit, and its reliability bins (count, accuracy, mean confidence).
      Ece: float[]
      Calibration: (int * float * float)[][]
      Sweep: Budget.SweepPoint[]
      Outputs: Budget.ExitOutputs }

/// A row of a table: one strategy (or grid point) over its seeds.
type Row =
    { Strategy: string
      Runs: SeedRun list }

    member r.Info = r.Runs.Head.Info
    member r.Seeds = r.Runs |> List.map (fun s -> s.Seed)

/// Reads a finished run, its budgets, curve and exit ratios under an exit policy.
let loadRunWith (policy: Budget.Policy) (runDir: string) (seed: int) =
    let info = RunFolder.readInfo runDir
    let outputs = RunFolder.readOutputs runDir info
    let sweep = Budget.sweepWith outputs policy
    let validation = RunFolder.readValidationOutputs runDir info
    let calibration = Array.init outputs.Exits (fun e -> Budget.calibration outputs e Budget.calibrationBins)
    { Seed = seed
      Info = info
      Budgets = Budget.standardBudgets |> Array.map (Budget.budgetedAccuracy outputs sweep)
      Fitted = Budget.standardBudgets |> Array.map (fun f -> validation |> Option.bind (fun v -> Budget.fittedOnValidation v outputs policy f))
      ExitAccuracy = Budget.exitAccuracy outputs
      Ece = calibration |> Array.map fst
      Calibration = calibration |> Array.map snd
      Sweep = sweep
      Outputs = outputs }

let loadRun (runDir: string) (seed: int) = loadRunWith Budget.Softmax runDir seed

/// The run folder of a row's seed.
let runDir (dir: string) (name: string) (seed: int) = Path.Combine(dir, "runs", name, $"seed-{seed}")

/// Every finished run under DIR/runs/NAME/seed-K, one row per NAME in the order of `order` (others after, by name);
/// `seeds` keeps only those seeds (None: all found).
let loadRowsWith (policy: Budget.Policy) (dir: string) (order: string list) (seeds: int list option) =
    let runs = Path.Combine(dir, "runs")
    if not (Directory.Exists runs) then failwithf "%s: no runs; run experiments/table1.fsx first" runs
    Directory.GetDirectories runs
    |> Array.map (fun d ->
        let seedRuns =
            Directory.GetDirectories(d, "seed-*")
            |> Array.choose (fun s ->
                match Int32.TryParse(Path.GetFileName(s).Substring 5) with
                | true, k when File.Exists(Path.Combine(s, "metrics.json")) && (seeds |> Option.forall (List.contains k)) -> Some(loadRunWith policy s k)
                | _ -> None)
            |> Array.sortBy (fun r -> r.Seed)
            |> List.ofArray
        Path.GetFileName d, seedRuns)
    |> Array.filter (fun (_, rs) -> not rs.IsEmpty)
    |> Array.sortBy (fun (n, _) -> (match List.tryFindIndex ((=) n) order with Some i -> i | None -> 1000), n)
    |> Array.map (fun (n, rs) -> { Strategy = n; Runs = rs })
    |> Array.toList

let loadRows (dir: string) (order: string list) (seeds: int list option) = loadRowsWith Budget.Softmax dir order seeds

/// Accuracy at budget b of every seed that has a threshold within it: (seed, accuracy).
let budgetValues (r: Row) (b: int) = r.Runs |> List.choose (fun s -> s.Budgets[b] |> Option.map (fun v -> s.Seed, v))
let exitValues (r: Row) (e: int) = r.Runs |> List.map (fun s -> s.Seed, s.ExitAccuracy[e])
let budgetSummary (r: Row) (b: int) = budgetValues r b |> List.map snd |> Statistics.summarize
let exitSummary (r: Row) (e: int) = exitValues r e |> List.map snd |> Statistics.summarize

/// The paired difference r − baseline at budget b over the seeds both have.
let deltaAt (r: Row) (baseline: Row) (b: int) = Statistics.paired (budgetValues r b) (budgetValues baseline b)

let fig3Thresholds = [ 0.5; 0.6; 0.7; 0.8; 0.9; 0.95; 0.99 ]

/// The parameters Fig. 3 shows under a policy: the papers' thresholds for softmax, fractions of ln C for entropy (the
/// smaller, the later samples leave), every patience.
let fig3Parameters (policy: Budget.Policy) (o: Budget.ExitOutputs) =
    match policy with
    | Budget.Softmax -> fig3Thresholds
    | Budget.Entropy -> [ 0.5; 0.3; 0.2; 0.1; 0.05; 0.02 ] |> List.map (fun f -> f * log (float (max 2 o.Classes)))
    | Budget.Patience -> [ for k in 0 .. o.Exits - 1 -> float k ]

/// Test accuracy at budget b under the honest protocol, per seed that has validation logits and a fitting parameter.
let fittedValues (r: Row) (b: int) = r.Runs |> List.choose (fun s -> s.Fitted[b] |> Option.map (fun p -> s.Seed, p.Accuracy))
let eceValues (r: Row) (e: int) = r.Runs |> List.map (fun s -> s.Seed, s.Ece[e])

/// The CPUs and kernels that produced the rows (one line each; several when runs were made on different machines).
let numericsOf (rows: Row list) =
    let all = rows |> List.collect (fun r -> r.Runs |> List.map (fun s -> r.Strategy, s.Info.Numerics))
    match all |> List.map snd |> List.distinct with
    | [ one ] -> one
    | several ->
        String.Join(" | ", several |> List.map (fun n -> $"""{n} (runs: {String.Join(",", all |> List.filter (fun (_, x) -> x = n) |> List.map fst |> List.distinct)})"""))

/// One line naming what produced a figure: the network as built, data, scale, device, kernels, seeds, code.
let provenanceOf (rows: Row list) =
    let r = rows.Head
    let seeds = rows |> List.collect (fun r -> r.Seeds) |> List.distinct |> List.sort
    let seedText = String.Join(",", seeds)
    let model = if r.Info.Model = "" then "" else r.Info.Model.Replace(", ", "; ") + ", "
    $"{model}{r.Info.Data}, scale {r.Info.Scale}, {r.Info.Device}, {r.Info.NumericsShort}, seeds {seedText}, code {r.Info.CodeVersion}"

/// Mean training cost of a row: epochs, optimiser steps, training MACs (from every seed that recorded it) and the
/// runs' own wall time (a stage reused from the prefix cache costs its MACs but no time).
let costOf (r: Row) =
    let costs = r.Runs |> List.choose (fun s -> s.Info.Cost)
    let mean f = if costs.IsEmpty then nan else costs |> List.averageBy f
    {| Epochs = mean (fun c -> float c.Epochs)
       Steps = mean (fun c -> float c.Steps)
       TrainingMacs = mean (fun c -> c.TrainingMacs)
       Seconds = r.Runs |> List.averageBy (fun s -> s.Info.WallSeconds) |}

let private inv = Globalization.CultureInfo.InvariantCulture
let private num (format: string) (v: float) = if Double.IsNaN v then "–" else v.ToString(format, inv)

/// The table in long form as CSV: one line per row and quantity (budgets, exits, paired differences), with n, mean,
/// standard deviation, the 95% CI half-width, every seed's value, and the provenance columns.
let writeCsv (path: string) (rows: Row list) (extra: (Row -> (string * Statistics.Summary) list)) =
    let header = [ "row"; "quantity"; "n"; "mean"; "std"; "ci95 half-width"; "per-seed values (seed:value)"; "data"; "scale"; "device"; "threads"; "code version"; "cpu and kernels" ]
    let line (r: Row) (q: string) (s: Statistics.Summary) (values: (int * float) list) =
        [ r.Strategy; q; string s.N; num "G6" s.Mean; num "G6" s.Std; num "G6" s.HalfWidth
          String.Join(";", values |> List.map (fun (k, v) -> $"""{k}:{v.ToString("G6", inv)}"""))
          r.Info.Data; r.Info.Scale; r.Info.Device; string r.Info.Threads; r.Info.CodeVersion; r.Info.Numerics ]
    let body =
        [ for r in rows do
            for b, f in Array.indexed Budget.standardBudgets do
                let v = budgetValues r b
                yield line r $"accuracy at {int (100.0 * f)}%% budget" (Statistics.summarize (List.map snd v)) v
            for e in 0 .. r.Runs.Head.ExitAccuracy.Length - 1 do
                let v = exitValues r e
                yield line r $"accuracy of exit {e + 1}" (Statistics.summarize (List.map snd v)) v
            for q, s in extra r do
                yield line r q s (s.Values |> List.mapi (fun i v -> i, v)) ]
    Markdown.writeAtomic path (Markdown.csv header body)

/// "" for the papers' exit rule, "-entropy" or "-patience" otherwise: what a table's files are suffixed with.
let policySuffix (o: Options) = if o.Policy = Budget.Softmax then "" else "-" + Budget.policyName o.Policy

/// Fig. 2: accuracy against average MACs, one mean curve per method with its 95% band over seeds, each row's legend
/// given by `label` (Table 2: "EWC λ=10, warm-up").
let writeFig2Labelled (path: string) (title: string) (label: Row -> string) (rows: Row list) =
    let curves =
        [ for r in rows ->
            let points = r.Runs.Head.Sweep.Length
            let at k = r.Runs |> List.map (fun s -> s.Sweep[k])
            $"{label r} (n={r.Runs.Length})",
            Array.init points (fun k -> at k |> List.averageBy (fun p -> p.AverageMacs)),
            Array.init points (fun k -> (at k |> List.map (fun p -> p.Accuracy) |> Statistics.summarize).Mean),
            Array.init points (fun k -> (at k |> List.map (fun p -> p.Accuracy) |> Statistics.summarize).HalfWidth) ]
    Plots.accuracyVsMacsBands path $"Accuracy against MACs: {title}" (provenanceOf rows) curves (float rows.Head.Info.BackboneMacs)

let writeFig2To (path: string) (title: string) (rows: Row list) = writeFig2Labelled path title (fun (r: Row) -> r.Strategy) rows

let writeFig2 (dir: string) (title: string) (rows: Row list) = writeFig2To (Path.Combine(dir, "fig2.png")) title rows

/// Fig. 3: the mean share of samples leaving at each exit over seeds, for several thresholds, one figure per method.
let writeFig3With (policy: Budget.Policy) (suffix: string) (dir: string) (title: string) (rows: Row list) =
    for r in rows do
        let exits = r.Runs.Head.Outputs.Exits
        Plots.exitRatios (Path.Combine(dir, $"fig3-{r.Strategy}{suffix}.png")) $"Exit ratios (mean over {r.Runs.Length} seeds, {Budget.policyName policy}): {r.Strategy}, {title}" (provenanceOf [ r ]) exits
            [ for t in fig3Parameters policy r.Runs.Head.Outputs ->
                let ratios = r.Runs |> List.map (fun s -> (Budget.pointWith s.Outputs policy t).ExitRatios)
                t.ToString("G3", inv), Array.init exits (fun e -> ratios |> List.averageBy (fun x -> x[e])) ]

let writeFig3 (dir: string) (title: string) (rows: Row list) = writeFig3With Budget.Softmax "" dir title rows

/// The honest protocol and calibration beside Table 1: budgets fitted on the validation split (test accuracy, its
/// MACs, the gap to the best threshold of the test sweep, paired) and every exit's ECE; reliability diagrams.
let honestAndCalibration (dir: string) (suffix: string) (rows: Row list) =
    let fittedRows = rows |> List.filter (fun r -> r.Runs |> List.exists (fun s -> s.Fitted |> Array.exists Option.isSome))
    let fitted =
        if fittedRows.IsEmpty then "## Thresholds fitted on the validation split\n\nNot available: these runs predate the cached validation logits.\n"
        else
            let header = [ "strategy"; "n"; "25%"; "50%"; "75%"; "100%"; "test MACs at 25% (% of backbone)"; "best on the test sweep − fitted, 25% (paired)"; "same, 100%" ]
            let gap (r: Row) (b: int) = Statistics.paired (budgetValues r b) (fittedValues r b)
            let macsAt (r: Row) (b: int) =
                let v = r.Runs |> List.choose (fun s -> s.Fitted[b] |> Option.map (fun p -> 100.0 * p.AverageMacs / float s.Info.BackboneMacs))
                if v.IsEmpty then "–" else Markdown.f2 (List.average v)
            "## Thresholds fitted on the validation split (the honest protocol)\n\n" +
            "The table above takes, for each budget, the best threshold of a sweep on the test set itself, as the papers do. Here the " +
            "threshold is chosen on the validation split (the one that spends the most within the budget there) and applied once to the " +
            "test set: test accuracy (%), mean ± 95% CI; its test cost may exceed the budget a little. The gap is what choosing on the test " +
            "set adds, paired by seed.\n\n" +
            Markdown.table header
                [ for r in fittedRows ->
                    [ r.Strategy; string (r.Runs |> List.filter (fun s -> s.Fitted |> Array.exists Option.isSome) |> List.length) ]
                    @ [ for b in 0..3 -> Statistics.format 100.0 (fittedValues r b |> List.map snd |> Statistics.summarize) ]
                    @ [ macsAt r 0; Statistics.formatSigned 100.0 (gap r 0); Statistics.formatSigned 100.0 (gap r 3) ] ]
    let exits = rows |> List.map (fun r -> r.Runs.Head.ExitAccuracy.Length) |> List.max
    let calibration =
        $"## Calibration\n\nExpected calibration error of every exit ({Budget.calibrationBins} equal-width bins of the maximum softmax probability), in points (×100), mean ± 95%% CI over seeds; reliability diagrams of the first seed in reliability-STRATEGY.png.\n\n" +
        Markdown.table ([ "strategy"; "n" ] @ [ for e in 1..exits -> $"exit {e}" ])
            [ for r in rows ->
                [ r.Strategy; string r.Runs.Length ]
                @ [ for e in 0 .. exits - 1 -> if e < r.Runs.Head.Ece.Length then Statistics.format 100.0 (eceValues r e |> List.map snd |> Statistics.summarize) else "" ] ]
    for r in rows do
        let first = r.Runs.Head
        Plots.reliability (Path.Combine(dir, $"reliability-{r.Strategy}{suffix}.png")) $"Reliability: {r.Strategy}, seed {first.Seed}" (provenanceOf [ r ])
            [ for e in 0 .. first.Ece.Length - 1 -> $"exit {e + 1}", first.Ece[e], first.Calibration[e] ]
    fitted + "\n" + calibration

/// Results folder of an experiment: OUT/MODEL-DATA-SCALE.
let resultsFolder (o: Options) (data: string) = Path.Combine(o.OutRoot, $"{o.Model}-{data}-{Scales.name o.Scale}")

/// Runs (or reuses) every (name, recipe) for every seed in DIR/runs/NAME/seed-K through the executor, sharing stage
/// prefixes through DIR/prefix-cache; returns the rows in the order given. A failed run stops with its log's tail.
let runAll (o: Options) (dir: string) (recipes: (string * Recipe) list) =
    let recipes = if o.EqualSteps then List.zip (List.map fst recipes) (Cost.equalSteps (List.map snd recipes)) else recipes
    let jobs =
        [ for seed in o.Seeds do
            for (name, recipe) in recipes ->
                let recipe =
                    { recipe with
                        Seed = seed
                        Deterministic = o.Deterministic
                        Data = (match o.DataRoot with
                                | Some r -> { recipe.Data with Root = Some r }
                                | None -> recipe.Data) }
                let recipe = if recipe.Data.Root.IsSome then Scales.fitToData recipe else recipe
                { Executor.Name = name; Executor.Seed = seed; Executor.Recipe = recipe; Executor.RunDir = runDir dir name seed } ]
    let prefixCache = Path.Combine(dir, "prefix-cache")
    let sweepOf () =
        Sweep.ofJobs o.Experiment o.Arguments dir (Scales.name o.Scale) prefixCache o.Threads o.Numerics o.Device
            [ for j in jobs -> j.Name, j.Seed, j.Recipe, j.RunDir ]
    let status () =
        let missing = jobs |> List.filter (fun j -> not (File.Exists(Path.Combine(j.RunDir, "metrics.json"))))
        jobs.Length - missing.Length, missing
    match o.Backend with
    | CollectOnly ->
        let done', missing = status ()
        o.Log $"{done'} of {jobs.Length} runs finished"
        if not missing.IsEmpty then
            o.Log $"""missing (the tables leave them out): {String.Join(", ", missing |> List.map (fun j -> $"{j.Name} seed {j.Seed}"))}"""
        if done' = 0 then raise (Interpreter.RunError $"no run of this sweep has finished yet in {dir}; see `earlyexit sweep status {dir}`")
    | PlanOnly ->
        let sweep = sweepOf ()
        Sweep.save sweep
        raise (Submitted $"planned {sweep.Runs.Length} runs in {Sweep.file dir}; run them with `earlyexit sweep submit {dir} --backend local|slurm`")
    | SlurmBackend so ->
        Slurm.requireClient ()
        let sweep = sweepOf ()
        Sweep.save sweep
        let todo = sweep.Runs |> List.filter (Sweep.finished >> not)
        if todo.IsEmpty then o.Log $"all {sweep.Runs.Length} runs already finished"
        else
            let job = Slurm.submit sweep { so with Device = (match so.Device with Some d -> Some d | None -> o.Device) } [ for r in todo -> r.Task ]
            raise (Submitted($"submitted Slurm array job {job}: {todo.Length} of {sweep.Runs.Length} runs (the others finished); " +
                             $"follow with `earlyexit sweep status {dir}`, write the tables with `earlyexit sweep collect {dir}`"))
    | LocalBackend ->
        Sweep.save (sweepOf ())
        let options: Executor.Options =
            { Jobs = o.Jobs; Threads = o.Threads; PrefixCache = Some prefixCache; Scale = Scales.name o.Scale
              Device = o.Device; Numerics = o.Numerics; SweepDir = Path.Combine(dir, "sweep"); Log = o.Log }
        let outcomes = Executor.run options jobs
        match outcomes |> List.filter (fun x -> x.ExitCode <> 0) with
        | [] -> ()
        | failed ->
            let what = failed |> List.map (fun f -> $"{f.Job.Name} seed {f.Job.Seed} (exit code {f.ExitCode}):\n{f.Tail}") |> String.concat "\n\n"
            raise (Interpreter.RunError $"{failed.Length} of {outcomes.Length} runs failed; the others are kept, and running again resumes:\n{what}")
    loadRowsWith o.Policy dir (List.map fst recipes) (Some o.Seeds)

/// The footer every table carries.
let provenanceText (o: Options) (dataNote: string) (data: string) (rows: Row list) (script: string) =
    let first = rows.Head.Info
    let threads = rows |> List.collect (fun r -> r.Runs |> List.map (fun s -> s.Info.Threads)) |> List.distinct |> List.map string
    let seeds = String.Join(",", o.Seeds)
    let threadsText = String.Join(",", threads)
    $"Data: {dataNote}. Scale: {Scales.name o.Scale} ({describeScale o data}). " +
    $"Model: {o.Model}. Seeds: {seeds} (n = {o.Seeds.Length}). Device: {first.Device}; torch threads per run: {threadsText}" +
    (if o.Deterministic then "; deterministic mode" else "") + (if o.EqualSteps then "; equal steps (every strategy gets the largest total of epochs)" else "") +
    $". Code: {first.CodeVersion}. Numerics: {numericsOf rows}. " +
    $"MACs: conv+linear, one multiply-add = 1; the 100%% budget is the backbone without internal classifiers ({first.BackboneMacs:N0} MACs); " +
    "training MACs count 3× the forward MACs of the exits a stage computes per training image (backward = 2× forward), plus LwF teachers, validation passes and the Fisher. " +
    "Generated " + DateTime.UtcNow.ToString("yyyy-MM-dd HH:mm") + $" UTC by experiments/{script}."

/// The table of per-exit accuracies, mean ± 95% CI half-width.
let exitTable (rows: Row list) =
    let exits = rows |> List.map (fun r -> r.Runs.Head.ExitAccuracy.Length) |> List.max
    Markdown.table ([ "row"; "n" ] @ [ for e in 1..exits -> $"exit {e}" ])
        [ for r in rows ->
            [ r.Strategy; string r.Runs.Length ]
            @ [ for e in 0 .. exits - 1 -> if e < r.Runs.Head.ExitAccuracy.Length then Statistics.format 100.0 (exitSummary r e) else "" ] ]

let run (o: Options) =
    if o.Regularisers.IsSome then
        invalidArg "regularisers" "--regularisers chooses a half of Table 2's grid (table2.fsx); Table 1 takes --strategies"
    if o.Parts.IsSome then invalidArg "parts" "--parts chooses parts of regularisers.fsx's grid; Table 1 takes --strategies"
    let data, dataNote = chooseData o
    let dir = resultsFolder o data
    o.Log $"table 1 on {dataNote}, scale {Scales.name o.Scale}: {describeScale o data}"
    o.Log $"""seeds {String.Join(",", o.Seeds)}; {o.Jobs} run(s) at a time, {o.Threads} torch thread(s) each; results in {dir}"""
    let preset = Presets.forModel o.Model
    let strategies = defaultArg o.Strategies (allStrategies preset)
    let rows = runAll o dir (recipesOf o data strategies)
    let separate = rows |> List.tryFind (fun r -> r.Strategy = "separate")
    let published = Map.ofList publishedDeltaVsSeparateAt25
    let header = [ "strategy"; "n"; "25%"; "50%"; "75%"; "100%"; "Δ vs separate @25% (paired, 95% CI)"; "verdict"; "Δ @25% (paper, CIFAR-100)"; "epochs"; "steps"; "training TMACs"; "train time (s)" ]
    let body =
        [ for r in rows ->
            let delta, verdict =
                match separate with
                | Some s when r.Strategy <> "separate" ->
                    let d = deltaAt r s 0
                    Statistics.formatSigned 100.0 d, (if d.N = 0 then "–" else Statistics.verdictName (Statistics.verdict d))
                | _ -> "–", ""
            let c = costOf r
            [ r.Strategy; string r.Runs.Length
              yield! [ for b in 0..3 -> Statistics.format 100.0 (budgetSummary r b) ]
              delta; verdict
              (match published.TryFind r.Strategy with
               | Some d -> $"+{Markdown.f2 d}"
               | None -> "")
              num "F0" c.Epochs; num "F0" c.Steps; num "F2" (c.TrainingMacs / 1e12); num "F0" c.Seconds ] ]
    let provenance = provenanceText o dataNote data rows "table1.fsx"
    // The papers' exit rule writes table1.*; another policy writes beside it with its name.
    let suffix = policySuffix o
    let policyText =
        match o.Policy with
        | Budget.Softmax -> ""
        | Budget.Entropy -> " Exit policy: entropy (a sample leaves at the first exit whose softmax entropy is below t; 100 thresholds over [0, ln C])."
        | Budget.Patience -> " Exit policy: patience (PBEE: a sample leaves once its prediction stayed the same for t consecutive exits; t = 0..M−1)."
    let titlePolicy = if suffix = "" then "" else " (" + Budget.policyName o.Policy + ")"
    let md =
        $"# Table 1: top-1 accuracy (%%) under a compute budget{titlePolicy}\n\n" +
        "Mean ± half-width of the 95% confidence interval over seeds (Student t; n seeds, one run each). Accuracy at the last " +
        "confidence threshold (100 evenly spaced in [0, 1], strict >) whose average MACs per sample stay within 25/50/75/100% " +
        "of the backbone; \"–\" where no threshold fits. Δ vs separate: the mean of the paired differences (same seed) with its " +
        "95% CI; verdict: better or worse where the CI excludes 0, indistinguishable where it does not." + policyText + "\n\n" +
        Markdown.table header body + "\n## Accuracy per exit (%)\n\n" + exitTable rows + "\n" + honestAndCalibration dir suffix rows + "\n" + provenance + "\n"
    Markdown.writeAtomic (Path.Combine(dir, $"table1{suffix}.md")) md
    let deltas (r: Row) =
        match separate with
        | Some s when r.Strategy <> "separate" -> [ for b, f in Array.indexed Budget.standardBudgets -> $"Δ vs separate at {int (100.0 * f)}%% budget (paired)", deltaAt r s b ]
        | _ -> []
    let extra (r: Row) =
        deltas r
        @ [ for b, f in Array.indexed Budget.standardBudgets do
              let v = fittedValues r b
              if not v.IsEmpty then yield $"accuracy at {int (100.0 * f)}%% budget, threshold fitted on validation", Statistics.summarize (List.map snd v) ]
        @ [ for e in 0 .. r.Runs.Head.Ece.Length - 1 -> $"ECE of exit {e + 1} ({Budget.calibrationBins} bins)", Statistics.summarize (eceValues r e |> List.map snd) ]
    writeCsv (Path.Combine(dir, $"table1{suffix}.csv")) rows extra
    let summaryJson (s: Statistics.Summary) = {| n = s.N; mean = s.Mean; std = s.Std; ci95HalfWidth = s.HalfWidth; values = s.Values |}
    let json =
        {| data = data
           dataNote = dataNote
           scale = Scales.name o.Scale
           model = o.Model
           seeds = o.Seeds
           device = rows.Head.Info.Device
           codeVersion = rows.Head.Info.CodeVersion
           numerics = numericsOf rows
           deterministic = o.Deterministic
           equalSteps = o.EqualSteps
           backboneMacs = rows.Head.Info.BackboneMacs
           exitMacs = rows.Head.Info.ExitMacs
           policy = Budget.policyName o.Policy
           budgets = Budget.standardBudgets
           rows =
            rows
            |> List.map (fun r ->
                {| strategy = r.Strategy
                   n = r.Runs.Length
                   seeds = r.Seeds
                   budgetedAccuracy = [ for b in 0..3 -> {| budget = Budget.standardBudgets[b]; summary = summaryJson (budgetSummary r b); perSeed = budgetValues r b |> List.map (fun (k, v) -> {| seed = k; value = v |}) |} ]
                   exitAccuracy = [ for e in 0 .. r.Runs.Head.ExitAccuracy.Length - 1 -> summaryJson (exitSummary r e) ]
                   fittedOnValidation = [ for b in 0..3 -> {| budget = Budget.standardBudgets[b]; summary = summaryJson (fittedValues r b |> List.map snd |> Statistics.summarize); perSeed = fittedValues r b |> List.map (fun (k, v) -> {| seed = k; value = v |}) |} ]
                   expectedCalibrationError = [ for e in 0 .. r.Runs.Head.Ece.Length - 1 -> summaryJson (eceValues r e |> List.map snd |> Statistics.summarize) ]
                   deltaVsSeparate = deltas r |> List.map (fun (q, s) -> {| quantity = q; summary = summaryJson s; verdict = Statistics.verdictName (Statistics.verdict s) |})
                   cost = costOf r
                   curves = r.Runs |> List.map (fun s -> {| seed = s.Seed; curve = s.Sweep |> Array.map (fun p -> {| threshold = p.Threshold; accuracy = p.Accuracy; averageMacs = p.AverageMacs; exitRatios = p.ExitRatios |}) |}) |}) |}
    let options = Markdown.jsonOptions true
    Markdown.writeAtomic (Path.Combine(dir, $"table1{suffix}.json")) (JsonSerializer.Serialize(json, options))
    let title = $"{o.Model} on {data}, {Scales.name o.Scale} scale" + (if suffix = "" then "" else $", {Budget.policyName o.Policy} exits")
    if suffix = "" then writeFig2 dir title rows
    else writeFig2To (Path.Combine(dir, $"fig2{suffix}.png")) title rows
    writeFig3With o.Policy suffix dir title (rows |> List.filter (fun r -> r.Strategy.StartsWith "sequential"))
    let mdPath = Path.Combine(dir, $"table1{suffix}.md")
    o.Log $"wrote {mdPath}, table1{suffix}.csv, table1{suffix}.json, fig2{suffix}.png, fig3-*{suffix}.png, reliability-*{suffix}.png"
    md
