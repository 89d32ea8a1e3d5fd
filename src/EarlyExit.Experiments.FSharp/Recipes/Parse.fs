/// Parsing of the small value syntaxes the command line and recipes share.
module EarlyExit.Experiments.Recipes.Parse

open System

/// "3x32x32" or "3×32×32" -> [|3;32;32|]
let shape (text: string) : Result<int64[], string> =
    let parts = text.Trim().Split([| 'x'; 'X'; '×'; ',' |], StringSplitOptions.RemoveEmptyEntries)
    let parsed = parts |> Array.map (fun p -> Int64.TryParse(p.Trim()))
    if parts.Length <> 3 || parsed |> Array.exists (fst >> not) || parsed |> Array.exists (fun (_, v) -> v <= 0L) then
        Error $"'{text}' is not an input shape; write C x H x W, for example 3x32x32 or 1x28x28"
    else Ok(parsed |> Array.map snd)

/// "3,4,6,3" -> [|3;4;6;3|]
let intList (what: string) (text: string) : Result<int[], string> =
    let parts = text.Split([| ','; ' ' |], StringSplitOptions.RemoveEmptyEntries)
    let parsed = parts |> Array.map (fun p -> Int32.TryParse(p.Trim()))
    if parts.Length = 0 || parsed |> Array.exists (fst >> not) then
        Error $"{what}: '{text}' is not a comma-separated list of integers"
    else Ok(parsed |> Array.map snd)

/// `--seeds`: "0,1,2" (those seeds) or "N" (seeds 0..N−1). Empty, negative or duplicated seeds, and N < 1, are errors.
let seeds (text: string) : Result<int list, string> =
    let t = text.Trim()
    if t = "" then Error "--seeds: give a list of seeds (0,1,2) or how many (3)"
    elif not (t.Contains ",") then
        match Int32.TryParse t with
        | true, n when n >= 1 -> Ok [ 0 .. n - 1 ]
        | true, 0 -> Error "--seeds 0: a number is how many seeds (3 means 0,1,2); give at least one (for seed 0 alone: --seed 0, or --seeds 0,)"
        | true, n -> Error $"--seeds {n}: a number is how many seeds (3 means 0,1,2); give at least one; seeds must not be negative"
        | _ -> Error $"--seeds: '{text}' is neither a number of seeds nor a comma-separated list"
    else
        match intList "--seeds" t with
        | Error e -> Error e
        | Ok xs when xs |> Array.exists (fun s -> s < 0) -> Error $"--seeds {t}: seeds must not be negative"
        | Ok xs when (Array.distinct xs).Length <> xs.Length -> Error $"--seeds {t}: seed {xs |> Array.countBy id |> Array.find (fun (_, c) -> c > 1) |> fst} appears twice"
        | Ok xs -> Ok(List.ofArray xs)
