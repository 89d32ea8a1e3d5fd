/// Recipes: builders, validation with paths, JSON round trips, and the interpreter's run folders.
module EarlyExit.Tests.Properties.RecipeTests

open System
open System.IO
open System.Text.Json
open Expecto
open FsCheck
open FsCheck.FSharp
open EarlyExit.Experiments.Recipes
open EarlyExit.Experiments.Recipes.Builders
open EarlyExit.Experiments.Runner
open EarlyExit.Tests.Support
open EarlyExit.Tests.Properties.Generators

let private settings =
    { Optimiser = { LearningRate = 1e-3; WeightDecay = 0.0; Schedule = Cosine }
      BatchSize = 32
      MaxEpochs = 2
      Patience = 1
      MaxStepsPerEpoch = 0
      WarmupEpochs = 3 }

/// A resnet34-family recipe with m exits (blocks [m], one exit per block).
let private recipeWith (m: int) (strategy: Strategy) =
    { Name = strategyName strategy
      Model = { Defaults.model "resnet34" with Classes = Some 10; Input = Some [ 1L; 28L; 28L ]; Width = Some 4; Blocks = Some [ m ]; Exits = Some [ 1..m ] }
      Data = Defaults.data "fashion-mnist"
      Augment = Defaults.augment
      RegulariserSettings = Map.empty
      Deterministic = false
      Dynamics = Defaults.dynamics
      Seed = 0
      Stages = stagesOf strategy m settings }

let private strategyGen =
    Gen.elements [ Joint; Disjoint; Mixed; BranchWise; Separate; Sequential [ ewc 100.0 ]; Sequential [ lwf 0.7 ]; Sequential [ ewc 10.0; lwf 0.2 ]; SequentialNoWarmup [ ewc 5.0 ]; SequentialNoWarmup [ lwf 0.5 ] ]

