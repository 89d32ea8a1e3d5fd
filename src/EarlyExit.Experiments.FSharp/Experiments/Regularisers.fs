/// What the regulariser plugins make possible, measured with seeds: (1) a schedule of λ over the stages against the
/// constants (the 2026 paper's "dynamically scheduling the regularization strength" left as future work), (2) the
/// exact Fisher against the paper's empirical one over a λ sweep (van de Ven, ICLR 2025 blog track), and (3) a third
/// regulariser, MAS, beside EWC and LwF. Every comparison is a paired difference over seeds with its 95% CI and a
/// verdict, and every row reports its cost.
module EarlyExit.Experiments.Experiments.Regularisers

open System
open System.IO
open EarlyExit.Experiments.Recipes
open EarlyExit.Experiments.Recipes.Builders
open EarlyExit.Experiments.Runner
open EarlyExit.Experiments.Evaluation
open EarlyExit.Experiments.Reports

let parts = [ "schedules"; "fisher"; "mas" ]

let lambdas = [ 10.0; 100.0; 1000.0 ]
let masLambdas = [ 0.1; 1.0; 10.0 ]

/// The two directions of one schedule family, geometric in μ, over λ's range in Table 2: from 10 up by ×10 per stage
/// (10, 100, 1000, 10000 for μ = 2..5), and from 1000 down by ×0.1 (1000, 100, 10, 1).
let schedules = [ "ewc-geometric-up", Strength.Geometric(10.0, 10.0); "ewc-geometric-down", Strength.Geometric(1000.0, 0.1) ]

let private name (prefix: string) (v: float) = $"{prefix}{v}"

/// A grid row: its name, what it runs, and the description the table shows.
type GridRow =
    { Name: string
      Strategy: Strategy
      Fisher: string
      Regulariser: string
      Strength: string }

let private row n strategy fisher reg strength = { Name = n; Strategy = strategy; Fisher = fisher; Regulariser = reg; Strength = strength }
/// The constants are Table 2's own rows (same names, recipes and folder: trained once for both).
let private ewcRow (l: float) = row $"ewc-lambda{l}-warmup" (Sequential [ ewc l ]) "empirical" "EWC" $"λ={l}"

/// The rows of the parts asked for, each once (the constants serve the schedules, the Fisher sweep and MAS alike).
let grid (asked: string list) =
    [ if List.contains "schedules" asked || List.contains "fisher" asked then
          for l in lambdas do yield ewcRow l
      elif List.contains "mas" asked then yield ewcRow 100.0
      if List.contains "schedules" asked then
          for n, s in schedules do yield row n (Sequential [ penalty "ewc" s ]) "empirical" "EWC" $"λ={Strength.format s}"
      if List.contains "fisher" asked then
          for l in lambdas do yield row (name "ewc-exact-lambda" l) (Sequential [ ewc l ]) "exact" "EWC" $"λ={l}"
      if List.contains "mas" asked then
          for l in masLambdas do yield row (name "mas-lambda" l) (Sequential [ mas l ]) "" "MAS" $"λ={l}"
          yield row "lwf-rho0.7-warmup" (Sequential [ lwf 0.7 ]) "" "LwF" "ρ=0.7" ]

/// One paired comparison: a − b of one measure per seed.
type Comparison =
    { Part: string
      Question: string
      A: string
      B: string
      Measure: string
      Value: Table1.SeedRun -> float option }

let private exitAt e (s: Table1.SeedRun) = Some s.ExitAccuracy[if e < 0 then s.ExitAccuracy.Length + e else e]
let private meanExits (s: Table1.SeedRun) = Some(Array.average s.ExitAccuracy)
let private budget b (s: Table1.SeedRun) = s.Budgets[b]

let private measures =
    [ "exit 1", exitAt 0; "last exit", exitAt -1; "25% budget", budget 0; "mean over exits", meanExits ]

