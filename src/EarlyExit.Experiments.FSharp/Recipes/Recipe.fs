/// Training recipes as data: a recipe is a model, data, augmentation, a seed and a list of stages.
/// Nothing here runs anything; `Runner.Interpreter` does.
namespace EarlyExit.Experiments.Recipes

/// The regulariser of a stage (eq. 1 of the 2026 paper: s·λ·R_EWC + (1−s)·ρ·R_LwF; both at once is allowed here).
type Regulariser =
    | NoRegulariser
    | Ewc of lambda: float
    | Lwf of rho: float
    | EwcAndLwf of lambda: float * rho: float

type Schedule =
    | Constant
    | Cosine

/// AdamW with explicit weight decay ("no weight decay" is 0.0, not AdamW's default).
type Optimiser =
    { LearningRate: float
      WeightDecay: float
      Schedule: Schedule }

type Stage =
    { Name: string
      /// 1-based exits whose cross-entropy enters the loss, with weights.
      LossExits: (int * float) list
      /// Groups that train ("segment3", "head2"); every other group is frozen.
      Trainable: string list
      Regulariser: Regulariser
      /// μ of a sequential stage (the exit it adds), 0 otherwise.
      Exit: int
      /// Exits ν < μ whose knowledge the regulariser protects.
      Protects: int list
      Optimiser: Optimiser
      BatchSize: int
      MaxEpochs: int
      /// Early-stopping patience in epochs on the validation split (0: none).
      Patience: int
      /// Cap on steps per epoch (0: full epochs); smoke scales use it.
      MaxStepsPerEpoch: int }

type ModelSpec =
    { Name: string
      Classes: int option
      Input: int64 list option
      Width: int option
      Blocks: int list option
      Exits: int list option
      /// MSDNet only: growth rate, step mode ("even", "lin_grow"), base, step, grFactor and bnFactor per scale.
      Growth: int option
      StepMode: string option
      Base: int option
      Step: int option
      GrowthFactors: int list option
      BottleneckFactors: int list option }

type DataSpec =
    { Name: string
      /// Data root (None: $EARLYEXIT_DATA, ~/.local/share/earlyexit/data, or /usr/share/datasets for Fashion-MNIST).
      Root: string option
      ValidationFraction: float
      /// Use only this many training samples (stratified), 0 for all.
      TrainLimit: int
      /// Use only this many test samples (stratified), 0 for all.
      TestLimit: int }

type MixSpec =
    { MixupAlpha: float
      CutmixAlpha: float
      SwitchProbability: float
      LabelSmoothing: float
      Probability: float }

type AugmentSpec =
    { CropPadding: int
      Flip: bool
      Mix: MixSpec option }

type FisherEstimatorSpec =
    | PerSample
    | PerSampleNaive
    | SquaredMinibatch

/// Where the LwF targets ŷ*_ν come from (EarlyExit.Losses.LwfTeacherPolicy).
type LwfTeachers =
    /// The paper's definition: one frozen copy per protected exit, as the network was when that exit finished.
    | PerExitTeachers
    /// Classic LwF: one frozen copy, the network as it was when the deepest protected exit finished (the previous
    /// stage of a sequential recipe); one teacher forward per step instead of one per protected exit.
    | PreviousStageTeacher

type FisherSpec =
    { Estimator: FisherEstimatorSpec
      /// Cap on the training samples of each Fisher (0: all).
      Samples: int }

type Recipe =
    { Name: string
      Model: ModelSpec
      Data: DataSpec
      Augment: AugmentSpec
      Fisher: FisherSpec
      /// Where LwF stages take their targets from (ignored by recipes without LwF).
      LwfTeachers: LwfTeachers
      Seed: int
      /// Deterministic mode: torch's deterministic algorithms, and a resume refused under another thread count or
      /// other kernels, so that the same code, seed and thread count give the same bits.
      Deterministic: bool
      Stages: Stage list }

/// What a regulariser involves: EWC (Fisher and anchor), LwF (teachers), or both.
module Regularisers =
    let usesEwc =
        function
        | Ewc _ | EwcAndLwf _ -> true
        | NoRegulariser | Lwf _ -> false

    let usesLwf =
        function
        | Lwf _ | EwcAndLwf _ -> true
        | NoRegulariser | Ewc _ -> false

module Names =
    let segment (k: int) = $"segment{k}"
    let head (k: int) = $"head{k}"

    let lwfTeachers =
        function
        | PerExitTeachers -> "per-exit"
        | PreviousStageTeacher -> "previous-stage"

    let parseLwfTeachers (s: string) =
        match s.Trim().ToLowerInvariant() with
        | "per-exit" -> Ok PerExitTeachers
        | "previous-stage" -> Ok PreviousStageTeacher
        | other -> Error $"unknown LwF teacher policy '{other}' (per-exit, previous-stage)"

    let regulariser =
        function
        | NoRegulariser -> "none"
        | Ewc l -> $"ewc(lambda={l})"
        | Lwf r -> $"lwf(rho={r})"
        | EwcAndLwf (l, r) -> $"ewc(lambda={l})+lwf(rho={r})"

module Defaults =
    let mix =
        { MixupAlpha = 0.8
          CutmixAlpha = 1.0
          SwitchProbability = 0.5
          LabelSmoothing = 0.1
          Probability = 1.0 }

    let augment = { CropPadding = 4; Flip = true; Mix = Some mix }
    let fisher = { Estimator = PerSample; Samples = 0 }

    let data name =
        { Name = name
          Root = None
          ValidationFraction = 0.1
          TrainLimit = 0
          TestLimit = 0 }

    let model name =
        { Name = name
          Classes = None
          Input = None
          Width = None
          Blocks = None
          Exits = None
          Growth = None
          StepMode = None
          Base = None
          Step = None
          GrowthFactors = None
          BottleneckFactors = None }
