/// Properties of the training engine: EWC, the per-sample Fisher, LwF, freezing, memory, resume.
module EarlyExit.Tests.Properties.TrainingTests

open System
open System.IO
open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open EarlyExit.Models
open EarlyExit.Data
open EarlyExit.Losses
open EarlyExit.Training
open EarlyExit.Experiments.Recipes
open EarlyExit.Experiments.Recipes.Builders
open EarlyExit.Experiments.Runner
open EarlyExit.Tests.Support
open EarlyExit.Tests.Properties.Generators
open EarlyExit.Tests.Properties.Tests

/// Random images and labels in memory: train, validation and test splits.
let synthetic (seed: int) (classes: int) (shape: int64[]) (n: int) =
    let rng = Random seed
    let make name count =
        let size = int (shape[0] * shape[1] * shape[2])
        let px = Array.init (count * size) (fun _ -> byte (rng.Next 256))
        let labels = Array.init count (fun i -> i % classes)
        ImageDataset(name, px, labels, int shape[0], int shape[1], int shape[2], classes, Array.create (int shape[0]) 0.5f, Array.create (int shape[0]) 0.25f)
    DataSplits(make "synthetic/train" n, make "synthetic/validation" (max classes (n / 4)), make "synthetic/test" (max classes (n / 4)), "memory")

let private close (a: torch.Tensor) (b: torch.Tensor) =
    let scale = b.abs().max().item<float32>()
    let diff = (a - b).abs()
    let bound = (b.abs() * 1e-3f) + (1e-5f * max scale 1e-12f)
    (diff - bound).max().item<float32>() <= 0.0f

let fisher =
    testList "per-sample Fisher" [
        testPropArbs "fast per-sample Fisher (layer inputs x output gradients) equals one backward pass per sample" (fun (c: SmallResNet) ->
            use net = build c
            let data = synthetic c.Seed c.Classes c.Input 12
            let exit = 1 + (c.Seed % net.ExitCount)
            // Per-sample conv gradients are formed a few samples at a time: one at a time, a few, or the whole batch.
            let saved = FisherInformation.PerSampleChunkFloats
            FisherInformation.PerSampleChunkFloats <- [| 1L; 2000L; 1L <<< 19 |][c.Seed % 3]
            let fast =
                try FisherInformation.Compute(net, exit, data.Train, FisherEstimator.PerSampleEmpirical, 12, 5, c.Seed)
                finally FisherInformation.PerSampleChunkFloats <- saved
            let slow = FisherInformation.Compute(net, exit, data.Train, FisherEstimator.PerSampleEmpiricalNaive, 12, 5, c.Seed)
            let ok =
                fast.Count = slow.Count && fast.Count > 0
                && fast.Keys |> Seq.forall (fun k -> slow.ContainsKey k && close fast[k] slow[k])
            for t in Seq.append fast.Values slow.Values do t.Dispose()
            ok)

        testPropArbs "Fishers are non-negative and cover exactly the parameters of segments 1..exit" (fun (c: SmallResNet) ->
            use net = build c
            let data = synthetic c.Seed c.Classes c.Input 8
            let exit = 1 + (c.Seed % net.ExitCount)
            let f = FisherInformation.Compute(net, exit, data.Train, FisherEstimator.PerSampleEmpirical, 8, 4, c.Seed)
            let expected = net.SegmentParameters(exit) |> Seq.map (fun struct (n, _) -> n) |> set
            let ok = set f.Keys = expected && f.Values |> Seq.forall (fun t -> t.min().item<float32>() >= 0.0f)
            for t in f.Values do t.Dispose()
            ok)

        testPropN 5 "with batches of one sample the squared-minibatch estimator equals the per-sample one" (fun (seed: int) ->
            let c = { Blocks = [| 1; 1 |]; BaseWidth = 4; Exits = [| 1; 2 |]; Classes = 3; Input = [| 1L; 8L; 8L |]; Seed = abs seed % 1000 }
            use net = build c
            let data = synthetic c.Seed 3 c.Input 6
            let a = FisherInformation.Compute(net, 2, data.Train, FisherEstimator.SquaredMinibatchGradient, 6, 1, 1)
            let b = FisherInformation.Compute(net, 2, data.Train, FisherEstimator.PerSampleEmpirical, 6, 3, 1)
            let ok = a.Keys |> Seq.forall (fun k -> close a[k] b[k])
            for t in Seq.append a.Values b.Values do t.Dispose()
            ok)
    ]

let private randomTerms (seed: int) =
    let g = torch.Generator(uint64 (abs seed + 1))
    [ for shape in [ [| 3L; 4L |]; [| 5L |]; [| 2L; 2L; 3L |] ] ->
        let theta = torch.randn(shape, generator = g)
        let fisher = torch.rand(shape, generator = g)
        let anchor = torch.randn(shape, generator = g)
        theta, fisher, anchor ]

