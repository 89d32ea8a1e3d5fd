/// Experiment scales: seconds (smoke), minutes on a 2-core CPU (cpu), or the paper's (paper, needs a GPU).
module EarlyExit.Experiments.Runner.Scales

open EarlyExit.Experiments.Recipes
open EarlyExit.Experiments.Recipes.Builders

type Scale =
    | Smoke
    | Cpu
    | Paper

let name =
    function
    | Smoke -> "smoke"
    | Cpu -> "cpu"
    | Paper -> "paper"

let parse (s: string) =
    match s.Trim().ToLowerInvariant() with
    | "smoke" -> Ok Smoke
    | "cpu" -> Ok Cpu
    | "paper" -> Ok Paper
    | other -> Error $"unknown scale '{other}'; use smoke, cpu or paper"

/// Model, data limits, augmentation and stage settings of a scale, for a model family and a data set.
type ScaleSettings =
    { Model: ModelSpec
      Data: DataSpec
      Augment: AugmentSpec
      /// Settings of the regularisers (the Fisher's and MAS's sample caps), used by the recipes whose stages use them.
      Settings: Map<string, Map<string, string>>
      Stages: StageSettings
      Description: string }

let private inputOf (data: string) =
    match EarlyExit.Data.DataCatalog.Normalise data with
    | "fashion-mnist" -> [ 1L; 28L; 28L ], 10
    | "cifar10" -> [ 3L; 32L; 32L ], 10
    | _ -> [ 3L; 32L; 32L ], 100

/// The model at a scale: the family's own shape knobs (MSDNet: channels and number of blocks; ResNet: width, blocks, exits).
let private modelAt (scale: Scale) (model: string) (input: int64 list) (classes: int) : ModelSpec =
    let spec = { Defaults.model model with Classes = Some classes; Input = Some input }
    let builtIn = model.StartsWith "msdnet" || model.StartsWith "resnet"
    match scale, model.StartsWith "msdnet" with
    // A family of the user's own (a plugin's) takes only classes and input from the scale: its size is its own.
    | _ when not builtIn -> spec
    | Smoke, true -> { spec with Width = Some 4; Blocks = Some [ 3 ] }
    | Cpu, true -> { spec with Width = Some 8; Blocks = Some [ 5 ] }
    | Smoke, false -> { spec with Width = Some 4; Blocks = Some [ 1; 1; 1; 1 ]; Exits = Some [ 1; 2; 3; 4 ] }
    // Exits after blocks 1, 2, 4, 6, 8: the first exit costs about 13% of the backbone, as exit 1 of the paper's
    // ResNet-34 does, so the 25% budget has an exit to use.
    // Width 8 (2.4× the throughput of width 16 on one thread here: 410 against 172 images/s) so that three seeds of
    // all seven strategies fit in an hour on 2 cores.
    | Cpu, false -> { spec with Width = Some 8; Blocks = Some [ 2; 2; 2; 2 ]; Exits = Some [ 1; 2; 4; 6; 8 ] }
    | Paper, _ -> spec

/// EWC's Fisher and MAS's importances over at most n training samples.
let private sampleCaps (n: int) =
    Map.empty |> Penalties.withSetting "ewc" "samples" (string n) |> Penalties.withSetting "mas" "samples" (string n)

