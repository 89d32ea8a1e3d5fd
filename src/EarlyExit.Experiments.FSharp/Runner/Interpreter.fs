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
open EarlyExit.Regularisers
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

// NaN (a cosine of a zero gradient, a missing value) is written as "NaN" rather than refused.
let private json = Markdown.jsonOptions true

let private writeAtomic = Markdown.writeAtomic

/// The complete settings of a regulariser in a recipe.
let settingsOf (recipe: Recipe) (name: string) = fst (Penalties.resolve recipe.RegulariserSettings name)

/// The earlier exits whose state of regulariser `name` a stage reads (none when it does not use it).
let stateRead (recipe: Recipe) (name: string) (s: Stage) : int list =
    if not (Penalties.uses name s) || s.Protects.IsEmpty then []
    else (RegulariserRegistry.Get name).StateRead(settingsOf recipe name, ResizeArray s.Protects) |> List.ofSeq

/// The regularisers that consolidate after stage i (keep state about its exit: EWC a Fisher and the anchor, LwF a
/// teacher), in the order of their first use: those a later stage reads that state of. With one previous-stage LwF
/// teacher, a stage keeps a teacher only where a later stage's deepest protected exit is its exit.
let consolidation (recipe: Recipe) (i: int) : string list =
    let s = recipe.Stages[i]
    if s.Exit = 0 then []
    else
        let later = recipe.Stages |> List.skip (i + 1)
        Penalties.usedBy later |> List.filter (fun name -> later |> List.exists (fun l -> List.contains s.Exit (stateRead recipe name l)))

/// The exits whose state of regulariser `name` the stages after stage i read; the rest is released after stage i.
let stateReadAfter (recipe: Recipe) (name: string) (i: int) =
    recipe.Stages |> List.skip (i + 1) |> List.collect (stateRead recipe name) |> Set.ofList

/// The exits whose LwF teachers the stages after stage i read: every protected exit (per-exit teachers) or the
/// deepest one (one previous-stage teacher). Teachers outside this set are released after stage i.
let teachersReadAfter (recipe: Recipe) (i: int) = stateReadAfter recipe "lwf" i

/// The regularisers of a run (those its stages use), each with its recipe settings and no state yet.
let regulariserSet (recipe: Recipe) =
    new RegulariserSet(Penalties.usedBy recipe.Stages |> List.map (fun n -> (RegulariserRegistry.Get n).Create(settingsOf recipe n)))

/// The resolved plan of one stage for the C# loop: every schedule resolved for the stage's exit μ.
let plan (recipe: Recipe) (i: int) (checkpointDir: string option) : StagePlan =
    let s = recipe.Stages[i]
    let exits = if s.Regularisers.IsEmpty then 0 else Validation.exitCount recipe.Model
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
        StageExit = s.Exit,
        ProtectedExits = List.toArray s.Protects,
        Regularisers = [| for p in s.Regularisers -> RegulariserUse(p.Name, Strength.at exits s.Exit p.Strength) |],
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
        ConsolidateAfter = List.toArray (consolidation recipe i))

/// Cache key of the state after stages 0..k: everything that determines it (not the recipe's name).
/// - Strengths enter resolved for each stage's exit, so a schedule and the constant it takes at a stage share it.
/// - What a stage keeps for later ones (Fisher and anchor, teacher) depends on the stages after it, so it is part of
///   the key, with the settings of every regulariser the prefix uses or consolidates (a Fisher's estimator).
/// - State that later stages no longer read is released after stage k: the key says what is still held.
let prefixKey (recipe: Recipe) (k: int) =
    let stages = List.take (k + 1) recipe.Stages
    let consolidated = [ for i in 0..k -> i, consolidation recipe i ]
    let resolved =
        stages
        |> List.map (fun s ->
            if s.Regularisers.IsEmpty then s
            else
                let m = Validation.exitCount recipe.Model
                { s with Regularisers = s.Regularisers |> List.map (fun p -> { p with Strength = Strength.Constant(Strength.at m s.Exit p.Strength) }) })
    let prefix = { recipe with Name = ""; Stages = resolved; RegulariserSettings = Map.empty }
    let involved = Penalties.usedBy stages @ (consolidated |> List.collect snd) |> List.distinct
    let settingsText =
        [ for name in involved ->
            let pairs = settingsOf recipe name |> Seq.sortBy (fun kv -> kv.Key) |> Seq.map (fun kv -> $"{kv.Key}={kv.Value}")
            $"|{name}{{{String.Join(',', pairs)}}}" ]
    let kept = [ for i, names in consolidated do if not names.IsEmpty then $"|{i}:" + String.Join(",", names) ]
    let held =
        [ for name in involved do
            let read = stateReadAfter recipe name k
            let exits = [ for i, names in consolidated do if List.contains name names && read.Contains recipe.Stages[i].Exit then recipe.Stages[i].Exit ]
            if not exits.IsEmpty then $"|held:{name}=" + String.Join(",", exits) ]
    // A user's own data (image-folder, npy) may change under the same path: its files' names, sizes and times enter
    // the key. The built-in sets add nothing, so their keys are what they always were.
    let dataText =
        if DataCatalog.IsOwnFormat recipe.Data.Name then [ "|data:" + DataCatalog.Fingerprint(recipe.Data.Name, Option.toObj recipe.Data.Root) ] else []
    let bytes = SHA256.HashData(Encoding.UTF8.GetBytes(RecipeJson.toJson prefix + String.concat "" (settingsText @ kept @ held @ dataText)))
    Convert.ToHexString(bytes).Substring(0, 20).ToLowerInvariant()

