/// Recipes: builders, validation with paths, JSON round trips, and the interpreter's run folders.
module EarlyExit.Tests.Properties.RecipeTests

open System
open System.IO
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
      Fisher = Defaults.fisher
      LwfTeachers = PerExitTeachers
      Deterministic = false
      Seed = 0
      Stages = stagesOf strategy m settings }

let private strategyGen =
    Gen.elements [ Joint; Disjoint; Mixed; BranchWise; Separate; Sequential(Ewc 100.0); Sequential(Lwf 0.7); Sequential(EwcAndLwf(10.0, 0.2)); SequentialNoWarmup(Ewc 5.0); SequentialNoWarmup(Lwf 0.5) ]

let builders =
    testList "builders" [
        testProperty "every builder's stages are valid, for 2 to 8 exits" (Prop.forAll (Arb.fromGen (Gen.zip strategyGen (Gen.choose (2, 8)))) (fun (strategy, m) ->
            Validation.problems (recipeWith m strategy) = []))

        testProperty "sequential builders train exits shallow to deep, each exactly once, after the warm-up" (Prop.forAll (Arb.fromGen (Gen.zip (Gen.elements [ Ewc 100.0; Lwf 0.7; EwcAndLwf(1.0, 1.0) ]) (Gen.choose (2, 8)))) (fun (reg, m) ->
            let stages = (recipeWith m (Sequential reg)).Stages
            let warm = stages.Head
            warm.Name = "warmup" && warm.LossExits = [ m, 1.0 ]
            && (stages.Tail |> List.map (fun s -> s.Exit)) = [ 1..m ]
            && (stages.Tail |> List.map (fun s -> s.LossExits |> List.map fst)) = [ for mu in 1..m -> [ mu ] ]
            && (stages.Tail |> List.forall (fun s -> s.Protects = [ 1 .. s.Exit - 1 ]))))

        test "sequential EWC freezes earlier heads, LwF trains them; both freeze deeper segments and the final classifier" {
            let ewc = (recipeWith 4 (Sequential(Ewc 100.0))).Stages[2]   // exit2
            let lwf = (recipeWith 4 (Sequential(Lwf 0.7))).Stages[2]
            Expect.equal ewc.Trainable [ "segment1"; "segment2"; "head2" ] "EWC stage 2"
            Expect.equal lwf.Trainable [ "segment1"; "segment2"; "head1"; "head2" ] "LwF stage 2"
        }

        test "disjoint trains the heads with the backbone frozen; mixed trains everything after the warm-up" {
            let d = (recipeWith 3 Disjoint).Stages
            Expect.equal d[1].Trainable [ "head1"; "head2" ] "disjoint heads stage"
            let mx = (recipeWith 3 Mixed).Stages
            Expect.equal mx[1].Trainable [ "segment1"; "segment2"; "segment3"; "head1"; "head2"; "head3" ] "mixed joint stage"
        }

        testProperty "JSON round trip gives the same recipe" (Prop.forAll (Arb.fromGen (Gen.zip3 strategyGen (Gen.choose (2, 6)) (Gen.elements [ PerExitTeachers; PreviousStageTeacher ]))) (fun (strategy, m, teachers) ->
            let r = { recipeWith m strategy with LwfTeachers = teachers }
            RecipeJson.parse (RecipeJson.toJson r) = Ok r))

        test "the default LwF teacher policy is not written, so recipes from before the option keep their JSON and cache keys" {
            let r = recipeWith 3 (Sequential(Lwf 0.7))
            Expect.isFalse ((RecipeJson.toJson r).Contains "\"teachers\"") "per-exit is the default"
            Expect.stringContains (RecipeJson.toJson { r with LwfTeachers = PreviousStageTeacher }) "\"teachers\": \"previous-stage\"" "previous-stage is written"
            Expect.notEqual (Interpreter.prefixKey r 3) (Interpreter.prefixKey { r with LwfTeachers = PreviousStageTeacher } 3) "different policies, different cache keys"
        }
    ]

