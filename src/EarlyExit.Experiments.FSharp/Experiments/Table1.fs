/// Table 1 of the 2026 paper (every strategy × top-1 at 25/50/75/100% of the backbone's MACs) with Fig. 2 and Fig. 3,
/// on the data and scale the machine allows. Runs are resumable and shared: finished runs are not redone and the
/// warm-up is trained once for every strategy that starts with it.
module EarlyExit.Experiments.Experiments.Table1

open System
open System.IO
open System.Text.Json
open EarlyExit.Data
open EarlyExit.Native
open EarlyExit.Experiments.Recipes
open EarlyExit.Experiments.Recipes.Builders
open EarlyExit.Experiments.Runner
open EarlyExit.Experiments.Evaluation
open EarlyExit.Experiments.Reports

type Options =
    { Scale: Scales.Scale
      /// None: CIFAR-100 when its files are present, else Fashion-MNIST.
      Data: string option
      DataRoot: string option
      Model: string
      Seed: int
      OutRoot: string
      Device: string option
      Strategies: Strategy list option
      /// LwF teacher policies to run every LwF strategy with (one row each); the first is the plain name's.
      LwfTeachers: LwfTeachers list
      Log: string -> unit }

/// The (row name, recipe) pairs of strategies: one per LwF teacher policy for strategies with LwF, the paper's
/// per-exit policy under the strategy's own name and any other as "NAME (POLICY teacher)".
let recipesOf (o: Options) (data: string) (strategies: Strategy list) =
    [ for strategy in strategies do
        let recipe = Scales.recipe o.Scale strategy o.Model data o.Seed
        if not (recipe.Stages |> List.exists (fun s -> Regularisers.usesLwf s.Regulariser)) then yield strategyName strategy, recipe
        else
            for t in o.LwfTeachers do
                let label = if t = PerExitTeachers then strategyName strategy else $"{strategyName strategy}-{Names.lwfTeachers t}-teacher"
                yield label, Scales.withLwfTeachers t recipe ]

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

type Row =
    { Strategy: string
      Info: RunFolder.RunInfo
      Budgets: float option[]
      ExitAccuracy: float[]
      Sweep: Budget.SweepPoint[]
      Outputs: Budget.ExitOutputs }

/// Reads a finished run into a row of the table.
let loadRow (name: string) (runDir: string) =
    let info = RunFolder.readInfo runDir
    let outputs = RunFolder.readOutputs runDir info
    let sweep = Budget.sweep outputs (Budget.thresholds 100)
    { Strategy = name
      Info = info
      Budgets = Budget.standardBudgets |> Array.map (Budget.budgetedAccuracy outputs sweep)
      ExitAccuracy = Budget.exitAccuracy outputs
      Sweep = sweep
      Outputs = outputs }

/// Every finished run under DIR/runs, in the order of `order` (others after, by name).
let loadRows (dir: string) (order: string list) =
    let runs = Path.Combine(dir, "runs")
    if not (Directory.Exists runs) then failwithf "%s: no runs; run experiments/table1.fsx first" runs
    Directory.GetDirectories runs
    |> Array.filter (fun d -> File.Exists(Path.Combine(d, "metrics.json")))
    |> Array.map (fun d -> Path.GetFileName d, d)
    |> Array.sortBy (fun (n, _) -> (match List.tryFindIndex ((=) n) order with Some i -> i | None -> 1000), n)
    |> Array.map (fun (n, d) -> loadRow n d)
    |> Array.toList

let fig3Thresholds = [ 0.5; 0.6; 0.7; 0.8; 0.9; 0.95; 0.99 ]

/// One line naming what produced a figure or a table row.
let provenanceOf (r: Row) =
    $"{r.Info.Data}, scale {r.Info.Scale}, {r.Info.Device}, {r.Info.NumericsShort}, seed {r.Info.Seed}, code {r.Info.CodeVersion}"

/// Writes a table as CSV with the provenance of each row in its own columns (data, scale, device, seed, code version).
let writeCsv (path: string) (header: string list) (body: string list list) (rows: Row list) =
    let csvHeader = header @ [ "data"; "scale"; "device"; "seed"; "code version"; "cpu and kernels" ]
    let csvBody = List.map2 (fun (row: string list) (r: Row) -> row @ [ r.Info.Data; r.Info.Scale; r.Info.Device; string r.Info.Seed; r.Info.CodeVersion; r.Info.Numerics ]) body rows
    Markdown.writeAtomic path (Markdown.csv csvHeader csvBody)

/// Fig. 2: accuracy against average MACs, one curve per method.
let writeFig2 (dir: string) (title: string) (rows: Row list) =
    Plots.accuracyVsMacs (Path.Combine(dir, "fig2.png")) $"Accuracy against MACs: {title}" (provenanceOf rows.Head) [ for r in rows -> r.Strategy, r.Sweep ]

/// Fig. 3: the share of samples leaving at each exit for several thresholds, one figure per method.
let writeFig3 (dir: string) (title: string) (rows: Row list) =
    for r in rows do
        Plots.exitRatios (Path.Combine(dir, $"fig3-{r.Strategy}.png")) $"Exit ratios: {r.Strategy}, {title}" (provenanceOf r) r.Outputs.Exits
            [ for t in fig3Thresholds -> t.ToString(Globalization.CultureInfo.InvariantCulture), (Budget.pointAt r.Outputs t).ExitRatios ]

