/// `earlyexit describe` and `earlyexit models`: the model zoo and exact costs per exit.
module EarlyExit.Experiments.Reports.Describe

open System
open System.Text.Json
open EarlyExit.Models
open EarlyExit.Flops
open Spectre.Console

let conventionName =
    function
    | MacConvention.ConvLinear -> "conv-linear"
    | MacConvention.MsdnetReference -> "msdnet-reference"
    | c -> string c

let conventionText =
    function
    | MacConvention.ConvLinear -> "multiply-accumulates of convolutions and linear layers (weights); one multiply-add = 1"
    | MacConvention.MsdnetReference -> "MSDNet reference: conv MACs, ReLU and pooling by element, linear W+b, BatchNorm 0; one multiply-add = 1"
    | c -> string c

/// The JSON document of `describe --json`.
let toJson (model: string) (net: MultiExitNetwork) (cost: NetworkCost) =
    let doc =
        {| model = model
           description = net.Describe()
           convention = conventionName cost.Convention
           conventionNote = conventionText cost.Convention
           input = cost.InputShape
           classes = net.NumClasses
           parameters = cost.BackboneParameters
           macs = cost.BackboneMacs
           totalParameters = cost.TotalParameters
           exits =
            cost.Exits
            |> Seq.map (fun e ->
                {| exit = e.Exit
                   macs = e.CumulativeMacs
                   parameters = e.CumulativeParameters
                   fraction = e.FractionOfBackbone
                   backboneMacs = e.CumulativeBackboneMacs
                   segmentMacs = e.SegmentMacs
                   headMacs = e.HeadMacs
                   segmentParameters = e.SegmentParameters
                   headParameters = e.HeadParameters |})
            |> Seq.toArray |}
    JsonSerializer.Serialize(doc, Markdown.jsonOptions false)

let private n (v: int64) = v.ToString("N0", Globalization.CultureInfo.InvariantCulture)

/// The readable table of `describe`.
let render (console: IAnsiConsole) (model: string) (net: MultiExitNetwork) (cost: NetworkCost) =
    console.MarkupLine($"[bold]{Markup.Escape model}[/]: {Markup.Escape(net.Describe())}")
    console.MarkupLine(
        $"backbone without internal classifiers: [bold]{n cost.BackboneParameters}[/] parameters, [bold]{n cost.BackboneMacs}[/] MACs (the 100%% budget); with all exits: {n cost.TotalParameters} parameters")
    let table = Table()
    table.Border <- TableBorder.Simple
    for h in [ "exit"; "cumulative MACs"; "% of budget"; "backbone %"; "head MACs"; "head params"; "cumulative params" ] do
        table.AddColumn(TableColumn(h).RightAligned()) |> ignore
    for e in cost.Exits do
        table.AddRow(
            string e.Exit,
            n e.CumulativeMacs,
            (100.0 * e.FractionOfBackbone).ToString("F1", Globalization.CultureInfo.InvariantCulture),
            (100.0 * float e.CumulativeBackboneMacs / float cost.BackboneMacs).ToString("F1", Globalization.CultureInfo.InvariantCulture),
            n e.HeadMacs,
            n e.HeadParameters,
            n e.CumulativeParameters)
        |> ignore
    console.Write table
    console.MarkupLine($"[grey]Convention: {Markup.Escape(conventionText cost.Convention)}. Cumulative MACs of exit μ include segments 1..μ and heads 1..μ (a sample leaving at μ went through the earlier heads); the backbone column counts segments only.[/]")

let listModels (console: IAnsiConsole) =
    let table = Table()
    table.Border <- TableBorder.Simple
    table.AddColumns("model", "what it is", "defaults") |> ignore
    for f in ModelRegistry.Families do
        table.AddRow(Markup.Escape f.Name, Markup.Escape f.Summary, Markup.Escape f.Defaults) |> ignore
    console.Write table
