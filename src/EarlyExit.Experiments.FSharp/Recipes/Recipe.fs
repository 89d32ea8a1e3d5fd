/// Training recipes as data: a recipe is a model, data, augmentation, a seed and a list of stages.
/// Nothing here runs anything; `Runner.Interpreter` does.
namespace EarlyExit.Experiments.Recipes

/// A regulariser's strength over the stages of a sequential recipe, as a function of the exit μ a stage adds (the
/// stages that protect an earlier exit have μ = 2..M, M the number of exits).
[<RequireQualifiedAccess>]
type Strength =
    | Constant of float
    /// From `first` at μ = 2 to `last` at μ = M, linearly (`first` when M = 2).
    | Linear of first: float * last: float
    /// first · ratio^(μ−2).
    | Geometric of first: float * ratio: float
    /// One value per stage μ = 2..M (M − 1 values).
    | PerStage of float list

/// One regulariser of a stage (eq. 1 of the 2026 paper generalised: loss = CE + Σ strength · R): a name from
/// EarlyExit.Regularisers.RegulariserRegistry (ewc, lwf, mas, ...) and its strength.
type Penalty = { Name: string; Strength: Strength }

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
      /// The regularisers whose penalties the stage adds to its loss, in this order (empty: none).
      Regularisers: Penalty list
      /// μ of a sequential stage (the exit it adds), 0 otherwise.
      Exit: int
      /// Exits ν < μ whose knowledge the regularisers protect.
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

/// Where the LwF targets ŷ*_ν come from (EarlyExit.Losses.LwfTeacherPolicy).
type LwfTeachers =
    /// The paper's definition: one frozen copy per protected exit, as the network was when that exit finished.
    | PerExitTeachers
    /// Classic LwF: one frozen copy, the network as it was when the deepest protected exit finished (the previous
    /// stage of a sequential recipe); one teacher forward per step instead of one per protected exit.
    | PreviousStageTeacher

/// Training-dynamics measurements a run records (none by default; they do not change what is trained).
type DynamicsSpec =
    { /// Gradient dominance every K optimiser steps of every stage (0: off).
      GradientEvery: int
      /// Numerical rank of every segment's output over this many validation images after every stage (0: off).
      RankSamples: int }

type Recipe =
    { Name: string
      Model: ModelSpec
      Data: DataSpec
      Augment: AugmentSpec
      /// Settings of the regularisers, by regulariser and setting name (EWC: "fisher" and "samples"; LwF: "teachers";
      /// MAS: "samples"); a setting not given takes the regulariser's default. Settings of a regulariser no stage uses
      /// have no effect (and are not written).
      RegulariserSettings: Map<string, Map<string, string>>
      Seed: int
      /// Deterministic mode: torch's deterministic algorithms, and a resume refused under another thread count or
      /// other kernels, so that the same code, seed and thread count give the same bits.
      Deterministic: bool
      Dynamics: DynamicsSpec
      Stages: Stage list }

/// Strengths as a function of the stage's exit, and their text form (command line and JSON).
module Strength =
    open System
    open System.Globalization

    let private inv = CultureInfo.InvariantCulture

    /// The strength at the stage that adds exit μ of a network with M exits.
    let at (exits: int) (mu: int) =
        function
        | Strength.Constant v -> v
        | Strength.Linear (first, last) -> if exits <= 2 then first else first + (last - first) * float (mu - 2) / float (exits - 2)
        | Strength.Geometric (first, ratio) -> first * Math.Pow(ratio, float (mu - 2))
        | Strength.PerStage values -> if mu >= 2 && mu - 2 < values.Length then values[mu - 2] else nan

    let private number (v: float) = v.ToString("R", inv)

    /// "100", "linear:10,1000", "geometric:10,2", or a list of one value per stage "10,100,1000,1000".
    let format =
        function
        | Strength.Constant v -> number v
        | Strength.Linear (a, b) -> $"linear:{number a},{number b}"
        | Strength.Geometric (a, r) -> $"geometric:{number a},{number r}"
        | Strength.PerStage vs -> String.Join(",", vs |> List.map number)

    let private numbers (what: string) (text: string) =
        let parts = text.Split(',', StringSplitOptions.TrimEntries)
        let parsed = parts |> Array.map (fun p -> match Double.TryParse(p, NumberStyles.Float, inv) with
                                                  | true, v when Double.IsFinite v -> Some v
                                                  | _ -> None)
        if parsed |> Array.exists Option.isNone || parts.Length = 0 then Error $"{what}: '{text}' is not a list of numbers"
        else Ok(parsed |> Array.map Option.get |> List.ofArray)

    /// Reads the text form of `format`.
    let parse (text: string) : Result<Strength, string> =
        let t = text.Trim()
        let two kind make =
            match numbers kind (t.Substring(kind.Length + 1)) with
            | Ok [ a; b ] -> Ok(make a b)
            | Ok _ ->
                let second = if kind = "linear" then "LAST" else "RATIO"
                Error $"{kind}: give two numbers ({kind}:FIRST,{second}), found '{t}'"
            | Error e -> Error e
        if t.StartsWith "linear:" then two "linear" (fun a b -> Strength.Linear(a, b))
        elif t.StartsWith "geometric:" then two "geometric" (fun a r -> Strength.Geometric(a, r))
        else
            match numbers "strength" t with
            | Ok [ v ] -> Ok(Strength.Constant v)
            | Ok vs -> Ok(Strength.PerStage vs)
            | Error _ -> Error $"strength '{t}': give a number, linear:FIRST,LAST, geometric:FIRST,RATIO or one number per stage (a,b,c)"