let settings (scale: Scale) (model: string) (data: string) : ScaleSettings =
    let input, classes = inputOf data
    let preset = Presets.forModel model
    let isFashion = EarlyExit.Data.DataCatalog.Normalise data = "fashion-mnist"
    let isMsd = model.StartsWith "msdnet"
    let builtIn = isMsd || model.StartsWith "resnet"
    match scale with
    | Smoke ->
        { Model = modelAt scale model input classes
          Data = { Defaults.data data with TrainLimit = 512; TestLimit = 256 }
          Augment = { Defaults.augment with CropPadding = (if isFashion then 2 else 4) }
          Settings = sampleCaps 128
          Stages =
            { Optimiser = { LearningRate = 2e-3; WeightDecay = 0.0; Schedule = Constant }
              BatchSize = 64
              MaxEpochs = 1
              Patience = 0
              MaxStepsPerEpoch = 3
              WarmupEpochs = 1 }
          Description =
            (if not builtIn then $"smoke: {model} (a plugin's family, at its own size)" elif isMsd then "smoke: MSDNet with 4 channels and 3 blocks" else "smoke: width-4 ResNet [1,1,1,1] with 4 exits")
            + ", 512 training images, 3 steps per stage; checks the plumbing, not accuracy" }
    | Cpu ->
        { Model = modelAt scale model input classes
          Data = { Defaults.data data with TrainLimit = 16000; TestLimit = 0 }
          // Short schedules learn little from Mixup/CutMix; the cpu scale keeps crop and flip only.
          Augment = { CropPadding = (if isFashion then 2 else 4); Flip = true; Mix = None }
          Settings = sampleCaps 2000
          Stages =
            { Optimiser = { LearningRate = 2e-3; WeightDecay = 0.0; Schedule = Cosine }
              BatchSize = 128
              MaxEpochs = 2
              Patience = 0
              MaxStepsPerEpoch = 0
              WarmupEpochs = 6 }
          Description =
            (if not builtIn then $"cpu: {model} (a plugin's family, at its own size)" elif isMsd then "cpu: MSDNet with 8 channels and 5 blocks (5 exits)" else "cpu: width-8 ResNet [2,2,2,2] (resnet34 family) with 5 exits after blocks 1,2,4,6,8")
            + ", 16,000 training images, 6 epochs for stages that train a backbone from scratch (warm-up, joint) and 2 for the others, crop+flip, AdamW lr 2e-3 cosine, no weight decay" }
    | Paper ->
        { Model = modelAt scale model input classes
          Data = Defaults.data data
          Augment = Defaults.augment
          Settings = Map.empty
          Stages =
            { Optimiser = { LearningRate = preset.LearningRate; WeightDecay = 0.0; Schedule = Constant }
              BatchSize = preset.BatchSize
              MaxEpochs = 500
              Patience = preset.Patience
              MaxStepsPerEpoch = 0
              WarmupEpochs = 500 }
          Description = $"paper: full {model}, batch {preset.BatchSize}, AdamW lr {preset.LearningRate} without weight decay, Mixup+CutMix, early stopping with patience {preset.Patience} (epoch cap 500)" }

/// A recipe with another LwF teacher policy; a policy other than the paper's per-exit one is named in the recipe's
/// name (and so in its run folder).
let withLwfTeachers (teachers: LwfTeachers) (recipe: Recipe) =
    if teachers = PerExitTeachers then recipe
    else { Settings.withLwfTeachers teachers recipe with Name = recipe.Name + $"-{Names.lwfTeachers teachers}-teacher" } |> Settings.complete

/// The recipe of a strategy at a scale, with the scale's settings adjusted by `adjust` (a second setting).
let recipeWith (adjust: ScaleSettings -> ScaleSettings) (scale: Scale) (strategy: Strategy) (model: string) (data: string) (seed: int) : Recipe =
    let s = adjust (settings scale model data)
    let m = Validation.exitCount s.Model
    { Name = $"{strategyName strategy}-{model}-{EarlyExit.Data.DataCatalog.Normalise data}-{name scale}"
      Model = s.Model
      Data = s.Data
      Augment = s.Augment
      RegulariserSettings = s.Settings
      Seed = seed
      Deterministic = false
      Dynamics = Defaults.dynamics
      Stages = stagesOf strategy m s.Stages }
    |> Settings.complete

/// For a user's own data (image-folder, npy: the recipe's data root holds it): the model takes the data's image shape
/// and classes, and the random crop pads by an eighth of the image side (4 pixels at 32×32, as the scales use for
/// CIFAR). Built-in data sets are left as they are.
let fitToData (recipe: Recipe) : Recipe =
    if not (EarlyExit.Data.DataCatalog.IsOwnFormat recipe.Data.Name) then recipe
    else
        let struct (c, h, w, classes) = EarlyExit.Data.DataCatalog.Describe(recipe.Data.Name, Option.toObj recipe.Data.Root)
        { recipe with
            Model = { recipe.Model with Input = Some [ int64 c; int64 h; int64 w ]; Classes = Some classes }
            Augment = { recipe.Augment with CropPadding = max 1 (min h w / 8) } }

/// The recipe of a strategy at a scale.
let recipe (scale: Scale) (strategy: Strategy) (model: string) (data: string) (seed: int) : Recipe =
    recipeWith id scale strategy model data seed

/// A second setting: every stage that does not train a backbone from scratch gets `epochs` epochs (the warm-up and
/// joint keep the scale's).
let withStageEpochs (epochs: int) (s: ScaleSettings) =
    { s with Stages = { s.Stages with MaxEpochs = epochs }; Description = s.Description + $"; second setting: {epochs} epochs for every stage after the warm-up" }
