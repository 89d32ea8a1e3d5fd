// Prints the parameters and cumulative MACs of every exit of a registered model.
//   dotnet fsi experiments/describe.fsx [MODEL]
#load "Load.fsx"

open EarlyExit.Models
open EarlyExit.Flops

let model = match fsi.CommandLineArgs |> Array.tail with [| m |] -> m | _ -> "resnet34"
TorchSharp.torch.manual_seed 0L |> ignore
let net = ModelRegistry.Create(model, ModelOptions.Default)
let cost = MacCounter.Count net
EarlyExit.Experiments.Reports.Describe.render Spectre.Console.AnsiConsole.Console model net cost
