/// The F# sample as a console app: `CustomModel.FSharp [--images DIR] [--out DIR] [--scale smoke|cpu]` (see Sample.fs).
module Program

open System.IO
open EarlyExit.Experiments.Runner

[<EntryPoint>]
let main argv =
    let args = List.ofArray argv
    let rec opt name = function
        | k :: v :: _ when k = name -> Some v
        | _ :: rest -> opt name rest
        | [] -> None
    match (opt "--scale" args |> Option.map Scales.parse |> Option.defaultValue (Ok Scales.Smoke)) with
    | Error e -> eprintfn "error: %s" e; 2
    | Ok scale -> Sample.run (opt "--images" args) (opt "--out" args |> Option.defaultValue "custom-model-out" |> Path.GetFullPath) scale
