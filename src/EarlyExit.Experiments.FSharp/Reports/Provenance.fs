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
    let cpu = EarlyExit.Native.CpuInfo.Read()
    $"{Environment.MachineName}, {cpu.ModelName} ({cpu.Summary}), {Environment.ProcessorCount} cores, {Runtime.InteropServices.RuntimeInformation.OSDescription}, .NET {Environment.Version}"

/// The numerics guard's verdict for this process: CPU, libtorch and oneDNN, and the convolution kernels in use.
let private verdict () =
    EarlyExit.Native.TorchNativeLoader.EnsureLoaded() |> ignore
    EarlyExit.Native.NumericsGuard.Current

/// One line: "CPU ...; libtorch ... (oneDNN ...); convolution kernels ..." (every run, table and benchmark carries it).
let numerics () = (verdict ()).Describe()

/// The same as a JSON-ready record, for run.json, metrics.json and bench.json.
let numericsRecord () =
    let v = verdict ()
    {| summary = v.Describe()
       short = $"{v.Cpu.ModelName} ({v.Cpu.Summary}), kernels {v.Backend}"
       cpu = v.Cpu.Describe()
       cpuFlags = v.Cpu.Flags
       libtorch = v.LibTorch.TorchVersion
       onednn = v.LibTorch.OneDnnVersion
       atenCpuCapability = v.LibTorch.CpuCapability
       torchSharp = v.LibTorch.TorchSharpVersion
       kernels = v.Backend
       decision = v.Decision
       threads = v.Threads
       allocator = EarlyExit.Native.NativeAllocator.Status
       trainingLayout = EarlyExit.Native.ConvolutionLayout.TrainingStatus
       nativeScalars = EarlyExit.Native.NativeScalars.Status
       nnpack = EarlyExit.Native.Nnpack.Status
       onednnCaches = EarlyExit.Native.OneDnnCaches.Status
       checkedBackends =
           [| for c in v.Checked ->
               {| backend = c.Backend; outcome = c.Outcome; detail = c.Detail
                  imagesPerSecond = c.ImagesPerSecond |} |] |}
