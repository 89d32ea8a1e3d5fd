module EarlyExit.Experiments.Program

open System
open Argu
open Spectre.Console
open EarlyExit.Native
open EarlyExit.Models
open EarlyExit.Flops
open EarlyExit.Data
open EarlyExit.Experiments.Cli
open EarlyExit.Experiments.Recipes
open EarlyExit.Experiments.Reports
open EarlyExit.Experiments.Evaluation
open EarlyExit.Experiments.Cli.Arguments

/// A user error: printed as one line, exit code 2.
exception UsageError of string

let private orFail =
    function
    | Ok v -> v
    | Error (e: string) -> raise (UsageError e)

let modelOptions (r: ParseResults<DescribeArgs>) =
    ModelOptions(
        NumClasses = (r.TryGetResult DescribeArgs.Classes |> Option.toNullable),
        InputShape = (r.TryGetResult DescribeArgs.Input |> Option.map (Parse.shape >> orFail) |> Option.toObj),
        BaseWidth = (r.TryGetResult DescribeArgs.Width |> Option.toNullable),
        Blocks = (r.TryGetResult DescribeArgs.Blocks |> Option.map (Parse.intList "blocks" >> orFail) |> Option.toObj),
        ExitPositions = (r.TryGetResult DescribeArgs.Exits |> Option.map (Parse.intList "exits" >> orFail) |> Option.toObj),
        GrowthRate = (r.TryGetResult DescribeArgs.Growth |> Option.toNullable),
        StepMode = (r.TryGetResult DescribeArgs.Step_Mode |> Option.toObj),
        Base = (r.TryGetResult DescribeArgs.Base |> Option.toNullable),
        Step = (r.TryGetResult DescribeArgs.Step |> Option.toNullable),
        GrowthFactors = (r.TryGetResult DescribeArgs.Gr_Factor |> Option.map (Parse.intList "gr-factor" >> orFail) |> Option.toObj),
        BottleneckFactors = (r.TryGetResult DescribeArgs.Bn_Factor |> Option.map (Parse.intList "bn-factor" >> orFail) |> Option.toObj))

let describe (r: ParseResults<DescribeArgs>) =
    TorchNativeLoader.EnsureLoaded() |> ignore
    let name = r.GetResult DescribeArgs.Model
    let convention =
        match r.TryGetResult DescribeArgs.Convention with
        | Some Msdnet_Reference -> MacConvention.MsdnetReference
        | _ -> MacConvention.ConvLinear
    TorchSharp.torch.manual_seed 0L |> ignore
    use net = ModelRegistry.Create(name, modelOptions r)
    let cost = MacCounter.Count(net, convention)
    if r.Contains DescribeArgs.Json then Console.Out.WriteLine(Describe.toJson name net cost)
    else Describe.render AnsiConsole.Console name net cost
    0

let data (r: ParseResults<DataArgs>) =
    match r.GetSubCommand() with
    | Check c ->
        let name = c.GetResult Name
        let root = c.TryGetResult DataCheckArgs.Root |> Option.toObj
        let splits = DataCatalog.Load(name, root)
        printfn "%s from %s" (DataCatalog.Normalise name) splits.Source
        for d in [ splits.Train; splits.Validation; splits.Test ] do
            printfn "  %-28s %6d images of %dx%dx%d, %d classes" d.Name d.Count d.Channels d.Height d.Width d.NumClasses
        0
    | Download c ->
        let name = c.GetResult Name
        let root = c.TryGetResult DataCheckArgs.Root |> Option.toObj
        let mutable last = -1L
        let folder =
            DataCatalog.DownloadCifar(
                name,
                root,
                (fun got total ->
                    let mb = got / (1L <<< 20)
                    if mb <> last && mb % 10L = 0L then
                        last <- mb
                        if total > 0L then eprintfn "  %d / %d MiB" mb (total / (1L <<< 20)) else eprintfn "  %d MiB" mb))
        printfn "%s extracted to %s" name folder
        0