let builders =
    testList "builders" [
        testProperty "every builder's stages are valid, for 2 to 8 exits" (Prop.forAll (Arb.fromGen (Gen.zip strategyGen (Gen.choose (2, 8)))) (fun (strategy, m) ->
            Validation.problems (recipeWith m strategy) = []))

        testProperty "sequential builders train exits shallow to deep, each exactly once, after the warm-up" (Prop.forAll (Arb.fromGen (Gen.zip (Gen.elements [ [ ewc 100.0 ]; [ lwf 0.7 ]; [ ewc 1.0; lwf 1.0 ]; [ mas 1.0 ] ]) (Gen.choose (2, 8)))) (fun (reg, m) ->
            let stages = (recipeWith m (Sequential reg)).Stages
            let warm = stages.Head
            warm.Name = "warmup" && warm.LossExits = [ m, 1.0 ]
            && (stages.Tail |> List.map (fun s -> s.Exit)) = [ 1..m ]
            && (stages.Tail |> List.map (fun s -> s.LossExits |> List.map fst)) = [ for mu in 1..m -> [ mu ] ]
            && (stages.Tail |> List.forall (fun s -> s.Protects = [ 1 .. s.Exit - 1 ]))))

        test "sequential EWC freezes earlier heads, LwF trains them; both freeze deeper segments and the final classifier" {
            let ewc = (recipeWith 4 (Sequential [ ewc 100.0 ])).Stages[2]   // exit2
            let lwf = (recipeWith 4 (Sequential [ lwf 0.7 ])).Stages[2]
            Expect.equal ewc.Trainable [ "segment1"; "segment2"; "head2" ] "EWC stage 2"
            Expect.equal lwf.Trainable [ "segment1"; "segment2"; "head1"; "head2" ] "LwF stage 2"
        }

        test "disjoint trains the heads with the backbone frozen; mixed trains everything after the warm-up" {
            let d = (recipeWith 3 Disjoint).Stages
            Expect.equal d[1].Trainable [ "head1"; "head2" ] "disjoint heads stage"
            let mx = (recipeWith 3 Mixed).Stages
            Expect.equal mx[1].Trainable [ "segment1"; "segment2"; "segment3"; "head1"; "head2"; "head3" ] "mixed joint stage"
        }

        testProperty "JSON round trip gives the same recipe (settings completed with their defaults)" (Prop.forAll (Arb.fromGen (Gen.zip3 strategyGen (Gen.choose (2, 6)) (Gen.elements [ PerExitTeachers; PreviousStageTeacher ]))) (fun (strategy, m, teachers) ->
            let r = Settings.withLwfTeachers teachers (recipeWith m strategy) |> Settings.complete
            RecipeJson.parse (RecipeJson.toJson r) = Ok r))

        testProperty "JSON round trip of schedules: linear, geometric and per-stage strengths" (Prop.forAll (Arb.fromGen (Gen.zip (Gen.choose (3, 6)) (Gen.elements [ "ewc"; "lwf"; "mas" ]))) (fun (m, name) ->
            [ Strength.Linear(10.0, 1000.0); Strength.Geometric(0.2, 2.0); Strength.PerStage [ for k in 2..m -> float k / 10.0 ]; Strength.Constant 0.5 ]
            |> List.forall (fun strength ->
                let r = recipeWith m (Sequential [ penalty name strength ]) |> Settings.complete
                Validation.problems r = [] && RecipeJson.parse (RecipeJson.toJson r) = Ok r)))

        testProperty "the compact form (shared stage keys under \"defaults\", default values left out, $schema) reads back as the same recipe" (Prop.forAll (Arb.fromGen (Gen.zip3 strategyGen (Gen.choose (2, 6)) (Gen.elements [ "resnet34"; "msdnet" ]))) (fun (strategy, m, model) ->
            let r = (if model = "resnet34" then recipeWith m strategy else Scales.recipe Scales.Smoke strategy "msdnet" "fashion-mnist" 0) |> Settings.complete
            let compact = RecipeJson.toCompactJson (Some "schemas/recipe.schema.json") r
            let full = RecipeJson.toJson r
            RecipeJson.parse compact = Ok r && compact.Length < full.Length && compact.Contains "\"$schema\""
            && (r.Stages.Length < 2 || compact.Contains "\"defaults\"")))

        test "a stage's own value wins over \"defaults\"; unknown keys of defaults are reported with their path" {
            let r = recipeWith 3 (Sequential [ ewc 100.0 ]) |> Settings.complete
            let compact = Nodes.JsonNode.Parse(RecipeJson.toCompactJson None r)
            compact["stages"][1]["maxEpochs"] <- Nodes.JsonValue.Create 7
            compact["defaults"]["optimiser"]["lr"] <- Nodes.JsonValue.Create 0.01
            match RecipeJson.parse (compact.ToJsonString()) with
            | Ok back ->
                Expect.equal (back.Stages |> List.map (fun s -> s.MaxEpochs)) [ 3; 7; 2; 2 ] "stage 1's own maxEpochs (the warm-up's 3 its own too)"
                Expect.isTrue (back.Stages |> List.forall (fun s -> s.Optimiser.LearningRate = 0.01)) "every stage inherits the default lr"
            | Error e -> failtestf "%A" e
            compact["defaults"]["maxEpoch"] <- Nodes.JsonValue.Create 3
            match RecipeJson.parse (compact.ToJsonString()) with
            | Error [ e ] -> Expect.stringContains e "defaults.maxEpoch: unknown key" "the path"
            | other -> failtestf "expected one error, got %A" other
        }

        test "overrides: PATH=VALUE in the JSON shape changes exactly that, the name records it, mistakes are refused with their path" {
            let r = recipeWith 3 (Sequential [ ewc 100.0 ]) |> Settings.complete
            match RecipeJson.withOverrides [ "stages[3].maxEpochs", "5"; "model.width", "8"; "stages[2].regularisers", "[{\"name\":\"ewc\",\"lambda\":10}]" ] r with
            | Ok o ->
                Expect.equal (o.Stages |> List.map (fun s -> s.MaxEpochs)) [ 3; 2; 2; 5 ] "only stage 3"
                Expect.equal o.Model.Width (Some 8) "model.width"
                Expect.equal o.Stages[2].Regularisers [ { Name = "ewc"; Strength = Strength.Constant 10.0 } ] "a JSON value"
                Expect.equal o.Stages[3].Regularisers r.Stages[3].Regularisers "the other stages keep theirs"
                Expect.equal o.Name (r.Name + "+stages[3].maxEpochs=5,model.width=8,stages[2].regularisers=[{\"name\":\"ewc\",\"lambda\":10}]") "the name records what changed"
                Expect.equal { o with Name = r.Name; Stages = r.Stages; Model = r.Model } r "nothing else changed"
            | Error e -> failtestf "%A" e
            let err overrides = match RecipeJson.withOverrides overrides r with
                                | Error e -> String.Join("; ", e)
                                | Ok _ -> ""
            Expect.stringContains (err [ "stages[9].maxEpochs", "1" ]) "stages has 4 items ([0] to [3])" "past the last stage"
            Expect.stringContains (err [ "model.widht", "3" ]) "model.widht: unknown key" "a misspelt key"
            Expect.stringContains (err [ "stages[1].maxEpochs", "abc" ]) "stages[1].maxEpochs: expected an integer, found 'abc'" "a wrong type"
            Expect.stringContains (err [ "stages[1].maxEpochs", "0" ]) "stages[1].maxEpochs: must be at least 1" "a wrong meaning"
            Expect.stringContains (err [ "..", "1" ]) "give a path like" "no path"
            // NaN passed `lr <= 0` and then failed in the JSON writer with .NET's message (earlyexit train --lr nan).
            for v in [ "NaN"; "Infinity"; "-Infinity"; "1e400" ] do
                Expect.stringContains (err [ "stages[0].optimiser.lr", v ]) $"stages[0].optimiser.lr: expected a finite number, found '{v}'" $"lr {v}"
            Expect.stringContains (err [ "stages[0].lossWeights", "[1, \"NaN\"]" ]) "expected a finite number, found 'NaN'" "a list entry"
            Expect.equal (RecipeJson.withOverrides [] r) (Ok r) "no overrides: the recipe as it was"
        }

        test "a recipe says the settings of every regulariser it uses, defaults included; another teacher policy changes the cache key" {
            let r = recipeWith 3 (Sequential [ lwf 0.7 ])
            Expect.stringContains (RecipeJson.toJson r) "\"teachers\": \"per-exit\"" "the default is written"
            let prev = Settings.withLwfTeachers PreviousStageTeacher r
            Expect.stringContains (RecipeJson.toJson prev) "\"teachers\": \"previous-stage\"" "previous-stage is written"
            Expect.isFalse ((RecipeJson.toJson (recipeWith 3 Joint)).Contains "\"regularisers\": {") "a recipe without regularisers has no settings"
            Expect.notEqual (Interpreter.prefixKey r 3) (Interpreter.prefixKey prev 3) "different policies, different cache keys"
        }
    ]

