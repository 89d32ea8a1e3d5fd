/// Parsing of the small value syntaxes the command line and recipes share.
module EarlyExit.Experiments.Cli.Parse

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
