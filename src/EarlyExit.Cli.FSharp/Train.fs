/// `earlyexit train`: from a recipe file, or from a strategy, a model, a data set and a scale.
module EarlyExit.Experiments.Cli.Train

open System
open System.IO
open Argu
open System.Text.Json
open EarlyExit.Native
open EarlyExit.Experiments.Recipes
open EarlyExit.Experiments.Runner
open EarlyExit.Experiments.Cli.Arguments

/// The scale when none is given: paper on a GPU, cpu otherwise.
let defaultScale () =
    if Devices.CudaAvailable() then Scales.Paper else Scales.Cpu

/// The strengths given on the command line: --lambda (EWC), --rho (LwF), --strength NAME=S.
let strengthsOf (r: ParseResults<TrainArgs>) : Result<Map<string, Strength>, string list> =
    let given =
        [ for l in r.GetResults TrainArgs.Lambda -> "--lambda", "ewc", l
          for x in r.GetResults TrainArgs.Rho -> "--rho", "lwf", x
          for spec in r.GetResults TrainArgs.Strength ->
              match spec.Split('=', 2) with
              | [| name; value |] -> "--strength", name.Trim(), value
              | _ -> "--strength", "", spec ]
    let parsed =
        [ for flag, name, value in given ->
            if name = "" then Error $"{flag} {value}: give NAME=STRENGTH, e.g. mas=1"
            elif (Penalties.kind name).IsNone then Error $"{flag} {name}=...: unknown regulariser '{name}'; known: {EarlyExit.Regularisers.RegulariserRegistry.KnownNames}"
            else Strength.parse value |> Result.map (fun s -> name, s) |> Result.mapError (fun e -> $"{flag}: {e}") ]
    match parsed |> List.choose (function Error e -> Some e | Ok _ -> None) with
    | [] -> Ok(parsed |> List.choose (function Ok p -> Some p | Error _ -> None) |> Map.ofList)
    | errors -> Error errors

/// The settings given on the command line: --fisher E, --setting NAME.KEY=VALUE, --lwf-teachers P.
let settingsOf (r: ParseResults<TrainArgs>) : Result<(string * string * string) list, string list> =
    let parsed =
        [ for e in r.GetResults TrainArgs.Fisher -> Ok("ewc", "fisher", e)
          for t in r.GetResults TrainArgs.Lwf_Teachers -> Ok("lwf", "teachers", t)
          for spec in r.GetResults TrainArgs.Setting ->
              match spec.Split('=', 2) with
              | [| key; value |] when key.Contains '.' ->
                  let dot = key.IndexOf '.'
                  Ok(key.Substring(0, dot).Trim(), key.Substring(dot + 1).Trim(), value.Trim())
              | _ -> Error $"--setting {spec}: give NAME.KEY=VALUE, e.g. ewc.samples=2000" ]
    match parsed |> List.choose (function Error e -> Some e | Ok _ -> None) with
    | [] -> Ok(parsed |> List.choose (function Ok p -> Some p | Error _ -> None))
    | errors -> Error errors

/// The overrides of the command line (--epochs, --lr, --batch-size, --set PATH=VALUE) applied to a recipe; its name
/// gets +WHAT=VALUE,... as given.
let applyOverrides (r: ParseResults<TrainArgs>) (recipe: Recipe) : Result<Recipe, string list> =
    let inv = Globalization.CultureInfo.InvariantCulture
    let perStage (key: string) (v: string) = [ for i in 0 .. recipe.Stages.Length - 1 -> $"stages[{i}].{key}", v ]
    let shortcuts =
        [ for e in r.GetResults TrainArgs.Epochs -> $"epochs={e}", perStage "maxEpochs" (string e)
          for lr in r.GetResults TrainArgs.Lr -> $"lr={lr.ToString(inv)}", perStage "optimiser.lr" (lr.ToString("R", inv))
          for b in r.GetResults TrainArgs.Batch_Size -> $"batch-size={b}", perStage "batchSize" (string b) ]
    let sets =
        [ for spec in r.GetResults TrainArgs.Set ->
            match spec.Split('=', 2) with
            | [| path; value |] when path.Trim() <> "" -> Ok(spec.Trim(), (path.Trim(), value.Trim()))
            | _ -> Error $"--set {spec}: give PATH=VALUE, e.g. stages[2].maxEpochs=5" ]
    match sets |> List.choose (function Error e -> Some e | Ok _ -> None) with
    | [] when shortcuts.IsEmpty && sets.IsEmpty -> Ok recipe
    | [] ->
        let sets = sets |> List.choose (function Ok s -> Some s | Error _ -> None)
        let pairs = (shortcuts |> List.collect snd) @ (sets |> List.map snd)
        RecipeJson.withOverrides pairs recipe
        |> Result.map (fun changed -> { changed with Name = recipe.Name + "+" + String.Join(",", (shortcuts |> List.map fst) @ (sets |> List.map fst)) })
    | errors -> Error errors

