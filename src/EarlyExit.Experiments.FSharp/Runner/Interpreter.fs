/// The one interpreter of recipes: runs the stages in order in a run folder that survives a kill.
///
/// Run folder:
///   recipe.json          the resolved recipe (the run's identity: --resume refuses a different one)
///   run.json             seed, device, code version, machine, data source, scale, start time
///   log.txt              every log line
///   stages/NN-name/      per-epoch checkpoint of a stage in progress (epoch.json written last)
///   stages/NN-name.done  state after the stage (model and regulariser state) + .json with its result
///   metrics.json         test accuracy of every exit, costs, wall time: the run is finished when it exists
///   test-logits.tensors  logits of every exit on the test set (evaluation derives everything from them)
///   tensorboard/         event files
module EarlyExit.Experiments.Runner.Interpreter

open System
open System.Diagnostics
open System.IO
open System.Security.Cryptography
open System.Text
open System.Text.Json
open Spectre.Console
open TorchSharp
open EarlyExit.Data
open EarlyExit.Flops
open EarlyExit.Losses
open EarlyExit.Models
open EarlyExit.Native
open EarlyExit.Training
open EarlyExit.Experiments.Recipes
open EarlyExit.Experiments.Reports

type RunOptions =
    { OutDir: string
      Resume: bool
      /// Folder of the stage-prefix cache shared between runs (None: no cache).
      PrefixCache: string option
      Scale: string
      Device: string option
      /// Called with each log line (besides log.txt).
      Log: string -> unit }

type RunResult =
    { OutDir: string
      TestAccuracy: float[]
      AlreadyFinished: bool
      WallSeconds: float }

exception RunError of string

let private json = JsonSerializerOptions(WriteIndented = true)

let private writeAtomic = Markdown.writeAtomic

let private fisherEstimator =
    function
    | PerSample -> FisherEstimator.PerSampleEmpirical
    | PerSampleNaive -> FisherEstimator.PerSampleEmpiricalNaive
    | SquaredMinibatch -> FisherEstimator.SquaredMinibatchGradient

/// Exits each stage must consolidate after it ends: EWC (Fisher + anchor) and/or LwF (teacher), derived from
/// which later stages protect that exit with which regulariser. With one previous-stage teacher, a stage keeps a
/// teacher only where a later stage's deepest protected exit is its exit.
let consolidation (teachers: LwfTeachers) (stages: Stage list) (i: int) =
    let s = stages[i]
    if s.Exit = 0 then false, false
    else
        let later = stages |> List.skip (i + 1) |> List.filter (fun l -> List.contains s.Exit l.Protects)
        let ewc = later |> List.exists (fun l -> Regularisers.usesEwc l.Regulariser)
        let usesTeacher (l: Stage) =
            match teachers with
            | PerExitTeachers -> true
            | PreviousStageTeacher -> List.max l.Protects = s.Exit
        let lwf = later |> List.exists (fun l -> Regularisers.usesLwf l.Regulariser && usesTeacher l)
        ewc, lwf

/// The exits whose LwF teachers the stages after stage i read: every protected exit (per-exit teachers) or the
/// deepest one (one previous-stage teacher). Teachers outside this set are released after stage i.
let teachersReadAfter (recipe: Recipe) (i: int) =
    recipe.Stages
    |> List.skip (i + 1)
    |> List.filter (fun l -> Regularisers.usesLwf l.Regulariser && not l.Protects.IsEmpty)
    |> List.collect (fun l -> match recipe.LwfTeachers with
                              | PerExitTeachers -> l.Protects
                              | PreviousStageTeacher -> [ List.max l.Protects ])
    |> Set.ofList

