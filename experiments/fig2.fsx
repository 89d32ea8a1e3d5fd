// Fig. 2: accuracy against average MACs per sample, one curve per method, from the finished runs of table1.fsx
// (no training): dotnet fsi experiments/fig2.fsx [results/table1/fashion-mnist-cpu]
#load "Load.fsx"

open EarlyExit.Experiments.Experiments

let dir =
    match fsi.CommandLineArgs |> Array.tail with
    | [| d |] -> d
    | _ -> System.IO.Path.Combine(__SOURCE_DIRECTORY__, "..", "results", "table1", "fashion-mnist-cpu")
let rows = Table1.loadRows dir [ "joint"; "disjoint"; "mixed"; "branchwise"; "separate"; "sequential-ewc"; "sequential-lwf" ]
let title = $"{System.IO.Path.GetFileName(System.IO.Path.GetFullPath dir)} ({rows.Head.Info.Device}, code {rows.Head.Info.CodeVersion})"
Table1.writeFig2 dir title rows
printfn "wrote %s" (System.IO.Path.Combine(dir, "fig2.png"))