let ewcPenalty =
    testList "EWC penalty" [
        testProp "zero at the anchor, with zero gradient there" (fun (seed: int) ->
            use scope = torch.NewDisposeScope()
            let terms = randomTerms seed |> List.map (fun (_, f, a) -> a.clone().requires_grad_(true), f, a)
            let p = Ewc.Penalty(ResizeArray(terms |> List.map (fun (t, f, a) -> struct (t, f, a))))
            p.backward()
            p.item<float32>() = 0.0f && terms |> List.forall (fun (t, _, _) -> t.grad.abs().max().item<float32>() = 0.0f))

        testProp "never negative" (fun (seed: int) ->
            use scope = torch.NewDisposeScope()
            let terms = randomTerms seed |> List.map (fun (t, f, a) -> struct (t, f, a))
            Ewc.Penalty(ResizeArray terms).item<float32>() >= 0.0f)

        testProp "quadratic in the displacement: R(θ* + t·d) = t²·R(θ* + d)" (fun (seed: int) (NormalFloat t0) ->
            let t = (abs t0 % 10.0) + 0.1
            use scope = torch.NewDisposeScope()
            let terms = randomTerms seed
            let at (scale: float) =
                Ewc.Penalty(ResizeArray(terms |> List.map (fun (d, f, a) -> struct (a + d * scale, f, a)))).to_type(torch.float64).item<float>()
            let r1, rt = at 1.0, at t
            abs (rt - t * t * r1) <= 1e-4 * abs (t * t * r1) + 1e-6)
    ]

let lwfKl =
    testList "LwF KL" [
        testProp "KL(current || teacher) is never negative" (fun (seed: int) ->
            use scope = torch.NewDisposeScope()
            let g = torch.Generator(uint64 (abs seed + 7))
            let a = torch.randn([| 6L; 5L |], generator = g) * 3.0f
            let b = torch.randn([| 6L; 5L |], generator = g) * 3.0f
            Lwf.KlCurrentToTeacher(a, b).item<float32>() >= -1e-7f)

        testProp "zero when the distributions agree (logits equal up to a per-row shift), positive when they differ" (fun (seed: int) ->
            use scope = torch.NewDisposeScope()
            let g = torch.Generator(uint64 (abs seed + 11))
            let a = torch.randn([| 4L; 6L |], generator = g)
            let shift = torch.randn([| 4L; 1L |], generator = g) * 5.0f
            let same = Lwf.KlCurrentToTeacher(a, a + shift).item<float32>()
            let b = a.clone()
            b[0L, 0L] <- torch.tensor(a[0L, 0L].item<float32>() + 1.0f)
            let differ = Lwf.KlCurrentToTeacher(a, b).item<float32>()
            abs same < 1e-6f && differ > 0.0f)

        test "matches the definition on a worked example" {
            // p = softmax([0, ln 3]) = [1/4, 3/4], q = [1/2, 1/2]: KL(p||q) = 1/4 ln(1/2) + 3/4 ln(3/2)
            use scope = torch.NewDisposeScope()
            let p = torch.tensor([| 0.0f; float32 (log 3.0) |]).reshape(1L, 2L)
            let q = torch.zeros(1L, 2L)
            let expected = 0.25 * log 0.5 + 0.75 * log 1.5
            Expect.floatClose Accuracy.medium (float (Lwf.KlCurrentToTeacher(p, q).item<float32>())) expected "KL value"
        }
    ]

let private settings =
    { Optimiser = { LearningRate = 1e-2; WeightDecay = 0.0; Schedule = Constant }
      BatchSize = 8
      MaxEpochs = 1
      Patience = 0
      MaxStepsPerEpoch = 2
      WarmupEpochs = 1 }

let private strategies =
    [ Joint; Disjoint; Mixed; BranchWise; Separate; Sequential [ ewc 100.0 ]; Sequential [ lwf 0.7 ]; Sequential [ ewc 10.0; lwf 0.5 ] ]

let private recipeFor (c: SmallResNet) (strategy: Strategy) =
    { Name = "t"
      Model = { Defaults.model "resnet34" with Classes = Some c.Classes; Input = Some(List.ofArray c.Input); Width = Some c.BaseWidth; Blocks = Some(List.ofArray c.Blocks); Exits = Some(List.ofArray c.Exits) }
      Data = Defaults.data "fashion-mnist"
      Augment = { CropPadding = 1; Flip = true; Mix = Some Defaults.mix }
      RegulariserSettings = Map.empty |> Penalties.withSetting "ewc" "samples" "8"
      Deterministic = false
      Dynamics = Defaults.dynamics
      Seed = c.Seed
      Stages = stagesOf strategy c.Exits.Length settings }

