/// The strategies of both papers as recipe builders, and the papers' hyper-parameters as presets.
module EarlyExit.Experiments.Recipes.Builders

open EarlyExit.Experiments.Recipes

/// What every stage of a built recipe shares.
type StageSettings =
    { Optimiser: Optimiser
      BatchSize: int
      MaxEpochs: int
      Patience: int
      MaxStepsPerEpoch: int
      /// Epoch cap of the stages that train a backbone from scratch: the warm-up (backbone with its final exit) and joint.
      WarmupEpochs: int }

type Strategy =
    | Joint
    | Disjoint
    | Mixed
    | BranchWise
    | Separate
    | Sequential of Regulariser
    /// Sequential without the warm-up of the backbone (the ablation of Table 2).
    | SequentialNoWarmup of Regulariser

let strategyName =
    function
    | Joint -> "joint"
    | Disjoint -> "disjoint"
    | Mixed -> "mixed"
    | BranchWise -> "branchwise"
    | Separate -> "separate"
    | Sequential NoRegulariser -> "sequential"
    | Sequential (Ewc _) -> "sequential-ewc"
    | Sequential (Lwf _) -> "sequential-lwf"
    | Sequential (EwcAndLwf _) -> "sequential-ewc-lwf"
    | SequentialNoWarmup r -> (match r with
                               | Ewc _ -> "sequential-ewc-nowarmup"
                               | Lwf _ -> "sequential-lwf-nowarmup"
                               | EwcAndLwf _ -> "sequential-ewc-lwf-nowarmup"
                               | NoRegulariser -> "sequential-nowarmup")

let private segments (ks: int seq) = ks |> Seq.map Names.segment |> Seq.toList
let private heads (ks: int seq) = ks |> Seq.map Names.head |> Seq.toList
let private uniform (exits: int list) = exits |> List.map (fun e -> e, 1.0 / float exits.Length)

let private stage (s: StageSettings) name loss trainable =
    { Name = name
      LossExits = loss
      Trainable = trainable
      Regulariser = NoRegulariser
      Exit = 0
      Protects = []
      Optimiser = s.Optimiser
      BatchSize = s.BatchSize
      MaxEpochs = s.MaxEpochs
      Patience = s.Patience
      MaxStepsPerEpoch = s.MaxStepsPerEpoch }

/// The warm-up shared by disjoint, mixed and the sequential strategies: the backbone with its final exit only.
let warmup (m: int) (s: StageSettings) =
    { stage s "warmup" [ m, 1.0 ] (segments [ 1..m ] @ heads [ m ]) with MaxEpochs = s.WarmupEpochs }

/// Joint: one stage, all segments and exits, loss = mean of the exits' cross-entropies. It trains a backbone from
/// scratch, so it gets the warm-up's epoch cap.
let joint (m: int) (s: StageSettings) =
    [ { stage s "joint" (uniform [ 1..m ]) (segments [ 1..m ] @ heads [ 1..m ]) with MaxEpochs = s.WarmupEpochs } ]

/// Disjoint (two-stage): warm-up, then the backbone frozen and the internal classifiers trained.
let disjoint (m: int) (s: StageSettings) =
    [ warmup m s; stage s "heads" (uniform [ 1 .. m - 1 ]) (heads [ 1 .. m - 1 ]) ]

/// Mixed (ICML 2025): warm-up, then the whole multi-exit network jointly.
let mixed (m: int) (s: StageSettings) =
    [ warmup m s; stage s "joint" (uniform [ 1..m ]) (segments [ 1..m ] @ heads [ 1..m ]) ]

/// Branch-wise: exits added shallow to deep; stage μ trains only segment μ and head μ.
let branchwise (m: int) (s: StageSettings) =
    [ for mu in 1..m -> { stage s $"exit{mu}" [ mu, 1.0 ] (segments [ mu ] @ heads [ mu ]) with Exit = mu } ]