/// The resolved plan of one stage for the C# loop.
let plan (recipe: Recipe) (i: int) (checkpointDir: string option) : StagePlan =
    let s = recipe.Stages[i]
    let ewc, lwf = consolidation recipe.LwfTeachers recipe.Stages i
    let lambda, rho =
        match s.Regulariser with
        | NoRegulariser -> 0.0, 0.0
        | Ewc l -> l, 0.0
        | Lwf r -> 0.0, r
        | EwcAndLwf (l, r) -> l, r
    let mix =
        recipe.Augment.Mix
        |> Option.map (fun m ->
            MixSettings(MixupAlpha = m.MixupAlpha, CutmixAlpha = m.CutmixAlpha, SwitchProbability = m.SwitchProbability,
                        LabelSmoothing = m.LabelSmoothing, Probability = m.Probability))
    StagePlan(
        Name = s.Name,
        LossExits = (s.LossExits |> List.map fst |> List.toArray),
        LossWeights = (s.LossExits |> List.map snd |> List.toArray),
        TrainableGroups = List.toArray s.Trainable,
        EwcLambda = lambda,
        LwfRho = rho,
        StageExit = s.Exit,
        ProtectedExits = List.toArray s.Protects,
        LwfTeachers = (match recipe.LwfTeachers with
                       | PerExitTeachers -> LwfTeacherPolicy.PerExit
                       | PreviousStageTeacher -> LwfTeacherPolicy.PreviousStage),
        LearningRate = s.Optimiser.LearningRate,
        WeightDecay = s.Optimiser.WeightDecay,
        Schedule = (match s.Optimiser.Schedule with
                    | Cosine -> LrSchedule.Cosine
                    | Constant -> LrSchedule.Constant),
        BatchSize = s.BatchSize,
        MaxEpochs = s.MaxEpochs,
        Patience = s.Patience,
        MaxStepsPerEpoch = s.MaxStepsPerEpoch,
        CropPadding = recipe.Augment.CropPadding,
        HorizontalFlip = recipe.Augment.Flip,
        Mix = Option.toObj mix,
        Seed = recipe.Seed + 1000 * i,
        CheckpointDirectory = Option.toObj checkpointDir,
        ConsolidateEwcAfter = ewc,
        SnapshotTeacherAfter = lwf,
        FisherEstimator = fisherEstimator recipe.Fisher.Estimator,
        FisherSamples = recipe.Fisher.Samples)

/// Cache key of the state after stages 0..k: everything that determines it (not the recipe's name).
/// What a stage keeps for later ones (Fisher and anchor, teacher) depends on the stages after it, so it is part of the key.
let prefixKey (recipe: Recipe) (k: int) =
    let stages = List.take (k + 1) recipe.Stages
    let trainsWithLwf = stages |> List.exists (fun s -> Regularisers.usesLwf s.Regulariser)
    // The teacher policy changes the state only through stages that train with LwF (what a stage keeps for later
    // ones is in `kept`), so prefixes without one (the warm-up) are shared by both policies.
    let prefix = { recipe with Name = ""; Stages = stages; LwfTeachers = (if trainsWithLwf then recipe.LwfTeachers else PerExitTeachers) }
    let flags = [ for i in 0..k -> i, consolidation recipe.LwfTeachers recipe.Stages i ]
    let kept =
        [ for i, f in flags do
            match f with
            | false, false -> ()
            | ewc, lwf -> $"|{i}:ewc={ewc},lwf={lwf}" ]
    // Teachers kept by stages 0..k that later stages no longer read are released after stage k.
    let read = teachersReadAfter recipe k
    let held = [ for i, (_, lwf) in flags do if lwf && read.Contains recipe.Stages[i].Exit then yield recipe.Stages[i].Exit ]
    let kept = if held.IsEmpty then kept else kept @ [ "|teachers=" + String.Join(",", held) ]
    let bytes = SHA256.HashData(Encoding.UTF8.GetBytes(RecipeJson.toJson prefix + String.concat "" kept))
    Convert.ToHexString(bytes).Substring(0, 20).ToLowerInvariant()

/// Loads the data of a recipe: train/validation/test, limited as the recipe says (stratified, seeded).
let loadData (recipe: Recipe) =
    let d = recipe.Data
    let splits = DataCatalog.Load(d.Name, Option.toObj d.Root, d.ValidationFraction, recipe.Seed)
    let train = if d.TrainLimit > 0 then splits.Train.Take(d.TrainLimit, recipe.Seed) else splits.Train
    let valLimit = if d.TrainLimit > 0 then max 1 (int (float d.TrainLimit * d.ValidationFraction / (1.0 - d.ValidationFraction))) else 0
    let validation = if valLimit > 0 then splits.Validation.Take(valLimit, recipe.Seed) else splits.Validation
    let test = if d.TestLimit > 0 then splits.Test.Take(d.TestLimit, recipe.Seed) else splits.Test
    DataSplits(train, validation, test, splits.Source)