let lwfTeachers =
    testList "LwF teacher policies" [
        test "with one protected exit, the previous-stage teacher and per-exit teachers train the same network bit-for-bit" {
            let c = { Blocks = [| 1; 1 |]; BaseWidth = 4; Exits = [| 1; 2 |]; Classes = 3; Input = [| 1L; 8L; 8L |]; Seed = 9 }
            let data = synthetic 3 3 c.Input 24
            let final teachers =
                let recipe = Settings.withLwfTeachers teachers (recipeFor c (Sequential [ lwf 0.5 ]))
                use net = build c
                use regs = Interpreter.regulariserSet recipe
                for i in 0 .. recipe.Stages.Length - 1 do
                    StageTrainer.Run(net, Interpreter.plan recipe i None, data, regs, torch.CPU) |> ignore
                net.state_dict() |> Seq.map (fun kv -> kv.Key, kv.Value.clone()) |> Map.ofSeq
            let a = final PerExitTeachers
            let b = final PreviousStageTeacher
            for KeyValue (k, t) in a do
                Expect.isTrue (same t b[k]) $"{k} equal"
        }
        test "the previous-stage policy needs only the deepest protected exit's teacher; per-exit needs all" {
            let c = { Blocks = [| 1; 1; 1 |]; BaseWidth = 4; Exits = [| 1; 2; 3 |]; Classes = 3; Input = [| 1L; 8L; 8L |]; Seed = 4 }
            use net = build c
            let recipe = recipeFor c (Sequential [ lwf 0.5 ])
            let with' teachers = Settings.withLwfTeachers teachers recipe
            // Each policy's run holds only the teacher of exit 2.
            let regsOf teachers =
                let regs = Interpreter.regulariserSet (with' teachers)
                regs.Get<EarlyExit.Regularisers.LwfRegulariser>().Teachers[2] <- net.FrozenCopy()
                regs
            use regsPrevious = regsOf PreviousStageTeacher
            use regsPerExit = regsOf PerExitTeachers
            let last = recipe.Stages.Length - 1
            let plan teachers = Interpreter.plan (with' teachers) last None
            Expect.sequenceEqual (plan PreviousStageTeacher).ProtectedExits [| 1; 2 |] "the last stage protects exits 1 and 2"
            StageTrainer.Validate(net, plan PreviousStageTeacher, regsPrevious)
            let e = Expect.throwsC (fun () -> StageTrainer.Validate(net, plan PerExitTeachers, regsPerExit)) id
            Expect.stringContains e.Message "LwF has no teacher for exit 1" "names the missing teacher"
            // What the interpreter keeps: a teacher after a stage only where a later stage's deepest protected exit is its exit.
            let kept teachers = [ for i in 0 .. last -> List.contains "lwf" (Interpreter.consolidation (with' teachers) i) ]
            Expect.equal (kept PerExitTeachers |> List.filter id |> List.length) 2 "per-exit: exits 1 and 2 keep teachers"
            Expect.equal (kept PreviousStageTeacher |> List.filter id |> List.length) 2 "previous-stage: stage 2 uses teacher 1, stage 3 teacher 2"
        }
    ]

/// Batch norms away from their initial state: running statistics and affine parameters drawn from the seed.
let private shakeBatchNorms (net: MultiExitNetwork) (seed: int) =
    use _ = torch.no_grad()
    let g = torch.Generator(uint64 seed)
    for m in net.modules() do
        match m with
        | :? TorchSharp.Modules.BatchNorm2d as bn ->
            let c = bn.running_mean.shape[0]
            bn.running_mean.copy_(torch.randn([| c |], generator = g) * 0.5) |> ignore
            bn.running_var.copy_(torch.rand([| c |], generator = g) * 2.0 + 0.1) |> ignore
            bn.weight.copy_(torch.randn([| c |], generator = g)) |> ignore
            bn.bias.copy_(torch.randn([| c |], generator = g) * 0.5) |> ignore
        | _ -> ()

let private inputOf (c: SmallResNet) (n: int64) =
    torch.randn([| n; c.Input[0]; c.Input[1]; c.Input[2] |], generator = torch.Generator(uint64 c.Seed + 7UL))

let frozenCopies =
    testList "frozen copies (LwF teachers): batch norm folded into the convolutions" [
        testPropertyWithConfig { configWithArbs with maxTest = 12 } "a frozen copy's logits equal its source's in eval mode, up to float rounding" (fun (c: SmallResNet) ->
            use net = build c
            shakeBatchNorms net c.Seed
            use frozen = net.FrozenCopy()
            net.eval() |> ignore
            use x = inputOf c 5L
            use _ = torch.no_grad()
            use scope = torch.NewDisposeScope()
            let folded = frozen.modules() |> Seq.filter (fun m -> match box m with :? IBatchNormFoldable as f -> f.IsFolded | _ -> false) |> Seq.length
            // The MAC counter hooks the leaf modules, which a folded forward does not call: it counts unfolded.
            let macs (n: MultiExitNetwork) = (EarlyExit.Flops.MacCounter.Count n).Exits |> Seq.map (fun e -> e.CumulativeMacs) |> Seq.toList
            folded = Array.sum c.Blocks + 1 // the stem and every block
            && Array.forall2 close (frozen.forward x) (net.forward x)
            && macs frozen = macs net)
        test "the fold serves eval forwards without gradients only, and is taken again by Freeze" {
            let c = { Blocks = [| 1; 1 |]; BaseWidth = 4; Exits = [| 1; 2 |]; Classes = 3; Input = [| 1L; 8L; 8L |]; Seed = 9 }
            use net = build c
            shakeBatchNorms net 9
            use frozen = net.FrozenCopy()
            net.eval() |> ignore
            use x = inputOf c 4L
            use scope = torch.NewDisposeScope()
            let noGrad (n: MultiExitNetwork) = (use _ = torch.no_grad() in (n.forward x)[1])
            let unfolded () = ((frozen.forward x)[1]).detach()
            let folded () = noGrad frozen
            let reference = noGrad net
            // With gradients enabled the copy runs the very ops of its source: equal bit for bit.
            Expect.isTrue (same (unfolded ()) reference) "gradients enabled: the unfolded forward"
            Expect.isTrue (close (folded ()) reference) "no gradients: the fold, equal up to rounding"
            let before = folded ()
            // A running variance changed after Freeze: the fold still holds the old statistics until Freeze runs again.
            let bn = frozen.modules() |> Seq.pick (fun m -> match m with :? TorchSharp.Modules.BatchNorm2d as b -> Some b | _ -> None)
            do (use _ = torch.no_grad()
                use four = 4.0.ToScalar()
                bn.running_var.mul_(four) |> ignore)
            Expect.isTrue (same (folded ()) before) "stale until Freeze"
            Expect.isFalse (close (unfolded ()) before) "the unfolded forward sees the change"
            frozen.Freeze()
            Expect.isTrue (close (folded ()) (unfolded ())) "Freeze takes the fold again"
            // Train mode never uses the fold, with or without gradients.
            frozen.train() |> ignore
            Expect.isTrue (same (noGrad frozen) (unfolded ())) "train mode: no fold"
        }
        test "LwF teachers saved and loaded give the logits of the teachers that were saved, bit for bit" {
            let c = { Blocks = [| 1; 1; 1 |]; BaseWidth = 4; Exits = [| 1; 2; 3 |]; Classes = 3; Input = [| 1L; 8L; 8L |]; Seed = 6 }
            use net = build c
            shakeBatchNorms net 6
            let settings = readOnlyDict [ "teachers", "per-exit" ]
            use saved = new EarlyExit.Regularisers.LwfRegulariser(settings)
            saved.Teachers[1] <- net.FrozenCopy()
            saved.Teachers[2] <- net.FrozenCopy()
            use state = new EarlyExit.Regularisers.StateWriter()
            saved.Save(state, "lwf/")
            use loaded = new EarlyExit.Regularisers.LwfRegulariser(settings)
            loaded.Load(state.Tensors, "lwf/", net)
            use x = inputOf c 6L
            use _ = torch.no_grad()
            use scope = torch.NewDisposeScope()
            for nu in [ 1; 2 ] do
                Expect.isTrue (same (loaded.Teachers[nu].ForwardExit(x, nu)) (saved.Teachers[nu].ForwardExit(x, nu))) $"teacher {nu}"
        }
    ]

let private stateOf (net: MultiExitNetwork) (groups: string list) =
    groups
    |> List.collect (fun g ->
        [ for (n, p) in net.GroupParameters g -> n, p.detach().clone()
          for (n, b) in net.GroupBuffers g -> n, b.detach().clone() ])

let freezing =
    testList "freezing" [
        testPropertyWithConfig { configWithArbs with maxTest = 12 } "after any stage of any built recipe, frozen parameters and buffers are bit-for-bit unchanged" (fun (c0: SmallResNet) (pick: NonNegativeInt) ->
            let c = { c0 with Exits = (if c0.Exits.Length < 2 then [| 1; c0.Blocks |> Array.sum |] |> Array.distinct else c0.Exits) }
            let strategy = strategies[pick.Get % strategies.Length]
            let recipe = recipeFor c strategy
            match Validation.validate recipe with
            | Error _ when c.Exits.Length < 2 -> true // a one-exit network has no disjoint heads stage
            | Error e -> failwithf "built recipe is invalid: %A" e
            | Ok recipe ->
                use net = build c
                use regs = Interpreter.regulariserSet recipe
                let data = synthetic c.Seed c.Classes c.Input 24
                recipe.Stages
                |> List.indexed
                |> List.forall (fun (i, s) ->
                    let frozen = net.Groups() |> Seq.filter (fun g -> not (List.contains g s.Trainable)) |> Seq.toList
                    let before = stateOf net frozen
                    StageTrainer.Run(net, Interpreter.plan recipe i None, data, regs, torch.CPU) |> ignore
                    let after = stateOf net frozen |> Map.ofList
                    let ok = before |> List.forall (fun (n, t) -> same t after[n])
                    for (_, t) in before do t.Dispose()
                    for t in after.Values do t.Dispose()
                    ok))
    ]

let memory =
    testList "memory" [
        test "live tensors return to their starting count after a stage, plus exactly what consolidation keeps" {
            let c = { Blocks = [| 1; 1 |]; BaseWidth = 4; Exits = [| 1; 2 |]; Classes = 3; Input = [| 1L; 8L; 8L |]; Seed = 3 }
            let settle () =
                for _ in 1..3 do
                    GC.Collect()
                    GC.WaitForPendingFinalizers()
                torch.Tensor.TotalCount
            for strategy, teachers in [ Joint, PerExitTeachers; Disjoint, PerExitTeachers; Sequential [ ewc 10.0 ], PerExitTeachers
                                        Sequential [ lwf 0.5 ], PerExitTeachers; Sequential [ lwf 0.5 ], PreviousStageTeacher ] do
                let recipe = Settings.withLwfTeachers teachers (recipeFor c strategy)
                use net = build c
                // What one teacher (a frozen copy of the network) holds.
                let teacherTensors =
                    let before = settle ()
                    let t = net.FrozenCopy()
                    let held = settle () - before
                    t.Dispose()
                    held
                use regs = Interpreter.regulariserSet recipe
                // Importances and anchors of the quadratic regularisers (EWC), counted one tensor each.
                let quadratic () =
                    regs.All |> Seq.sumBy (function
                        | :? EarlyExit.Regularisers.QuadraticRegulariser as q -> q.State.Importance.Count + q.State.Anchor.Count
                        | _ -> 0)
                let data = synthetic 1 3 c.Input 24
                for i, s in List.indexed recipe.Stages do
                    let lwf = List.contains "lwf" (Interpreter.consolidation recipe i)
                    let quadraticBefore = quadratic ()
                    let before = settle ()
                    StageTrainer.Run(net, Interpreter.plan recipe i None, data, regs, torch.CPU) |> ignore
                    let after = settle ()
                    let kept = int64 (quadratic () - quadraticBefore) + (if lwf then teacherTensors else 0L)
                    Expect.equal (after - before) kept $"{strategyName strategy} stage {s.Name}: live tensors grow by what consolidation keeps"
        }
    ]

/// Stops a stage after a given epoch, as a kill would (the checkpoint of that epoch is written first).
type private KillAfter(epoch: int) =
    interface ITrainingObserver with
        member _.OnEpochEnd(_, r) = if r.Epoch = epoch then raise (OperationCanceledException "killed")

let resume =
    testList "resume" [
        test "a stage killed after an epoch and resumed ends bit-for-bit where an uninterrupted one ends" {
            let c = { Blocks = [| 1; 1 |]; BaseWidth = 4; Exits = [| 1; 2 |]; Classes = 3; Input = [| 1L; 8L; 8L |]; Seed = 5 }
            let recipe = { recipeFor c Joint with Stages = [ { (stagesOf Joint 2 settings).Head with MaxEpochs = 3; Optimiser = { LearningRate = 1e-2; WeightDecay = 0.01; Schedule = Cosine } } ] }
            let data = synthetic 2 3 c.Input 32
            let final (kill: bool) =
                use dir = new TempDir()
                let p = Interpreter.plan recipe 0 (Some dir.Path)
                use regs = new EarlyExit.Regularisers.RegulariserSet()
                if kill then
                    use net = build c
                    Expect.throwsT<OperationCanceledException> (fun () -> StageTrainer.Run(net, p, data, regs, torch.CPU, KillAfter 1) |> ignore) "killed"
                use net = build c
                let result = StageTrainer.Run(net, p, data, regs, torch.CPU)
                result.EpochsRun, net.state_dict() |> Seq.map (fun kv -> kv.Key, kv.Value.clone()) |> Map.ofSeq
            let epochsA, a = final false
            let epochsB, b = final true
            Expect.equal epochsB epochsA "same history length"
            for KeyValue (k, t) in a do
                Expect.isTrue (same t b[k]) $"{k} equal after resume"
        }
    ]

let private smallMsdNet () =
    torch.manual_seed 11L |> ignore
    ModelRegistry.Create("msdnet", ModelOptions(NumClasses = 3, InputShape = [| 1L; 20L; 20L |], BaseWidth = 4, Blocks = [| 3 |]))

let msdnet =
    testList "MSDNet in the training engine" [
        test "fast per-sample Fisher equals one backward pass per sample on every exit" {
            use net = smallMsdNet ()
            let data = synthetic 4 3 [| 1L; 20L; 20L |] 10
            for exit in 1 .. net.ExitCount do
                let fast = FisherInformation.Compute(net, exit, data.Train, FisherEstimator.PerSampleEmpirical, 10, 4, 0)
                let slow = FisherInformation.Compute(net, exit, data.Train, FisherEstimator.PerSampleEmpiricalNaive, 10, 4, 0)
                Expect.equal (set fast.Keys) (set slow.Keys) $"exit {exit}: same parameters"
                for k in fast.Keys do
                    Expect.isTrue (close fast[k] slow[k]) $"exit {exit}: {k}"
                for t in Seq.append fast.Values slow.Values do t.Dispose()
        }
        test "a frozen copy (its batch norms folded into the convolutions) gives its source's logits in eval mode" {
            use net = smallMsdNet ()
            shakeBatchNorms net 12
            use frozen = net.FrozenCopy()
            net.eval() |> ignore
            use x = torch.randn([| 3L; 1L; 20L; 20L |], generator = torch.Generator(5UL))
            use _ = torch.no_grad()
            use scope = torch.NewDisposeScope()
            let folded = frozen.modules() |> Seq.filter (fun m -> match box m with :? IBatchNormFoldable as f -> f.IsFolded | _ -> false) |> Seq.length
            Expect.equal folded (net.modules() |> Seq.filter (fun m -> m :? TorchSharp.Modules.BatchNorm2d) |> Seq.length) "every batch norm folded"
            Array.iteri2 (fun i a b -> Expect.isTrue (close a b) $"exit {i + 1}") (frozen.forward x) (net.forward x)
        }
        test "sequential EWC and LwF stages leave frozen segments and heads bit-for-bit unchanged" {
            for strategy in [ Sequential [ ewc 100.0 ]; Sequential [ lwf 0.5 ] ] do
                use net = smallMsdNet ()
                let data = synthetic 5 3 [| 1L; 20L; 20L |] 24
                let recipe =
                    { Name = "msd"
                      Model = { Defaults.model "msdnet" with Classes = Some 3; Input = Some [ 1L; 20L; 20L ]; Width = Some 4; Blocks = Some [ 3 ] }
                      Data = Defaults.data "fashion-mnist"
                      Augment = { CropPadding = 1; Flip = true; Mix = Some Defaults.mix }
                      RegulariserSettings = Map.empty |> Penalties.withSetting "ewc" "samples" "8"
                      Deterministic = false
                      Dynamics = Defaults.dynamics
                      Seed = 0
                      Stages = stagesOf strategy net.ExitCount settings }
                use regs = Interpreter.regulariserSet recipe
                Expect.equal (Validation.problems recipe) [] "valid recipe"
                for i, s in List.indexed recipe.Stages do
                    let frozen = net.Groups() |> Seq.filter (fun g -> not (List.contains g s.Trainable)) |> Seq.toList
                    let before = stateOf net frozen
                    StageTrainer.Run(net, Interpreter.plan recipe i None, data, regs, torch.CPU) |> ignore
                    let after = stateOf net frozen |> Map.ofList
                    for (n, t) in before do
                        Expect.isTrue (same t after[n]) $"{strategyName strategy} stage {s.Name}: {n}"
        }
    ]

/// Gradients of the joint loss of one network at batch 5, every parameter, in float64 (a float32 network's are
/// converted after the backward pass); `train` chooses BatchNorm's mode.
let private jointGradients (net: MultiExitNetwork) (x: torch.Tensor) (y: torch.Tensor) (train: bool) =
    if train then net.train() |> ignore else net.eval() |> ignore
    net.zero_grad()
    use scope = torch.NewDisposeScope()
    let logits = net.forward x
    let loss = (logits |> Array.map (fun l -> torch.nn.functional.cross_entropy(l, y)) |> Array.reduce (+)) / float logits.Length
    loss.backward()
    [| for p in net.parameters() -> p.grad.detach().to_type(torch.float64).clone().MoveToOuterDisposeScope() |]

/// Copies parameters and buffers between two networks of one architecture (any dtype).
let private copyState (src: MultiExitNetwork) (dst: MultiExitNetwork) =
    use _ = torch.no_grad()
    let from = src.state_dict()
    for kv in dst.state_dict() do kv.Value.copy_(from[kv.Key]) |> ignore

let private relativeError (a: torch.Tensor[]) (b: torch.Tensor[]) =
    let sq (t: torch.Tensor) = t.square().sum().item<float>()
    sqrt (Array.map2 (fun (p: torch.Tensor) q -> sq (p - q)) a b |> Array.sum) / sqrt (Array.sumBy sq b)

/// float32 gradients of the joint loss against float64 ones (ATen computes float64 convolutions itself: oneDNN has
/// none), for every registered family at the smoke and cpu scales' sizes and on a 3-channel input, under the kernels
/// the numerics guard chose for this process, three seeds each at batch 5. Bounds, from 8 seeds of 8 such
/// configurations on three correct backends (oneDNN capped at AVX, at SSE4.1, and oneDNN off): with BatchNorm in eval
/// mode float32 agrees to 1e-7 typically and 4.4e-5 at worst (a 3-scale MSDNet; its float64 gradient is smooth there,
/// so this is rounding, not a tie); the bound is 1e-3. In train mode the backward pass through batch statistics
/// cancels large terms: typically 1e-6, single seeds up to 8.5e-3; the bound is on the median over the seeds, 1e-2.
/// The faults this exists for (AMD EPYCs) gave 0.06-0.31 and NaN on every batch; NaN and passes that differ are
/// caught exactly.
let gradientOracle =
    // Every family trained NCHW, and the ResNet also trained channels-last (EarlyExit.Native.ConvolutionLayout.Training:
    // on 1 thread, or from 16 channels), whatever this process's thread count.
    let configs =
        [ for family in ModelRegistry.Families do
            for scale, data in [ Scales.Smoke, "fashion-mnist"; Scales.Cpu, "fashion-mnist"; Scales.Smoke, "cifar100" ] -> family.Name, scale, data, EarlyExit.Native.TrainingLayout.Nchw
          yield "resnet34", Scales.Cpu, "fashion-mnist", EarlyExit.Native.TrainingLayout.ChannelsLast
          yield "resnet34", Scales.Smoke, "cifar100", EarlyExit.Native.TrainingLayout.ChannelsLast ]
    testList "float32 gradients of every model family against float64" [
        for family, scale, data, layout in configs ->
            let trained = if layout = EarlyExit.Native.TrainingLayout.ChannelsLast then ", trained channels-last" else ""
            test $"{family}, {Scales.name scale} scale, {data}'s input{trained}: eval mode within 1e-3; train mode finite, repeatable bit for bit, median within 1e-2" {
                let spec = (Scales.settings scale family data).Model
                let trainErrors = ResizeArray<float>()
                let before = EarlyExit.Native.ConvolutionLayout.Training
                EarlyExit.Native.ConvolutionLayout.Training <- layout
                use _restore = { new IDisposable with member _.Dispose() = EarlyExit.Native.ConvolutionLayout.Training <- before }
                for seed in [ 1L; 2L; 3L ] do
                    torch.manual_seed seed |> ignore
                    use net = ModelRegistry.Create(family, Validation.modelOptions spec)
                    use net64 = net.CreateSibling()
                    net64.``to``(torch.float64) |> ignore
                    copyState net net64
                    use x = torch.randn(Array.append [| 5L |] net.InputShape)
                    use x64 = x.to_type(torch.float64)
                    use y = torch.randint(int64 net.NumClasses, [| 5L |])
                    let evalErr = relativeError (jointGradients net x y false) (jointGradients net64 x64 y false)
                    Expect.isLessThanOrEqual evalErr 1e-3 $"seed {seed}, eval mode: float32 against float64"
                    let g1 = jointGradients net x y true
                    let g2 = jointGradients net x y true
                    let g64 = jointGradients net64 x64 y true
                    Expect.isTrue (g1 |> Array.forall (fun g -> g.isfinite().all().item<bool>())) $"seed {seed}, train mode: finite"
                    Expect.isTrue (Array.forall2 (fun (a: torch.Tensor) (b: torch.Tensor) -> a.eq(b).all().item<bool>()) g1 g2) $"seed {seed}, train mode: two passes bit-identical"
                    trainErrors.Add(relativeError g1 g64)
                    for g in Seq.concat [ g1; g2; g64 ] do g.Dispose()
                let median = (Seq.sort trainErrors |> Seq.toArray)[trainErrors.Count / 2]
                let each = trainErrors |> Seq.map (sprintf "%.1e") |> String.concat " "
                Expect.isLessThanOrEqual median 1e-2 $"train mode, median over seeds of float32 against float64 (each: {each})"
            }
        // The network check every run and evaluation makes (EarlyExit.Native.NetworkCheck): it must pass wherever the
        // oracle above passes, fail on a fault, and leave the network and the global generator as they were.
        yield test "the network check passes every family at the smoke and cpu scales under the guard's kernels, fails on a simulated fault, and touches neither the network nor the generator" {
            for family in ModelRegistry.Families do
                for scale, data in [ Scales.Smoke, "fashion-mnist"; Scales.Cpu, "fashion-mnist"; Scales.Smoke, "cifar100" ] do
                    let spec = (Scales.settings scale family.Name data).Model
                    torch.manual_seed 4L |> ignore
                    use net = ModelRegistry.Create(family.Name, Validation.modelOptions spec)
                    net.train() |> ignore
                    let before = [| for kv in net.state_dict() -> kv.Key, kv.Value.clone() |]
                    torch.manual_seed 9L |> ignore
                    let r = EarlyExit.Native.NetworkCheck.Run net
                    use drawn = torch.randn(3L)
                    torch.manual_seed 9L |> ignore
                    use expected = torch.randn(3L)
                    let where = $"{family.Name}, {Scales.name scale}, {data}, kernels {EarlyExit.Native.NumericsGuard.Current.Backend}"
                    Expect.isTrue r.Passed $"{where}: {r.Summary()}"
                    Expect.isLessThanOrEqual (max r.NchwError r.ChannelsLastError) 1e-4 $"{where}: within float32 rounding (measured 1e-7)"
                    Expect.isTrue (drawn.eq(expected).all().item<bool>()) $"{where}: the global generator draws what it would have drawn"
                    Expect.isTrue net.training $"{where}: still in train mode"
                    let after = net.state_dict()
                    for k, v in before do
                        Expect.isTrue (v.eq(after[k]).all().item<bool>()) $"{where}: {k} untouched"
                        v.Dispose()
            use net = ModelRegistry.Create("msdnet", ModelOptions(NumClasses = 4, InputShape = [| 1L; 20L; 20L |], BaseWidth = 4, Blocks = [| 3 |], GrowthRate = 2))
            let r = EarlyExit.Native.NetworkCheck.Run(net, simulateFault = true)
            Expect.isFalse r.Passed "a simulated fault fails"
            Expect.stringContains (r.Summary()) "gradient off by" $"says what: {r.Summary()}"
            Expect.floatClose Accuracy.medium r.NchwError 0.3 "the whole gradient 1.3 times float64's"
            Expect.isTrue (net.named_parameters() |> Seq.exists (fun struct (name, _) -> name = r.WorstParameter)) $"names a parameter: {r.WorstParameter}"
        }
        // A channels-last input, which a user's data or plugin may hand in, and the ResNet's own training layout on 1
        // thread (EarlyExit.Native.ConvolutionLayout.Training): the kernels of the family 25 model 1 EPYC are wrong only there. The
        // ResNet's shape meets the broken one (a 1x1 stride-2 shortcut from 4 channels at 8x8, batch 3): under
        // --numerics default there its train-mode gradient is 0.20 off; under default-nchw (NCHW inputs, never trained
        // channels-last) and on correct kernels within 1e-4, as on NCHW input.
        yield test "a channels-last input: a ResNet's and an MSDNet's train-mode gradients within 1e-4 of float64, as on an NCHW input" {
            let before = EarlyExit.Native.ConvolutionLayout.Training
            use _restore = { new IDisposable with member _.Dispose() = EarlyExit.Native.ConvolutionLayout.Training <- before }
            for family, options, shape in
                [ "resnet34", ModelOptions(NumClasses = 5, InputShape = [| 3L; 8L; 8L |], BaseWidth = 4, Blocks = [| 1; 1; 1 |], ExitPositions = [| 1; 2; 3 |]), [| 3L; 3L; 8L; 8L |]
                  "msdnet", ModelOptions(NumClasses = 5, InputShape = [| 3L; 20L; 20L |], BaseWidth = 4, Blocks = [| 3 |]), [| 6L; 3L; 20L; 20L |] ] do
                torch.manual_seed 11L |> ignore
                use net = ModelRegistry.Create(family, options)
                use net64 = net.CreateSibling()
                net64.``to``(torch.float64) |> ignore
                copyState net net64
                use x64 = torch.randn(shape, dtype = torch.float64)
                use y = torch.randint(5L, [| shape[0] |])
                let g64 = jointGradients net64 x64 y true
                use x = x64.to_type(torch.float32)
                use channelsLast = x.permute(0L, 2L, 3L, 1L).contiguous().permute(0L, 3L, 1L, 2L)
                Expect.isFalse (channelsLast.is_contiguous()) "the input is channels-last"
                for trainingLayout in [ EarlyExit.Native.TrainingLayout.Nchw; EarlyExit.Native.TrainingLayout.ChannelsLast ] do
                  EarlyExit.Native.ConvolutionLayout.Training <- trainingLayout
                  for layout, input in [ "NCHW", x; "channels-last", channelsLast ] do
                    let g = jointGradients net input y true
                    let err = relativeError g g64
                    Expect.isLessThanOrEqual err 1e-4 $"{family}, {layout} input, trained {trainingLayout}, kernels {EarlyExit.Native.NumericsGuard.Current.Backend}: the whole gradient within float32 rounding of float64 ({err:G2})"
                    for t in g do t.Dispose()
                for t in g64 do t.Dispose()
        }
    ]

/// Runs this test executable's gc-stress mode in a child process (an abort must not end the test run).
let private gcStress (steps: int) (env: (string * string) list) =
    let self = Reflection.Assembly.GetEntryAssembly().Location
    let psi = Diagnostics.ProcessStartInfo("dotnet", [ self; "gc-stress"; string steps ])
    psi.RedirectStandardOutput <- true
    psi.RedirectStandardError <- true
    psi.Environment.Remove EarlyExit.Native.NativeScalars.Variable |> ignore
    for k, v in env do psi.Environment[k] <- v
    use p = Diagnostics.Process.Start psi
    let out = p.StandardOutput.ReadToEndAsync()
    let err = p.StandardError.ReadToEnd()
    p.WaitForExit()
    p.ExitCode, out.Result + err

let nativeScalars =
    testList "native scalars (TorchSharp frees them from the finalizer)" [
        test "a disposed scalar is queued, and freed at the second safe point after it" {
            Expect.isTrue EarlyExit.Native.NativeScalars.Active EarlyExit.Native.NativeScalars.Status
            // Scalars that earlier tests left to the garbage collector are queued by the finalizer thread whenever it
            // runs: finalize them all first, so that none arrives between the counts below (one run here saw 56).
            for _ in 1..2 do
                GC.Collect()
                GC.WaitForPendingFinalizers()
            EarlyExit.Native.NativeScalars.ReleaseDeferred() |> ignore
            EarlyExit.Native.NativeScalars.ReleaseDeferred() |> ignore
            let struct (d0, r0, p0) = EarlyExit.Native.NativeScalars.Counts()
            Expect.equal p0 0UL "nothing waits after two safe points"
            for i in 1..100 do (float i).ToScalar().Dispose()
            let struct (d1, r1, p1) = EarlyExit.Native.NativeScalars.Counts()
            Expect.equal (d1 - d0, r1 - r0, p1) (100UL, 0UL, 100UL) "queued, not freed"
            Expect.equal (EarlyExit.Native.NativeScalars.ReleaseDeferred()) 0L "the first safe point frees what was queued before the previous one: nothing"
            Expect.equal (EarlyExit.Native.NativeScalars.ReleaseDeferred()) 100L "the second frees them"
            let struct (_, r2, p2) = EarlyExit.Native.NativeScalars.Counts()
            Expect.equal (r2 - r0, p2) (100UL, 0UL) "all freed"
        }
        test "the training loop survives garbage collections forced during its native calls" {
            let code, output = gcStress 400 []
            Expect.equal code 0 $"gc-stress exits normally:\n{output}"
            Expect.stringContains output "no abort; native scalars: deferred release" "with deferred release"
        }
        test "the stress has teeth: with TorchSharp's own release (scalars freed by the finalizer) the same loop aborts" {
            // Measured here: 10 aborts in 10 runs of 400 steps; three tries make a false pass about 1 in 4,000.
            let codes = ResizeArray<int>()
            while codes.Count < 3 && not (codes.Exists(fun c -> c <> 0)) do
                codes.Add(fst (gcStress 400 [ EarlyExit.Native.NativeScalars.Variable, "immediate" ]))
            Expect.exists codes (fun c -> c <> 0) $"at least one of three runs aborts (exit codes {List.ofSeq codes})"
        }
    ]

let all = testList "training engine" [ gradientOracle; nativeScalars; msdnet; fisher; ewcPenalty; lwfKl; lwfTeachers; frozenCopies; freezing; memory; resume ]
