// A network of your own, on images of your own, through the recipes, the runner and eval (the F# side of the
// library), as a script. Registers "tinycnn-fs" (three conv blocks, SDN heads), writes an image folder from
// Fashion-MNIST unless one is given, trains it with sequential EWC (warm-up, then exits 1..3, λ = 100) and evaluates
// it. The code is samples/CustomModel.FSharp/Sample.fs, which the console app of that folder compiles too.
//
//   dotnet build -c Release && dotnet fsi samples/custom-model.fsx [--images DIR] [--out DIR] [--scale smoke|cpu]
//
// The folder it writes (DIR/images: train/CLASS/*.png, test/CLASS/*.png, three classes) is what the C# sample
// (samples/CustomModel.CSharp) and the command line (`earlyexit train --data image-folder --data-root DIR/images`) read.
#load "../experiments/Load.fsx"
#load "CustomModel.FSharp/Sample.fs"

open System.IO
open EarlyExit.Experiments.Runner

let args = fsi.CommandLineArgs |> Array.skip 1 |> List.ofArray
let rec opt name = function
    | k :: v :: _ when k = name -> Some v
    | _ :: rest -> opt name rest
    | [] -> None
let scale = match opt "--scale" args with
            | Some s -> (match Scales.parse s with Ok v -> v | Error e -> failwith e)
            | None -> Scales.Smoke
exit (Sample.run (opt "--images" args) (opt "--out" args |> Option.defaultValue "custom-model-out" |> Path.GetFullPath) scale)