let comparisons (asked: string list) =
    [ if List.contains "schedules" asked then
          for n, s in schedules do
              for m, f in measures ->
                  { Part = "schedules"; Question = $"{n} ({Strength.format s}) against the paper's constant λ = 100"; A = n; B = "ewc-lambda100-warmup"; Measure = m; Value = f }
          for m, f in measures ->
              { Part = "schedules"; Question = "increasing against decreasing λ"; A = "ewc-geometric-up"; B = "ewc-geometric-down"; Measure = m; Value = f }
      if List.contains "fisher" asked then
          for l in lambdas do
              for m, f in [ measures[0]; measures[1]; measures[3] ] ->
                  { Part = "fisher"; Question = $"exact against empirical Fisher at λ = {l}"; A = name "ewc-exact-lambda" l; B = $"ewc-lambda{l}-warmup"; Measure = m; Value = f }
          for est, high, low in [ "empirical", "ewc-lambda1000-warmup", "ewc-lambda10-warmup"; "exact", name "ewc-exact-lambda" 1000.0, name "ewc-exact-lambda" 10.0 ] do
              for m, f in [ measures[0]; measures[1] ] ->
                  { Part = "fisher"; Question = $"λ sensitivity with the {est} Fisher: λ = 1000 against λ = 10"; A = high; B = low; Measure = m; Value = f }
      if List.contains "mas" asked then
          for l in masLambdas do
              for other, label in [ "ewc-lambda100-warmup", "EWC λ = 100"; "lwf-rho0.7-warmup", "LwF ρ = 0.7" ] do
                  for m, f in [ measures[2]; measures[3] ] ->
                      { Part = "mas"; Question = $"MAS λ = {l} against {label}"; A = name "mas-lambda" l; B = other; Measure = m; Value = f } ]

/// The per-seed values of a comparison: a − b over the seeds both rows have.
let differences (rows: Map<string, Table1.Row>) (c: Comparison) =
    match rows.TryFind c.A, rows.TryFind c.B with
    | Some a, Some b ->
        let values (r: Table1.Row) = r.Runs |> List.choose (fun s -> c.Value s |> Option.map (fun v -> s.Seed, v))
        Some(Statistics.paired (values a) (values b))
    | _ -> None

let private recipeOf (o: Table1.Options) (data: string) (r: GridRow) =
    let recipe = Table1.recipeOf o r.Strategy data
    if r.Fisher = "exact" then
        let samples = Interpreter.settingsOf recipe "ewc" |> fun s -> int s["samples"]
        Settings.withFisher "exact" samples recipe
    else recipe

