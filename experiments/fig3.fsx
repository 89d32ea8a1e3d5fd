// Fig. 3: share of test samples leaving at each exit for thresholds 0.5 ... 0.99, one figure per sequential method,
// from the finished runs of table1.fsx (no training): dotnet fsi experiments/fig3.fsx [results/table1/fashion-mnist-cpu]
#load "Load.fsx"

open EarlyExit.Experiments.Experiments

let dir =
    match fsi.CommandLineArgs |> Array.tail with
    | [| d |] -> d
    | _ -> System.IO.Path.Combine(__SOURCE_DIRECTORY__, "..", "results", "table1", "fashion-mnist-cpu")
let rows = Table1.loadRows dir [ "sequential-ewc"; "sequential-lwf" ] |> List.filter (fun r -> r.Strategy.StartsWith "sequential")
let title = $"{System.IO.Path.GetFileName(System.IO.Path.GetFullPath dir)} ({rows.Head.Info.Device}, code {rows.Head.Info.CodeVersion})"
Table1.writeFig3 dir title rows
for r in rows do printfn "wrote %s" (System.IO.Path.Combine(dir, $"fig3-{r.Strategy}.png"))