/// What the stages of a recipe ask of the regulariser registry.
module Penalties =
    open EarlyExit.Regularisers

    /// The registered kind of a name (None for an unknown one).
    let kind (name: string) =
        match RegulariserRegistry.TryGet name with
        | true, k -> Some k
        | _ -> None

    let names (s: Stage) = s.Regularisers |> List.map (fun p -> p.Name)
    let uses (name: string) (s: Stage) = s.Regularisers |> List.exists (fun p -> p.Name = name)

    /// Whether a stage's penalties read its protected exits' outputs (then gradients reach their heads).
    let readsProtectedExits (s: Stage) =
        s.Regularisers |> List.exists (fun p -> kind p.Name |> Option.exists (fun k -> k.ReadsProtectedExits))

    /// Every regulariser the stages name, in the order of first use.
    let usedBy (stages: Stage list) = stages |> List.collect names |> List.distinct

    /// The complete settings of a regulariser in a recipe (its defaults, overridden by the recipe's), and the problems.
    let resolve (settings: Map<string, Map<string, string>>) (name: string) =
        match kind name with
        | None -> System.Collections.Generic.Dictionary<string, string>(), [ $"unknown regulariser '{name}'; known: {RegulariserRegistry.KnownNames}" ]
        | Some k ->
            let given = System.Collections.Generic.Dictionary<string, string>()
            for KeyValue (key, v) in settings |> Map.tryFind name |> Option.defaultValue Map.empty do given[key] <- v
            let struct (resolved, problems) = RegulariserRegistry.Resolve(k, given)
            resolved, List.ofSeq problems

    /// The recipe with one setting of one regulariser changed.
    let withSetting (name: string) (key: string) (value: string) (settings: Map<string, Map<string, string>>) =
        let current = settings |> Map.tryFind name |> Option.defaultValue Map.empty
        settings |> Map.add name (current |> Map.add key value)

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

    /// "none", or e.g. "ewc(lambda=100)+lwf(rho=0.7)", "ewc(lambda=geometric:10,2)".
    let penalties (ps: Penalty list) =
        if ps.IsEmpty then "none"
        else
            ps
            |> List.map (fun p ->
                let strength = Penalties.kind p.Name |> Option.map (fun k -> k.StrengthName) |> Option.defaultValue "strength"
                $"{p.Name}({strength}={Strength.format p.Strength})")
            |> String.concat "+"

module Defaults =
    let dynamics = { GradientEvery = 0; RankSamples = 0 }

    let mix =
        { MixupAlpha = 0.8
          CutmixAlpha = 1.0
          SwitchProbability = 0.5
          LabelSmoothing = 0.1
          Probability = 1.0 }

    let augment = { CropPadding = 4; Flip = true; Mix = Some mix }

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

/// The settings of the built-in regularisers that recipes and scripts set by name.
module Settings =
    /// The recipe with the settings of the regularisers its stages use, complete (defaults filled in), and no others:
    /// what `RecipeJson.toJson` writes, so that a recipe made this way reads back equal. Settings with problems are
    /// left as they are, for validation to report.
    let complete (r: Recipe) =
        let used = Penalties.usedBy r.Stages
        let resolved = used |> List.map (fun name -> name, Penalties.resolve r.RegulariserSettings name)
        let unknownGiven = r.RegulariserSettings |> Map.exists (fun name _ -> (Penalties.kind name).IsNone)
        if unknownGiven || resolved |> List.exists (fun (_, (_, problems)) -> not problems.IsEmpty) then r
        else
            { r with
                RegulariserSettings =
                    resolved |> List.map (fun (name, (settings, _)) -> name, settings |> Seq.map (fun kv -> kv.Key, kv.Value) |> Map.ofSeq) |> Map.ofList }

    /// The LwF teacher policy of a recipe (its "lwf" setting "teachers").
    let lwfTeachers (r: Recipe) =
        match r.RegulariserSettings |> Map.tryFind "lwf" |> Option.bind (Map.tryFind "teachers") with
        | Some "previous-stage" -> PreviousStageTeacher
        | _ -> PerExitTeachers

    let withLwfTeachers (t: LwfTeachers) (r: Recipe) =
        { r with RegulariserSettings = r.RegulariserSettings |> Penalties.withSetting "lwf" "teachers" (Names.lwfTeachers t) }

    /// EWC's Fisher estimator and sample cap ("empirical", "exact", "sampled", "squared-minibatch", "empirical-naive").
    let withFisher (estimator: string) (samples: int) (r: Recipe) =
        { r with
            RegulariserSettings =
                r.RegulariserSettings
                |> Penalties.withSetting "ewc" "fisher" estimator
                |> Penalties.withSetting "ewc" "samples" (string samples) }
