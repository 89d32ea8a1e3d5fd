/// The training-dynamics metrics against cases whose answer is known.
module EarlyExit.Tests.Properties.AnalysisTests

open System
open Expecto
open FsCheck
open TorchSharp
open EarlyExit.Analysis
open EarlyExit.Models
open EarlyExit.Training
open EarlyExit.Losses
open EarlyExit.Tests.Properties.Generators
open EarlyExit.Tests.Properties.Tests

type private Tensor = torch.Tensor

/// U·diag(s)·Vᵀ with orthonormal U (n×k) and V (d×k): a matrix of rank k with singular values s.
let private withSingularValues (n: int64) (d: int64) (s: float[]) (seed: int) =
    let g = torch.Generator(uint64 (abs seed + 3))
    let k = int64 s.Length
    let struct (u, _) = torch.linalg.qr(torch.randn([| n; k |], dtype = torch.float64, generator = g))
    let struct (v, _) = torch.linalg.qr(torch.randn([| d; k |], dtype = torch.float64, generator = g))
    u.mm(torch.diag(torch.tensor(s, dtype = torch.float64))).mm(v.t())

let rank =
    testList "numerical rank" [
        testProp "a constructed rank-k matrix has rank k; k equal singular values have effective rank k" (fun (PositiveInt k0) (seed: int) ->
            let k = 1 + k0 % 12
            use scope = torch.NewDisposeScope()
            let struct (r, eff, _, _) = RepresentationRank.Of(withSingularValues 40L 30L (Array.create k 2.5) seed)
            r = k && abs (eff - float k) < 1e-6)
        testProp "one dominant singular value: effective rank near 1, the rank counts what is above σ_max·max(N, D)·ε₃₂" (fun (seed: int) ->
            use scope = torch.NewDisposeScope()
            // Tolerance 1000 · 50 · 1.19e-7 ≈ 6e-3: singular values of 1 count, of 1e-3 do not.
            let struct (r, eff, tol, largest) = RepresentationRank.Of(withSingularValues 50L 20L [| 1000.0; 1.0; 1.0; 1.0 |] seed)
            let struct (r2, _, _, _) = RepresentationRank.Of(withSingularValues 50L 20L [| 1000.0; 1e-3; 1e-3 |] seed)
            r = 4 && r2 = 1 && eff > 1.0 && eff < 1.05 && abs (largest - 1000.0) < 1e-6 && abs (tol - 1000.0 * 50.0 * RepresentationRank.Float32Epsilon) < 1e-9)
        test "per segment of a network: every segment reported, rank at most min(N, D)" {
            let c = { Blocks = [| 1; 1 |]; BaseWidth = 4; Exits = [| 1; 2 |]; Classes = 3; Input = [| 1L; 8L; 8L |]; Seed = 1 }
            use net = build c
            let data = (TrainingTests.synthetic 1 3 c.Input 40).Validation
            let ranks = RepresentationRank.Compute(net, data, 25, 0)
            Expect.equal (ranks |> Seq.map (fun r -> r.Segment) |> List.ofSeq) [ 1; 2 ] "segments"
            for r in ranks do
                Expect.isTrue (r.Rank >= 1 && int64 r.Rank <= min r.Samples r.Features) $"segment {r.Segment}: {r.Rank} of {r.Samples}x{r.Features}"
        }
    ]

/// The loss terms of a batch as the loop makes them: every exit's cross-entropy in a live graph.
let private lossesOf (net: MultiExitNetwork) (x: Tensor) (y: Tensor) (weights: float list) =
    let logits = net.ForwardUpTo(x, net.ExitCount)
    [ for e, w in List.indexed weights -> ExitLoss(e + 1, w, torch.nn.functional.cross_entropy(logits[e], y)) ] |> ResizeArray

