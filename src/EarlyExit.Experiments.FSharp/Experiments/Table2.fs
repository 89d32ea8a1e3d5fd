/// Table 2 of the 2026 paper: the ablation over the regulariser (EWC, LwF), its strength (λ, ρ) and the warm-up of
/// the backbone (on/off), as one grid of recipes.
module EarlyExit.Experiments.Experiments.Table2

open System
open System.IO
open EarlyExit.Experiments.Recipes
open EarlyExit.Experiments.Recipes.Builders
open EarlyExit.Experiments.Runner
open EarlyExit.Experiments.Evaluation
open EarlyExit.Experiments.Reports

let lambdas = [ 10.0; 100.0; 1000.0 ]
let rhos = [ 0.2; 0.5; 0.7 ]

/// The grid: every regulariser strength, with and without the warm-up. Names are unique run folders.
let grid () =
    [ for warm in [ true; false ] do
        let w = if warm then "warmup" else "nowarmup"
        for l in lambdas -> (if warm then Sequential [ ewc l ] else SequentialNoWarmup [ ewc l ]), $"ewc-lambda{l}-{w}"
        for r in rhos -> (if warm then Sequential [ lwf r ] else SequentialNoWarmup [ lwf r ]), $"lwf-rho{r}-{w}" ]

/// The grid rows of the regularisers asked for (None: all twelve).
let gridOf (regularisers: string list option) =
    let keep (strategy: Strategy) =
        match regularisers, strategy with
        | None, _ -> true
        | Some rs, (Sequential ps | SequentialNoWarmup ps) -> ps |> List.forall (fun p -> List.contains p.Name rs)
        | Some _, _ -> false
    grid () |> List.filter (fst >> keep)

let run (o: Table1.Options) =
    if o.Parts.IsSome then invalidArg "parts" "--parts chooses parts of regularisers.fsx's grid; Table 2 takes --regularisers ewc or lwf"
    if o.Strategies.IsSome then
        invalidArg "strategies" "Table 2 runs its own grid (EWC λ and LwF ρ, with and without the warm-up); choose a half of it with --regularisers ewc or lwf"
    let data, dataNote = Table1.chooseData o
    let dir = Table1.resultsFolder o data
    o.Log $"""table 2 (ablation) on {dataNote}, scale {Scales.name o.Scale}, seeds {String.Join(",", o.Seeds)}; results in {dir}"""
    let runs = gridOf o.Regularisers
    // Only the grid's own rows: the folder also holds regularisers.fsx's (it extends this grid).
    let names = runs |> List.map snd |> set
    let rows = Table1.runAll o dir [ for (s, name) in runs -> name, Table1.recipeOf o s data ] |> List.filter (fun r -> names.Contains r.Strategy)
    let byName = rows |> List.map (fun r -> r.Strategy, r) |> Map.ofList
    let header = [ "run"; "reg."; "strength"; "W.U."; "n"; "25%"; "50%"; "75%"; "100%"; "accuracy per exit (means)"; "epochs"; "steps"; "training TMACs"; "train time (s)" ]
    let num (format: string) (v: float) = if Double.IsNaN v then "–" else v.ToString(format, Globalization.CultureInfo.InvariantCulture)
    let body =
        [ for (strategy, name) in runs do
            match byName.TryFind name with
            | None -> ()
            | Some r ->
                let reg, strength, warm =
                    match strategy with
                    | Sequential ps -> Table1.regulariserLabel ps, Table1.strengthLabel ps, "✓"
                    | SequentialNoWarmup ps -> Table1.regulariserLabel ps, Table1.strengthLabel ps, "✗"
                    | other -> strategyName other, "", ""
                let c = Table1.costOf r
                yield
                    [ r.Strategy; reg; strength; warm; string r.Runs.Length
                      yield! [ for b in 0..3 -> Statistics.format 100.0 (Table1.budgetSummary r b) ]
                      [ for e in 0 .. r.Runs.Head.ExitAccuracy.Length - 1 -> Markdown.f2 (100.0 * (Table1.exitSummary r e).Mean) ] |> String.concat " / "
                      num "F0" c.Epochs; num "F0" c.Steps; num "F2" (c.TrainingMacs / 1e12); num "F0" c.Seconds ] ]
    let provenance = Table1.provenanceText o dataNote data rows "table2.fsx"
    let md =
        "# Table 2: ablation over the regulariser, its strength and the warm-up\n\n" +
        "Top-1 accuracy (%) within 25/50/75/100% of the backbone's MACs, mean ± half-width of the 95% confidence interval over " +
        "seeds (W.U.: warm-up of the backbone with its final exit); cost: means over seeds of epochs, optimiser steps, training MACs " +
        "and the runs' own wall time (a stage reused from the prefix cache costs its MACs but no time). The paired comparisons the paper draws from this grid are " +
        $"in ../../claims-{data}-{Scales.name o.Scale}.md.\n\n" +
        Markdown.table header body + "\n## Accuracy per exit (%)\n\n" + Table1.exitTable rows + "\n" + provenance + "\n"
    let suffix = Table1.policySuffix o
    Markdown.writeAtomic (Path.Combine(dir, $"table2{suffix}.md")) md
    Table1.writeCsv (Path.Combine(dir, $"table2{suffix}.csv")) rows (fun _ -> [])
    let labelOf (r: Table1.Row) =
        match runs |> List.tryFind (fun (_, n) -> n = r.Strategy) with
        | Some (Sequential ps, _) -> $"{Table1.regulariserLabel ps} {Table1.strengthLabel ps}, warm-up"
        | Some (SequentialNoWarmup ps, _) -> $"{Table1.regulariserLabel ps} {Table1.strengthLabel ps}, no warm-up"
        | _ -> r.Strategy
    Table1.writeFig2Labelled (Path.Combine(dir, $"fig2{suffix}.png")) $"ablation, {o.Model} on {data}, {Scales.name o.Scale} scale" labelOf rows
    md