let doctor (r: ParseResults<DoctorArgs>) =
    let report = TorchNativeLoader.EnsureLoaded()
    printfn "TorchSharp natives: %s" (TorchNativeLoader.Describe report)
    let verdict = NumericsGuard.Current
    printfn "CPU: %s" (verdict.Cpu.Describe())
    printfn "oneDNN's cache sizes: %s" OneDnnCaches.Status
    printfn "libtorch: %s" (verdict.LibTorch.Describe())
    printfn "convolution kernels in use: %s" verdict.Kernels
    let shown =
        if r.Contains Recheck then
            let fresh = NumericsGuard.Recheck(r.Contains All)
            if fresh.Backend <> verdict.Backend then
                printfn "the recheck chose %s (this process keeps %s; the next process uses the new verdict)" fresh.Backend verdict.Backend
            fresh
        else verdict
    printfn "numerics check (%d cases, float32 against float64, tolerance %g, on %d threads; %s):"
        ConvolutionCheck.Cases.Count ConvolutionCheck.Tolerance shown.Threads shown.Decision
    for c in shown.Checked do
        let timed = if c.ImagesPerSecond.HasValue then $"; trains at {c.ImagesPerSecond.Value:F0} images/s" else ""
        printfn "  %-20s %s (%.1f s%s)" c.Backend c.Detail c.Seconds timed
    let device = Devices.Choose()
    printfn "device: %s" (Devices.Describe device)
    let load = try (IO.File.ReadAllText "/proc/loadavg").Split(' ') |> Array.take 3 |> String.concat " " with _ -> "unknown"
    printfn "cores: %d; torch threads: %s (OMP_NUM_THREADS=%s); load average: %s"
        Environment.ProcessorCount TorchThreads.Status
        (match Environment.GetEnvironmentVariable "OMP_NUM_THREADS" with null -> "unset" | v -> v) load
    printfn "training layout: %s" ConvolutionLayout.TrainingStatus
    printfn "CUDA available: %b" (Devices.CudaAvailable())
    0