/// Separate: exits added shallow to deep; stage μ trains segments 1..μ and heads 1..μ on the CEs of exits 1..μ.
let separate (m: int) (s: StageSettings) =
    [ for mu in 1..m -> { stage s $"exit{mu}" (uniform [ 1..mu ]) (segments [ 1..mu ] @ heads [ 1..mu ]) with Exit = mu } ]

/// Sequential (2026): [warm-up;] then for μ = 1..M train segments 1..μ and head μ on CE(μ) plus the regulariser
/// protecting exits 1..μ−1; deeper segments and the final classifier frozen. With LwF the earlier heads train too
/// (its gradients reach them); with EWC they stay frozen.
let sequentialWith (withWarmup: bool) (reg: Regulariser) (m: int) (s: StageSettings) =
    let earlierHeadsTrain = Regularisers.usesLwf reg
    let stageOf mu =
        let trainable = segments [ 1..mu ] @ (if earlierHeadsTrain then heads [ 1..mu ] else heads [ mu ])
        { stage s $"exit{mu}" [ mu, 1.0 ] trainable with
            Exit = mu
            Regulariser = (if mu = 1 then NoRegulariser else reg)
            Protects = (if mu = 1 || reg = NoRegulariser then [] else [ 1 .. mu - 1 ]) }
    (if withWarmup then [ warmup m s ] else []) @ [ for mu in 1..m -> stageOf mu ]

let sequential reg m s = sequentialWith true reg m s

let stagesOf (strategy: Strategy) (m: int) (s: StageSettings) =
    match strategy with
    | Joint -> joint m s
    | Disjoint -> disjoint m s
    | Mixed -> mixed m s
    | BranchWise -> branchwise m s
    | Separate -> separate m s
    | Sequential reg -> sequential reg m s
    | SequentialNoWarmup reg -> sequentialWith false reg m s

/// The papers' hyper-parameters (SPEC): ResNet-34 λ = 100, ρ = 0.7, batch 128, lr 5e-4; MSDNet λ = 1000, ρ = 0.2,
/// batch 512, lr 1e-3; no weight decay; patience 50.
module Presets =
    type Paper =
        { Lambda: float
          Rho: float
          BatchSize: int
          LearningRate: float
          Patience: int }

    let resnet34 = { Lambda = 100.0; Rho = 0.7; BatchSize = 128; LearningRate = 5e-4; Patience = 50 }
    let msdnet = { Lambda = 1000.0; Rho = 0.2; BatchSize = 512; LearningRate = 1e-3; Patience = 50 }

    let forModel (name: string) =
        if name.StartsWith "msdnet" then msdnet else resnet34

/// Parses a strategy name; regularised names take the model's preset strength unless one is given.
let parseStrategy (preset: Presets.Paper) (name: string) (lambda: float option) (rho: float option) : Result<Strategy, string> =
    let l = defaultArg lambda preset.Lambda
    let r = defaultArg rho preset.Rho
    match name.Trim().ToLowerInvariant() with
    | "joint" -> Ok Joint
    | "disjoint" | "two-stage" -> Ok Disjoint
    | "mixed" -> Ok Mixed
    | "branchwise" | "branch-wise" -> Ok BranchWise
    | "separate" -> Ok Separate
    | "sequential" -> Ok(Sequential NoRegulariser)
    | "sequential-ewc" | "ewc" -> Ok(Sequential(Ewc l))
    | "sequential-lwf" | "lwf" -> Ok(Sequential(Lwf r))
    | "sequential-ewc-lwf" -> Ok(Sequential(EwcAndLwf(l, r)))
    | "sequential-ewc-nowarmup" -> Ok(SequentialNoWarmup(Ewc l))
    | "sequential-lwf-nowarmup" -> Ok(SequentialNoWarmup(Lwf r))
    | other ->
        Error $"unknown strategy '{other}'; known: joint, disjoint, mixed, branchwise, separate, sequential-ewc, sequential-lwf, sequential-ewc-lwf, sequential-ewc-nowarmup, sequential-lwf-nowarmup"

let allStrategies (preset: Presets.Paper) =
    [ Joint; Disjoint; Mixed; BranchWise; Separate; Sequential(Ewc preset.Lambda); Sequential(Lwf preset.Rho) ]
