/// What training a recipe costs: epochs, optimiser steps and images per stage, and training MACs.
///
/// Convention (stated wherever the figures appear): a training step costs 3× the forward MACs of the exits it computes
/// (backward ≈ 2× forward), per image; LwF teachers, validation passes and the Fisher's forward and backward passes are
/// counted too (1×, 1× and 3× forward; the exact Fisher 1 + 2C×, the sampled one 4×). Forward MACs of "up to exit μ" are the cumulative MACs of exit μ (segments and
/// heads 1..μ), as the budgets use them.
module EarlyExit.Experiments.Runner.Cost

open EarlyExit.Experiments.Recipes
open EarlyExit.Regularisers

type StageCost =
    { Stage: string
      Epochs: int
      Steps: int
      /// Training images processed (steps × batch, the last batch of an epoch possibly smaller).
      Images: int64
      TrainingMacs: float
      /// Wall time of the stage in the run that trained it (0 when it was reused from the prefix cache).
      Seconds: float
      Reused: bool }

/// The backward pass as a multiple of the forward pass.
let backwardMultiple = 2.0

/// Training MACs of one stage: `images` training images through the exits it computes (forward + backward), the
/// forwards its regularisers' penalties add (LwF teachers), `validationPasses` passes over `validationImages`, and
/// the consolidation of each regulariser in `consolidates` after it (the Fisher's passes over its samples of the
/// `trainImages`). `exitMacs` are cumulative MACs per exit (index μ−1).
let stageMacs (exitMacs: int64[]) (recipe: Recipe) (consolidates: string list) (stage: Stage) (images: int64) (validationImages: int64)
              (validationPasses: int) (trainImages: int) (classes: int) : float =
    let upTo = List.max ((stage.LossExits |> List.map fst) @ stage.Protects)
    let forward = float exitMacs[upTo - 1]
    let kindOf name = RegulariserRegistry.Get name
    let settingsOf name = fst (Penalties.resolve recipe.RegulariserSettings name)
    let protects = ResizeArray stage.Protects
    let penaltyForward =
        if stage.Protects.IsEmpty then 0.0
        else stage.Regularisers |> List.sumBy (fun p -> (kindOf p.Name).PenaltyForwardMacs(settingsOf p.Name, protects, exitMacs))
    let consolidation =
        if stage.Exit = 0 then 0.0
        else consolidates |> List.sumBy (fun n -> (kindOf n).ConsolidationMacs(settingsOf n, stage.Exit, trainImages, classes, exitMacs))
    float images * ((1.0 + backwardMultiple) * forward + penaltyForward)
    + float validationImages * float validationPasses * forward
    + consolidation

/// Totals of a run: epochs, steps, images and MACs over its stages.
let totals (stages: StageCost list) =
    {| Epochs = stages |> List.sumBy (fun s -> s.Epochs)
       Steps = stages |> List.sumBy (fun s -> s.Steps)
       Images = stages |> List.sumBy (fun s -> s.Images)
       TrainingMacs = stages |> List.sumBy (fun s -> s.TrainingMacs) |}

/// `--equal-steps`: every recipe gets the same total of epochs (so the same optimiser steps: a full epoch is the same
/// number of steps in every stage of one scale), the largest total among them; each recipe splits it over its stages
/// in proportion to their own epoch caps, rounded so that the total is exact (largest remainder), at least 1 each.
let equalSteps (recipes: Recipe list) : Recipe list =
    let total (r: Recipe) = r.Stages |> List.sumBy (fun s -> s.MaxEpochs)
    let target = recipes |> List.map total |> List.max
    [ for r in recipes ->
        let caps = r.Stages |> List.map (fun s -> float s.MaxEpochs)
        let sum = List.sum caps
        let exact = caps |> List.map (fun c -> c / sum * float target)
        let floors = exact |> List.map (fun e -> max 1 (int (floor e)))
        let missing = target - List.sum floors
        let order = exact |> List.mapi (fun i e -> i, e - floor e) |> List.sortByDescending snd |> List.map fst
        let extra = set (List.truncate (max 0 missing) order)
        let epochs = floors |> List.mapi (fun i f -> if extra.Contains i then f + 1 else f)
        { r with Stages = List.map2 (fun (s: Stage) e -> { s with MaxEpochs = e }) r.Stages epochs } ]
