/// The Slurm backend of a sweep: one sbatch script with a job array (task i runs run i of the sweep through
/// `earlyexit sweep task ROOT i`), submitted with sbatch; status from squeue and the run folders; resubmission of what
/// did not finish. Tasks share the prefix cache through its locks (flock, on the shared filesystem), and every task
/// resumes its run from its last epoch, so a requeue or a preemption loses at most the epoch in flight.
module EarlyExit.Experiments.Runner.Slurm

open System
open System.Diagnostics
open System.IO
open System.Text.Json
open System.Text.RegularExpressions

type Options =
    { Partition: string option
      /// Wall-clock limit of each task (sbatch --time, e.g. 02:00:00).
      Time: string option
      /// Memory of each task (sbatch --mem, e.g. 8G).
      Mem: string option
      /// CPUs of each task; its torch threads.
      CpusPerTask: int
      /// Generic resources of each task (sbatch --gres, e.g. gpu:1).
      Gres: string option
      /// The device the runs train on ("cuda" on GPU nodes; None: each task decides, CUDA when present).
      Device: string option
      /// Tasks at a time (the array's %N).
      MaxConcurrent: int option
      /// sbatch --requeue: a preempted or failed node's task goes back to the queue (and resumes).
      Requeue: bool
      /// Further sbatch options, one per line (e.g. --account=proj).
      Extra: string list }

let defaults =
    { Partition = None; Time = None; Mem = None; CpusPerTask = 1; Gres = None; Device = None; MaxConcurrent = None; Requeue = true; Extra = [] }

let folder (root: string) = Path.Combine(Sweep.folder root, "slurm")
let logsFolder (root: string) = Path.Combine(folder root, "logs")
let logOf (root: string) (jobId: string) (task: int) = Path.Combine(logsFolder root, $"{jobId}_{task}.out")

/// "0-3", "0,2,5-7": the tasks in sbatch's --array syntax (ranges of consecutive indices).
let arraySpec (tasks: int list) =
    let sorted = tasks |> List.distinct |> List.sort
    let rec ranges acc =
        function
        | [] -> List.rev acc
        | x :: rest ->
            let run = rest |> List.mapi (fun i v -> i, v) |> List.takeWhile (fun (i, v) -> v = x + i + 1) |> List.length
            let last = x + run
            ranges ((if run = 0 then string x else $"{x}-{last}") :: acc) (List.skip run rest)
    String.Join(",", ranges [] sorted)

/// The sbatch script of an array over `tasks` of the sweep. `dotnet` and `cli` are the absolute paths of the .NET host
/// and of earlyexit.dll, which every node must see.
let script (s: Sweep.Sweep) (o: Options) (tasks: int list) (dotnet: string) (cli: string) =
    let array = arraySpec tasks + (match o.MaxConcurrent with Some n -> $"%%{n}" | None -> "")
    let numerics = if String.IsNullOrEmpty s.Numerics then "" else $" --numerics {s.Numerics}"
    let device = match o.Device with Some d -> $" --device {d}" | None -> ""
    let lines =
        [ yield "#!/bin/bash"
          yield $"#SBATCH --job-name=earlyexit-{s.Experiment}"
          yield $"#SBATCH --array={array}"
          yield $"#SBATCH --cpus-per-task={o.CpusPerTask}"
          yield $"#SBATCH --output={logsFolder s.Root}/%%A_%%a.out"
          yield "#SBATCH --open-mode=append"
          match o.Partition with Some p -> yield $"#SBATCH --partition={p}" | None -> ()
          match o.Time with Some t -> yield $"#SBATCH --time={t}" | None -> ()
          match o.Mem with Some m -> yield $"#SBATCH --mem={m}" | None -> ()
          match o.Gres with Some g -> yield $"#SBATCH --gres={g}" | None -> ()
          if o.Requeue then yield "#SBATCH --requeue"
          for e in o.Extra do yield $"#SBATCH {e}"
          yield ""
          yield $"# {s.Runs.Length} runs of {s.Experiment} ({s.Scale} scale) in {s.Root}; task i runs run i of {Sweep.file s.Root}."
          yield "# Each task resumes its run from its last epoch, so a requeue loses at most the epoch in flight."
          yield "set -uo pipefail"
          yield "export OMP_NUM_THREADS=\"$SLURM_CPUS_PER_TASK\" CI=true DOTNET_CLI_TELEMETRY_OPTOUT=1"
          yield $"exec \"{dotnet}\" \"{cli}\" --threads \"$SLURM_CPUS_PER_TASK\"{numerics} sweep task \"{s.Root}\" \"$SLURM_ARRAY_TASK_ID\"{device}" ]
    String.Join("\n", lines) + "\n"

/// One submission: the array job and its tasks.
type Submission = { JobId: string; Tasks: int list; Script: string; Submitted: string; Options: Options }

