/// The options every experiment script takes: --scale --data --data-root --model --seed --out --device --numerics.
module EarlyExit.Experiments.Experiments.ScriptArgs

open System
open System.IO
open EarlyExit.Native
open EarlyExit.Experiments.Runner

exception ScriptArgError of string

/// `numerics` is applied by experiments/Load.fsx before torch first runs; it is accepted here so that it parses.
let known = [ "scale"; "data"; "data-root"; "model"; "seed"; "out"; "device"; "strategies"; "lwf-teachers"; "numerics" ]

let parse (experiment: string) (repoRoot: string) (argv: string list) : Table1.Options =
    let rec go (acc: Map<string, string>) =
        function
        | [] -> acc
        | (key: string) :: value :: rest when key.StartsWith "--" && List.contains (key.Substring 2) known -> go (acc.Add(key.Substring 2, value)) rest
        | [ key ] when key.StartsWith "--" -> raise (ScriptArgError $"missing value after {key}")
        | other :: _ ->
            let options = String.Join(", --", known)
            raise (ScriptArgError $"unexpected argument '{other}'; the options are --{options}")
    let opts = go Map.empty argv
    let scale =
        match opts.TryFind "scale" with
        | Some s ->
            match Scales.parse s with
            | Ok v -> v
            | Error e -> raise (ScriptArgError e)
        | None -> if Devices.CudaAvailable() then Scales.Paper else Scales.Cpu
    let seed =
        match opts.TryFind "seed" with
        | None -> 0
        | Some s ->
            match Int32.TryParse s with
            | true, v -> v
            | _ -> raise (ScriptArgError $"--seed: '{s}' is not an integer")
    { Scale = scale
      Data = opts.TryFind "data"
      DataRoot = opts.TryFind "data-root"
      Model = defaultArg (opts.TryFind "model") "resnet34"
      Seed = seed
      OutRoot = defaultArg (opts.TryFind "out") (Path.Combine(repoRoot, "results", experiment))
      Device = opts.TryFind "device"
      Strategies =
        opts.TryFind "strategies"
        |> Option.map (fun list ->
            let model = defaultArg (opts.TryFind "model") "resnet34"
            let preset = EarlyExit.Experiments.Recipes.Builders.Presets.forModel model
            [ for name in list.Split(',', StringSplitOptions.RemoveEmptyEntries) ->
                match EarlyExit.Experiments.Recipes.Builders.parseStrategy preset name None None with
                | Ok s -> s
                | Error e -> raise (ScriptArgError $"--strategies: {e}") ])
      LwfTeachers =
        match opts.TryFind "lwf-teachers" with
        | None -> [ EarlyExit.Experiments.Recipes.PerExitTeachers ]
        | Some list ->
            [ for name in list.Split(',', StringSplitOptions.RemoveEmptyEntries ||| StringSplitOptions.TrimEntries) ->
                match EarlyExit.Experiments.Recipes.Names.parseLwfTeachers name with
                | Ok t -> t
                | Error e -> raise (ScriptArgError $"--lwf-teachers: {e}") ]
            |> List.distinct
      Log = fun line -> Console.Out.WriteLine line }

/// Runs an experiment body with the clear errors every script shares; returns the exit code.
let main (body: unit -> unit) =
    try
        body ()
        0
    with
    | ScriptArgError msg -> eprintfn "error: %s" msg; 2
    | :? EarlyExit.Data.DataFormatException as e -> eprintfn "error: %s" e.Message; 1
    | Interpreter.RunError msg -> eprintfn "error: %s" msg; 1
    | :? ArgumentException as e -> eprintfn "error: %s" e.Message; 2

/// The whole body of an experiment script: parse the options, run, print the Markdown and the time; the exit code.
let runScript (experiment: string) (scriptDir: string) (argv: string[]) (body: Table1.Options -> string) =
    let clock = Diagnostics.Stopwatch.StartNew()
    main (fun () ->
        let options = parse experiment (Path.Combine(scriptDir, "..")) (argv |> Array.tail |> List.ofArray)
        printfn "\n%s" (body options)
        printfn "%s.fsx finished in %.0f s" experiment clock.Elapsed.TotalSeconds)

/// The figure scripts' argument: a results folder of table1 (default: Fashion-MNIST at cpu scale).
let resultsDir (scriptDir: string) (argv: string[]) =
    match argv |> Array.tail with
    | [| d |] -> d
    | _ -> Path.Combine(scriptDir, "..", "results", "table1", "resnet34-fashion-mnist-cpu")

/// The title line of a figure drawn from finished runs.
let figureTitle (dir: string) (rows: Table1.Row list) =
    $"{Path.GetFileName(Path.GetFullPath dir)} ({rows.Head.Info.Device}, code {rows.Head.Info.CodeVersion})"
