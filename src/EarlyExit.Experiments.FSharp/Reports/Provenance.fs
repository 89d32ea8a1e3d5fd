/// What produced an output: code version, machine, device. Every report carries it.
module EarlyExit.Experiments.Reports.Provenance

open System
open System.Diagnostics
open System.IO

/// The git commit of the working tree (with "+dirty" when it has changes), or "unknown".
let codeVersion () =
    try
        let run (args: string) =
            let psi = ProcessStartInfo("git", args, RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false)
            use p = Process.Start psi
            let out = p.StandardOutput.ReadToEnd().Trim()
            p.WaitForExit()
            if p.ExitCode = 0 then Some out else None
        match run "rev-parse --short=12 HEAD" with
        | Some sha when sha <> "" ->
            match run "status --porcelain --untracked-files=no" with
            | Some s when s <> "" -> sha + "+dirty"
            | _ -> sha
        | _ -> "unknown"
    with _ -> "unknown"

let machine () =
    $"{Environment.MachineName}, {Environment.ProcessorCount} cores, {Runtime.InteropServices.RuntimeInformation.OSDescription}, .NET {Environment.Version}"
