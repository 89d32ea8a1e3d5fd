/// `earlyexit sweep`: plan an experiment's runs as a sweep, submit it (local executor or a Slurm job array), follow
/// it, resubmit what did not finish, and collect the same tables as a local run.
module EarlyExit.Experiments.Cli.SweepCommand

open System
open System.IO
open System.Text.Json
open Argu
open Spectre.Console
open EarlyExit.Native
open EarlyExit.Experiments.Runner
open EarlyExit.Experiments.Experiments
open EarlyExit.Experiments.Cli.Arguments

/// The Slurm options of the command line over a base (the last submission's, or the defaults with the sweep's threads).
let private slurmOptions (r: ParseResults<SlurmArgs>) (b: Slurm.Options) : Slurm.Options =
    { b with
        Partition = r.TryGetResult SlurmArgs.Partition |> Option.orElse b.Partition
        Time = r.TryGetResult SlurmArgs.Time |> Option.orElse b.Time
        Mem = r.TryGetResult SlurmArgs.Mem |> Option.orElse b.Mem
        CpusPerTask = r.GetResult(SlurmArgs.Cpus_Per_Task, b.CpusPerTask)
        Gres = r.TryGetResult SlurmArgs.Gres |> Option.orElse b.Gres
        Device = r.TryGetResult SlurmArgs.Device |> Option.orElse b.Device
        MaxConcurrent = r.TryGetResult SlurmArgs.Max_Concurrent |> Option.orElse b.MaxConcurrent
        Requeue = b.Requeue && not (r.Contains SlurmArgs.No_Requeue)
        Extra = b.Extra @ r.GetResults SlurmArgs.Sbatch }

let private baseOptions (s: Sweep.Sweep) =
    match Slurm.submissions s.Root |> List.tryLast with
    | Some last -> last.Options
    | None -> { Slurm.defaults with CpusPerTask = s.Threads; Device = Option.ofObj s.Device }

let submit (r: ParseResults<SlurmArgs>) =
    let s = Sweep.load (r.GetResult SlurmArgs.Root)
    match r.GetResult(SlurmArgs.Backend, "local") with
    | "local" ->
        let jobs = r.GetResult(SlurmArgs.Jobs, Executor.defaultJobs ())
        let options: Executor.Options =
            { Jobs = jobs; Threads = s.Threads; PrefixCache = Some s.PrefixCache; Scale = s.Scale
              Device = r.TryGetResult SlurmArgs.Device |> Option.orElse (Option.ofObj s.Device); Numerics = Option.ofObj s.Numerics
              SweepDir = Sweep.folder s.Root; Log = fun line -> Console.Out.WriteLine line }
        let outcomes = Executor.run options (Sweep.toJobs s)
        let failed = outcomes |> List.filter (fun o -> o.ExitCode <> 0)
        printfn "%d of %d runs finished; tables: earlyexit sweep collect %s" (outcomes.Length - failed.Length) outcomes.Length s.Root
        if failed.IsEmpty then 0 else 1
    | "slurm" ->
        Slurm.requireClient ()
        let todo = s.Runs |> List.filter (Sweep.finished >> not)
        if todo.IsEmpty then
            printfn "all %d runs already finished; tables: earlyexit sweep collect %s" s.Runs.Length s.Root
            0
        else
            let job = Slurm.submit s (slurmOptions r (baseOptions s)) [ for run in todo -> run.Task ]
            printfn "submitted Slurm array job %s: %d of %d runs; follow with `earlyexit sweep status %s`" job todo.Length s.Runs.Length s.Root
            0
    | other -> raise (Sweep.SweepError $"--backend {other}: local or slurm")

let resubmit (r: ParseResults<SlurmArgs>) =
    let s = Sweep.load (r.GetResult SlurmArgs.Root)
    let job, skipped = Slurm.resubmit s (slurmOptions r (baseOptions s)) (r.Contains SlurmArgs.Reset)
    for run, why in skipped do printfn "left out: %s seed %d (task %d): %s" run.Name run.Seed run.Task why
    match job with
    | Some j -> printfn "resubmitted as Slurm array job %s" j
    | None -> printfn "nothing to resubmit: every run is finished, queued or out of attempts"
    0