let gradients =
    testList "gradient dominance" [
        test "an exit whose loss is zero has a zero share; shares of a segment sum to 1; an exit reaches only its segments" {
            let c = { Blocks = [| 1; 1; 1 |]; BaseWidth = 4; Exits = [| 1; 2; 3 |]; Classes = 3; Input = [| 1L; 8L; 8L |]; Seed = 2 }
            use net = build c
            use scope = torch.NewDisposeScope()
            let x = torch.randn([| 6L; 1L; 8L; 8L |])
            let y = torch.tensor([| 0L; 1L; 2L; 0L; 1L; 2L |])
            let losses = lossesOf net x y [ 1.0; 1.0; 1.0 ]
            // Exit 2's loss made zero (in the graph: multiplied by 0).
            losses[1] <- ExitLoss(2, 1.0, losses[1].Loss.mul(torch.tensor 0.0f))
            let before = net.parameters() |> Seq.map (fun p -> p.detach().clone()) |> List.ofSeq
            let s: GradientSample = GradientDominanceProbe.Measure(net, losses, 0)
            Expect.equal s.Exits [| 1; 2; 3 |] "exits"
            for seg in 0..2 do
                Expect.equal (s.Shares[1][seg]) 0.0 $"exit 2 drives segment {seg + 1} by nothing"
                let total = s.Shares |> Array.sumBy (fun sh -> sh[seg])
                Expect.floatClose Accuracy.high total 1.0 $"segment {seg + 1}: shares sum to 1"
            Expect.equal (s.Norms[0][1]) 0.0 "exit 1 does not reach segment 2"
            Expect.equal (s.Norms[0][2]) 0.0 "nor segment 3"
            Expect.equal (s.Shares[2][2]) 1.0 "segment 3: only exit 3 reaches it"
            Expect.floatClose Accuracy.high (s.Cosines[0][0][0]) 1.0 "an exit's gradient is parallel to itself"
            Expect.isTrue (Double.IsNaN(s.Cosines[0][1][1])) "a zero gradient has no direction"
            // The measurement leaves the parameters and their gradients alone.
            Expect.isTrue (List.forall2 (fun (a: Tensor) (b: Tensor) -> same a b) before (net.parameters() |> Seq.map (fun p -> p.detach()) |> List.ofSeq)) "parameters"
            Expect.isTrue (net.parameters() |> Seq.forall (fun p -> isNull p.grad)) "no .grad written"
        }
        test "frozen segments are not measured; a loss weight scales an exit's norm" {
            let c = { Blocks = [| 1; 1 |]; BaseWidth = 4; Exits = [| 1; 2 |]; Classes = 3; Input = [| 1L; 8L; 8L |]; Seed = 3 }
            use net = build c
            use scope = torch.NewDisposeScope()
            let x = torch.randn([| 5L; 1L; 8L; 8L |])
            let y = torch.tensor([| 0L; 1L; 2L; 0L; 1L |])
            let a: GradientSample = GradientDominanceProbe.Measure(net, lossesOf net x y [ 1.0; 1.0 ], 0)
            let b: GradientSample = GradientDominanceProbe.Measure(net, lossesOf net x y [ 3.0; 1.0 ], 0)
            Expect.floatClose Accuracy.medium (b.Norms[0][0]) (3.0 * a.Norms[0][0]) "w = 3 triples exit 1's norm"
            for (_, p) in net.GroupParameters "segment1" do p.requires_grad <- false
            let frozen: GradientSample = GradientDominanceProbe.Measure(net, lossesOf net x y [ 1.0; 1.0 ], 0)
            Expect.equal (frozen.Norms[0][0], frozen.Norms[1][0]) (0.0, 0.0) "segment 1 frozen: nothing drives it"
            Expect.isTrue (frozen.Norms[1][1] > 0.0) "segment 2 still measured"
        }
    ]

let landscape =
    testList "loss landscape" [
        test "the value at (0, 0) is the model's own loss; the weights are restored bit for bit" {
            let c = { Blocks = [| 1; 1 |]; BaseWidth = 4; Exits = [| 1; 2 |]; Classes = 3; Input = [| 1L; 8L; 8L |]; Seed = 4 }
            use net = build c
            let data = (TrainingTests.synthetic 4 3 c.Input 40).Test
            let before = net.state_dict() |> Seq.map (fun kv -> kv.Key, kv.Value.clone()) |> Map.ofSeq
            for groups in [ PerturbedGroups.All; PerturbedGroups.Backbone; PerturbedGroups.Heads ] do
                let r = LossLandscape.Compute(net, data, 30, 5, 1.0, groups, 7)
                Expect.equal (r.Alphas[2]) 0.0 "0 is on the axis"
                let pick =
                    let o = Array.init data.Count id
                    Random(7).Shuffle(o)
                    Array.take r.Samples o
                let own = Evaluator.Evaluate(net, data.Subset pick, net.ExitCount, 256, torch.CPU)
                for e in 0 .. net.ExitCount - 1 do
                    Expect.equal (r.Loss[e][2][2]) (own.Loss[e]) $"{groups}: exit {e + 1} at the origin"
                    Expect.isTrue (r.Loss[e] |> Array.exists (Array.exists (fun v -> v <> own.Loss[e]))) $"{groups}: the plane is not flat"
            for KeyValue (k, t) in net.state_dict() do
                Expect.isTrue (same t before[k]) $"{k} restored"
        }
        test "filter-normalised directions: every filter has the norm of the weights' filter; 1-D parameters do not move" {
            let c = { Blocks = [| 1 |]; BaseWidth = 4; Exits = [| 1 |]; Classes = 3; Input = [| 1L; 8L; 8L |]; Seed = 5 }
            use net = build c
            let d = LossLandscape.Direction(net, PerturbedGroups.All, torch.Generator(1UL))
            for (name, p) in net.named_parameters() do
                if p.dim() <= 1L then Expect.equal (d[name].abs().max().item<float32>()) 0.0f $"{name} fixed"
                else
                    let dn = d[name].reshape(p.shape[0], -1L).norm(1)
                    let pn = p.detach().reshape(p.shape[0], -1L).norm(1)
                    Expect.isTrue (((dn - pn).abs().max().item<float32>()) < 1e-4f * (pn.max().item<float32>() + 1e-6f)) $"{name}: filter norms"
        }
    ]