let msdnetOptions =
    testList "MSDNet options" [
        test "configurable like the reference: step mode, base, step, growth, scales; recipes keep them through JSON" {
            let r = recipeWith 3 (Sequential(Lwf 0.2))
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
            let msd = { r with Model = m; Stages = stagesOf (Sequential(Lwf 0.2)) 4 settings }
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

let private baseJson () = RecipeJson.toJson (recipeWith 3 (Sequential(Ewc 100.0)))

let validation =
    testList "recipe validation" [
        test "an unknown key is reported with its path" {
            let json = baseJson().Replace("\"batchSize\": 32,", "\"batchSize\": 32, \"lr\": 0.1,")
            Expect.contains (errorsOf json |> List.map (fun e -> e.Split(':')[0])) "stages[0].lr" "path of the unknown key"
        }
        test "an unknown LwF teacher policy is reported with its path" {
            let json = baseJson().Replace("\"stages\":", "\"lwf\": { \"teachers\": \"oldest\" }, \"stages\":")
            Expect.exists (errorsOf json) (fun e -> e.StartsWith "lwf.teachers: unknown LwF teacher policy 'oldest'") "unknown policy"
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
            let r = recipeWith 3 (Sequential(Ewc 100.0))
            let bad = { r with Stages = r.Stages |> List.mapi (fun i s -> if i = 1 then { s with Regulariser = Ewc 100.0; Protects = [] } else s) }
            Expect.exists (Validation.problems bad) (fun e -> e.StartsWith "stages[1].regulariser: ewc(lambda=100) has no earlier exit to protect") "nothing to protect"
        }
        test "protecting an exit no earlier stage trained is reported" {
            let r = recipeWith 3 (Sequential(Lwf 0.5))
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
                Expect.stringStarts (n.GetProperty("nativeScalars").GetString()) "deferred release" $"{f}: native scalars released at safe points"
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
            let ewc = smokeRecipe (Sequential(Ewc 100.0))
            let lwf = smokeRecipe (Sequential(Lwf 0.7))
            Expect.equal (Interpreter.prefixKey ewc 0) (Interpreter.prefixKey lwf 0) "the warm-up is shared"
            Expect.notEqual (Interpreter.prefixKey ewc 1) (Interpreter.prefixKey lwf 1) "exit 1 is not: EWC keeps a Fisher, LwF a teacher"
            let prev = { lwf with LwfTeachers = PreviousStageTeacher }
            Expect.equal (Interpreter.prefixKey lwf 1) (Interpreter.prefixKey { prev with LwfTeachers = PerExitTeachers } 1) "the key is a function of the recipe"
            Expect.equal (Interpreter.prefixKey lwf 0) (Interpreter.prefixKey prev 0) "both teacher policies share the warm-up"
        }
        test "teachers no later stage reads are released after each stage: the saved states hold exactly the ones still needed" {
            for teachers in [ PerExitTeachers; PreviousStageTeacher ] do
                use dir = new TempDir()
                let recipe = { smokeRecipe (Sequential(Lwf 0.7)) with LwfTeachers = teachers }
                let out = dir.File "run"
                Interpreter.run { quiet with OutDir = out } recipe |> ignore
                let last = recipe.Stages.Length - 1
                for i, s in List.indexed recipe.Stages do
                    let d = EarlyExit.Training.TensorStore.Load(Path.Combine(out, "stages", $"%02d{i}-{s.Name}.done.regs"))
                    let held = d["meta/teachers"].data<int64>().ToArray() |> Array.map int |> List.ofArray
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
            let r = smokeRecipe (Sequential(Lwf 0.7))
            Expect.equal (r.Stages |> List.map (fun s -> s.Exit)) [ 0; 1; 2; 3; 4 ] "warm-up, then exits 1..4"
            // Same stages 0..2 and the same teachers kept by them (exits 1 and 2), but later stages that no longer
            // read teacher 1: after stage 2 one recipe still holds it, the other has released it.
            let other = { r with Stages = r.Stages |> List.mapi (fun i s -> if i = 3 then { s with Protects = [ 2 ] } elif i = 4 then { s with Protects = [ 3 ] } else s) }
            for i in 0..2 do
                Expect.equal (Interpreter.consolidation other.LwfTeachers other.Stages i) (Interpreter.consolidation r.LwfTeachers r.Stages i) $"stage {i} keeps the same"
            Expect.notEqual (Interpreter.prefixKey r 2) (Interpreter.prefixKey other 2) "teachers 1 and 2 held vs teacher 2 only"
            Expect.equal (Interpreter.prefixKey r 1) (Interpreter.prefixKey other 1) "after stage 1 both hold teacher 1"
        }
        test "experiment scripts run every LwF strategy once per teacher policy asked for, under distinct names" {
            let options: EarlyExit.Experiments.Experiments.Table1.Options =
                { Scale = Scales.Smoke; Data = None; DataRoot = None; Model = "resnet34"; Seeds = [ 0 ]; OutRoot = ""; Device = None
                  Strategies = None; LwfTeachers = [ PerExitTeachers; PreviousStageTeacher ]; Jobs = 1; Threads = 1
                  Deterministic = false; EqualSteps = false; Numerics = None; StageEpochs = None; Regularisers = None; Log = ignore }
            let rows = EarlyExit.Experiments.Experiments.Table1.recipesOf options "fashion-mnist" [ Joint; Sequential(Ewc 100.0); Sequential(Lwf 0.7) ]
            Expect.equal (rows |> List.map fst) [ "joint"; "sequential-ewc"; "sequential-lwf"; "sequential-lwf-previous-stage-teacher" ] "row names"
            Expect.equal (rows |> List.map (fun (_, r) -> r.LwfTeachers)) [ PerExitTeachers; PerExitTeachers; PerExitTeachers; PreviousStageTeacher ] "policies"
            Expect.equal (rows |> List.map (fun (_, r) -> r.Name) |> List.distinct |> List.length) 4 "distinct recipe names (run folders)"
        }
    ]

let all = testList "recipes" [ builders; msdnetOptions; validation; interpreter ]