let private stageDir (out: string) (i: int) (s: Stage) = Path.Combine(out, "stages", $"%02d{i}-{s.Name}")
let private doneFile (out: string) (i: int) (s: Stage) = stageDir out i s + ".done"

/// Writes the state after a stage: model tensors and regulariser state, then the result JSON last.
let private saveStageState (path: string) (net: MultiExitNetwork) (regs: RegularizerState) (result: obj) =
    Directory.CreateDirectory(Path.GetDirectoryName path) |> ignore
    TensorStore.Save(path + ".model", TensorStore.StateOf net)
    regs.Save(path + ".regs")
    writeAtomic (path + ".json") (JsonSerializer.Serialize(result, json))

let private stageStateExists (path: string) = File.Exists(path + ".json") && File.Exists(path + ".model") && File.Exists(path + ".regs")

let private loadStageState (path: string) (net: MultiExitNetwork) (regs: RegularizerState) =
    let tensors = TensorStore.Load(path + ".model")
    try TensorStore.LoadInto(net, tensors)
    finally for t in tensors.Values do t.Dispose()
    regs.Load(path + ".regs", net)

let private copyStageState (src: string) (dst: string) =
    Directory.CreateDirectory(Path.GetDirectoryName dst) |> ignore
    for ext in [ ".model"; ".regs"; ".json" ] do
        File.Copy(src + ext, dst + ext + ".tmp", true)
        File.Move(dst + ext + ".tmp", dst + ext, true)

/// An exclusive lock on a file (flock, so the kernel releases it when its process dies, even by kill -9).
/// Waits up to `waitSeconds` (calling `waiting` once when it has to wait), then fails with `busy`.
let acquireLock (path: string) (waitSeconds: float) (waiting: unit -> unit) (busy: unit -> string) : IDisposable =
    Directory.CreateDirectory(Path.GetDirectoryName path) |> ignore
    let deadline = DateTime.UtcNow.AddSeconds waitSeconds
    let mutable told = false
    let rec attempt () =
        let got =
            try Some(new FileStream(path, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None) :> IDisposable)
            with :? IOException -> None
        match got with
        | Some l -> l
        | None when DateTime.UtcNow < deadline ->
            if not told then
                told <- true
                waiting ()
            Threading.Thread.Sleep 250
            attempt ()
        | None -> raise (RunError(busy ()))
    attempt ()

/// Progress of a running run, for a live view: `progress.json` in the run folder, rewritten at most once a second.
type Progress =
    { Stage: int
      Stages: int
      StageName: string
      Epoch: int
      Epochs: int
      Step: int
      Steps: int
      Loss: float
      ImagesPerSecond: float
      /// Remaining seconds at the current rate, counting every later stage's full epoch caps (early stopping can end sooner).
      EtaSeconds: float
      Updated: string }