let connectivity =
    testList "mode connectivity" [
        test "the ends with each run's own statistics equal the runs' own figures; a network joined to itself has no barrier" {
            let c = { Blocks = [| 1; 1 |]; BaseWidth = 4; Exits = [| 1; 2 |]; Classes = 3; Input = [| 1L; 8L; 8L |]; Seed = 6 }
            use a = build c
            use b = build { c with Seed = 7 }
            let data = TrainingTests.synthetic 6 3 c.Input 48
            let r = ModeConnectivity.Compute(a, b, data.Train, data.Test, 5, 40, 12, 3)
            let pick =
                let o = Array.init data.Test.Count id
                Random(3).Shuffle(o)
                Array.take 12 o
            let ownA = Evaluator.Evaluate(a, data.Test.Subset pick, 2, 256, torch.CPU)
            let ownB = Evaluator.Evaluate(b, data.Test.Subset pick, 2, 256, torch.CPU)
            Expect.equal r.OwnStatisticsA.Loss ownA.Loss "end A: run A's own loss"
            Expect.equal r.OwnStatisticsB.Accuracy ownB.Accuracy "end B: run B's own accuracy"
            Expect.equal (r.Path |> Array.map (fun p -> p.T)) [| 0.0; 0.25; 0.5; 0.75; 1.0 |] "five points"
            // From a network to itself every point is the network (up to rounding of (1 − t)·θ + t·θ).
            let self = ModeConnectivity.Compute(a, a, data.Train, data.Test, 4, 40, 12, 3)
            for e in 0..1 do
                Expect.isTrue (self.LossBarrier[e] < 1e-5) $"exit {e + 1}: no barrier from a network to itself"
                Expect.isTrue (self.Path |> Array.forall (fun p -> abs (p.Loss[e] - self.Path[0].Loss[e]) < 1e-5)) $"exit {e + 1}: the path is flat"
        }
    ]

let recorded =
    testList "recorded during training" [
        test "a run that records gradient dominance every step and ranks after every stage trains the same bits as one that does not" {
            use dir = new EarlyExit.Tests.Support.TempDir()
            let r = EarlyExit.Experiments.Runner.Scales.recipe EarlyExit.Experiments.Runner.Scales.Smoke EarlyExit.Experiments.Recipes.Builders.Mixed "resnet34" "fashion-mnist" 2
            let measured = { r with Dynamics = { GradientEvery = 1; RankSamples = 32 } }
            let quiet: EarlyExit.Experiments.Runner.Interpreter.RunOptions =
                { OutDir = ""; Resume = false; PrefixCache = None; Scale = "smoke"; Device = Some "cpu"; Log = ignore }
            EarlyExit.Experiments.Runner.Interpreter.run { quiet with OutDir = dir.File "plain" } r |> ignore
            EarlyExit.Experiments.Runner.Interpreter.run { quiet with OutDir = dir.File "measured" } measured |> ignore
            let sha (p: string) = Convert.ToHexString(System.Security.Cryptography.SHA256.HashData(IO.File.ReadAllBytes p))
            Expect.equal (sha (IO.Path.Combine(dir.File "measured", "test-logits.tensors"))) (sha (IO.Path.Combine(dir.File "plain", "test-logits.tensors"))) "same test logits"
            let stages = EarlyExit.Experiments.Analysis.Analyze.gradientsOf (dir.File "measured")
            Expect.equal (stages |> List.map (fun g -> g.Stage)) [ "warmup"; "joint" ] "both stages measured"
            Expect.isTrue (stages |> List.forall (fun g -> g.Samples = 3)) "every step of the 3 per stage"
            Expect.equal (EarlyExit.Experiments.Analysis.Analyze.ranksOf (dir.File "measured") |> List.length) 2 "a rank after each stage"
            Expect.isEmpty (EarlyExit.Experiments.Analysis.Analyze.gradientsOf (dir.File "plain")) "nothing recorded when not asked"
        }
    ]

let all = testList "training dynamics" [ rank; gradients; landscape; connectivity; recorded ]