/// The CPUs and kernels that produced the rows (one line each; several when runs were made on different machines).
let numericsOf (rows: Row list) =
    match rows |> List.map (fun r -> r.Info.Numerics) |> List.distinct with
    | [ one ] -> one
    | several -> String.Join(" | ", several |> List.map (fun n -> $"{n} (runs: {String.Join(',', rows |> List.filter (fun r -> r.Info.Numerics = n) |> List.map (fun r -> r.Strategy))})"))

/// Runs (or reuses) one recipe per (name, strategy) in DIR/runs/NAME, sharing stage prefixes through DIR/prefix-cache.
let runAll (o: Options) (data: string) (dir: string) (recipes: (string * Recipe) list) =
    [ for (name, recipe) in recipes ->
        let recipe = match o.DataRoot with
                     | Some r -> { recipe with Data = { recipe.Data with Root = Some r } }
                     | None -> recipe
        let runDir = Path.Combine(dir, "runs", name)
        let options: Interpreter.RunOptions =
            { OutDir = runDir
              Resume = true
              PrefixCache = Some(Path.Combine(dir, "prefix-cache"))
              Scale = Scales.name o.Scale
              Device = o.Device
              Log = fun l -> o.Log $"[{name}] {l}" }
        Interpreter.run options recipe |> ignore
        loadRow name runDir ]

/// Results folder of an experiment: OUT/MODEL-DATA-SCALE.
let resultsFolder (o: Options) (data: string) = Path.Combine(o.OutRoot, $"{o.Model}-{data}-{Scales.name o.Scale}")

let run (o: Options) =
    let data, dataNote = chooseData o
    let dir = resultsFolder o data
    o.Log $"table 1 on {dataNote}, scale {Scales.name o.Scale}: {(Scales.settings o.Scale o.Model data).Description}"
    o.Log $"results in {dir}"
    let preset = Presets.forModel o.Model
    let strategies = defaultArg o.Strategies (allStrategies preset)
    let rows =
        runAll o data dir (recipesOf o data strategies)
    let first = rows.Head.Info
    let provenance =
        $"Data: {dataNote}. Scale: {Scales.name o.Scale} ({(Scales.settings o.Scale o.Model data).Description}). " +
        $"Model: {o.Model}. Device: {first.Device}. Seed: {o.Seed}. Code: {first.CodeVersion}. Numerics: {numericsOf rows}. " +
        $"MACs: conv+linear, one multiply-add = 1; the 100%% budget is the backbone without internal classifiers ({first.BackboneMacs:N0} MACs). " +
        "Generated " + DateTime.UtcNow.ToString("yyyy-MM-dd HH:mm") + " UTC by experiments/table1.fsx."
    let separate25 = rows |> List.tryFind (fun r -> r.Strategy = "separate") |> Option.bind (fun r -> r.Budgets[0])
    let published = Map.ofList publishedDeltaVsSeparateAt25
    let header = [ "strategy"; "25%"; "50%"; "75%"; "100%"; "Δ vs separate @25% (ours)"; "Δ @25% (paper, CIFAR-100)"; "accuracy per exit"; "train time (s)" ]
    let body =
        [ for r in rows ->
            let delta =
                match r.Budgets[0], separate25 with
                | Some a, Some s when r.Strategy <> "separate" -> (if a >= s then "+" else "") + Markdown.f2 (100.0 * (a - s))
                | _ -> "–"
            [ r.Strategy
              yield! r.Budgets |> Array.map Budget.percent
              delta
              (match published.TryFind r.Strategy with
               | Some d -> $"+{Markdown.f2 d}"
               | None -> "")
              (r.ExitAccuracy |> Array.map (fun a -> Markdown.f2 (100.0 * a)) |> String.concat " / ")
              (r.Info.WallSeconds.ToString("F0", Globalization.CultureInfo.InvariantCulture)) ] ]
    let md =
        "# Table 1: top-1 accuracy (%) under a compute budget\n\n" +
        "Accuracy at the last confidence threshold (100 evenly spaced in [0, 1], strict >) whose average MACs per sample " +
        "stay within 25/50/75/100% of the backbone; \"–\" where no threshold fits.\n\n" +
        Markdown.table header body + "\n" + provenance + "\n"
    Markdown.writeAtomic (Path.Combine(dir, "table1.md")) md
    writeCsv (Path.Combine(dir, "table1.csv")) header body rows
    let json =
        {| data = data
           dataNote = dataNote
           scale = Scales.name o.Scale
           model = o.Model
           device = first.Device
           seed = o.Seed
           codeVersion = first.CodeVersion
           numerics = numericsOf rows
           backboneMacs = first.BackboneMacs
           exitMacs = first.ExitMacs
           budgets = Budget.standardBudgets
           rows =
            rows
            |> List.map (fun r ->
                {| strategy = r.Strategy
                   budgetedAccuracy = r.Budgets |> Array.map Option.toNullable
                   exitAccuracy = r.ExitAccuracy
                   trainSeconds = r.Info.WallSeconds
                   curve = r.Sweep |> Array.map (fun p -> {| threshold = p.Threshold; accuracy = p.Accuracy; averageMacs = p.AverageMacs; exitRatios = p.ExitRatios |}) |}) |}
    Markdown.writeAtomic (Path.Combine(dir, "table1.json")) (JsonSerializer.Serialize(json, JsonSerializerOptions(WriteIndented = true)))
    let title = $"{o.Model} on {data}, {Scales.name o.Scale} scale"
    writeFig2 dir title rows
    writeFig3 dir title (rows |> List.filter (fun r -> r.Strategy.StartsWith "sequential"))
    let mdPath = Path.Combine(dir, "table1.md")
    o.Log $"wrote {mdPath}, table1.csv, table1.json, fig2.png, fig3-*.png"
    md