let msdnetOptions =
    testList "MSDNet options" [
        test "configurable like the reference: step mode, base, step, growth, scales; recipes keep them through JSON" {
            let r = recipeWith 3 (Sequential [ lwf 0.2 ])
            let m =
                { Defaults.model "msdnet" with
                    Classes = Some 10
                    Input = Some [ 1L; 28L; 28L ]
                    Width = Some 4
                    Blocks = Some [ 4 ]
                    Growth = Some 4
                    StepMode = Some "lin_grow"
                    Base = Some 2
                    Step = Some 1
                    GrowthFactors = Some [ 1; 2 ]
                    BottleneckFactors = Some [ 1; 2 ] }
            let msd = { r with Model = m; Stages = stagesOf (Sequential [ lwf 0.2 ]) 4 settings } |> Settings.complete
            Expect.equal (Validation.problems msd) [] "valid"
            Expect.equal (RecipeJson.parse (RecipeJson.toJson msd)) (Ok msd) "JSON round trip"
            let config = EarlyExit.Models.ModelRegistry.MsdNetConfigOf(Validation.modelOptions m)
            Expect.equal (config.LayersPerBlock()) [| 2; 2; 3; 4 |] "lin_grow: base, then step*i+1"
            Expect.equal config.Scales 2 "two scales from grFactor 1-2"
        }
        test "a ResNet refuses MSDNet options, and MSDNet refuses exit positions" {
            let r = recipeWith 3 Joint
            let bad = { r with Model = { r.Model with Growth = Some 4 } }
            Expect.exists (Validation.problems bad) (fun e -> e.Contains "growth: an MSDNet option") "resnet + growth"
            let msd = { r with Model = { Defaults.model "msdnet" with Exits = Some [ 1; 2 ] } }
            Expect.exists (Validation.problems msd) (fun e -> e.Contains "MSDNet has one exit per block") "msdnet + exits"
        }
    ]

