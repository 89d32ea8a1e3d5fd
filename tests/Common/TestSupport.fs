/// Shared by both test executables: the entry point that loads TorchSharp first and prints a plain summary line.
module EarlyExit.Tests.Support

open System
open System.IO
open Expecto
open Expecto.Impl

/// Loads TorchSharp before any test touches it (the failure of a first load is cached for the process).
let ensureTorch () = EarlyExit.Native.TorchNativeLoader.EnsureLoaded() |> ignore

/// A fresh temporary folder, removed when disposed.
type TempDir() =
    let path = Path.Combine(Path.GetTempPath(), "earlyexit-tests-" + Guid.NewGuid().ToString("N"))
    do Directory.CreateDirectory path |> ignore
    member _.Path = path
    member _.File(name: string) = Path.Combine(path, name)
    interface IDisposable with
        member _.Dispose() =
            try Directory.Delete(path, true) with _ -> ()

/// Runs the tests with Expecto's CLI and ends with the line CI reads: "N passed, N failed".
let run (name: string) (argv: string[]) (tests: Test) =
    ensureTorch ()
    let printer = TestPrinters.defaultPrinter
    let mutable line = None
    let summary =
        { printer with
            summary =
                fun config s ->
                    async {
                        do! printer.summary config s
                        line <- Some(s.passed.Length, s.failed.Length + s.errored.Length)
                    } }
    // Sequenced: torch already uses every core, and the live-tensor counts some tests compare are process-wide.
    let code = runTestsWithCLIArgs [ CLIArguments.Printer summary; CLIArguments.Sequenced ] argv tests
    match line with
    | Some (passed, failed) -> printfn "\n%s: %d passed, %d failed" name passed failed
    | None -> printfn "\n%s: 0 passed, 0 failed" name
    code
