/// The strategies of both papers as recipe builders, and the papers' hyper-parameters as presets.
module EarlyExit.Experiments.Recipes.Builders

open System
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
    /// Sequential (2026) with these regularisers (none: plain sequential training).
    | Sequential of Penalty list
    /// Sequential without the warm-up of the backbone (the ablation of Table 2).
    | SequentialNoWarmup of Penalty list

/// A regulariser of the registry with a constant strength, or a schedule.
let penalty (name: string) (strength: Strength) = { Name = name; Strength = strength }
let ewc (lambda: float) = penalty "ewc" (Strength.Constant lambda)
let lwf (rho: float) = penalty "lwf" (Strength.Constant rho)
let mas (lambda: float) = penalty "mas" (Strength.Constant lambda)

/// "sequential-ewc", "sequential-ewc-lwf", "sequential-mas-nowarmup": the regularisers' names in their order.
let strategyName =
    function
    | Joint -> "joint"
    | Disjoint -> "disjoint"
    | Mixed -> "mixed"
    | BranchWise -> "branchwise"
    | Separate -> "separate"
    | Sequential ps -> String.concat "-" ("sequential" :: (ps |> List.map (fun p -> p.Name)))
    | SequentialNoWarmup ps -> String.concat "-" ("sequential" :: (ps |> List.map (fun p -> p.Name))) + "-nowarmup"

let private segments (ks: int seq) = ks |> Seq.map Names.segment |> Seq.toList
let private heads (ks: int seq) = ks |> Seq.map Names.head |> Seq.toList
let private uniform (exits: int list) = exits |> List.map (fun e -> e, 1.0 / float exits.Length)

let private stage (s: StageSettings) name loss trainable =
    { Name = name
      LossExits = loss
      Trainable = trainable
      Regularisers = []
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

/// Sequential (2026): [warm-up;] then for μ = 1..M train segments 1..μ and head μ on CE(μ) plus the regularisers
/// protecting exits 1..μ−1; deeper segments and the final classifier frozen. With a regulariser that reads the earlier
/// exits' outputs (LwF) the earlier heads train too (its gradients reach them); otherwise (EWC, MAS) they stay frozen.
let sequentialWith (withWarmup: bool) (regs: Penalty list) (m: int) (s: StageSettings) =
    let earlierHeadsTrain = regs |> List.exists (fun p -> Penalties.kind p.Name |> Option.exists (fun k -> k.ReadsProtectedExits))
    let stageOf mu =
        let trainable = segments [ 1..mu ] @ (if earlierHeadsTrain then heads [ 1..mu ] else heads [ mu ])
        { stage s $"exit{mu}" [ mu, 1.0 ] trainable with
            Exit = mu
            Regularisers = (if mu = 1 then [] else regs)
            Protects = (if mu = 1 || regs.IsEmpty then [] else [ 1 .. mu - 1 ]) }
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

/// The strength a regulariser gets when none is given: the paper's preset for EWC (λ) and LwF (ρ), else the
/// regulariser's own default.
let defaultStrength (preset: Presets.Paper) (name: string) =
    match name with
    | "ewc" -> preset.Lambda
    | "lwf" -> preset.Rho
    | other -> Penalties.kind other |> Option.map (fun k -> k.DefaultStrength) |> Option.defaultValue 1.0

let private knownStrategies () =
    let regs = EarlyExit.Regularisers.RegulariserRegistry.Kinds |> Seq.map (fun k -> $"sequential-{k.Name}") |> String.concat ", "
    $"joint, disjoint, mixed, branchwise, separate, sequential, {regs}, sequential-ewc-lwf and the like (several regularisers joined by '-'), each sequential one also with -nowarmup"

/// Parses a strategy name: "sequential-R1[-R2...][-nowarmup]" names registered regularisers (ewc, lwf, mas, ...);
/// each takes its strength from `strengths` or else `defaultStrength`.
let parseStrategy (preset: Presets.Paper) (name: string) (strengths: Map<string, Strength>) : Result<Strategy, string> =
    let strengthOf r = strengths |> Map.tryFind r |> Option.defaultWith (fun () -> Strength.Constant(defaultStrength preset r))
    let sequentialOf (rest: string) =
        let parts, warm =
            let ps = rest.Split('-', StringSplitOptions.RemoveEmptyEntries) |> List.ofArray
            match List.rev ps with
            | "nowarmup" :: before -> List.rev before, false
            | _ -> ps, true
        match parts |> List.tryFind (fun p -> (Penalties.kind p).IsNone) with
        | Some bad -> Error $"unknown strategy '{name}': '{bad}' is not a registered regulariser ({EarlyExit.Regularisers.RegulariserRegistry.KnownNames}); known strategies: {knownStrategies ()}"
        | None when List.distinct parts <> parts -> Error $"strategy '{name}' names a regulariser twice"
        | None ->
            let ps = parts |> List.map (fun r -> penalty r (strengthOf r))
            Ok(if warm then Sequential ps else SequentialNoWarmup ps)
    match name.Trim().ToLowerInvariant() with
    | "joint" -> Ok Joint
    | "disjoint" | "two-stage" -> Ok Disjoint
    | "mixed" -> Ok Mixed
    | "branchwise" | "branch-wise" -> Ok BranchWise
    | "separate" -> Ok Separate
    | "sequential" -> Ok(Sequential [])
    | "sequential-nowarmup" -> Ok(SequentialNoWarmup [])
    | "ewc" | "lwf" | "mas" as r -> sequentialOf r
    | other when other.StartsWith "sequential-" -> sequentialOf (other.Substring "sequential-".Length)
    | other -> Error $"unknown strategy '{other}'; known: {knownStrategies ()}"

let allStrategies (preset: Presets.Paper) =
    [ Joint; Disjoint; Mixed; BranchWise; Separate; Sequential [ ewc preset.Lambda ]; Sequential [ lwf preset.Rho ] ]