let private submissionsFile (root: string) = Path.Combine(folder root, "submissions.json")

let submissions (root: string) : Submission list =
    let f = submissionsFile root
    if File.Exists f then JsonSerializer.Deserialize<Submission list>(File.ReadAllText f) else []

/// The submission a task last went out with (its log is that job's).
let lastSubmissionOf (root: string) (task: int) = submissions root |> List.filter (fun s -> List.contains task s.Tasks) |> List.tryLast

/// An executable on PATH, or None.
let which (name: string) =
    (Environment.GetEnvironmentVariable "PATH" |> Option.ofObj |> Option.defaultValue "").Split(':', StringSplitOptions.RemoveEmptyEntries)
    |> Array.map (fun d -> Path.Combine(d, name))
    |> Array.tryFind File.Exists

/// Runs a Slurm client command with a time limit: exit code, standard output, standard error.
let private client (name: string) (args: string list) (timeoutSeconds: int) =
    match which name with
    | None -> raise (Sweep.SweepError $"{name} not found on PATH: this machine has no Slurm client (install Debian's slurm-client, or run the sweep with --backend local)")
    | Some exe ->
        let psi = ProcessStartInfo(exe, RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false)
        for a in args do psi.ArgumentList.Add a
        use p = Process.Start psi
        let out = p.StandardOutput.ReadToEndAsync()
        let err = p.StandardError.ReadToEndAsync()
        if not (p.WaitForExit(timeoutSeconds * 1000)) then
            (try p.Kill true with _ -> ())
            raise (Sweep.SweepError $"{name} did not answer within {timeoutSeconds} s: is the Slurm controller reachable (scontrol ping)?")
        p.WaitForExit()
        p.ExitCode, out.Result.Trim(), err.Result.Trim()

let private unreachable (err: string) =
    err.Contains "Unable to contact slurm controller" || err.Contains "Connection refused" || err.Contains "Socket timed out"

/// Refuses to go on without sbatch: the Slurm backend needs a Slurm client on this machine.
let requireClient () =
    if which "sbatch" |> Option.isNone then
        raise (Sweep.SweepError "sbatch not found on PATH: this machine has no Slurm client (install Debian's slurm-client, or run the sweep with --backend local)")

/// Writes the array script for `tasks` and submits it; returns the job id. Clear errors for a missing sbatch, an
/// unreachable controller and a refused submission.
let submit (s: Sweep.Sweep) (o: Options) (tasks: int list) =
    if tasks.IsEmpty then raise (Sweep.SweepError "nothing to submit")
    if o.CpusPerTask < 1 then raise (Sweep.SweepError $"--cpus-per-task {o.CpusPerTask}: give each task at least one CPU")
    requireClient ()
    Sweep.checkWritable s.Root
    Directory.CreateDirectory(logsFolder s.Root) |> ignore
    let n = submissions s.Root |> List.length
    let path = Path.Combine(folder s.Root, $"array-{n}.sbatch")
    let dotnet = Environment.ProcessPath
    let cli = Executor.cliAssembly ()
    File.WriteAllText(path, script s o tasks dotnet cli)
    let code, out, err = client "sbatch" [ "--parsable"; path ] 120
    if code <> 0 then
        if unreachable err then raise (Sweep.SweepError $"sbatch could not reach the Slurm controller; nothing was submitted: {err}")
        else raise (Sweep.SweepError $"sbatch refused the job array (exit code {code}); nothing was submitted: {err}")
    let jobId = out.Split(';').[0].Trim()
    if not (Regex.IsMatch(jobId, "^[0-9]+$")) then raise (Sweep.SweepError $"sbatch answered '{out}', not a job id")
    let all = submissions s.Root @ [ { JobId = jobId; Tasks = tasks; Script = path; Submitted = DateTime.UtcNow.ToString "o"; Options = o } ]
    File.WriteAllText(submissionsFile s.Root + ".tmp", JsonSerializer.Serialize(all, EarlyExit.Experiments.Reports.Markdown.jsonOptions false))
    File.Move(submissionsFile s.Root + ".tmp", submissionsFile s.Root, true)
    jobId

/// Expands squeue's job ids of an array ("12_3", "12_[0-2,5%2]") into (job, task) pairs.
let expandJobIds (id: string) =
    match id.Split('_', 2) with
    | [| job; tasks |] when tasks.StartsWith "[" ->
        let inner = tasks.Trim('[', ']').Split('%').[0]
        [ for part in inner.Split(',', StringSplitOptions.RemoveEmptyEntries) do
            match part.Split('-') with
            | [| a; b |] -> for t in int a .. int b -> job, t
            | [| a |] -> yield job, int a
            | _ -> () ]
    | [| job; task |] ->
        match Int32.TryParse task with
        | true, t -> [ job, t ]
        | _ -> []
    | _ -> []