/// Where the saved recipe's "$schema" points: schemas/recipe.schema.json of the checkout this build lives in, relative
/// to the saved file (None outside a checkout; `earlyexit schema --out FILE` writes one).
let schemaFor (recipeFile: string) =
    let rec up (dir: string) =
        if isNull dir then None
        else
            let candidate = Path.Combine(dir, "schemas", "recipe.schema.json")
            if File.Exists candidate then Some candidate else up (Path.GetDirectoryName dir)
    up AppContext.BaseDirectory
    |> Option.map (fun schema -> Path.GetRelativePath(Path.GetDirectoryName(Path.GetFullPath recipeFile), schema))

let resolveRecipe (r: ParseResults<TrainArgs>) : Result<Recipe * string, string list> =
    match r.TryGetResult TrainArgs.Recipe with
    | Some _ when [ r.Contains TrainArgs.Lwf_Teachers; r.Contains TrainArgs.Lambda; r.Contains TrainArgs.Rho; r.Contains TrainArgs.Strength
                    r.Contains TrainArgs.Fisher; r.Contains TrainArgs.Setting ] |> List.exists id ->
        Error [ "--lambda, --rho, --strength, --fisher, --setting and --lwf-teachers go with --strategy; in a recipe file, set the stages' \"regularisers\" and the recipe's \"regularisers\" settings (see --save-recipe)" ]
    | Some file ->
        RecipeJson.load file |> Result.bind (applyOverrides r) |> Result.map (fun recipe -> recipe, "recipe")
    | None ->
        let model = r.GetResult(TrainArgs.Model, "resnet34")
        let data = r.GetResult(TrainArgs.Data, "fashion-mnist")
        let scale =
            match r.TryGetResult TrainArgs.Scale with
            | Some s -> Scales.parse s
            | None -> Ok(defaultScale ())
        match scale, r.TryGetResult TrainArgs.Strategy with
        | Error e, _ -> Error [ e ]
        | _, None -> Error [ "give --recipe FILE, or --strategy NAME (with --model, --data, --scale)" ]
        | Ok scale, Some name ->
            let preset = Builders.Presets.forModel model
            match strengthsOf r, settingsOf r with
            | Error e, _ | _, Error e -> Error e
            | Ok strengths, Ok settings ->
            let teachers =
                match r.TryGetResult TrainArgs.Lwf_Teachers with
                | Some s -> Names.parseLwfTeachers s
                | None -> Ok PerExitTeachers
            let usedBy =
                function
                | Builders.Sequential ps | Builders.SequentialNoWarmup ps -> ps |> List.map (fun p -> p.Name)
                | _ -> []
            // A strength or a setting of a regulariser the strategy does not use would do nothing: say so.
            let unused strategy =
                Seq.append (Map.keys strengths) (settings |> List.map (fun (n, _, _) -> n))
                |> Seq.filter (fun n -> not (List.contains n (usedBy strategy))) |> Seq.distinct |> List.ofSeq
            match Builders.parseStrategy preset name strengths, teachers with
            | Error e, _ | _, Error e -> Error [ e ]
            | Ok strategy, _ when not (unused strategy).IsEmpty ->
                let usedText = match usedBy strategy with
                               | [] -> "no regulariser"
                               | us -> String.Join(", ", us)
                Error [ for n in unused strategy -> $"strategy {Builders.strategyName strategy} uses {usedText}: a strength or setting of {n} would have no effect" ]
            | Ok strategy, Ok teachers ->
                try
                    let recipe = Scales.recipe scale strategy model data (r.GetResult(TrainArgs.Seed, 0))
                    let recipe = Scales.withLwfTeachers teachers recipe
                    let recipe =
                        { recipe with
                            RegulariserSettings =
                                settings |> List.fold (fun m (name, key, value) -> m |> Penalties.withSetting name key value) recipe.RegulariserSettings }
                        |> Settings.complete
                    let recipe =
                        match r.TryGetResult TrainArgs.Data_Root with
                        | Some root -> { recipe with Data = { recipe.Data with Root = Some root } }
                        | None -> recipe
                    let recipe =
                        if EarlyExit.Data.DataCatalog.IsOwnFormat recipe.Data.Name && recipe.Data.Root.IsNone then recipe
                        else Scales.fitToData recipe
                    Validation.validate recipe |> Result.bind (applyOverrides r) |> Result.map (fun v -> v, Scales.name scale)
                with
                | :? ArgumentException as e -> Error [ e.Message ]
                | :? EarlyExit.Data.DataFormatException as e -> Error [ e.Message ]

