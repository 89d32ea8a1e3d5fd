/// The local executor: runs independent runs (strategies × seeds × grid points) N at a time, each in its own
/// `earlyexit train` process with T torch threads, and shows them live.
///
/// A run is a recipe and a run folder; its process resumes it (a finished run is reused, an interrupted one continues
/// from its last epoch), so killing the executor loses at most the epoch in flight of each job, and running it again
/// finishes the grid. Runs that share a stage prefix (the warm-up) train it once: the interpreter holds a lock on the
/// prefix while it trains it, and the executor starts a run whose first stage another running job is training only
/// when nothing else is left to start. A child process watches its parent and ends when the executor does.
module EarlyExit.Experiments.Runner.Executor

open System
open System.Diagnostics
open System.IO
open System.Text.Json
open Spectre.Console
open EarlyExit.Experiments.Recipes

/// One run of a sweep: a row name, a seed, its recipe and its run folder.
type Job =
    { Name: string
      Seed: int
      Recipe: Recipe
      RunDir: string }

type Options =
    { /// Runs at a time.
      Jobs: int
      /// torch threads of each run.
      Threads: int
      PrefixCache: string option
      /// The scale's name, for the runs' provenance.
      Scale: string
      Device: string option
      /// Convolution kernels forced on every run (None: each process's numerics guard decides; they share its verdict).
      Numerics: string option
      /// Where recipes and the runs' console output go.
      SweepDir: string
      Log: string -> unit }

type Outcome =
    { Job: Job
      ExitCode: int
      Seconds: float
      /// The last lines of the run's console output (for failures).
      Tail: string }

/// On N cores: N runs of 1 thread each (measured on 2 cores: two 1-thread runs 248 images/s in all, one 2-thread run
/// 199, two 2-thread runs 133; see EarlyExit.Native.TorchThreads).
let defaultJobs () = max 1 Environment.ProcessorCount
let defaultThreads (jobs: int) = max 1 (Environment.ProcessorCount / max 1 jobs)

/// Checks --jobs and --threads: both at least 1 (a clear error otherwise).
let validate (jobs: int) (threads: int) =
    if jobs < 1 then Error $"--jobs {jobs}: run at least one job at a time"
    elif threads < 1 then Error $"--threads {threads}: give each run at least one thread"
    else Ok()

/// Environment variable naming the earlyexit command line (its earlyexit.dll) the executor and Slurm tasks run.
[<Literal>]
let CliVariable = "EARLYEXIT_CLI"

/// The earlyexit command line the runs are started with, given EARLYEXIT_CLI's value (null when unset) and this
/// library's path: the variable's file, else earlyexit.dll beside the library (the command line's own folder, the
/// experiment scripts', the tool's); a library used without the command line gets an error that says what to do.
let resolveCli (variable: string) (libraryPath: string) =
    if not (String.IsNullOrWhiteSpace variable) then
        if File.Exists variable then Path.GetFullPath variable
        else invalidOp $"{CliVariable}={variable}: no such file (it names the earlyexit.dll that runs each job)"
    else
        let dir = Path.GetDirectoryName(Path.GetFullPath libraryPath)
        let beside = Path.Combine(dir, "earlyexit.dll")
        if File.Exists beside then beside
        else
            invalidOp (
                $"the executor runs each job as `dotnet earlyexit.dll train ...`, and no earlyexit.dll is beside {Path.GetFileName libraryPath} " +
                $"({dir}); set {CliVariable} to an earlyexit.dll: the installed tool's (under ~/.dotnet/tools/.store/earlyexit/) or a build of src/EarlyExit.Cli.FSharp")

/// The earlyexit command line of this process's runs (see resolveCli).
let cliAssembly () = resolveCli (Environment.GetEnvironmentVariable CliVariable) typeof<Options>.Assembly.Location

let private cli () = cliAssembly ()

let private jobLabel (j: Job) = $"{j.Name} seed {j.Seed}"

/// The progress file of a running job, if it has written one.
let private progressOf (j: Job) =
    let path = Path.Combine(j.RunDir, "progress.json")
    try
        if File.Exists path then Some(JsonSerializer.Deserialize<Interpreter.Progress>(File.ReadAllText path)) else None
    with _ -> None

let private finished (j: Job) = File.Exists(Path.Combine(j.RunDir, "metrics.json"))

let private eta (seconds: float) =
    if Double.IsNaN seconds || Double.IsInfinity seconds then "?"
    else
        let t = TimeSpan.FromSeconds seconds
        if t.TotalHours >= 1.0 then $"{int t.TotalHours}h{t.Minutes:D2}m" else $"{t.Minutes}m{t.Seconds:D2}s"

let private describe (j: Job) =
    match progressOf j with
    | Some p ->
        $"stage {p.Stage}/{p.Stages} {p.StageName}, epoch {p.Epoch}/{p.Epochs}, step {p.Step}/{p.Steps}, loss {p.Loss:F3}, {p.ImagesPerSecond:F0} images/s, ETA {eta p.EtaSeconds}"
    | None -> "starting"