/// Progress: a live bar when interactive, plain log lines otherwise; progress.json for the executor's view.
type private Observer(log: string -> unit, writer: Modules.SummaryWriter, task: ProgressTask option, stageIndex: int, stageCount: int,
                      progressPath: string, remainingAfter: int64, batchSize: int) =
    let mutable step = 0
    let clock = Stopwatch.StartNew()
    let mutable lastWrite = -10.0
    let mutable epochStart = 0.0
    let mutable epochSteps = 0
    member val StepsDone = 0 with get, set
    member val ImagesDone = 0L with get, set
    interface ITrainingObserver with
        member _.OnStageStart(plan, startEpoch, batches) =
            let from = if startEpoch > 0 then $" (resuming at epoch {startEpoch + 1})" else ""
            log $"stage {stageIndex + 1}/{stageCount} '{plan.Name}': up to {plan.MaxEpochs} epochs of {batches} steps, trains {String.Join(',', plan.TrainableGroups)}{from}"
            epochStart <- clock.Elapsed.TotalSeconds
            epochSteps <- 0
            task |> Option.iter (fun t ->
                t.Description <- Markup.Escape $"stage {stageIndex + 1}/{stageCount} {plan.Name}"
                t.MaxValue <- float (max 1 (plan.MaxEpochs * batches))
                t.Value <- float (startEpoch * batches))
        member this.OnBatch(plan, epoch, batch, batches, loss) =
            step <- step + 1
            epochSteps <- epochSteps + 1
            this.StepsDone <- this.StepsDone + 1
            this.ImagesDone <- this.ImagesDone + int64 plan.BatchSize
            let now = clock.Elapsed.TotalSeconds
            if now - lastWrite >= 1.0 || batch + 1 = batches then
                lastWrite <- now
                let rate = float (epochSteps * batchSize) / max 1e-9 (now - epochStart)
                let left = int64 (plan.MaxEpochs - epoch - 1) * int64 batches + int64 (batches - batch - 1) + remainingAfter
                let p =
                    { Stage = stageIndex + 1; Stages = stageCount; StageName = plan.Name; Epoch = epoch + 1; Epochs = plan.MaxEpochs
                      Step = batch + 1; Steps = batches; Loss = loss; ImagesPerSecond = rate
                      EtaSeconds = (if rate > 0.0 then float (left * int64 batchSize) / rate else nan); Updated = DateTime.UtcNow.ToString "o" }
                try writeAtomic progressPath (JsonSerializer.Serialize p) with :? IOException -> ()
            match task with
            | Some t -> t.Increment 1.0
            | None ->
                let every = max 1 (batches / 4)
                if (batch + 1) % every = 0 && batch + 1 < batches then
                    log $"  {plan.Name} epoch {epoch + 1} step {batch + 1}/{batches} loss {loss:F4}"
        member _.OnEpochEnd(plan, r) =
            epochStart <- clock.Elapsed.TotalSeconds
            epochSteps <- 0
            let accs = r.ValidationAccuracy |> Array.map (fun a -> a.ToString("F3", Globalization.CultureInfo.InvariantCulture)) |> String.concat " "
            let mark = if r.Improved then " *" else ""
            log $"  {plan.Name} epoch {r.Epoch + 1}: train loss {r.TrainLoss:F4}, validation accuracy per exit [{accs}], monitored {r.Monitor:F4}{mark} ({r.Seconds:F1} s, lr {r.LearningRate:G3})"
            let tag = $"{stageIndex:D2}-{plan.Name}"
            writer.add_scalar($"{tag}/train_loss", float32 r.TrainLoss, r.Epoch)
            r.ValidationAccuracy |> Array.iteri (fun e a -> writer.add_scalar($"{tag}/val_acc_exit{e + 1}", float32 a, r.Epoch))

/// What a finished stage cost, from its state JSON (older runs lack the figures: zeros).
let private stageCostOf (path: string) (stage: Stage) (macsOf: Stage -> int64 -> int -> float) =
    use doc = JsonDocument.Parse(File.ReadAllText(path + ".json"))
    let r = doc.RootElement
    let int (k: string) = match r.TryGetProperty k with
                          | true, v -> v.GetInt32()
                          | _ -> 0
    let images = match r.TryGetProperty "images" with
                 | true, v -> v.GetInt64()
                 | _ -> 0L
    let seconds = match r.TryGetProperty "seconds" with
                  | true, v -> v.GetDouble()
                  | _ -> 0.0
    { Cost.Stage = stage.Name; Cost.Epochs = int "epochsRun"; Cost.Steps = int "steps"; Cost.Images = images
      Cost.TrainingMacs = macsOf stage images (int "epochsRun"); Cost.Seconds = seconds; Cost.Reused = false }