let private errorsOf (json: string) =
    match RecipeJson.parse json with
    | Ok _ -> []
    | Error es -> es

let private baseJson () = RecipeJson.toJson (recipeWith 3 (Sequential [ ewc 100.0 ]))

let validation =
    testList "recipe validation" [
        test "an unknown key is reported with its path" {
            let json = baseJson().Replace("\"batchSize\": 32,", "\"batchSize\": 32, \"lr\": 0.1,")
            Expect.contains (errorsOf json |> List.map (fun e -> e.Split(':')[0])) "stages[0].lr" "path of the unknown key"
        }
        test "an unknown setting, value or regulariser is reported with its path" {
            let json = baseJson().Replace("\"stages\":", "\"lwf\": { \"teachers\": \"oldest\" }, \"stages\":")
            Expect.exists (errorsOf json) (fun e -> e.StartsWith "regularisers.lwf.teachers: unknown value 'oldest' (per-exit, previous-stage)") "unknown policy (older form)"
            let json = baseJson().Replace("\"fisher\": \"empirical\"", "\"fisher\": \"exactly\"")
            Expect.exists (errorsOf json) (fun e -> e.StartsWith "regularisers.ewc.fisher: unknown value 'exactly' (empirical, empirical-naive, squared-minibatch, exact, sampled)") "unknown estimator"
            let json = baseJson().Replace("\"samples\": 0", "\"sample\": 5")
            Expect.exists (errorsOf json) (fun e -> e.StartsWith "regularisers.ewc.sample: ewc has no setting 'sample' (known: fisher, samples)") "unknown setting"
            let json = baseJson().Replace("\"regularisers\": {", "\"regularisers\": { \"si\": { \"c\": 1 },")
            Expect.exists (errorsOf json) (fun e -> e.StartsWith "regularisers.si: unknown regulariser 'si'; known: ewc, lwf, mas") "unknown regulariser in the settings"
            let json = baseJson().Replace("\"name\": \"ewc\"", "\"name\": \"ewk\"")
            Expect.exists (errorsOf json) (fun e -> e.StartsWith "stages[2].regularisers[0].name: unknown regulariser 'ewk'") "unknown regulariser in a stage"
            let json = baseJson().Replace("\"lambda\": 100", "\"lambda\": \"geometric:10\"")
            Expect.exists (errorsOf json) (fun e -> e.StartsWith "stages[2].regularisers[0].lambda: geometric: give two numbers") "a schedule needs its numbers"
        }
        test "a per-stage list needs one value per regularised stage, and every strength must be positive" {
            let r = recipeWith 4 (Sequential [ penalty "ewc" (Strength.PerStage [ 1.0; 2.0 ]) ])
            Expect.exists (Validation.problems r) (fun e -> e.EndsWith "2 values for the stages μ = 2..4; give 3, one per stage") "too short"
            let r = recipeWith 4 (Sequential [ penalty "lwf" (Strength.Linear(0.5, -1.0)) ])
            Expect.exists (Validation.problems r) (fun e -> e.Contains "a linear schedule from 0.5 to -1 must stay positive") "negative end"
        }
        test "the older single \"regulariser\" form and \"fisher\" section still read, as the list and EWC's settings" {
            let legacy = baseJson().Replace("\"regularisers\": [\n        {\n          \"name\": \"ewc\",\n          \"lambda\": 100\n        }\n      ]", "\"regulariser\": { \"kind\": \"ewc\", \"lambda\": 100 }")
            Expect.isTrue (legacy.Contains "\"kind\": \"ewc\"") "the test replaced the list"
            let legacy = legacy.Replace("\"regularisers\": {\n    \"ewc\": {\n      \"fisher\": \"empirical\",\n      \"samples\": 0\n    }\n  },", "\"fisher\": { \"estimator\": \"per-sample\", \"samples\": 0 },")
            Expect.isTrue (legacy.Contains "\"estimator\": \"per-sample\"") "the test replaced the settings"
            Expect.equal (RecipeJson.parse legacy) (Ok(recipeWith 3 (Sequential [ ewc 100.0 ]) |> Settings.complete)) "same recipe"
        }
        test "a wrong type is reported with its path" {
            let json = baseJson().Replace("\"maxEpochs\": 2,", "\"maxEpochs\": \"two\",")
            Expect.exists (errorsOf json) (fun e -> e.StartsWith "stages[1].maxEpochs: expected an integer") "wrong type"
        }
        test "an exit out of range is reported with its path" {
            let r = recipeWith 3 Joint
            let bad = { r with Stages = [ { r.Stages.Head with LossExits = [ 1, 0.5; 9, 0.5 ] } ] }
            Expect.contains (Validation.problems bad) "stages[0].lossExits[1]: exit 9 is out of range 1..3" "range"
        }
        test "a stage that trains nothing is reported" {
            let r = recipeWith 3 Joint
            let bad = { r with Stages = [ { r.Stages.Head with Trainable = [] } ] }
            Expect.contains (Validation.problems bad) "stages[0].train: the stage trains nothing" "nothing trains"
        }
        test "a regulariser with no earlier exit to protect is reported" {
            let r = recipeWith 3 (Sequential [ ewc 100.0 ])
            let bad = { r with Stages = r.Stages |> List.mapi (fun i s -> if i = 1 then { s with Regularisers = [ ewc 100.0 ]; Protects = [] } else s) }
            Expect.exists (Validation.problems bad) (fun e -> e.StartsWith "stages[1].regularisers: ewc(lambda=100) has no earlier exit to protect") "nothing to protect"
        }
        test "protecting an exit no earlier stage trained is reported" {
            let r = recipeWith 3 (Sequential [ lwf 0.5 ])
            let bad = { r with Stages = [ r.Stages[0]; r.Stages[2] ] }
            Expect.exists (Validation.problems bad) (fun e -> e.Contains "exit 1 was not trained by an earlier sequential stage") "no teacher"
        }
        test "a trainable group no loss reaches is reported" {
            let r = recipeWith 3 BranchWise
            let bad = { r with Stages = [ { r.Stages.Head with Trainable = [ "segment1"; "head1"; "segment3" ] } ] }
            Expect.exists (Validation.problems bad) (fun e -> e.StartsWith "stages[0].train: segment3 gets no gradient") "unreached group"
        }
        test "a file that is not JSON, and a missing file, are clear errors" {
            use dir = new TempDir()
            let f = dir.File "bad.json"
            File.WriteAllText(f, "{ not json")
            match RecipeJson.load f with
            | Error [ e ] -> Expect.stringContains e "not valid JSON" "parse error"
            | other -> failtestf "expected one error, got %A" other
            match RecipeJson.load (dir.File "missing.json") with
            | Error [ e ] -> Expect.stringContains e "recipe file not found" "missing"
            | other -> failtestf "expected one error, got %A" other
        }
    ]

