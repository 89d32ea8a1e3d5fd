/// A sweep is data: the list of (row, seed, recipe, run folder) runs an experiment needs, written to
/// ROOT/sweep/sweep.json with one recipe file per run, so that any backend can run it and anyone can collect it:
/// the local executor (`Executor`), or a Slurm job array (`Slurm`) whose task i runs run i. Either way the run folders,
/// the prefix cache (shared safely through its locks) and the tables are the same.
module EarlyExit.Experiments.Runner.Sweep

open System
open System.IO
open System.Text.Json
open EarlyExit.Experiments.Recipes

/// One run of a sweep; `Task` is its index (the Slurm array task).
type Run =
    { Task: int
      Name: string
      Seed: int
      /// The recipe file, absolute.
      Recipe: string
      /// The run folder, absolute.
      RunDir: string }

type Sweep =
    { /// The experiment that planned it ("table1", "table2", "regularisers", "train") and its script options, so
      /// that `sweep collect` can write the same tables from whatever finished.
      Experiment: string
      Arguments: string list
      /// Absolute results folder of the experiment (on a shared filesystem for a cluster).
      Root: string
      Scale: string
      PrefixCache: string
      /// Torch threads of every run, and kernels and device forced on every run (null: each process decides).
      Threads: int
      Numerics: string
      Device: string
      Created: string
      Runs: Run list }

exception SweepError of string

let folder (root: string) = Path.Combine(root, "sweep")
let file (root: string) = Path.Combine(folder root, "sweep.json")

let private json = EarlyExit.Experiments.Reports.Markdown.jsonOptions false

/// Refuses a root that cannot be written, before anything is written (a read-only or missing parent, a file).
let checkWritable (root: string) =
    try
        Directory.CreateDirectory(folder root) |> ignore
        let probe = Path.Combine(folder root, $".write-test-{Guid.NewGuid():N}")
        File.WriteAllText(probe, "")
        File.Delete probe
    with
    | :? UnauthorizedAccessException
    | :? IOException as e -> raise (SweepError $"the run root {root} is not writable ({e.Message}); give --out a folder on a filesystem you can write (on a cluster: one every node sees)")

/// Writes the recipes and ROOT/sweep/sweep.json (atomically, last).
let save (s: Sweep) =
    checkWritable s.Root
    File.WriteAllText(file s.Root + ".tmp", JsonSerializer.Serialize(s, json))
    File.Move(file s.Root + ".tmp", file s.Root, true)

let load (root: string) : Sweep =
    let path = file (Path.GetFullPath root)
    if not (File.Exists path) then raise (SweepError $"{path} not found: {root} holds no sweep (plan one with an experiment script's --backend, or `earlyexit sweep plan`)")
    try
        JsonSerializer.Deserialize<Sweep>(File.ReadAllText path)
    with :? JsonException as e -> raise (SweepError $"{path} is not a sweep file: {e.Message}")

/// The sweep of jobs an experiment planned: each job's recipe is written beside sweep.json.
let ofJobs (experiment: string) (arguments: string list) (root: string) (scale: string) (prefixCache: string) (threads: int)
           (numerics: string option) (device: string option) (jobs: (string * int * Recipe * string) list) : Sweep =
    let root = Path.GetFullPath root
    checkWritable root
    { Experiment = experiment
      Arguments = arguments
      Root = root
      Scale = scale
      PrefixCache = Path.GetFullPath prefixCache
      Threads = threads
      Numerics = Option.toObj numerics
      Device = Option.toObj device
      Created = DateTime.UtcNow.ToString "o"
      Runs =
        [ for i, (name, seed, recipe, runDir) in List.indexed jobs ->
            let path = Path.Combine(folder root, $"{name}-seed{seed}.recipe.json")
            RecipeJson.save path recipe
            { Task = i; Name = name; Seed = seed; Recipe = path; RunDir = Path.GetFullPath runDir } ] }

let finished (r: Run) = File.Exists(Path.Combine(r.RunDir, "metrics.json"))