let run (o: Table1.Options) =
    if o.Strategies.IsSome || o.Regularisers.IsSome then
        invalidArg "strategies" "regularisers.fsx runs its own grid; choose parts of it with --parts schedules,fisher,mas"
    let asked = defaultArg o.Parts parts
    let data, dataNote = Table1.chooseData o
    let dir = Table1.resultsFolder o data
    let gridRows = grid asked
    let fisherSamples = Interpreter.settingsOf (recipeOf o data (ewcRow 100.0)) "ewc" |> fun s -> s["samples"]
    o.Log $"""regularisers ({String.Join(", ", asked)}) on {dataNote}, scale {Scales.name o.Scale}, seeds {String.Join(",", o.Seeds)}; {gridRows.Length} rows; results in {dir}"""
    // Only this grid's rows: the folder is Table 2's, with its other runs.
    let names = gridRows |> List.map (fun r -> r.Name) |> set
    let rows = Table1.runAll o dir [ for r in gridRows -> r.Name, recipeOf o data r ] |> List.filter (fun r -> names.Contains r.Strategy)
    let byName = rows |> List.map (fun r -> r.Strategy, r) |> Map.ofList
    let inv = Globalization.CultureInfo.InvariantCulture
    let num (format: string) (v: float) = if Double.IsNaN v then "–" else v.ToString(format, inv)
    let header = [ "row"; "regulariser"; "strength"; "Fisher"; "n"; "25%"; "50%"; "100%"; "exit 1"; "last exit"; "mean over exits"; "steps"; "training TMACs"; "train time (s)" ]
    let body =
        [ for g in gridRows do
            match byName.TryFind g.Name with
            | None -> ()
            | Some r ->
                let c = Table1.costOf r
                let mean = r.Runs |> List.map (fun s -> Array.average s.ExitAccuracy) |> Statistics.summarize
                let last = r.Runs.Head.ExitAccuracy.Length - 1
                yield
                    [ r.Strategy; g.Regulariser; g.Strength; (if g.Fisher = "" then "–" else g.Fisher); string r.Runs.Length
                      Statistics.format 100.0 (Table1.budgetSummary r 0); Statistics.format 100.0 (Table1.budgetSummary r 1); Statistics.format 100.0 (Table1.budgetSummary r 3)
                      Statistics.format 100.0 (Table1.exitSummary r 0); Statistics.format 100.0 (Table1.exitSummary r last); Statistics.format 100.0 mean
                      num "F0" c.Steps; num "F2" (c.TrainingMacs / 1e12); num "F0" c.Seconds ] ]
    let compared =
        [ for c in comparisons asked do
            match differences byName c with
            | None -> ()
            | Some d ->
                yield c, d ]
    let comparisonTable (part: string) =
        Markdown.table [ "question"; "a − b"; "measure"; "Δ (points, paired, 95% CI)"; "n"; "verdict" ]
            [ for c, d in compared |> List.filter (fun (c, _) -> c.Part = part) ->
                [ c.Question; $"{c.A} − {c.B}"; c.Measure; Statistics.formatSigned 100.0 d; string d.N; Statistics.verdictName (Statistics.verdict d) ] ]
    let sections =
        [ if List.contains "schedules" asked then
              "## Schedules of λ against the constants\n\n" +
              "One family, geometric in the exit μ a stage adds: up from λ = 10 by ×10 per stage, and down from λ = 1000 by ×0.1 " +
              "(the range of Table 2's constants). The paper names scheduling the strength \"to better balance early and late exits\" " +
              "as future work; here is what the two directions do, paired by seed against the paper's constant λ = 100.\n\n" +
              comparisonTable "schedules"
          if List.contains "fisher" asked then
              "## The exact Fisher against the empirical one\n\n" +
              "The exact Fisher takes the expectation over the model's own predicted distribution (one gradient pass per class and " +
              "sample: its consolidation costs about C = 10 times the empirical one's); the empirical Fisher, the paper's, uses the " +
              $"true label. Same samples ({fisherSamples} per exit), same λ, same seeds.\n\n" +
              comparisonTable "fisher"
          if List.contains "mas" asked then
              "## A third regulariser: MAS beside EWC and LwF\n\n" +
              "MAS (memory aware synapses) weighs the squared change of segments 1..μ−1 by the mean absolute per-sample gradient of " +
              "‖logits‖² of each earlier exit, added up online like EWC's Fisher. Its importances sum to 66–134 times the empirical " +
              "Fisher's on the cpu-scale ResNet (exits 3 and 1 after one epoch of joint training, `experiments/importance-scale.fsx`), " +
              "so λ_MAS ∈ {0.1, 1, 10} spans what λ_EWC ∈ {10, 100, 1000} does.\n\n" +
              comparisonTable "mas" ]
    let provenance = Table1.provenanceText o dataNote data rows "regularisers.fsx"
    let md =
        "# Regularisers: schedules, Fisher variants and MAS\n\n" +
        "Sequential training with the warm-up (the 2026 paper's recipe), at the scale below. Cells: mean ± half-width of the 95% " +
        "confidence interval over seeds (Student t). Comparisons: the mean of paired differences (same seed: same initial " +
        "weights, split and data order) with its 95% CI; better or worse where the interval excludes 0, indistinguishable where it " +
        "does not. Each comparison is tested on its own at 95% (no correction for the number of comparisons: with this many, " +
        "expect about one in twenty to exclude 0 by chance).\n\n" +
        Markdown.table header body + "\n" + String.Join("\n", sections) + "\n## Accuracy per exit (%)\n\n" + Table1.exitTable rows + "\n" + provenance + "\n"
    let suffix = Table1.policySuffix o
    Markdown.writeAtomic (Path.Combine(dir, $"regularisers{suffix}.md")) md
    let extra (r: Table1.Row) =
        [ for c, d in compared do
            if c.A = r.Strategy then yield $"{c.Question}: {c.Measure} (paired, {c.A} − {c.B})", d ]
    Table1.writeCsv (Path.Combine(dir, $"regularisers{suffix}.csv")) rows extra
    // Beside Table 2's own fig2.png.
    Table1.writeFig2To (Path.Combine(dir, $"fig2-regularisers{suffix}.png")) $"regularisers, {o.Model} on {data}, {Scales.name o.Scale} scale" rows
    md
