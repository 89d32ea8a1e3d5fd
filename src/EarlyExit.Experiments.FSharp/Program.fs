module EarlyExit.Experiments.Program

open System
open Argu
open Spectre.Console
open EarlyExit.Native
open EarlyExit.Models
open EarlyExit.Flops
open EarlyExit.Data
open EarlyExit.Experiments.Cli
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
        let root = c.TryGetResult Root |> Option.toObj
        let splits = DataCatalog.Load(name, root)
        printfn "%s from %s" (DataCatalog.Normalise name) splits.Source
        for d in [ splits.Train; splits.Validation; splits.Test ] do
            printfn "  %-28s %6d images of %dx%dx%d, %d classes" d.Name d.Count d.Channels d.Height d.Width d.NumClasses
        0
    | Download c ->
        let name = c.GetResult Name
        let root = c.TryGetResult Root |> Option.toObj
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

let doctor () =
    let report = TorchNativeLoader.EnsureLoaded()
    printfn "TorchSharp natives: %s" (TorchNativeLoader.Describe report)
    let device = Devices.Choose()
    printfn "device: %s" (Devices.Describe device)
    printfn "CUDA available: %b" (Devices.CudaAvailable())
    0

[<EntryPoint>]
let main argv =
    // Spectre assumes 80 columns when output is redirected; tables of numbers need more.
    if Console.IsOutputRedirected then AnsiConsole.Profile.Width <- 140
    let parser = ArgumentParser.Create<CliArgs>(programName = "earlyexit", errorHandler = ProcessExiter())
    try
        let results = parser.ParseCommandLine(argv, raiseOnUsage = true)
        match results.GetAllResults() with
        | [ Models ] ->
            Describe.listModels AnsiConsole.Console
            0
        | [ Describe r ] -> describe r
        | [ Data r ] -> data r
        | [ Doctor ] -> doctor ()
        | [ Eval r ] -> Eval.run (r.GetResult EvalArgs.Run_Dir) (r.Contains EvalArgs.Json) (r.GetResult(EvalArgs.Timing_Samples, 256))
        | [ Train r ] ->
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
    | :? TorchUnavailableException as e ->
        eprintfn "error: %s" e.Message
        1
