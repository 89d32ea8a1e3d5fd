/// The options every experiment script takes: --scale --data --data-root --model --seeds (or --seed) --jobs --threads
/// --out --device --numerics --deterministic --equal-steps --stage-epochs (and Table 2's --regularisers, regularisers.fsx's
/// --parts).
module EarlyExit.Experiments.Experiments.ScriptArgs

open System
open System.IO
open EarlyExit.Native
open EarlyExit.Experiments.Runner

exception ScriptArgError of string

/// Options with a value; `numerics` is applied by experiments/Load.fsx before torch first runs and read here again
/// for the runs the executor starts.
let known = [ "scale"; "data"; "data-root"; "model"; "seed"; "seeds"; "jobs"; "threads"; "out"; "device"; "strategies"; "lwf-teachers"; "numerics"; "stage-epochs"; "regularisers"; "parts"
              // Where the runs go, and the Slurm backend's options.
              "backend"; "partition"; "time"; "mem"; "cpus-per-task"; "gres"; "max-concurrent"; "sbatch"
              // The exit policy of the budget tables (softmax, entropy, patience).
              "policy"
              // A plugin assembly (models, regularisers of your own), loaded by experiments/Load.fsx.
              "plugin" ]
/// Options without a value.
let flags = [ "deterministic"; "equal-steps"; "no-requeue" ]

/// What every option does (`--help` of every script prints it); the test keeps it complete.
let help =
    [ "scale", "smoke (seconds), cpu (minutes here) or paper (default: paper on a GPU, cpu otherwise)"
      "data", "cifar100, cifar10, fashion-mnist, image-folder or npy (default: CIFAR-100 when its files are present, else Fashion-MNIST)"
      "data-root", "folder of the data sets (image-folder, npy: the folder of your data)"
      "model", "resnet34 (default) or msdnet, or a plugin's family"
      "seed", "one seed, K"
      "seeds", "N seeds (0..N-1) or a list 0,1,2 (default 3, 2 at smoke scale); one run folder per seed, paired across rows"
      "jobs", "runs at a time (default: one per core)"
      "threads", "torch threads of each run (default 1 when several jobs run)"
      "out", "results root (default results/EXPERIMENT); the tables go to OUT/MODEL-DATA-SCALE/"
      "device", "auto, cpu or cuda"
      "strategies", "table1: the rows, e.g. joint,disjoint,mixed (default: all seven)"
      "lwf-teachers", "LwF rows once per teacher policy: per-exit (the paper's, default), previous-stage"
      "numerics", "force the convolution kernels (default: the numerics check's choice)"
      "stage-epochs", "epochs of every stage after the warm-up (a second protocol)"
      "regularisers", "table2: ewc, lwf or both (default both)"
      "parts", "regularisers: schedules, fisher, mas (default all)"
      "backend", "local (the executor, default), slurm (a job array), plan (write the sweep only)"
      "partition", "slurm: partition"
      "time", "slurm: wall-clock limit of each task"
      "mem", "slurm: memory of each task"
      "cpus-per-task", "slurm: CPUs of each task (default: --threads)"
      "gres", "slurm: generic resources (gpu:1)"
      "max-concurrent", "slurm: tasks at a time"
      "sbatch", "slurm: one more sbatch option"
      "policy", "exit policy of the budget tables: softmax (the papers'), entropy, patience"
      "plugin", "an assembly with models or regularisers of your own (IEarlyExitPlugin)"
      "deterministic", "deterministic mode (same code, seed, threads and kernels give the same bits)"
      "equal-steps", "every row gets the same total of optimiser steps"
      "no-requeue", "slurm: do not requeue preempted tasks" ]

/// The usage text of a script.
let usage (experiment: string) =
    let line (name: string) =
        let value = if List.contains name flags then "" else " VALUE"
        let text = help |> List.tryFind (fst >> (=) name) |> Option.map snd |> Option.defaultValue ""
        $"  --{name}{value}".PadRight(26) + " " + text
    String.concat "\n" ([ $"usage: dotnet fsi experiments/{experiment}.fsx [options]"; ""; "options:" ] @ [ for n in known @ flags -> line n ]
                         @ [ $"  help (or -- --help)        this text (dotnet fsi takes --help for itself)" ])

/// The Slurm options of a script's command line (`--partition`, `--time`, `--mem`, `--cpus-per-task` (default: the
/// runs' threads), `--gres`, `--max-concurrent`, `--sbatch "--account=x"` (repeatable through commas? one option),
/// `--no-requeue`).
let slurmOptions (opts: Map<string, string>) (threads: int) (device: string option) : EarlyExit.Experiments.Runner.Slurm.Options =
    let positive (name: string) =
        opts.TryFind name
        |> Option.map (fun v ->
            match Int32.TryParse v with
            | true, n when n >= 1 -> n
            | _ -> raise (ScriptArgError $"--{name} {v}: give a positive integer"))
    { EarlyExit.Experiments.Runner.Slurm.defaults with
        Partition = opts.TryFind "partition"
        Time = opts.TryFind "time"
        Mem = opts.TryFind "mem"
        CpusPerTask = defaultArg (positive "cpus-per-task") threads
        Gres = opts.TryFind "gres"
        Device = device
        MaxConcurrent = positive "max-concurrent"
        Requeue = not (opts.ContainsKey "no-requeue")
        Extra = opts.TryFind "sbatch" |> Option.map (fun e -> [ e ]) |> Option.defaultValue [] }

