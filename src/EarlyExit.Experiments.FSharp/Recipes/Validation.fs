/// Everything that can be wrong with a recipe, found before a run starts, each problem with its path.
module EarlyExit.Experiments.Recipes.Validation

open System
open EarlyExit.Models
open EarlyExit.Experiments.Recipes

let modelOptions (m: ModelSpec) =
    ModelOptions(
        NumClasses = Option.toNullable m.Classes,
        InputShape = (m.Input |> Option.map List.toArray |> Option.toObj),
        BaseWidth = Option.toNullable m.Width,
        Blocks = (m.Blocks |> Option.map List.toArray |> Option.toObj),
        ExitPositions = (m.Exits |> Option.map List.toArray |> Option.toObj),
        GrowthRate = Option.toNullable m.Growth,
        StepMode = Option.toObj m.StepMode,
        Base = Option.toNullable m.Base,
        Step = Option.toNullable m.Step,
        GrowthFactors = (m.GrowthFactors |> Option.map List.toArray |> Option.toObj),
        BottleneckFactors = (m.BottleneckFactors |> Option.map List.toArray |> Option.toObj))

/// Number of exits of the model a recipe names (no network is built).
let exitCount (m: ModelSpec) =
    let family = ModelRegistry.Get m.Name
    family.ExitCount.Invoke(modelOptions m)

let private dataNames = set EarlyExit.Data.DataCatalog.Names

