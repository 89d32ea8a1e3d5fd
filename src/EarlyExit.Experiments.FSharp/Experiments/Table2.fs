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
        for l in lambdas -> (if warm then Sequential(Ewc l) else SequentialNoWarmup(Ewc l)), $"ewc-lambda{l}-{w}"
        for r in rhos -> (if warm then Sequential(Lwf r) else SequentialNoWarmup(Lwf r)), $"lwf-rho{r}-{w}" ]

let run (o: Table1.Options) =
    let data, dataNote = Table1.chooseData o
    let dir = Table1.resultsFolder o data
    o.Log $"table 2 (ablation) on {dataNote}, scale {Scales.name o.Scale}; results in {dir}"
    let rows = Table1.runAll o data dir [ for (s, name) in grid () -> name, Scales.recipe o.Scale s o.Model data o.Seed ]
    let first = rows.Head.Info
    let header = [ "run"; "reg."; "strength"; "W.U."; "25%"; "50%"; "75%"; "100%"; "accuracy per exit" ]
    let body =
        [ for ((strategy, _), r) in List.zip (grid ()) rows ->
            let reg, strength, warm =
                match strategy with
                | Sequential(Ewc l) -> "EWC", $"λ={l}", "✓"
                | SequentialNoWarmup(Ewc l) -> "EWC", $"λ={l}", "✗"
                | Sequential(Lwf p) -> "LwF", $"ρ={p}", "✓"
                | SequentialNoWarmup(Lwf p) -> "LwF", $"ρ={p}", "✗"
                | other -> strategyName other, "", ""
            [ r.Strategy; reg; strength; warm
              yield! r.Budgets |> Array.map Budget.percent
              r.ExitAccuracy |> Array.map (fun a -> Markdown.f2 (100.0 * a)) |> String.concat " / " ] ]
    let provenance =
        $"Data: {dataNote}. Scale: {Scales.name o.Scale}. Model: {o.Model}. Device: {first.Device}. Seed: {o.Seed}. Code: {first.CodeVersion}. Numerics: {Table1.numericsOf rows}. " +
        "Generated " + DateTime.UtcNow.ToString("yyyy-MM-dd HH:mm") + " UTC by experiments/table2.fsx."
    let md =
        "# Table 2: ablation over the regulariser, its strength and the warm-up\n\n" +
        "Top-1 accuracy (%) within 25/50/75/100% of the backbone's MACs (W.U.: warm-up of the backbone with its final exit).\n\n" +
        Markdown.table header body + "\n" + provenance + "\n"
    Markdown.writeAtomic (Path.Combine(dir, "table2.md")) md
    Table1.writeCsv (Path.Combine(dir, "table2.csv")) header body rows
    Table1.writeFig2 dir $"ablation, {o.Model} on {data}, {Scales.name o.Scale} scale" rows
    md