/// Remaining task-seconds, from measured rates: each running run's ETA (its progress: the current images/s over the
/// steps left, every later stage at its epoch cap, so an upper bound under early stopping), and for every run not yet
/// running the mean wall time of the finished ones; None for those where no run has finished yet.
let remaining (statuses: Slurm.RunStatus list) =
    let wall (st: Slurm.RunStatus) =
        try
            use doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(st.Run.RunDir, "metrics.json")))
            Some(doc.RootElement.GetProperty("wallSeconds").GetDouble())
        with _ -> None
    let eta (st: Slurm.RunStatus) =
        try
            use doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(st.Run.RunDir, "progress.json")))
            let v = doc.RootElement.GetProperty("EtaSeconds")
            if v.ValueKind = JsonValueKind.Number then Some(v.GetDouble()) else None
        with _ -> None
    let finishedWalls = statuses |> List.filter (fun st -> st.State = "finished") |> List.choose wall |> List.filter (fun w -> w > 0.0)
    let running = statuses |> List.filter (fun st -> st.State = "running") |> List.choose eta
    let waiting = statuses |> List.filter (fun st -> st.State <> "finished" && st.State <> "running") |> List.length
    let meanFull = if finishedWalls.IsEmpty then None else Some(List.average finishedWalls)
    {| runningSeconds = List.sum running
       runningRuns = running.Length
       waitingRuns = waiting
       meanFinishedSeconds = Option.toNullable meanFull
       finishedMeasured = finishedWalls.Length
       waitingSeconds = (match meanFull with Some m -> Nullable(m * float waiting) | None -> Nullable()) |}

let status (r: ParseResults<SweepStatusArgs>) =
    let s = Sweep.load (r.GetResult SweepStatusArgs.Root)
    let statuses, queueError = Slurm.status s
    let counts = statuses |> List.countBy (fun st -> st.State)
    let left = remaining statuses
    if r.Contains SweepStatusArgs.Json then
        let json =
            {| root = s.Root
               experiment = s.Experiment
               queueError = Option.toObj queueError
               counts = dict counts
               remaining = left
               runs = [ for st in statuses -> {| task = st.Run.Task; name = st.Run.Name; seed = st.Run.Seed; state = st.State; detail = st.Detail; logTail = st.LogTail; runDir = st.Run.RunDir |} ] |}
        printfn "%s" (JsonSerializer.Serialize(json, EarlyExit.Experiments.Reports.Markdown.jsonOptions false))
    else
        queueError |> Option.iter (fun e -> eprintfn "warning: %s (states below come from the run folders alone)" e)
        let table = Table().AddColumns("task", "run", "seed", "state", "detail")
        for st in statuses do
            table.AddRow(string st.Run.Task, Markup.Escape st.Run.Name, string st.Run.Seed, Markup.Escape st.State, Markup.Escape st.Detail) |> ignore
        AnsiConsole.Write table
        printfn "%s" (String.Join(", ", counts |> List.map (fun (k, n) -> $"{n} {k}")))
        let hours (sec: float) = (sec / 3600.0).ToString("F1", Globalization.CultureInfo.InvariantCulture)
        if left.runningRuns > 0 || left.waitingRuns > 0 then
            let waiting =
                if left.waitingRuns = 0 then ""
                elif left.waitingSeconds.HasValue then $"; {hours left.waitingSeconds.Value} for the {left.waitingRuns} not running, at the mean wall time of {left.finishedMeasured} finished run(s)"
                else $"; the {left.waitingRuns} not running: no estimate until a run finishes"
            printfn "remaining, from measured rates: %s task-hours for the %d running (their ETAs, every later stage at its epoch cap)%s" (hours left.runningSeconds) left.runningRuns waiting
        for st in statuses do
            if st.LogTail <> "" then printfn "\n%s seed %d (task %d), %s; its log ends:\n%s" st.Run.Name st.Run.Seed st.Run.Task st.State st.LogTail
    if statuses |> List.exists (fun st -> st.State = "failed") then 1 else 0

let task (r: ParseResults<SweepTaskArgs>) =
    let root, index = r.GetResult SweepTaskArgs.Task
    let s = Sweep.load root
    TorchNativeLoader.EnsureLoaded() |> ignore
    try Sweep.runTask s index (r.TryGetResult SweepTaskArgs.Device) (fun line -> Console.Out.WriteLine line)
    with Interpreter.RunError msg ->
        eprintfn "error: %s" msg
        1

/// `earlyexit sweep plan EXPERIMENT OPTIONS` (options passed on to the experiment, so handled before Argu).
let plan (experiment: string) (options: string list) = ScriptArgs.planSweep experiment options

let collect (r: ParseResults<SweepRootArgs>) = ScriptArgs.collectSweep (r.GetResult SweepRootArgs.Root)

let run (r: ParseResults<SweepArgs>) =
    try
        match r.TryGetSubCommand() with
        | Some (Submit a) -> submit a
        | Some (Status a) -> status a
        | Some (Resubmit a) -> resubmit a
        | Some (Collect a) -> collect a
        | Some (Task a) -> task a
        | Some (Plan e) -> plan e []
        | None ->
            eprintfn "%s" (r.Parser.PrintUsage())
            2
    with Sweep.SweepError msg ->
        eprintfn "error: %s" msg
        1
