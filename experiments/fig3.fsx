// Fig. 3: share of test samples leaving at each exit for thresholds 0.5 ... 0.99, one figure per sequential method,
// from the finished runs of table1.fsx (no training): dotnet fsi experiments/fig3.fsx [results/table1/resnet34-fashion-mnist-cpu]
#load "Load.fsx"

open EarlyExit.Experiments.Experiments

let dir = ScriptArgs.resultsDir __SOURCE_DIRECTORY__ fsi.CommandLineArgs
let rows = Table1.loadRows dir [ "sequential-ewc"; "sequential-lwf" ] None |> List.filter (fun r -> r.Strategy.StartsWith "sequential")
Table1.writeFig3 dir (ScriptArgs.figureTitle dir rows) rows
for r in rows do printfn "wrote %s" (System.IO.Path.Combine(dir, $"fig3-{r.Strategy}.png"))