/// Runs (or resumes, or recognises as finished) a recipe in a run folder.
let run (options: RunOptions) (recipe: Recipe) : RunResult =
    match Validation.validate recipe with
    | Error problems -> raise (RunError("the recipe is not valid:\n  " + String.Join("\n  ", problems)))
    | Ok _ -> ()
    let out = Path.GetFullPath options.OutDir
    let recipeJson = RecipeJson.toJson recipe
    let recipePath = Path.Combine(out, "recipe.json")
    let metricsPath = Path.Combine(out, "metrics.json")
    let runInfoPath = Path.Combine(out, "run.json")
    if Directory.Exists out && Directory.EnumerateFileSystemEntries out |> Seq.exists (fun e -> Path.GetFileName e <> ".run.lock") then
        if not (File.Exists recipePath) then
            raise (RunError $"{out} exists and is not a run folder; choose another --out")
        elif File.ReadAllText recipePath <> recipeJson then
            raise (RunError $"{out} holds a run of a different recipe; choose another --out (nothing was changed)")
        elif not options.Resume && not (File.Exists metricsPath) then
            raise (RunError $"{out} holds an unfinished run of this recipe; pass --resume to continue it")
    Directory.CreateDirectory out |> ignore
    // One process per run folder: a second one waits a little (a killed predecessor's lock goes with it), then stops.
    let runLockPath = Path.Combine(out, ".run.lock")
    use _runLock =
        acquireLock runLockPath 30.0
            (fun () -> options.Log $"{out}: another process holds this run; waiting up to 30 s")
            (fun () -> $"{out}: another process is running this run (its lock is {runLockPath}); nothing was changed")
    if File.Exists metricsPath then
        use doc = JsonDocument.Parse(File.ReadAllText metricsPath)
        let acc = doc.RootElement.GetProperty("testAccuracy").EnumerateArray() |> Seq.map (fun e -> e.GetDouble()) |> Seq.toArray
        options.Log $"{out}: finished run found; not redone"
        { OutDir = out; TestAccuracy = acc; AlreadyFinished = true; WallSeconds = 0.0 }
    else
    let clock = Stopwatch.StartNew()
    let loader = TorchNativeLoader.EnsureLoaded()
    let numerics = Provenance.numericsRecord ()
    let threads = torch.get_num_threads ()
    // Deterministic mode: deterministic algorithms, and a resume only under the thread count and kernels that started it.
    if recipe.Deterministic then
        LibTorchControls.DeterministicAlgorithms <- true
        if File.Exists runInfoPath then
            use doc = JsonDocument.Parse(File.ReadAllText runInfoPath)
            let r = doc.RootElement
            let before (k: string) = match r.TryGetProperty k with
                                     | true, v -> Some(v.ToString())
                                     | _ -> None
            match before "threads", before "kernels" with
            | Some t, Some k when t <> string threads || k <> numerics.kernels ->
                raise (RunError $"{out}: a deterministic run started with {t} thread(s) and {k} kernels; this process has {threads} and {numerics.kernels}. Resume it with --threads {t} (and --numerics {k}) to keep it bit-for-bit reproducible")
            | _ -> ()
    writeAtomic recipePath recipeJson
    use logFile = new StreamWriter(Path.Combine(out, "log.txt"), true)
    let log (line: string) =
        let stamped = $"{DateTime.Now:``yyyy-MM-dd HH:mm:ss``} {line}"
        logFile.WriteLine stamped
        logFile.Flush()
        options.Log line
    let device = Devices.Choose(Option.toObj options.Device)
    let code = Provenance.codeVersion ()
    log $"run {recipe.Name} in {out}"
    log $"device {Devices.Describe device}; threads {TorchThreads.Status}; TorchSharp natives {TorchNativeLoader.Describe loader}; code {code}"
    log $"numerics: {numerics.summary}"
    if recipe.Deterministic then log $"deterministic mode: the same code, seed, thread count ({threads}) and kernels ({numerics.kernels}) give the same bits"
    let data = loadData recipe
    log $"data {data.Train.Name}: {data.Train.Count} train, {data.Validation.Count} validation, {data.Test.Count} test images from {data.Source}"
    let runInfo =
        {| recipe = recipe.Name
           seed = recipe.Seed
           scale = options.Scale
           device = Devices.Describe device
           threads = threads
           threadChoice = TorchThreads.Status
           deterministic = recipe.Deterministic
           kernels = numerics.kernels
           codeVersion = code
           machine = Provenance.machine ()
           numerics = numerics
           data = data.Source
           trainImages = data.Train.Count
           validationImages = data.Validation.Count
           testImages = data.Test.Count
           started = DateTime.UtcNow.ToString("o") |}
    writeAtomic runInfoPath (JsonSerializer.Serialize(runInfo, json))

    torch.manual_seed (int64 recipe.Seed) |> ignore
    use net = ModelRegistry.Create(recipe.Model.Name, Validation.modelOptions recipe.Model)
    net.``to``(device) |> ignore
    let cost = MacCounter.Count net
    let exitMacs = cost.Exits |> Seq.map (fun e -> e.CumulativeMacs) |> Seq.toArray
    use regs = new RegularizerState()
    let writer = torch.utils.tensorboard.SummaryWriter(Path.Combine(out, "tensorboard"))
    let stages = recipe.Stages
    let n = stages.Length
    let stepsPerEpoch (s: Stage) =
        let full = (data.Train.Count + s.BatchSize - 1) / s.BatchSize
        if s.MaxStepsPerEpoch > 0 then min full s.MaxStepsPerEpoch else full
    let fisherSamples = int64 (if recipe.Fisher.Samples > 0 then min recipe.Fisher.Samples data.Train.Count else data.Train.Count)
    let macsOf (i: int) (s: Stage) (images: int64) (epochs: int) =
        let ewc, _ = consolidation recipe.LwfTeachers stages i
        Cost.stageMacs exitMacs recipe.LwfTeachers s images (int64 data.Validation.Count) epochs (if ewc then fisherSamples else 0L)
    let reusedStages = Collections.Generic.HashSet<int>()

    /// Loads the state after stage i from the prefix cache into the run folder and the network.
    let reuse (dir: string) (i: int) =
        copyStageState (Path.Combine(dir, prefixKey recipe i)) (doneFile out i stages[i])
        loadStageState (doneFile out i stages[i]) net regs
        reusedStages.Add i |> ignore

    // Resume point: the last finished stage in the run folder, else the longest cached prefix.
    let lastDone = [ 0 .. n - 1 ] |> List.filter (fun i -> stageStateExists (doneFile out i stages[i])) |> List.tryLast
    let firstToRun =
        match lastDone with
        | Some i ->
            loadStageState (doneFile out i stages[i]) net regs
            log $"resuming after stage {i + 1}/{n} '{stages[i].Name}'"
            i + 1
        | None ->
            let cached =
                match options.PrefixCache with
                | None -> None
                | Some dir ->
                    [ 0 .. n - 1 ] |> List.rev |> List.tryFind (fun k -> stageStateExists (Path.Combine(dir, prefixKey recipe k)))
            match cached, options.PrefixCache with
            | Some k, Some dir ->
                for i in 0..k do
                    let cachedState = Path.Combine(dir, prefixKey recipe i)
                    if stageStateExists cachedState then copyStageState cachedState (doneFile out i stages[i])
                    reusedStages.Add i |> ignore
                loadStageState (doneFile out k stages[k]) net regs
                let names = String.Join(", ", stages |> List.take (k + 1) |> List.map (fun s -> s.Name))
                log $"stages 1..{k + 1} ({names}) reused from the prefix cache"
                k + 1
            | _ -> 0

    let trainStage (task: ProgressTask option) (i: int) =
        let s = stages[i]
        let p = plan recipe i (Some(stageDir out i s))
        let later = [ i + 1 .. n - 1 ] |> List.sumBy (fun j -> int64 (stepsPerEpoch stages[j] * stages[j].MaxEpochs))
        let observer = Observer(log, writer, task, i, n, Path.Combine(out, "progress.json"), later, s.BatchSize)
        let stageClock = Stopwatch.StartNew()
        let result =
            try StageTrainer.Run(net, p, data, regs, device, observer)
            with :? NonFiniteLossException as e -> raise (RunError e.Message)
        // Release the teachers no later stage reads (all of them after the last LwF stage; with one
        // previous-stage teacher, every one but the newest).
        let read = teachersReadAfter recipe i
        for nu in List.ofSeq regs.Teachers.Keys do
            if not (read.Contains nu) then
                regs.Teachers[nu].Dispose()
                regs.Teachers.Remove nu |> ignore
        let steps = result.History |> Seq.sumBy (fun h -> h.Steps)
        // An epoch's last batch may be smaller: its images are at most the training split.
        let images = result.History |> Seq.sumBy (fun h -> int64 (min (h.Steps * s.BatchSize) data.Train.Count))
        let stateInfo =
            {| stage = s.Name
               bestEpoch = result.BestEpoch + 1
               bestMonitor = result.BestMonitor
               epochsRun = result.EpochsRun
               stoppedEarly = result.StoppedEarly
               steps = steps
               images = images
               seconds = stageClock.Elapsed.TotalSeconds |}
        saveStageState (doneFile out i s) net regs stateInfo
        match options.PrefixCache with
        | Some dir -> copyStageState (doneFile out i s) (Path.Combine(dir, prefixKey recipe i))
        | None -> ()
        // The per-epoch checkpoint of a finished stage is no longer needed.
        let dir = stageDir out i s
        if Directory.Exists dir then Directory.Delete(dir, true)
        let early = if result.StoppedEarly then " (stopped early)" else ""
        log $"stage {i + 1}/{n} '{s.Name}' done: best epoch {result.BestEpoch + 1}, monitored validation accuracy {result.BestMonitor:F4}{early}"

    let runStages (task: ProgressTask option) =
        for i in firstToRun .. n - 1 do
            match options.PrefixCache with
            | None -> trainStage task i
            | Some dir ->
                // Runs that share this prefix train it once: the first holds its lock while it trains; the others
                // wait, then reuse it. A killed holder's lock goes with it, and a waiter trains the stage itself.
                let key = prefixKey recipe i
                let cached () = stageStateExists (Path.Combine(dir, key))
                if cached () then
                    reuse dir i
                    log $"stage {i + 1}/{n} '{stages[i].Name}' reused from the prefix cache"
                else
                    use _ =
                        acquireLock (Path.Combine(dir, key + ".lock")) (7.0 * 24.0 * 3600.0)
                            (fun () -> log $"stage {i + 1}/{n} '{stages[i].Name}' is being trained by another run; waiting for it (prefix {key})")
                            (fun () -> $"gave up waiting for prefix {key}")
                    if cached () then
                        reuse dir i
                        log $"stage {i + 1}/{n} '{stages[i].Name}' reused from the prefix cache (trained by another run meanwhile)"
                    else trainStage task i

    if AnsiConsole.Profile.Capabilities.Interactive && firstToRun < n then
        AnsiConsole.Progress().AutoClear(false).Columns(TaskDescriptionColumn(), ProgressBarColumn(), PercentageColumn(), ElapsedTimeColumn(), RemainingTimeColumn())
            .Start(fun ctx -> runStages (Some(ctx.AddTask "training")))
    else runStages None

    // Test evaluation from the cached logits of every exit.
    let logits = Evaluator.CollectLogits(net, data.Test, 256, device)
    let labels = torch.tensor(data.Test.Labels |> Array.map int64)
    TensorStore.Save(Path.Combine(out, "test-logits.tensors"), dict [ "logits", logits; "labels", labels ] |> Collections.Generic.Dictionary)
    let acc =
        [| for e in 0 .. net.ExitCount - 1 ->
               use pred = logits[e].argmax(1L)
               use eq = pred.eq(labels)
               use s = eq.sum()
               float (s.item<int64>()) / float data.Test.Count |]
    logits.Dispose()
    labels.Dispose()
    let stageCosts =
        [ for i, s in List.indexed stages ->
            let c = stageCostOf (doneFile out i s) s (macsOf i)
            if reusedStages.Contains i then { c with Reused = true } else c ]
    let totals = Cost.totals stageCosts
    let metrics =
        {| recipe = recipe.Name
           model = net.Describe()
           data = data.Test.Name
           dataSource = data.Source
           scale = options.Scale
           device = Devices.Describe device
           threads = threads
           deterministic = recipe.Deterministic
           seed = recipe.Seed
           codeVersion = code
           numerics = numerics
           testImages = data.Test.Count
           testAccuracy = acc
           exitMacs = exitMacs
           backboneMacs = cost.BackboneMacs
           macConvention = "conv-linear (one multiply-add = 1)"
           cost =
            {| convention = "training MACs: 3x the forward MACs of the exits a stage computes per training image (backward = 2x forward), plus LwF teacher forwards (1x), validation passes (1x) and the Fisher (3x)"
               epochs = totals.Epochs
               steps = totals.Steps
               images = totals.Images
               trainingMacs = totals.TrainingMacs
               stages = stageCosts |}
           wallSeconds = clock.Elapsed.TotalSeconds
           finished = DateTime.UtcNow.ToString("o") |}
    writeAtomic metricsPath (JsonSerializer.Serialize(metrics, json))
    writer.add_text("metrics", JsonSerializer.Serialize(metrics), 0)
    let accText = acc |> Array.mapi (fun i a -> $"exit{i + 1} {a:F4}") |> String.concat ", "
    log $"test accuracy: {accText}; {totals.Steps} optimiser steps, {totals.TrainingMacs / 1e12:F2} TMACs of training; {clock.Elapsed.TotalSeconds:F0} s"
    { OutDir = out; TestAccuracy = acc; AlreadyFinished = false; WallSeconds = clock.Elapsed.TotalSeconds }