/// Seeds when none are given: 2 at smoke scale (enough to exercise the statistics), 3 otherwise.
let defaultSeeds (scale: Scales.Scale) = if scale = Scales.Smoke then [ 0; 1 ] else [ 0; 1; 2 ]

let parse (experiment: string) (repoRoot: string) (argv: string list) : Table1.Options =
    let rec go (acc: Map<string, string>) =
        function
        | [] -> acc
        | (key: string) :: rest when key.StartsWith "--" && List.contains (key.Substring 2) flags -> go (acc.Add(key.Substring 2, "true")) rest
        | (key: string) :: value :: rest when key.StartsWith "--" && List.contains (key.Substring 2) known -> go (acc.Add(key.Substring 2, value)) rest
        | [ key ] when key.StartsWith "--" && List.contains (key.Substring 2) known -> raise (ScriptArgError $"missing value after {key}")
        | other :: _ ->
            let options = String.Join(", --", known @ flags)
            raise (ScriptArgError $"unexpected argument '{other}'; the options are --{options}")
    let opts = go Map.empty argv
    let scale =
        match opts.TryFind "scale" with
        | Some s ->
            match Scales.parse s with
            | Ok v -> v
            | Error e -> raise (ScriptArgError e)
        | None -> if Devices.CudaAvailable() then Scales.Paper else Scales.Cpu
    let positive (name: string) (fallback: int) =
        match opts.TryFind name with
        | None -> fallback
        | Some s ->
            match Int32.TryParse s with
            | true, v when v >= 1 -> v
            | _ -> raise (ScriptArgError $"--{name} {s}: give a positive integer")
    let seeds =
        match opts.TryFind "seed", opts.TryFind "seeds" with
        | Some _, Some _ -> raise (ScriptArgError "give --seed or --seeds, not both")
        | Some s, None ->
            match Int32.TryParse s with
            | true, v when v >= 0 -> [ v ]
            | _ -> raise (ScriptArgError $"--seed: '{s}' is not a non-negative integer")
        | None, Some s ->
            match EarlyExit.Experiments.Recipes.Parse.seeds s with
            | Ok v -> v
            | Error e -> raise (ScriptArgError e)
        | None, None -> defaultSeeds scale
    let jobs = positive "jobs" (min (Executor.defaultJobs ()) (max 1 seeds.Length * 7))
    let threads =
        match opts.TryFind "threads" with
        | Some t ->
            try
                let n = TorchThreads.Parse t
                if n.HasValue then n.Value else Executor.defaultThreads jobs
            with :? ArgumentException as e -> raise (ScriptArgError e.Message)
        | None -> Executor.defaultThreads jobs
    let model = defaultArg (opts.TryFind "model") "resnet34"
    { Scale = scale
      Data = opts.TryFind "data"
      DataRoot = opts.TryFind "data-root"
      Model = model
      Seeds = seeds
      // regularisers.fsx extends Table 2's grid and shares its runs (the constants are Table 2's rows): same folder.
      OutRoot = defaultArg (opts.TryFind "out") (Path.Combine(repoRoot, "results", (if experiment = "regularisers" then "table2" else experiment)))
      Device = opts.TryFind "device"
      Strategies =
        opts.TryFind "strategies"
        |> Option.map (fun list ->
            let preset = EarlyExit.Experiments.Recipes.Builders.Presets.forModel model
            [ for name in list.Split(',', StringSplitOptions.RemoveEmptyEntries) ->
                match EarlyExit.Experiments.Recipes.Builders.parseStrategy preset name Map.empty with
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
      Jobs = jobs
      Threads = threads
      Deterministic = opts.ContainsKey "deterministic"
      EqualSteps = opts.ContainsKey "equal-steps"
      Numerics = opts.TryFind "numerics"
      StageEpochs = (if opts.ContainsKey "stage-epochs" then Some(positive "stage-epochs" 1) else None)
      Regularisers =
        opts.TryFind "regularisers"
        |> Option.map (fun list ->
            let names = list.Split(',', StringSplitOptions.RemoveEmptyEntries ||| StringSplitOptions.TrimEntries) |> List.ofArray
            match names |> List.tryFind (fun n -> n <> "ewc" && n <> "lwf") with
            | Some bad -> raise (ScriptArgError $"--regularisers: unknown regulariser '{bad}' (ewc or lwf)")
            | None when names.IsEmpty -> raise (ScriptArgError "--regularisers: give ewc, lwf or ewc,lwf")
            | None -> List.distinct names)
      Parts =
        opts.TryFind "parts"
        |> Option.map (fun list ->
            let names = list.Split(',', StringSplitOptions.RemoveEmptyEntries ||| StringSplitOptions.TrimEntries) |> List.ofArray
            let known = Regularisers.parts
            match names |> List.tryFind (fun n -> not (List.contains n known)) with
            | Some bad -> raise (ScriptArgError $"""--parts: unknown part '{bad}' ({String.Join(", ", known)})""")
            | None when names.IsEmpty -> raise (ScriptArgError $"""--parts: give one or more of {String.Join(", ", known)}""")
            | None -> List.distinct names)
      Backend =
        match opts.TryFind "backend" with
        | None | Some "local" -> Table1.LocalBackend
        | Some "slurm" -> Table1.SlurmBackend(slurmOptions opts threads (opts.TryFind "device"))
        | Some other -> raise (ScriptArgError $"--backend {other}: local (the executor on this machine) or slurm (a job array)")
      Policy =
        match opts.TryFind "policy" with
        | None -> EarlyExit.Experiments.Evaluation.Budget.Softmax
        | Some p ->
            match EarlyExit.Experiments.Evaluation.Budget.parsePolicy p with
            | Ok v -> v
            | Error e -> raise (ScriptArgError $"--policy: {e}")
      Experiment = experiment
      Arguments = argv
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
    | Sweep.SweepError msg -> eprintfn "error: %s" msg; 1
    | :? ArgumentException as e -> eprintfn "error: %s" e.Message; 2

/// The experiments a sweep can come from, by name.
let bodyOf (experiment: string) : Table1.Options -> string =
    match experiment with
    | "table1" -> Table1.run
    | "table2" -> Table2.run
    | "regularisers" -> Regularisers.run
    | "dynamics" -> Dynamics.run
    | other -> raise (ScriptArgError $"unknown experiment '{other}' (table1, table2, regularisers, dynamics)")

/// Runs an experiment's body; prints its tables and the claims file, or, when its runs went to a scheduler (or were
/// only planned), what to do next.
let private runBody (experiment: string) (options: Table1.Options) (body: Table1.Options -> string) =
    let text =
        try Some(body options)
        with Table1.Submitted message ->
            printfn "%s" message
            None
    match text with
    | None -> ()
    | Some text ->
        printfn "\n%s" text
        // What the results say about the papers' claims, from every table of this data set and scale: this
        // experiment's from its --out, whatever the folder is called, the others' beside it.
        let data, _ = Table1.chooseData options
        printfn "%s" (Claims.writeAfter experiment options.OutRoot data (Scales.name options.Scale))

/// The whole body of an experiment script: parse the options, run, print the Markdown and the time; the exit code.
let runScript (experiment: string) (scriptDir: string) (argv: string[]) (body: Table1.Options -> string) =
    let clock = Diagnostics.Stopwatch.StartNew()
    // `dotnet fsi` answers --help and -h itself; a script sees them after "--", or the word help.
    if argv |> Array.tail |> Array.exists (fun a -> a = "--help" || a = "-h" || a = "help") then
        printfn "%s" (usage experiment)
        0
    else
    main (fun () ->
        let options = parse experiment (Path.Combine(scriptDir, "..")) (argv |> Array.tail |> List.ofArray)
        runBody experiment options body
        printfn "%s.fsx finished in %.0f s" experiment clock.Elapsed.TotalSeconds)

/// `earlyexit sweep plan EXPERIMENT OPTIONS`: the experiment's runs as a sweep (recipes and sweep.json), not run.
let planSweep (experiment: string) (argv: string list) =
    main (fun () ->
        let body = bodyOf experiment
        let options = parse experiment (Directory.GetCurrentDirectory()) argv
        runBody experiment { options with Backend = Table1.PlanOnly } body)

/// `earlyexit sweep collect ROOT`: the experiment's tables, figures and claims from whatever runs of the sweep
/// finished, saying what is missing.
let collectSweep (root: string) =
    main (fun () ->
        let sweep = Sweep.load root
        let body = bodyOf sweep.Experiment
        let options = parse sweep.Experiment (Directory.GetCurrentDirectory()) sweep.Arguments
        let options = { options with Backend = Table1.CollectOnly; OutRoot = Path.GetDirectoryName sweep.Root }
        if Table1.resultsFolder options (fst (Table1.chooseData options)) <> sweep.Root then
            raise (ScriptArgError $"{sweep.Root}: the sweep's options name another results folder ({Table1.resultsFolder options (fst (Table1.chooseData options))})")
        runBody sweep.Experiment options body)

/// The figure scripts' argument: a results folder of table1 (default: Fashion-MNIST at cpu scale).
let resultsDir (scriptDir: string) (argv: string[]) =
    match argv |> Array.tail with
    | [| d |] -> d
    | _ -> Path.Combine(scriptDir, "..", "results", "table1", "resnet34-fashion-mnist-cpu")

/// The title line of a figure drawn from finished runs.
let figureTitle (dir: string) (rows: Table1.Row list) =
    $"{Path.GetFileName(Path.GetFullPath dir)} ({rows.Head.Info.Device}, code {rows.Head.Info.CodeVersion})"