/// A smoke-sized recipe on Fashion-MNIST (installed by .ci/run from Debian's package).
let private smokeRecipe (strategy: Strategy) =
    let r = Scales.recipe Scales.Smoke strategy "resnet34" "fashion-mnist" 0
    { r with Data = { r.Data with TrainLimit = 200; TestLimit = 100 }; Stages = r.Stages |> List.map (fun s -> { s with MaxStepsPerEpoch = 2 }) }

let private quiet: Interpreter.RunOptions =
    { OutDir = ""; Resume = false; PrefixCache = None; Scale = "smoke"; Device = Some "cpu"; Log = ignore }

let interpreter =
    testList "interpreter (run folders, on Fashion-MNIST)" [
        test "a finished run is not redone; a different recipe or an unfinished run without --resume is refused, and nothing is lost" {
            use dir = new TempDir()
            let out = dir.File "run"
            let first = Interpreter.run { quiet with OutDir = out } (smokeRecipe Joint)
            Expect.isFalse first.AlreadyFinished "first run trains"
            for f in [ "recipe.json"; "run.json"; "log.txt"; "metrics.json"; "test-logits.tensors" ] do
                Expect.isTrue (File.Exists(Path.Combine(out, f))) $"{f} written"
            // Provenance: the CPU, libtorch and oneDNN, and the kernels the numerics guard chose for this process.
            let verdict = EarlyExit.Native.NumericsGuard.Current
            for f in [ "run.json"; "metrics.json" ] do
                use doc = System.Text.Json.JsonDocument.Parse(File.ReadAllText(Path.Combine(out, f)))
                let n = doc.RootElement.GetProperty "numerics"
                Expect.equal (n.GetProperty("kernels").GetString()) verdict.Backend $"{f}: kernels in use"
                Expect.equal (n.GetProperty("cpu").GetString()) (verdict.Cpu.Describe()) $"{f}: CPU"
                Expect.equal (n.GetProperty("libtorch").GetString()) "2.10.0" $"{f}: libtorch version"
                Expect.stringStarts (n.GetProperty("onednn").GetString()) "v3." $"{f}: oneDNN version"
                Expect.equal (n.GetProperty("allocator").GetString()) EarlyExit.Native.NativeAllocator.Status $"{f}: what the allocator was set to"
                Expect.equal (n.GetProperty("trainingLayout").GetString()) EarlyExit.Native.ConvolutionLayout.TrainingStatus $"{f}: the layout it trained in, and why"
                Expect.stringStarts (n.GetProperty("nativeScalars").GetString()) "deferred release" $"{f}: native scalars released at safe points"
                Expect.equal (n.GetProperty("nnpack").GetString()) EarlyExit.Native.Nnpack.Status $"{f}: what was done about NNPACK"
            let info = EarlyExit.Experiments.Evaluation.RunFolder.readInfo out
            Expect.stringContains info.Numerics (verdict.Cpu.ModelName) "the table row carries the CPU"
            Expect.stringContains info.Numerics $"convolution kernels {verdict.Backend}" "and the kernels"
            let second = Interpreter.run { quiet with OutDir = out } (smokeRecipe Joint)
            Expect.isTrue second.AlreadyFinished "second run recognises the finished run"
            Expect.equal second.TestAccuracy first.TestAccuracy "same metrics"
            Expect.throws (fun () -> Interpreter.run { quiet with OutDir = out } (smokeRecipe Separate) |> ignore) "another recipe is refused"
            Expect.isTrue (File.Exists(Path.Combine(out, "metrics.json"))) "the first run's results are kept"
            // An unfinished run: remove the metrics, as a kill before the end would leave it.
            File.Delete(Path.Combine(out, "metrics.json"))
            Expect.throws (fun () -> Interpreter.run { quiet with OutDir = out } (smokeRecipe Joint) |> ignore) "unfinished run needs --resume"
            let resumed = Interpreter.run { quiet with OutDir = out; Resume = true } (smokeRecipe Joint)
            Expect.equal resumed.TestAccuracy first.TestAccuracy "resuming after the last stage gives the same model"
        }
        test "TensorBoard: Unix wall times, the training loss at one global step across stages, the recipe as text" {
            Expect.equal (EarlyExit.Experiments.Reports.TensorBoard.crc32c (ReadOnlySpan(Text.Encoding.ASCII.GetBytes "123456789"))) 0xE3069283u "CRC-32C check value"
            use dir = new TempDir()
            let out = dir.File "run"
            Interpreter.run { quiet with OutDir = out } (smokeRecipe Mixed) |> ignore
            let files = Directory.GetFiles(Path.Combine(out, "tensorboard"))
            Expect.equal files.Length 1 "one event file"
            let events = EarlyExit.Experiments.Reports.TensorBoard.read files[0]
            let now = float (DateTimeOffset.UtcNow.ToUnixTimeSeconds())
            Expect.isTrue (events |> List.forall (fun e -> abs (e.WallTime - now) < 3600.0)) "every wall time within an hour of now (Unix seconds)"
            Expect.equal events.Head.FileVersion (Some "brain.Event:2") "the file's first event"
            let losses = events |> List.filter (fun e -> e.Tag = "train/loss")
            // Mixed at this size: a warm-up and a joint stage of 2 steps each (1 epoch): steps 0, 1, then 2, 3.
            Expect.equal (losses |> List.map (fun e -> e.Step)) [ 0L; 1L; 2L; 3L ] "one global step across the stages"
            Expect.isTrue (losses |> List.forall (fun e -> e.Scalar |> Option.exists Double.IsFinite)) "finite losses"
            let recipe = events |> List.find (fun e -> e.Tag = "recipe")
            Expect.equal recipe.Text (Some(File.ReadAllText(Path.Combine(out, "recipe.json")))) "the recipe as text"
            Expect.isTrue (events |> List.exists (fun e -> e.Tag = "metrics" && e.Text.IsSome)) "the metrics at the end"
            Expect.isTrue (events |> List.exists (fun e -> e.Tag = "validation/accuracy_exit1")) "validation accuracy per exit"
        }
        test "a NaN loss stops the run with a message that names the numerics check and the kernels in use" {
            use dir = new TempDir()
            let r = smokeRecipe Joint
            let exploding = { r with Stages = r.Stages |> List.map (fun s -> { s with Optimiser = { s.Optimiser with LearningRate = 1e30 } }) }
            let msg =
                try
                    Interpreter.run { quiet with OutDir = dir.File "run" } exploding |> ignore
                    ""
                with Interpreter.RunError m -> m
            Expect.stringContains msg "the loss is" "says the loss is not finite"
            Expect.stringContains msg "numerics check" "names the numerics check"
            Expect.stringContains msg EarlyExit.Native.NumericsGuard.Current.Backend "and the kernels in use"
            Expect.stringContains msg "earlyexit doctor --recheck" "and how to check again"
        }
        test "the warm-up is reused from the prefix cache by the next strategy that starts with it" {
            use dir = new TempDir()
            let cache = dir.File "cache"
            let logs = ResizeArray<string>()
            Interpreter.run { quiet with OutDir = dir.File "disjoint"; PrefixCache = Some cache } (smokeRecipe Disjoint) |> ignore
            Interpreter.run { quiet with OutDir = dir.File "mixed"; PrefixCache = Some cache; Log = logs.Add } (smokeRecipe Mixed) |> ignore
            Expect.exists logs (fun l -> l.Contains "reused from the prefix cache" && l.Contains "warmup") "mixed reused disjoint's warm-up"
            Expect.isTrue (File.Exists(Path.Combine(dir.File "mixed", "metrics.json"))) "mixed finished"
        }
        test "a cached stage is reused only where it kept what later stages need (EWC Fisher vs LwF teacher)" {
            let ewc = smokeRecipe (Sequential [ ewc 100.0 ])
            let lwf = smokeRecipe (Sequential [ lwf 0.7 ])
            Expect.equal (Interpreter.prefixKey ewc 0) (Interpreter.prefixKey lwf 0) "the warm-up is shared"
            Expect.notEqual (Interpreter.prefixKey ewc 1) (Interpreter.prefixKey lwf 1) "exit 1 is not: EWC keeps a Fisher, LwF a teacher"
            let prev = Settings.withLwfTeachers PreviousStageTeacher lwf
            Expect.equal (Interpreter.prefixKey lwf 1) (Interpreter.prefixKey (Settings.withLwfTeachers PerExitTeachers prev) 1) "the key is a function of the recipe"
            Expect.equal (Interpreter.prefixKey lwf 0) (Interpreter.prefixKey prev 0) "both teacher policies share the warm-up"
        }
        test "teachers no later stage reads are released after each stage: the saved states hold exactly the ones still needed" {
            for teachers in [ PerExitTeachers; PreviousStageTeacher ] do
                use dir = new TempDir()
                let recipe = Settings.withLwfTeachers teachers (smokeRecipe (Sequential [ lwf 0.7 ]))
                let out = dir.File "run"
                Interpreter.run { quiet with OutDir = out } recipe |> ignore
                let last = recipe.Stages.Length - 1
                for i, s in List.indexed recipe.Stages do
                    let d = EarlyExit.Training.TensorStore.Load(Path.Combine(out, "stages", $"%02d{i}-{s.Name}.done.regs"))
                    let held = d["lwf/teachers"].data<int64>().ToArray() |> Array.map int |> List.ofArray
                    for t in d.Values do t.Dispose()
                    let expected =
                        match teachers with
                        | _ when s.Exit = 0 || i = last -> []
                        | PerExitTeachers -> [ 1 .. s.Exit ]
                        | PreviousStageTeacher -> [ s.Exit ]
                    Expect.equal held expected $"{Names.lwfTeachers teachers}: teachers held after stage {s.Name}"
                    Expect.equal (Set.ofList held) (Set.intersect (Set.ofList [ 1 .. max 0 s.Exit ]) (Interpreter.teachersReadAfter recipe i)) "as teachersReadAfter says"
        }
        test "the cache key of a prefix says which teachers it still holds" {
            let r = smokeRecipe (Sequential [ lwf 0.7 ])
            Expect.equal (r.Stages |> List.map (fun s -> s.Exit)) [ 0; 1; 2; 3; 4 ] "warm-up, then exits 1..4"
            // Same stages 0..2 and the same teachers kept by them (exits 1 and 2), but later stages that no longer
            // read teacher 1: after stage 2 one recipe still holds it, the other has released it.
            let other = { r with Stages = r.Stages |> List.mapi (fun i s -> if i = 3 then { s with Protects = [ 2 ] } elif i = 4 then { s with Protects = [ 3 ] } else s) }
            for i in 0..2 do
                Expect.equal (Interpreter.consolidation other i) (Interpreter.consolidation r i) $"stage {i} keeps the same"
            Expect.notEqual (Interpreter.prefixKey r 2) (Interpreter.prefixKey other 2) "teachers 1 and 2 held vs teacher 2 only"
            Expect.equal (Interpreter.prefixKey r 1) (Interpreter.prefixKey other 1) "after stage 1 both hold teacher 1"
        }
        test "experiment scripts run every LwF strategy once per teacher policy asked for, under distinct names" {
            let options: EarlyExit.Experiments.Experiments.Table1.Options =
                { Scale = Scales.Smoke; Data = None; DataRoot = None; Model = "resnet34"; Seeds = [ 0 ]; OutRoot = ""; Device = None
                  Strategies = None; LwfTeachers = [ PerExitTeachers; PreviousStageTeacher ]; Jobs = 1; Threads = 1
                  Deterministic = false; EqualSteps = false; Numerics = None; StageEpochs = None; Regularisers = None; Parts = None
                  Backend = EarlyExit.Experiments.Experiments.Table1.LocalBackend; Policy = EarlyExit.Experiments.Evaluation.Budget.Softmax
                  Experiment = "table1"; Arguments = []; Log = ignore }
            let rows = EarlyExit.Experiments.Experiments.Table1.recipesOf options "fashion-mnist" [ Joint; Sequential [ ewc 100.0 ]; Sequential [ lwf 0.7 ] ]
            Expect.equal (rows |> List.map fst) [ "joint"; "sequential-ewc"; "sequential-lwf"; "sequential-lwf-previous-stage-teacher" ] "row names"
            Expect.equal (rows |> List.map (fun (_, r) -> Settings.lwfTeachers r)) [ PerExitTeachers; PerExitTeachers; PerExitTeachers; PreviousStageTeacher ] "policies"
            Expect.equal (rows |> List.map (fun (_, r) -> r.Name) |> List.distinct |> List.length) 4 "distinct recipe names (run folders)"
        }
    ]

let all = testList "recipes" [ builders; msdnetOptions; validation; interpreter ]