/// Ends this process (as kill -9 would: the epoch in flight is lost, the run resumes) when process `pid` ends: the
/// executor's runs must not outlive it.
let watchParent (pid: int) =
    let alive () =
        try
            use p = Diagnostics.Process.GetProcessById pid
            not p.HasExited
        with _ -> false
    let t =
        Threading.Thread((fun () ->
            while alive () do Threading.Thread.Sleep 1000
            Diagnostics.Process.GetCurrentProcess().Kill()), IsBackground = true, Name = "parent watch")
    t.Start()

let run (r: ParseResults<TrainArgs>) =
    let seeds =
        match r.TryGetResult TrainArgs.Seeds with
        | None -> Ok None
        | Some s -> Parse.seeds s |> Result.map Some
    let jobs = r.GetResult(TrainArgs.Jobs, Executor.defaultJobs ())
    match resolveRecipe r, seeds with
    | Error problems, _ ->
        for p in problems do eprintfn "error: %s" p
        2
    | _, Error e ->
        eprintfn "error: %s" e
        2
    | Ok _, Ok (Some _) when r.Contains TrainArgs.Seed ->
        eprintfn "error: give --seed or --seeds, not both"
        2
    | Ok _, Ok _ when jobs < 1 ->
        eprintfn "error: --jobs %d: run at least one job at a time" jobs
        2
    | Ok (recipe, scale), Ok seeds ->
        let recipe = if r.Contains TrainArgs.Deterministic then { recipe with Deterministic = true } else recipe
        let scale = if r.Contains TrainArgs.Recipe then r.GetResult(TrainArgs.Scale, scale) else scale
        match r.TryGetResult TrainArgs.Save_Recipe, seeds with
        | Some file, _ ->
            let full = Path.GetFullPath file
            Directory.CreateDirectory(Path.GetDirectoryName full) |> ignore
            EarlyExit.Experiments.Reports.Markdown.writeAtomic full (RecipeJson.toCompactJson (schemaFor full) recipe)
            printfn "recipe written to %s" file
            0
        | None, Some seeds ->
            // One run folder per seed, OUT/seed-K, run by the local executor.
            let out = Path.GetFullPath(r.GetResult TrainArgs.Out)
            let threads =
                match Option.ofObj TorchThreads.Requested |> Option.map TorchThreads.Parse with
                | Some n when n.HasValue -> n.Value
                | _ -> Executor.defaultThreads (min jobs seeds.Length)
            let options: Executor.Options =
                { Jobs = jobs; Threads = threads; PrefixCache = r.TryGetResult TrainArgs.Prefix_Cache |> Option.orElse (Some(Path.Combine(out, "prefix-cache")))
                  Scale = scale; Device = r.TryGetResult TrainArgs.Device; Numerics = Option.ofObj NumericsGuard.Requested
                  SweepDir = Path.Combine(out, "sweep"); Log = fun line -> Console.Out.WriteLine line }
            let runs = [ for s in seeds -> { Executor.Name = recipe.Name; Executor.Seed = s; Executor.Recipe = { recipe with Seed = s }; Executor.RunDir = Path.Combine(out, $"seed-{s}") } ]
            let outcomes = Executor.run options runs
            for o in outcomes do
                if o.ExitCode = 0 then
                    use doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(o.Job.RunDir, "metrics.json")))
                    let acc = doc.RootElement.GetProperty("testAccuracy").EnumerateArray() |> Seq.map (fun e -> sprintf "%.4f" (e.GetDouble())) |> String.concat " "
                    printfn "seed %d: test accuracy per exit %s (%s)" o.Job.Seed acc o.Job.RunDir
                else printfn "seed %d: FAILED (exit code %d); see %s" o.Job.Seed o.ExitCode o.Job.RunDir
            if outcomes |> List.forall (fun o -> o.ExitCode = 0) then 0 else 1
        | None, None ->
            let options: Interpreter.RunOptions =
                { OutDir = r.GetResult TrainArgs.Out
                  Resume = r.Contains TrainArgs.Resume
                  PrefixCache = r.TryGetResult TrainArgs.Prefix_Cache
                  Scale = scale
                  Device = r.TryGetResult TrainArgs.Device
                  Log = fun line -> Console.Out.WriteLine line }
            try
                let result = Interpreter.run options recipe
                let acc = result.TestAccuracy |> Array.mapi (fun i a -> sprintf "exit %d: %.4f" (i + 1) a) |> String.concat ", "
                printfn "test accuracy per exit: %s" acc
                printfn "run folder: %s" result.OutDir
                0
            with Interpreter.RunError msg ->
                eprintfn "error: %s" msg
                1
