// Table 1 of the 2026 paper: every strategy x top-1 at 25/50/75/100% of the backbone's MACs, with Fig. 2
// (accuracy against MACs) and Fig. 3 (exit ratios per threshold), on the data and scale this machine allows.
//
//   dotnet build -c Release && dotnet fsi experiments/table1.fsx [--scale smoke|cpu|paper] [--data cifar100|fashion-mnist]
//        [--data-root DIR] [--model resnet34] [--seed N] [--out results/table1] [--device auto|cpu|cuda]
//
// Default scale: paper on a GPU, cpu otherwise. Default data: CIFAR-100 when its binary files are present, else
// Fashion-MNIST (apt-get install -y dataset-fashion-mnist). Finished runs are reused, interrupted ones resumed.
#load "Load.fsx"

open System
open EarlyExit.Experiments.Runner
open EarlyExit.Experiments.Experiments

let args = fsi.CommandLineArgs |> Array.tail |> List.ofArray

let rec parse (acc: Map<string, string>) =
    function
    | [] -> acc
    | (key: string) :: value :: rest when key.StartsWith "--" -> parse (acc.Add(key.Substring 2, value)) rest
    | [ key ] -> failwithf "missing value after %s" key
    | other :: _ -> failwithf "unexpected argument '%s' (arguments: --scale --data --data-root --model --seed --out --device)" other

let exitWith (code: int) (msg: string) =
    eprintfn "error: %s" msg
    exit code

let opts = try parse Map.empty args with e -> exitWith 2 e.Message
for k in opts.Keys do
    if not (List.contains k [ "scale"; "data"; "data-root"; "model"; "seed"; "out"; "device" ]) then exitWith 2 $"unknown option --{k}"

let scale =
    match opts.TryFind "scale" with
    | Some s -> (match Scales.parse s with Ok v -> v | Error e -> exitWith 2 e)
    | None -> if EarlyExit.Native.Devices.CudaAvailable() then Scales.Paper else Scales.Cpu

let clock = Diagnostics.Stopwatch.StartNew()
try
    let markdown =
        Table1.run
            { Scale = scale
              Data = opts.TryFind "data"
              DataRoot = opts.TryFind "data-root"
              Model = defaultArg (opts.TryFind "model") "resnet34"
              Seed = (match opts.TryFind "seed" with Some s -> int s | None -> 0)
              OutRoot = defaultArg (opts.TryFind "out") (IO.Path.Combine(__SOURCE_DIRECTORY__, "..", "results", "table1"))
              Device = opts.TryFind "device"
              Strategies = None
              Log = fun line -> printfn "%s" line }
    printfn "\n%s" markdown
    printfn "table1.fsx finished in %.0f s" clock.Elapsed.TotalSeconds
with
| :? EarlyExit.Data.DataFormatException as e -> exitWith 1 e.Message
| Interpreter.RunError msg -> exitWith 1 msg