/// All problems of a recipe, as "path: message" lines; empty when the recipe can run.
let problems (r: Recipe) : string list =
    [ if String.IsNullOrWhiteSpace r.Name then "name: must not be empty"
      // Model
      let family = try Some(ModelRegistry.Get r.Model.Name) with :? ArgumentException as e -> None
      match family with
      | None ->
          let known = ModelRegistry.Families |> Seq.map (fun f -> f.Name) |> String.concat ", "
          $"model.name: unknown model '{r.Model.Name}'; known: {known}"
      | Some f ->
          match r.Model.Classes with
          | Some c when c < 2 -> $"model.classes: {c} is fewer than 2"
          | _ -> ()
          match r.Model.Input with
          | Some s when s.Length <> 3 || List.exists (fun v -> v < 1L) s -> "model.input: must be C x H x W with positive sizes"
          | _ -> ()
          match r.Model.Width with
          | Some w when w < 1 -> $"model.width: {w} is not positive"
          | _ -> ()
          for p in f.Problems.Invoke(modelOptions r.Model) do
              $"model: {p}"
      // Data
      if not (dataNames.Contains(EarlyExit.Data.DataCatalog.Normalise r.Data.Name)) then
          $"""data.name: unknown data set '{r.Data.Name}'; known: {String.Join(", ", EarlyExit.Data.DataCatalog.Names)}"""
      elif EarlyExit.Data.DataCatalog.IsOwnFormat r.Data.Name && (r.Data.Root |> Option.forall String.IsNullOrWhiteSpace) then
          $"data.root: data set '{EarlyExit.Data.DataCatalog.Normalise r.Data.Name}' is read from the folder given as its root; set data.root (--data-root on the command line)"
      if r.Data.ValidationFraction <= 0.0 || r.Data.ValidationFraction >= 0.5 then
          $"data.validationFraction: {r.Data.ValidationFraction} must lie in (0, 0.5)"
      if r.Data.TrainLimit < 0 then "data.trainLimit: must be 0 (all) or positive"
      if r.Data.TestLimit < 0 then "data.testLimit: must be 0 (all) or positive"
      // Augmentation
      if r.Augment.CropPadding < 0 then "augment.cropPadding: must be non-negative"
      match r.Augment.Mix with
      | Some m ->
          if m.MixupAlpha < 0.0 then "augment.mix.mixupAlpha: must be non-negative"
          if m.CutmixAlpha < 0.0 then "augment.mix.cutmixAlpha: must be non-negative"
          if m.SwitchProbability < 0.0 || m.SwitchProbability > 1.0 then "augment.mix.switchProbability: must lie in [0, 1]"
          if m.Probability < 0.0 || m.Probability > 1.0 then "augment.mix.probability: must lie in [0, 1]"
          if m.LabelSmoothing < 0.0 || m.LabelSmoothing >= 1.0 then "augment.mix.labelSmoothing: must lie in [0, 1)"
      | None -> ()
      if r.Dynamics.GradientEvery < 0 then "dynamics.gradientEvery: must be 0 (off) or positive"
      if r.Dynamics.RankSamples < 0 then "dynamics.rankSamples: must be 0 (off) or positive"
      // Regulariser settings: every named regulariser is registered, every setting known and valid.
      for KeyValue (name, _) in r.RegulariserSettings do
          let _, ps = Penalties.resolve r.RegulariserSettings name
          for p in ps do
              if p.StartsWith "unknown regulariser" then $"regularisers.{name}: {p}" else $"regularisers.{name}.{p}"
      // Stages
      if r.Stages.IsEmpty then "stages: a recipe needs at least one stage"
      let m = match family with
              | Some f when f.Problems.Invoke(modelOptions r.Model).Count = 0 -> Some(f.ExitCount.Invoke(modelOptions r.Model))
              | _ -> None
      let duplicates = r.Stages |> List.countBy (fun s -> s.Name) |> List.filter (fun (_, c) -> c > 1)
      for (name, _) in duplicates do
          $"stages: the name '{name}' is used more than once"
      for i, s in List.indexed r.Stages do
          let at = $"stages[{i}]"
          if String.IsNullOrWhiteSpace s.Name then $"{at}.name: must not be empty"
          if s.LossExits.IsEmpty then $"{at}.lossExits: no exit contributes a loss"
          if s.Trainable.IsEmpty then $"{at}.train: the stage trains nothing"
          if s.Optimiser.LearningRate <= 0.0 then $"{at}.optimiser.lr: must be positive"
          if s.Optimiser.WeightDecay < 0.0 then $"{at}.optimiser.weightDecay: must be non-negative"
          if s.BatchSize < 1 then $"{at}.batchSize: must be positive"
          if s.MaxEpochs < 1 then $"{at}.maxEpochs: must be at least 1"
          if s.Patience < 0 then $"{at}.patience: must be 0 (none) or positive"
          if s.MaxStepsPerEpoch < 0 then $"{at}.maxStepsPerEpoch: must be 0 (full epochs) or positive"
          for j, (_, w) in List.indexed s.LossExits do
              if w <= 0.0 || Double.IsNaN w then $"{at}.lossWeights[{j}]: weight {w} must be positive"
          for j, p in List.indexed s.Regularisers do
              match Penalties.kind p.Name with
              | None -> $"{at}.regularisers[{j}].name: unknown regulariser '{p.Name}'; known: {EarlyExit.Regularisers.RegulariserRegistry.KnownNames}"
              | Some k ->
                  match p.Strength with
                  | Strength.Constant v when not (v > 0.0) || Double.IsInfinity v -> $"{at}.regularisers[{j}].{k.StrengthName}: {v} must be positive"
                  | Strength.Linear (a, b) when not (a > 0.0 && b > 0.0) -> $"{at}.regularisers[{j}].{k.StrengthName}: a linear schedule from {a} to {b} must stay positive"
                  | Strength.Geometric (a, q) when not (a > 0.0 && q > 0.0) -> $"{at}.regularisers[{j}].{k.StrengthName}: a geometric schedule ({a}, ratio {q}) must stay positive"
                  | Strength.PerStage vs when vs |> List.exists (fun v -> not (v > 0.0)) -> $"{at}.regularisers[{j}].{k.StrengthName}: every value of the list must be positive"
                  | _ -> ()
          for name in Penalties.names s |> List.countBy id |> List.filter (fun (_, c) -> c > 1) |> List.map fst do
              $"{at}.regularisers: {name} is listed more than once"
          if not s.Regularisers.IsEmpty && s.Protects.IsEmpty then
              $"{at}.regularisers: {Names.penalties s.Regularisers} has no earlier exit to protect"
          if s.Regularisers.IsEmpty && not s.Protects.IsEmpty then
              $"{at}.protects: exits to protect but no regulariser"
          match m with
          | None -> ()
          | Some m ->
              for j, (e, _) in List.indexed s.LossExits do
                  if e < 1 || e > m then $"{at}.lossExits[{j}]: exit {e} is out of range 1..{m}"
              let groups = set ([ for k in 1..m -> Names.segment k ] @ [ for k in 1..m -> Names.head k ])
              for j, g in List.indexed s.Trainable do
                  if not (groups.Contains g) then $"{at}.train[{j}]: unknown group '{g}' (the model has segment1..segment{m}, head1..head{m})"
              if s.Exit < 0 || s.Exit > m then $"{at}.exit: {s.Exit} is out of range 0..{m}"
              for j, nu in List.indexed s.Protects do
                  if nu < 1 || nu > m then $"{at}.protects[{j}]: exit {nu} is out of range 1..{m}"
                  elif s.Exit > 0 && nu >= s.Exit then $"{at}.protects[{j}]: exit {nu} is not earlier than the stage's exit {s.Exit}"
              if not s.Regularisers.IsEmpty && s.Exit = 0 then
                  $"{at}.exit: a regularised stage must name the exit μ it adds"
              // A schedule is a function of μ: a list needs one value per stage μ = 2..M.
              for j, p in List.indexed s.Regularisers do
                  match p.Strength with
                  | Strength.PerStage vs when vs.Length <> m - 1 ->
                      $"{at}.regularisers[{j}]: {vs.Length} values for the stages μ = 2..{m}; give {m - 1}, one per stage"
                  | _ -> ()
              // Every protected exit needs an earlier stage that finished it (Fisher and anchor, or teacher).
              let finishedBefore = r.Stages |> List.take i |> List.map (fun p -> p.Exit) |> set
              for nu in s.Protects do
                  if not (finishedBefore.Contains nu) then
                      $"{at}.protects: exit {nu} was not trained by an earlier sequential stage, so there is nothing to protect"
              // Every loss must reach a trainable parameter, and every trainable group must get a gradient.
              let trainable = set s.Trainable
              let pathOf e = [ for k in 1..e -> Names.segment k ] @ [ Names.head e ]
              for (e, _) in s.LossExits do
                  if e >= 1 && e <= m && pathOf e |> List.forall (trainable.Contains >> not) then
                      $"{at}.lossExits: the loss of exit {e} reaches no trainable parameter"
              let reached =
                  let lwfExits = if Penalties.readsProtectedExits s then s.Protects else []
                  (List.map fst s.LossExits @ lwfExits) |> List.filter (fun e -> e >= 1 && e <= m) |> List.collect pathOf |> set
              for g in s.Trainable do
                  if groups.Contains g && not (reached.Contains g) then
                      $"{at}.train: {g} gets no gradient in this stage (no loss reaches it); freeze it or add its exit" ]

let validate (r: Recipe) : Result<Recipe, string list> =
    match problems r with
    | [] -> Ok r
    | ps -> Error ps