[<EntryPoint>]
let main argv =
    // Spectre assumes 80 columns when output is redirected; tables of numbers need more.
    if Console.IsOutputRedirected then AnsiConsole.Profile.Width <- 140
    let parser = ArgumentParser.Create<CliArgs>(programName = "earlyexit", errorHandler = ProcessExiter())
    // `sweep plan EXPERIMENT OPTIONS`: the options are the experiment script's own, passed on unparsed.
    let planAt = argv |> Array.tryFindIndex ((=) "sweep") |> Option.filter (fun i -> i + 2 < argv.Length && argv[i + 1] = "plan")
    match planAt with
    | Some i ->
        let global' = parser.ParseCommandLine(argv[.. i - 1], raiseOnUsage = true)
        global'.TryGetResult Numerics |> Option.iter (fun b -> NumericsGuard.Requested <- b)
        global'.TryGetResult Threads |> Option.iter (fun t -> TorchThreads.Parse t |> ignore; TorchThreads.Requested <- t)
        try
            EarlyExit.Extensions.Plugins.Export(global'.GetResults Plugin)
            EarlyExit.Extensions.Plugins.LoadFromEnvironment()
            SweepCommand.plan argv[i + 2] (List.ofArray argv[i + 3 ..])
        with :? EarlyExit.Extensions.PluginException as e ->
            eprintfn "error: %s" e.Message
            1
    | None ->
    try
        let results = parser.ParseCommandLine(argv, raiseOnUsage = true)
        // Before the first use of torch: the guard applies the kernels once per process.
        results.TryGetResult Numerics |> Option.iter (fun b -> NumericsGuard.Requested <- b)
        results.TryGetResult Threads |> Option.iter (fun t -> TorchThreads.Parse t |> ignore; TorchThreads.Requested <- t)
        // Plugins (models and regularisers of the user's own) before anything looks a name up; the processes this
        // one starts inherit them through $EARLYEXIT_PLUGINS.
        EarlyExit.Extensions.Plugins.Export(results.GetResults Plugin)
        EarlyExit.Extensions.Plugins.LoadFromEnvironment()
        match results.TryGetSubCommand() with
        | _ when results.Contains Version ->
            let informational =
                typeof<CliArgs>.Assembly.GetCustomAttributes(typeof<Reflection.AssemblyInformationalVersionAttribute>, false)
                |> Array.tryHead |> Option.map (fun a -> (a :?> Reflection.AssemblyInformationalVersionAttribute).InformationalVersion)
            printfn "earlyexit %s (TorchSharp %O)" (defaultArg informational "unknown") (typeof<TorchSharp.torch.Tensor>.Assembly.GetName().Version)
            0
        | Some (Models r) ->
            if r.Contains ModelsArgs.Json then
                Console.Out.WriteLine(Text.Json.JsonSerializer.Serialize([ for f in ModelRegistry.Families -> {| name = f.Name; summary = f.Summary; defaults = f.Defaults |} ], EarlyExit.Experiments.Reports.Markdown.jsonOptions false))
            else Describe.listModels AnsiConsole.Console
            0
        | Some (Describe r) -> describe r
        | Some (Data r) -> data r
        | Some (Doctor r) -> doctor r
        | Some (Schema r) ->
            let text = EarlyExit.Experiments.Recipes.RecipeSchema.text ()
            match r.TryGetResult SchemaArgs.Out with
            | Some file ->
                EarlyExit.Experiments.Reports.Markdown.writeAtomic file text
                printfn "schema written to %s" file
            | None -> printf "%s" text
            0
        | Some (Sweep r) -> SweepCommand.run r
        | Some (Analyze r) ->
            TorchNativeLoader.EnsureLoaded() |> ignore
            let metrics =
                match r.TryGetResult AnalyzeArgs.Metrics with
                | Some list ->
                    let names = list.Split(',', StringSplitOptions.RemoveEmptyEntries ||| StringSplitOptions.TrimEntries) |> List.ofArray
                    match names |> List.tryFind (fun n -> not (List.contains n EarlyExit.Experiments.Analysis.Analyze.metricNames)) with
                    | Some bad -> raise (ArgumentException $"--metrics: unknown metric '{bad}' (gradients, rank, landscape, connectivity)")
                    | None -> names
                | None -> if r.Contains AnalyzeArgs.Vs then EarlyExit.Experiments.Analysis.Analyze.metricNames else [ "gradients"; "rank"; "landscape" ]
            let d = EarlyExit.Experiments.Analysis.Analyze.defaults
            let groups =
                match r.GetResult(AnalyzeArgs.Groups, "all") with
                | "all" -> EarlyExit.Analysis.PerturbedGroups.All
                | "backbone" -> EarlyExit.Analysis.PerturbedGroups.Backbone
                | "heads" -> EarlyExit.Analysis.PerturbedGroups.Heads
                | other -> raise (ArgumentException $"--groups {other}: all, backbone or heads")
            let positive (v: int) (what: string) = if v < 1 then raise (ArgumentException $"--{what} {v}: give a positive number") else v
            let settings: EarlyExit.Experiments.Analysis.Analyze.Settings =
                { Samples = positive (r.GetResult(AnalyzeArgs.Samples, d.Samples)) "samples"
                  RankSamples = positive (r.GetResult(AnalyzeArgs.Rank_Samples, d.RankSamples)) "rank-samples"
                  Grid = (let g = r.GetResult(AnalyzeArgs.Grid, d.Grid) in if g < 2 then raise (ArgumentException $"--grid {g}: at least 2 points per axis") else g)
                  Span = (let sp = r.GetResult(AnalyzeArgs.Span, d.Span) in if not (sp > 0.0) then raise (ArgumentException $"--span {sp}: give a positive half-width") else sp)
                  Groups = groups
                  Points = (let p = r.GetResult(AnalyzeArgs.Points, d.Points) in if p < 2 then raise (ArgumentException $"--points {p}: a path needs its two ends") else p)
                  BnSamples = positive (r.GetResult(AnalyzeArgs.Bn_Samples, d.BnSamples)) "bn-samples"
                  Seed = r.GetResult(AnalyzeArgs.Seed, d.Seed) }
            try
                let md = EarlyExit.Experiments.Analysis.Analyze.run (r.GetResult AnalyzeArgs.Run_Dir) (r.TryGetResult AnalyzeArgs.Vs) metrics settings (r.TryGetResult AnalyzeArgs.Out) (fun l -> eprintfn "%s" l)
                printfn "%s" md
                0
            with Failure msg ->
                eprintfn "error: %s" msg
                1
        | Some (Eval r) ->
            match EarlyExit.Experiments.Evaluation.Budget.parsePolicy (r.GetResult(EvalArgs.Policy, "softmax")) with
            | Error e -> raise (ArgumentException e)
            | Ok _ when r.GetResult(EvalArgs.Timing_Samples, 256) < 0 ->
                raise (ArgumentException $"--timing-samples {r.GetResult EvalArgs.Timing_Samples}: give a count of test images, or 0 to skip the timing")
            | Ok policy -> Eval.run (r.GetResult EvalArgs.Run_Dir) (r.Contains EvalArgs.Json) (r.GetResult(EvalArgs.Timing_Samples, 256)) policy
        | Some (Export r) ->
            TorchNativeLoader.EnsureLoaded() |> ignore
            let format = EarlyExit.Interop.WeightFiles.Parse(r.GetResult(ExportArgs.Format, "safetensors"))
            Weights.export (r.GetResult ExportArgs.Run_Dir) format (r.TryGetResult ExportArgs.Out) |> ignore
            0
        | Some (Import r) ->
            let recipe =
                match r.TryGetResult ImportArgs.Like, r.TryGetResult ImportArgs.Recipe with
                | Some dir, None ->
                    if not (IO.Directory.Exists dir) then failwithf "%s: no such run folder" dir
                    match EarlyExit.Experiments.Recipes.RecipeJson.load (IO.Path.Combine(dir, "recipe.json")) with
                    | Ok rc -> rc
                    | Error e -> failwithf "%s: %s" dir (String.Join("; ", e))
                | None, Some file ->
                    match EarlyExit.Experiments.Recipes.RecipeJson.load file with
                    | Ok rc -> rc
                    | Error e -> failwithf "%s" (String.Join("; ", e))
                | _ -> raise (ArgumentException "give --like RUN_DIR or --recipe FILE (the network, data and seed the weights are for)")
            Weights.import (r.GetResult ImportArgs.Weights) recipe (r.GetResult ImportArgs.Out) (r.TryGetResult ImportArgs.Device) |> ignore
            0
        | Some (Train r) ->
            r.TryGetResult Parent_Pid |> Option.iter Train.watchParent
            TorchNativeLoader.EnsureLoaded() |> ignore
            Train.run r
        | _ ->
            eprintfn "%s" (parser.PrintUsage())
            2
    with
    | UsageError msg ->
        eprintfn "error: %s" msg
        2
    | :? ArgumentException as e ->
        eprintfn "error: %s" e.Message
        2
    | :? DataFormatException as e ->
        eprintfn "error: %s" e.Message
        1
    | :? EarlyExit.Extensions.PluginException as e ->
        eprintfn "error: %s" e.Message
        1
    | :? EarlyExit.Interop.WeightFileException as e ->
        eprintfn "error: %s" e.Message
        1
    | :? TorchUnavailableException as e ->
        eprintfn "error: %s" e.Message
        1
    | :? NumericsException as e ->
        eprintfn "error: %s" e.Message
        1
    | Failure msg ->
        eprintfn "error: %s" msg
        1
    | :? IO.IOException
    | :? UnauthorizedAccessException as e ->
        eprintfn "error: %s" e.Message
        1
    | e when Environment.GetEnvironmentVariable "EARLYEXIT_DEBUG" <> "1" ->
        // Anything else is a bug of ours: one line, and how to see where it happened.
        eprintfn "error: %s (%s; an unexpected error: rerun with EARLYEXIT_DEBUG=1 for the stack trace, and report it)" e.Message (e.GetType().Name)
        70