/// Loads the data of a recipe: train/validation/test, limited as the recipe says (stratified, seeded).
let loadData (recipe: Recipe) =
    let d = recipe.Data
    let splits = DataCatalog.Load(d.Name, Option.toObj d.Root, d.ValidationFraction, recipe.Seed)
    let train = if d.TrainLimit > 0 then splits.Train.Take(d.TrainLimit, recipe.Seed) else splits.Train
    let valLimit = if d.TrainLimit > 0 then max 1 (int (float d.TrainLimit * d.ValidationFraction / (1.0 - d.ValidationFraction))) else 0
    let validation = if valLimit > 0 then splits.Validation.Take(valLimit, recipe.Seed) else splits.Validation
    let test = if d.TestLimit > 0 then splits.Test.Take(d.TestLimit, recipe.Seed) else splits.Test
    // The network must take the data's images and have a logit for every class the data has.
    let shape = [ int64 train.Channels; int64 train.Height; int64 train.Width ]
    match recipe.Model.Input with
    | Some input when input <> shape ->
        let show (l: int64 list) = String.Join("×", l)
        raise (RunError $"model.input is {show input}, but the images of {d.Name} ({splits.Source}) are {show shape}; set model.input to {show shape}")
    | _ -> ()
    match recipe.Model.Classes with
    | Some c when c < train.NumClasses ->
        raise (RunError $"model.classes is {c}, but {d.Name} ({splits.Source}) has {train.NumClasses} classes; set model.classes to {train.NumClasses}")
    | _ -> ()
    DataSplits(train, validation, test, splits.Source)

let private stageDir (out: string) (i: int) (s: Stage) = Path.Combine(out, "stages", $"%02d{i}-{s.Name}")
let private doneFile (out: string) (i: int) (s: Stage) = stageDir out i s + ".done"

/// Writes the state after a stage: model tensors and regulariser state, then the result JSON last.
let private saveStageState (path: string) (net: MultiExitNetwork) (regs: RegulariserSet) (result: obj) =
    Directory.CreateDirectory(Path.GetDirectoryName path) |> ignore
    TensorStore.Save(path + ".model", TensorStore.StateOf net)
    regs.Save(path + ".regs")
    writeAtomic (path + ".json") (JsonSerializer.Serialize(result, json))

let private stageStateExists (path: string) = File.Exists(path + ".json") && File.Exists(path + ".model") && File.Exists(path + ".regs")

