// Fig. 2: accuracy against average MACs per sample, one curve per method, from the finished runs of table1.fsx
// (no training): dotnet fsi experiments/fig2.fsx [results/table1/resnet34-fashion-mnist-cpu]
#load "Load.fsx"

open EarlyExit.Experiments.Experiments

let dir = ScriptArgs.resultsDir __SOURCE_DIRECTORY__ fsi.CommandLineArgs
let rows = Table1.loadRows dir [ "joint"; "disjoint"; "mixed"; "branchwise"; "separate"; "sequential-ewc"; "sequential-lwf" ] None
Table1.writeFig2 dir (ScriptArgs.figureTitle dir rows) rows
printfn "wrote %s" (System.IO.Path.Combine(dir, "fig2.png"))