/// Attempts of a run under a scheduler: counted by the task itself when it starts (ROOT/sweep/attempts/TASK).
let attemptsFile (s: Sweep) (r: Run) = Path.Combine(folder s.Root, "attempts", $"{r.Task}")

let attempts (s: Sweep) (r: Run) =
    let f = attemptsFile s r
    if File.Exists f then (File.ReadAllLines f).Length else 0

/// A task may start at most this many times; then it is failed until resubmitted with --reset.
let maxAttempts = 3

/// Where a run is, from its folder alone: finished, started (a stage done or an epoch checkpoint), or not started.
let progressOf (r: Run) =
    if finished r then "finished"
    elif Directory.Exists(Path.Combine(r.RunDir, "stages")) && Directory.EnumerateFileSystemEntries(Path.Combine(r.RunDir, "stages")) |> Seq.isEmpty |> not then
        let p = Path.Combine(r.RunDir, "progress.json")
        if File.Exists p then
            try
                use doc = JsonDocument.Parse(File.ReadAllText p)
                let e = doc.RootElement
                $"""stage {e.GetProperty("Stage").GetInt32()}/{e.GetProperty("Stages").GetInt32()} {e.GetProperty("StageName").GetString()}, epoch {e.GetProperty("Epoch").GetInt32()}/{e.GetProperty("Epochs").GetInt32()}"""
            with _ -> "started"
        else "started"
    else "not started"

/// The runs of a sweep as the local executor's jobs (recipes read back from their files).
let toJobs (s: Sweep) : Executor.Job list =
    [ for r in s.Runs ->
        match RecipeJson.load r.Recipe with
        | Ok recipe -> { Executor.Name = r.Name; Executor.Seed = r.Seed; Executor.Recipe = recipe; Executor.RunDir = r.RunDir }
        | Error es -> raise (SweepError(String.Join("\n", es))) ]

/// Runs task `task` of a sweep in this process (what a Slurm array task does): counts the attempt, refuses a task that
/// already started `maxAttempts` times, then runs or resumes the run. Returns the exit code.
let runTask (s: Sweep) (task: int) (device: string option) (log: string -> unit) =
    match s.Runs |> List.tryFind (fun r -> r.Task = task) with
    | None -> raise (SweepError $"task {task}: the sweep in {s.Root} has tasks 0..{s.Runs.Length - 1}")
    | Some r when finished r ->
        log $"task {task} ({r.Name} seed {r.Seed}): already finished in {r.RunDir}"
        0
    | Some r ->
        let before = attempts s r
        if before >= maxAttempts then
            let logs = Path.Combine(folder s.Root, "slurm", "logs")
            log $"task {task} ({r.Name} seed {r.Seed}) failed {before} times; not started again. Its logs are in {logs}; `earlyexit sweep resubmit {s.Root} --reset` tries again"
            1
        else
            let f = attemptsFile s r
            Directory.CreateDirectory(Path.GetDirectoryName f) |> ignore
            let job = Environment.GetEnvironmentVariable "SLURM_ARRAY_JOB_ID" |> Option.ofObj |> Option.defaultValue "local"
            File.AppendAllLines(f, [ $"{DateTime.UtcNow:o} job {job} host {Environment.MachineName}" ])
            log $"task {task}: {r.Name} seed {r.Seed}, attempt {before + 1} of at most {maxAttempts}, in {r.RunDir}"
            let recipe =
                match RecipeJson.load r.Recipe with
                | Ok x -> x
                | Error es -> raise (SweepError(String.Join("\n", es)))
            let options: Interpreter.RunOptions =
                { OutDir = r.RunDir; Resume = true; PrefixCache = Some s.PrefixCache; Scale = s.Scale
                  Device = (match device with Some d -> Some d | None -> Option.ofObj s.Device); Log = log }
            let result = Interpreter.run options recipe
            let accuracy = String.Join(" ", result.TestAccuracy |> Array.map (fun a -> a.ToString("F4", Globalization.CultureInfo.InvariantCulture)))
            log $"task {task} finished: test accuracy per exit {accuracy}"
            0