/// The queued tasks of the sweep's submissions: task → (state, reason), from squeue; an error message when squeue fails.
let queued (root: string) : Result<Map<int, string * string>, string> =
    match submissions root with
    | [] -> Ok Map.empty
    | subs ->
        let ids = String.Join(",", subs |> List.map (fun s -> s.JobId))
        try
            let code, out, err = client "squeue" [ "--noheader"; "--array"; "--jobs"; ids; "--format=%i|%T|%r" ] 60
            if code <> 0 && not (err.Contains "Invalid job id") then
                Error(if unreachable err then $"squeue could not reach the Slurm controller: {err}" else $"squeue failed (exit code {code}): {err}")
            else
                let mine = subs |> List.map (fun s -> s.JobId) |> set
                Ok(
                    [ for line in out.Split('\n', StringSplitOptions.RemoveEmptyEntries) do
                        match line.Split('|') with
                        | [| id; state; reason |] ->
                            for job, task in expandJobIds id do
                                // A task's latest submission is what counts.
                                if mine.Contains job && (lastSubmissionOf root task |> Option.exists (fun s -> s.JobId = job)) then
                                    yield task, (state.Trim(), reason.Trim())
                        | _ -> () ]
                    |> Map.ofList)
        with Sweep.SweepError e -> Error e

/// What a run is doing: its state and, for a failure, the tail of its last log.
type RunStatus = { Run: Sweep.Run; State: string; Detail: string; LogTail: string }

let private tail (path: string) (n: int) =
    if File.Exists path then
        File.ReadAllLines path |> Array.filter (fun l -> l.Trim() <> "") |> Array.rev |> Array.truncate n |> Array.rev |> String.concat "\n"
    else ""

/// The state of every run: finished, running, pending, cancelled, failed (with its log), not submitted.
let status (s: Sweep.Sweep) =
    let queue = queued s.Root
    let q = match queue with Ok m -> m | Error _ -> Map.empty
    let statuses =
        [ for r in s.Runs ->
            let attempts = Sweep.attempts s r
            let log = lastSubmissionOf s.Root r.Task |> Option.map (fun sub -> logOf s.Root sub.JobId r.Task)
            let logTail = log |> Option.map (fun l -> tail l 12) |> Option.defaultValue ""
            if Sweep.finished r then { Run = r; State = "finished"; Detail = ""; LogTail = "" }
            else
                match q.TryFind r.Task with
                | Some (state, reason) when state = "RUNNING" || state = "COMPLETING" ->
                    { Run = r; State = "running"; Detail = $"{Sweep.progressOf r}, attempt {attempts}"; LogTail = "" }
                | Some (state, reason) ->
                    { Run = r; State = state.ToLowerInvariant(); Detail = (if reason = "None" then "" else reason); LogTail = "" }
                | None when (lastSubmissionOf s.Root r.Task).IsNone -> { Run = r; State = "not submitted"; Detail = Sweep.progressOf r; LogTail = "" }
                | None when logTail.Contains "CANCELLED" -> { Run = r; State = "cancelled"; Detail = $"{Sweep.progressOf r}, after {attempts} attempt(s)"; LogTail = logTail }
                | None when attempts >= Sweep.maxAttempts -> { Run = r; State = "failed"; Detail = $"{attempts} attempts, the most a task gets: `earlyexit sweep resubmit {s.Root} --reset` to try again"; LogTail = logTail }
                | None when attempts = 0 -> { Run = r; State = "not started"; Detail = "submitted, never started (cancelled while pending?)"; LogTail = logTail }
                | None -> { Run = r; State = "failed"; Detail = $"{Sweep.progressOf r}, after {attempts} attempt(s)"; LogTail = logTail } ]
    statuses, (match queue with Error e -> Some e | Ok _ -> None)

/// Submits again every run that is not finished and not queued; runs that used their attempts need `reset`.
/// Returns the job id (None when nothing needed it) and the runs left out with the reason.
let resubmit (s: Sweep.Sweep) (o: Options) (reset: bool) =
    let statuses, queueError =
        match status s with
        | _, Some e -> raise (Sweep.SweepError $"{e}; nothing was resubmitted")
        | st, None -> st, None
    ignore queueError
    let queuedStates = set [ "running"; "pending"; "configuring"; "completing"; "requeued"; "suspended" ]
    let candidates = statuses |> List.filter (fun st -> st.State <> "finished" && not (queuedStates.Contains st.State))
    let spent, todo = candidates |> List.partition (fun st -> not reset && Sweep.attempts s st.Run >= Sweep.maxAttempts)
    if reset then
        for st in todo do
            let f = Sweep.attemptsFile s st.Run
            if File.Exists f then File.Delete f
    let job = if todo.IsEmpty then None else Some(submit s o [ for st in todo -> st.Run.Task ])
    job, [ for st in spent -> st.Run, $"failed {Sweep.attempts s st.Run} times; --reset to try again" ]
