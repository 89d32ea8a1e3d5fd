/// Small writers for the tables of reports: Markdown and CSV, with a provenance header; the JSON options of files people read.
module EarlyExit.Experiments.Reports.Markdown

open System
open System.IO
open System.Text

let table (header: string list) (rows: string list list) =
    let sb = StringBuilder()
    sb.AppendLine("| " + String.Join(" | ", header) + " |") |> ignore
    sb.AppendLine("|" + String.Join("|", header |> List.map (fun _ -> "---")) + "|") |> ignore
    for r in rows do
        sb.AppendLine("| " + String.Join(" | ", r) + " |") |> ignore
    sb.ToString()

let csv (header: string list) (rows: string list list) =
    let quote (s: string) = if s.Contains ',' || s.Contains '"' then "\"" + s.Replace("\"", "\"\"") + "\"" else s
    let sb = StringBuilder()
    sb.AppendLine(String.Join(",", header |> List.map quote)) |> ignore
    for r in rows do
        sb.AppendLine(String.Join(",", r |> List.map quote)) |> ignore
    sb.ToString()

let writeAtomic (path: string) (text: string) =
    Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath path)) |> ignore
    let tmp = path + ".tmp"
    File.WriteAllText(tmp, text)
    File.Move(tmp, path, true)

/// JSON options for the files and outputs people read (results, run folders, sweeps): indented, with '+', '\'', '<',
/// '&' and non-ASCII text (μ, Δ, –) written as themselves, not as the "\u002B" escapes System.Text.Json's default,
/// HTML-safe encoder writes; quotes and control characters are still escaped, so the JSON is valid. `namedFloats`:
/// NaN and ±Infinity written as "NaN" and "Infinity" rather than refused.
/// Two shared instances (System.Text.Json caches each type's metadata per options instance); never modified.
let private readable (numbers: Text.Json.Serialization.JsonNumberHandling) =
    Text.Json.JsonSerializerOptions(
        WriteIndented = true, Encoder = Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping, NumberHandling = numbers)
let private readableStrict = readable Text.Json.Serialization.JsonNumberHandling.Strict
let private readableNamedFloats = readable Text.Json.Serialization.JsonNumberHandling.AllowNamedFloatingPointLiterals
let jsonOptions (namedFloats: bool) = if namedFloats then readableNamedFloats else readableStrict

let f2 (v: float) = v.ToString("F2", Globalization.CultureInfo.InvariantCulture)