/// Runs every job (those already finished are only checked), at most `o.Jobs` at a time; returns their outcomes in
/// the order given.
let run (o: Options) (jobs: Job list) : Outcome list =
    match validate o.Jobs o.Threads with
    | Error e -> raise (ArgumentException e)
    | Ok () -> ()
    Directory.CreateDirectory o.SweepDir |> ignore
    let queue = Collections.Generic.List<Job>(jobs)
    let running = Collections.Generic.Dictionary<Job, Process * Stopwatch * string>(HashIdentity.Reference)
    let outcomes = Collections.Generic.Dictionary<Job, Outcome>(HashIdentity.Reference)
    let me = Environment.ProcessId
    let logPathOf (j: Job) = Path.Combine(o.SweepDir, $"{j.Name}-seed{j.Seed}.log")

    let start (j: Job) =
        let recipePath = Path.Combine(o.SweepDir, $"{j.Name}-seed{j.Seed}.recipe.json")
        RecipeJson.save recipePath j.Recipe
        let psi = ProcessStartInfo("dotnet", RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false)
        let add (a: string) = psi.ArgumentList.Add a
        add (cli ())
        add "--threads"; add (string o.Threads)
        o.Numerics |> Option.iter (fun n -> add "--numerics"; add n)
        add "train"; add "--recipe"; add recipePath; add "--out"; add j.RunDir; add "--resume"
        add "--scale"; add o.Scale; add "--parent-pid"; add (string me)
        o.PrefixCache |> Option.iter (fun c -> add "--prefix-cache"; add c)
        o.Device |> Option.iter (fun d -> add "--device"; add d)
        // libgomp sizes its pool from the environment when it loads; --threads then sets torch's count.
        psi.Environment["OMP_NUM_THREADS"] <- string o.Threads
        psi.Environment["CI"] <- "true"  // plain progress lines, no live bar, in the child
        let logPath = logPathOf j
        let logFile = new StreamWriter(logPath, false)
        let gate = obj ()
        let p = new Process(StartInfo = psi)
        let write (line: string) = if not (isNull line) then lock gate (fun () -> logFile.WriteLine line; logFile.Flush())
        p.OutputDataReceived.Add(fun e -> write e.Data)
        p.ErrorDataReceived.Add(fun e -> write e.Data)
        p.EnableRaisingEvents <- true
        p.Exited.Add(fun _ -> lock gate (fun () -> logFile.Dispose()))
        p.Start() |> ignore
        p.BeginOutputReadLine()
        p.BeginErrorReadLine()
        running[j] <- (p, Stopwatch.StartNew(), logPath)
        o.Log $"[{jobLabel j}] started ({o.Threads} thread(s)); console output in {logPath}"

    /// The next job to start: the first queued one whose first stage no running job is training (a job that shares a
    /// prefix would only wait on its lock); any queued job when there is no such one.
    let next () =
        let busyPrefixes =
            running.Keys |> Seq.choose (fun j -> if j.Recipe.Stages.IsEmpty then None else Some(Interpreter.prefixKey j.Recipe 0)) |> set
        let free (j: Job) =
            match o.PrefixCache with
            | Some dir ->
                let k = Interpreter.prefixKey j.Recipe 0
                not (busyPrefixes.Contains k) || File.Exists(Path.Combine(dir, k + ".json"))
            | None -> true
        match Seq.tryFind free queue with
        | Some j -> Some j
        | None -> if queue.Count > 0 && running.Count = 0 then Some queue[0] else None

    let reap () =
        for KeyValue (j, (p, clock, logPath)) in List.ofSeq running do
            if p.HasExited then
                p.WaitForExit()
                let tail =
                    try File.ReadAllLines logPath |> Array.filter (fun l -> l.Trim() <> "") |> Array.rev |> Array.truncate 15 |> Array.rev |> String.concat "\n"
                    with _ -> ""
                outcomes[j] <- { Job = j; ExitCode = p.ExitCode; Seconds = clock.Elapsed.TotalSeconds; Tail = tail }
                running.Remove j |> ignore
                if p.ExitCode = 0 then o.Log $"[{jobLabel j}] finished in {clock.Elapsed.TotalSeconds:F0} s"
                else o.Log $"[{jobLabel j}] FAILED (exit code {p.ExitCode}):\n{tail}"
                p.Dispose()

    let fill () =
        let mutable go = true
        while go && running.Count < o.Jobs && queue.Count > 0 do
            match next () with
            | Some j ->
                queue.Remove j |> ignore
                start j
            | None -> go <- false

    // Finished runs need no process.
    for j in List.ofSeq queue do
        if finished j then
            queue.Remove j |> ignore
            outcomes[j] <- { Job = j; ExitCode = 0; Seconds = 0.0; Tail = "" }
    let reused = outcomes.Count
    if reused > 0 then o.Log $"{reused} of {jobs.Length} runs already finished (reused)"
    if queue.Count > 0 then
        o.Log $"running {queue.Count} runs, {o.Jobs} at a time with {o.Threads} torch thread(s) each"
        let step () =
            reap ()
            fill ()
        if AnsiConsole.Profile.Capabilities.Interactive then
            let table = Table().AddColumns("run", "state")
            AnsiConsole.Live(table).Start(fun ctx ->
                while queue.Count > 0 || running.Count > 0 do
                    step ()
                    table.Rows.Clear()
                    for j in jobs do
                        let state =
                            if running.ContainsKey j then describe j
                            elif outcomes.ContainsKey j then (if outcomes[j].ExitCode = 0 then "done" else $"[red]FAILED (exit code {outcomes[j].ExitCode})[/]")
                            else "queued"
                        table.AddRow(Markup.Escape(jobLabel j), (if state.StartsWith "[red]" then state else Markup.Escape state)) |> ignore
                    ctx.Refresh()
                    Threading.Thread.Sleep 1000)
        else
            let mutable lastReport = DateTime.MinValue
            while queue.Count > 0 || running.Count > 0 do
                step ()
                if DateTime.UtcNow - lastReport > TimeSpan.FromSeconds 30.0 && running.Count > 0 then
                    lastReport <- DateTime.UtcNow
                    for j in running.Keys do o.Log $"[{jobLabel j}] {describe j}"
                Threading.Thread.Sleep 500
    [ for j in jobs -> outcomes[j] ]