let private loadStageState (path: string) (net: MultiExitNetwork) (regs: RegulariserSet) =
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
type private Observer(log: string -> unit, writer: TensorBoard.EventWriter, task: ProgressTask option, stageIndex: int, stageCount: int,
                      progressPath: string, remainingAfter: int64, batchSize: int, stepOffset: int64) =
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
            // One global step across the run's stages (every earlier stage at its epoch cap, so it does not depend on
            // early stopping, a resume or the prefix cache).
            writer.Scalar("train/loss", loss, stepOffset + int64 epoch * int64 batches + int64 batch)
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
            writer.Scalar($"{tag}/train_loss", r.TrainLoss, int64 r.Epoch)
            r.ValidationAccuracy |> Array.iteri (fun e a -> writer.Scalar($"{tag}/val_acc_exit{e + 1}", a, int64 r.Epoch))
            let globalStep = stepOffset + int64 (r.Epoch + 1) * int64 r.Steps
            writer.Scalar("train/learning_rate", r.LearningRate, globalStep)
            r.ValidationAccuracy |> Array.iteri (fun e a -> writer.Scalar($"validation/accuracy_exit{e + 1}", a, globalStep))

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
    let device = Devices.Choose(Option.toObj options.Device)
    // The network's own numerics check (its float32 gradients against float64, every convolution shape it has), before
    // anything is written: where the kernels in use fail it, oneDNN is switched off in this process (and the verdict
    // below says so), or the run stops with NumericsException.
    let networkCheck =
        if device.``type`` <> DeviceType.CPU then "not run (not on the CPU)"
        else
            use candidate = ModelRegistry.Create(recipe.Model.Name, Validation.modelOptions recipe.Model)
            match NetworkCheck.EnsureUnlessSkipped candidate with
            | null -> $"skipped ({NetworkCheck.SkipVariable}=1)"
            | r -> r.Summary()
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
    let code = Provenance.codeVersion ()
    log $"run {recipe.Name} in {out}"
    log $"device {Devices.Describe device}; threads {TorchThreads.Status}; TorchSharp natives {TorchNativeLoader.Describe loader}; code {code}"
    log $"numerics: {numerics.summary}"
    log $"network check: {networkCheck}"
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
           networkCheck = networkCheck
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
    use regs = regulariserSet recipe
    use writer = new TensorBoard.EventWriter(Path.Combine(out, "tensorboard"))
    // The run's hyper-parameters: its whole recipe.
    writer.Text("recipe", recipeJson, 0L)
    let stages = recipe.Stages
    let n = stages.Length
    let stepsPerEpoch (s: Stage) =
        let full = (data.Train.Count + s.BatchSize - 1) / s.BatchSize
        if s.MaxStepsPerEpoch > 0 then min full s.MaxStepsPerEpoch else full
    let macsOf (i: int) (s: Stage) (images: int64) (epochs: int) =
        Cost.stageMacs exitMacs recipe (consolidation recipe i) s images (int64 data.Validation.Count) epochs data.Train.Count data.Train.NumClasses
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
        let offset = [ 0 .. i - 1 ] |> List.sumBy (fun j -> int64 (stepsPerEpoch stages[j] * stages[j].MaxEpochs))
        let observer = Observer(log, writer, task, i, n, Path.Combine(out, "progress.json"), later, s.BatchSize, offset)
        let stageClock = Stopwatch.StartNew()
        let gradients = if recipe.Dynamics.GradientEvery > 0 then Some(EarlyExit.Analysis.GradientDominanceProbe(recipe.Dynamics.GradientEvery)) else None
        let probes: Collections.Generic.IReadOnlyList<ITrainingProbe> =
            match gradients with
            | Some g -> [| g :> ITrainingProbe |]
            | None -> [||]
        let result =
            try StageTrainer.Run(net, p, data, regs, device, observer, probes)
            with :? NonFiniteLossException as e -> raise (RunError e.Message)
        let trainSeconds = stageClock.Elapsed.TotalSeconds
        // Training dynamics, where the recipe asks for them: gradient dominance over the stage, ranks after it.
        let tag = $"{i:D2}-{s.Name}"
        let gradientInfo =
            gradients
            |> Option.map (fun g ->
                for sample in g.Samples do
                    for k, e in Array.indexed sample.Exits do
                        for seg in 0 .. sample.Shares[k].Length - 1 do
                            if sample.Norms[k][seg] > 0.0 then writer.Scalar($"{tag}/grad_share/exit{e}_segment{seg + 1}", sample.Shares[k][seg], int64 sample.Step)
                {| every = g.Every; seconds = g.Seconds; samples = g.Samples |})
        let rankInfo =
            if recipe.Dynamics.RankSamples > 0 then
                let clock = Stopwatch.StartNew()
                let ranks = EarlyExit.Analysis.RepresentationRank.Compute(net, data.Validation, recipe.Dynamics.RankSamples, recipe.Seed, device)
                for r in ranks do
                    writer.Scalar($"rank/segment{r.Segment}", float r.Rank, int64 i)
                    writer.Scalar($"effective_rank/segment{r.Segment}", r.EffectiveRank, int64 i)
                Some {| seconds = clock.Elapsed.TotalSeconds; tolerance = "σ_max · max(N, D) · ε(float32)"; segments = ranks |}
            else None
        // Release the state no later stage reads (LwF: all teachers after the last LwF stage; with one previous-stage
        // teacher, every one but the newest).
        for r in regs.All do
            r.Release(Collections.Generic.HashSet<int>(stateReadAfter recipe r.Kind.Name i))
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
               seconds = trainSeconds
               gradients = Option.toObj (gradientInfo |> Option.map box)
               rank = Option.toObj (rankInfo |> Option.map box) |}
        saveStageState (doneFile out i s) net regs stateInfo
        match options.PrefixCache with
        | Some dir -> copyStageState (doneFile out i s) (Path.Combine(dir, prefixKey recipe i))
        | None -> ()
        // The per-epoch checkpoint of a finished stage is no longer needed.
        let dir = stageDir out i s
        if Directory.Exists dir then Directory.Delete(dir, true)
        let early = if result.StoppedEarly then " (stopped early)" else ""
        log $"stage {i + 1}/{n} '{s.Name}' done: best epoch {result.BestEpoch + 1}, monitored validation accuracy {result.BestMonitor:F4}{early}"
        if regs.All.Count > 0 then log $"  regularisers: {regs.Describe()}"

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

    // The validation split's logits too (thresholds fitted on validation, the honest budget protocol).
    (let v = Evaluator.CollectLogits(net, data.Validation, 256, device)
     let vl = torch.tensor(data.Validation.Labels |> Array.map int64)
     TensorStore.Save(Path.Combine(out, "validation-logits.tensors"), dict [ "logits", v; "labels", vl ] |> Collections.Generic.Dictionary)
     v.Dispose()
     vl.Dispose())
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
           regularisers = [ for r in regs.All -> {| name = r.Kind.Name; settings = r.Settings |} ]
           dynamics =
            if recipe.Dynamics = Defaults.dynamics then null
            else
                box [ for i, st in List.indexed stages ->
                        use doc = JsonDocument.Parse(File.ReadAllText(doneFile out i st + ".json"))
                        let r = doc.RootElement
                        let part (k: string) = match r.TryGetProperty k with
                                               | true, v when v.ValueKind <> JsonValueKind.Null -> v.Clone()
                                               | _ -> JsonDocument.Parse("null").RootElement
                        {| stage = st.Name; gradients = part "gradients"; rank = part "rank" |} ]
           exitMacs = exitMacs
           backboneMacs = cost.BackboneMacs
           macConvention = "conv-linear (one multiply-add = 1)"
           cost =
            {| convention = "training MACs: 3x the forward MACs of the exits a stage computes per training image (backward = 2x forward), plus LwF teacher forwards (1x), validation passes (1x) and the Fisher or MAS importances (3x per sample; the exact Fisher 1+2C x, the sampled one 4x)"
               epochs = totals.Epochs
               steps = totals.Steps
               images = totals.Images
               trainingMacs = totals.TrainingMacs
               stages = stageCosts |}
           wallSeconds = clock.Elapsed.TotalSeconds
           finished = DateTime.UtcNow.ToString("o") |}
    writeAtomic metricsPath (JsonSerializer.Serialize(metrics, json))
    writer.Text("metrics", JsonSerializer.Serialize(metrics, json), 0L)
    let accText = acc |> Array.mapi (fun i a -> $"exit{i + 1} {a:F4}") |> String.concat ", "
    log $"test accuracy: {accText}; {totals.Steps} optimiser steps, {totals.TrainingMacs / 1e12:F2} TMACs of training; {clock.Elapsed.TotalSeconds:F0} s"
    // A summary at the end of an interactive run: what each stage did and cost, then every exit's accuracy.
    if AnsiConsole.Profile.Capabilities.Interactive then
        let t = Table(Title = TableTitle(Markup.Escape $"{recipe.Name}: {out}"))
        t.AddColumns("stage", "epochs", "steps", "best epoch", "validation (monitored)", "training TMACs", "seconds") |> ignore
        for i, st in List.indexed stages do
            use doc = JsonDocument.Parse(File.ReadAllText(doneFile out i st + ".json"))
            let r = doc.RootElement
            let c = stageCosts[i]
            let get (k: string) = match r.TryGetProperty k with
                                  | true, v when v.ValueKind = JsonValueKind.Number -> v.GetDouble()
                                  | _ -> nan
            t.AddRow(Markup.Escape st.Name, string c.Epochs, string c.Steps, (if c.Reused then "reused" else string (int (get "bestEpoch"))),
                     (get "bestMonitor").ToString("F4"), (c.TrainingMacs / 1e12).ToString("F3"), (if c.Reused then "–" else c.Seconds.ToString("F0"))) |> ignore
        AnsiConsole.Write t
        let e = Table()
        e.AddColumns(Array.append [| "" |] [| for i in 1 .. acc.Length -> $"exit {i}" |]) |> ignore
        e.AddRow(Array.append [| "test accuracy (%)" |] (acc |> Array.map (fun a -> (100.0 * a).ToString("F2")))) |> ignore
        AnsiConsole.Write e
    { OutDir = out; TestAccuracy = acc; AlreadyFinished = false; WallSeconds = clock.Elapsed.TotalSeconds }
