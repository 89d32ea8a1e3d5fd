/// `earlyexit train`: from a recipe file, or from a strategy, a model, a data set and a scale.
module EarlyExit.Experiments.Cli.Train

open System
open System.IO
open Argu
open EarlyExit.Native
open EarlyExit.Experiments.Recipes
open EarlyExit.Experiments.Runner
open EarlyExit.Experiments.Cli.Arguments

/// The scale when none is given: paper on a GPU, cpu otherwise.
let defaultScale () =
    if Devices.CudaAvailable() then Scales.Paper else Scales.Cpu

let resolveRecipe (r: ParseResults<TrainArgs>) : Result<Recipe * string, string list> =
    match r.TryGetResult TrainArgs.Recipe with
    | Some _ when r.Contains TrainArgs.Lwf_Teachers ->
        Error [ "--lwf-teachers goes with --strategy; in a recipe file, set \"lwf\": { \"teachers\": ... }" ]
    | Some file ->
        RecipeJson.load file |> Result.map (fun recipe -> recipe, "recipe")
    | None ->
        let model = r.GetResult(TrainArgs.Model, "resnet34")
        let data = r.GetResult(TrainArgs.Data, "fashion-mnist")
        let scale =
            match r.TryGetResult TrainArgs.Scale with
            | Some s -> Scales.parse s
            | None -> Ok(defaultScale ())
        match scale, r.TryGetResult TrainArgs.Strategy with
        | Error e, _ -> Error [ e ]
        | _, None -> Error [ "give --recipe FILE, or --strategy NAME (with --model, --data, --scale)" ]
        | Ok scale, Some name ->
            let preset = Builders.Presets.forModel model
            let teachers =
                match r.TryGetResult TrainArgs.Lwf_Teachers with
                | Some s -> Names.parseLwfTeachers s
                | None -> Ok PerExitTeachers
            match Builders.parseStrategy preset name (r.TryGetResult TrainArgs.Lambda) (r.TryGetResult TrainArgs.Rho), teachers with
            | Error e, _ | _, Error e -> Error [ e ]
            | Ok strategy, Ok teachers ->
                try
                    let recipe = Scales.recipe scale strategy model data (r.GetResult(TrainArgs.Seed, 0))
                    let recipe = Scales.withLwfTeachers teachers recipe
                    let recipe =
                        match r.TryGetResult TrainArgs.Data_Root with
                        | Some root -> { recipe with Data = { recipe.Data with Root = Some root } }
                        | None -> recipe
                    Validation.validate recipe |> Result.map (fun v -> v, Scales.name scale)
                with :? ArgumentException as e -> Error [ e.Message ]

let run (r: ParseResults<TrainArgs>) =
    match resolveRecipe r with
    | Error problems ->
        for p in problems do eprintfn "error: %s" p
        2
    | Ok (recipe, scale) ->
        match r.TryGetResult TrainArgs.Save_Recipe with
        | Some file ->
            RecipeJson.save file recipe
            printfn "recipe written to %s" file
            0
        | None ->
            let options: Interpreter.RunOptions =
                { OutDir = r.GetResult TrainArgs.Out
                  Resume = r.Contains TrainArgs.Resume
                  PrefixCache = r.TryGetResult TrainArgs.Prefix_Cache
                  Scale = scale
                  Device = r.TryGetResult TrainArgs.Device
                  Log = fun line -> Console.Out.WriteLine line }
            try
                let result = Interpreter.run options recipe
                let acc = result.TestAccuracy |> Array.mapi (fun i a -> sprintf "exit %d: %.4f" (i + 1) a) |> String.concat ", "
                printfn "test accuracy per exit: %s" acc
                printfn "run folder: %s" result.OutDir
                0
            with Interpreter.RunError msg ->
                eprintfn "error: %s" msg
                1
