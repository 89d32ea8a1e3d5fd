/// The regulariser plugins: the Fisher variants and MAS against per-sample oracles, schedules, the registry, and a
/// regulariser registered from outside the core running through recipes, the interpreter and resume.
module EarlyExit.Tests.Properties.RegulariserTests

open System
open System.Collections.Generic
open System.IO
open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open EarlyExit.Models
open EarlyExit.Data
open EarlyExit.Losses
open EarlyExit.Regularisers
open EarlyExit.Training
open EarlyExit.Experiments.Recipes
open EarlyExit.Experiments.Recipes.Builders
open EarlyExit.Experiments.Runner
open EarlyExit.Tests.Support
open EarlyExit.Tests.Properties.Generators
open EarlyExit.Tests.Properties.Tests

type private Tensor = torch.Tensor

let private close (a: Tensor) (b: Tensor) =
    let scale = b.abs().max().item<float32>()
    let diff = (a - b).abs()
    let bound = (b.abs() * 1e-3f) + (1e-5f * max scale 1e-12f)
    (diff - bound).max().item<float32>() <= 0.0f

/// The slow, obvious reference: one forward and backward pass per sample (and per class), in eval mode, of
/// `objective logits sample`, each parameter's gradient reduced by `reduce` and weighted, then averaged.
/// `objective` returns (weight, scalar) pairs: the reduced gradient of each scalar is multiplied by its weight.
let private oracle (net: MultiExitNetwork) (exit: int) (data: ImageDataset) (objective: Tensor -> int -> (float32 * Tensor) list) (reduce: Tensor -> Tensor) =
    net.eval() |> ignore
    let targets = net.SegmentParameters(exit) |> Seq.toList
    for struct (_, p) in targets do p.requires_grad <- true
    let sums = targets |> List.map (fun struct (n, p) -> n, torch.zeros_like(p)) |> Map.ofList
    for i in 0 .. data.Count - 1 do
        let terms = objective (net.ForwardExit(data.Images(ReadOnlySpan [| i |]), exit)) i |> List.length
        for k in 0 .. terms - 1 do
            use scope = torch.NewDisposeScope()
            net.zero_grad()
            // A fresh forward pass for every term: no graph is reused.
            let weight, scalar = (objective (net.ForwardExit(data.Images(ReadOnlySpan [| i |]), exit)) i)[k]
            scalar.backward()
            use _ = torch.no_grad()
            for struct (n, p) in targets do
                if not (isNull p.grad) then sums[n].add_((reduce p.grad).mul(torch.tensor weight)) |> ignore
    for t in sums.Values do t.div_(torch.tensor (float32 data.Count)) |> ignore
    net.zero_grad()
    sums

let private agree (fast: Dictionary<string, Tensor>) (slow: Map<string, Tensor>) =
    let ok = fast.Count = slow.Count && fast.Count > 0 && fast.Keys |> Seq.forall (fun k -> slow.ContainsKey k && close fast[k] slow[k])
    for t in fast.Values do t.Dispose()
    for t in slow.Values do t.Dispose()
    ok

/// Every sample's log-probability of every class, weighted by its probability: the exact Fisher's definition.
let private exactTerms (logits: Tensor) (_: int) =
    let logp = torch.nn.functional.log_softmax(logits, 1L)
    let p = logp.exp().detach()
    [ for c in 0L .. logits.shape[1] - 1L -> p[0L, c].item<float32>(), logp[0L, c] ]

let private square (g: Tensor) = g * g

let fisherVariants =
    testList "Fisher variants and MAS against one backward pass per sample" [
        testPropArbs "exact Fisher: Σ_c ŷ(c)(∂ log ŷ(c)/∂θ)², per sample" (fun (c: SmallResNet) ->
            use net = build c
            let data = (TrainingTests.synthetic c.Seed c.Classes c.Input 8).Train
            let exit = 1 + (c.Seed % net.ExitCount)
            let fast = FisherInformation.Compute(net, exit, data, FisherEstimator.Exact, 0, 3, c.Seed)
            agree fast (oracle net exit data exactTerms square))

        testPropArbs "sampled Fisher: (∂ log ŷ(ŷ_i)/∂θ)² with the label drawn from the model, per sample" (fun (c: SmallResNet) ->
            use net = build c
            let data = (TrainingTests.synthetic c.Seed c.Classes c.Input 8).Train
            let exit = 1 + (c.Seed % net.ExitCount)
            let labels = FisherInformation.SampleLabels(net, exit, data, [| 0 .. data.Count - 1 |], 5, c.Seed)
            let fast = FisherInformation.Compute(net, exit, data, FisherEstimator.Sampled, 0, 3, c.Seed)
            let terms (logits: Tensor) (i: int) = [ 1.0f, torch.nn.functional.log_softmax(logits, 1L)[0L, labels[i]] ]
            agree fast (oracle net exit data terms square))

        testPropArbs "MAS importance: mean over samples of |∂‖logits‖²/∂θ|, per sample" (fun (c: SmallResNet) ->
            use net = build c
            let data = (TrainingTests.synthetic c.Seed c.Classes c.Input 8).Train
            let exit = 1 + (c.Seed % net.ExitCount)
            let saved = PerSampleGradients.ChunkFloats
            PerSampleGradients.ChunkFloats <- [| 1L; 2000L; 1L <<< 19 |][c.Seed % 3]
            let fast =
                try MasRegulariser.Compute(net, exit, data, 0, 3, c.Seed)
                finally PerSampleGradients.ChunkFloats <- saved
            let terms (logits: Tensor) (_: int) = [ 1.0f, (logits * logits).sum() ]
            agree fast (oracle net exit data terms (fun g -> g.abs())))

        test "MSDNet: exact and sampled Fishers and MAS equal their oracles on every exit" {
            torch.manual_seed 11L |> ignore
            use net = ModelRegistry.Create("msdnet", ModelOptions(NumClasses = 3, InputShape = [| 1L; 20L; 20L |], BaseWidth = 4, Blocks = [| 3 |]))
            let data = (TrainingTests.synthetic 4 3 [| 1L; 20L; 20L |] 6).Train
            for exit in 1 .. net.ExitCount do
                Expect.isTrue (agree (FisherInformation.Compute(net, exit, data, FisherEstimator.Exact, 0, 4, 0)) (oracle net exit data exactTerms square)) $"exact, exit {exit}"
                let labels = FisherInformation.SampleLabels(net, exit, data, [| 0 .. data.Count - 1 |], 4, 0)
                let sampled (logits: Tensor) (i: int) = [ 1.0f, torch.nn.functional.log_softmax(logits, 1L)[0L, labels[i]] ]
                Expect.isTrue (agree (FisherInformation.Compute(net, exit, data, FisherEstimator.Sampled, 0, 4, 0)) (oracle net exit data sampled square)) $"sampled, exit {exit}"
                let mas (logits: Tensor) (_: int) = [ 1.0f, (logits * logits).sum() ]
                Expect.isTrue (agree (MasRegulariser.Compute(net, exit, data, 0, 4, 0)) (oracle net exit data mas (fun g -> g.abs()))) $"MAS, exit {exit}"
        }

        test "a sampled label is the first class whose cumulative probability exceeds u (worked by hand)" {
            let p = [| 0.2; 0.5; 0.3 |]
            for u, expected in [ 0.0, 0; 0.1999, 0; 0.2, 1; 0.69, 1; 0.7, 2; 0.9999, 2 ] do
                Expect.equal (FisherInformation.DrawLabel(ReadOnlySpan p, u)) expected $"u = {u}"
        }

        test "the draws are uniform and do not depend on the batch: deciles of 20,000 draws, and labels in batches of 1 and 7" {
            let counts = Array.zeroCreate 10
            for s in 0 .. 19999 do
                let u = FisherInformation.Uniform(s % 37, s)
                Expect.isTrue (u >= 0.0 && u < 1.0) "in [0, 1)"
                counts[int (u * 10.0)] <- counts[int (u * 10.0)] + 1
            // 2000 expected per decile; 5 standard deviations is about ±212.
            for k, n in Array.indexed counts do
                Expect.isTrue (abs (n - 2000) < 212) $"decile {k}: {n}"
            let c = { Blocks = [| 1; 1 |]; BaseWidth = 4; Exits = [| 1; 2 |]; Classes = 4; Input = [| 1L; 8L; 8L |]; Seed = 2 }
            use net = build c
            let data = (TrainingTests.synthetic 2 4 c.Input 21).Train
            let all = [| 0 .. data.Count - 1 |]
            Expect.sequenceEqual (FisherInformation.SampleLabels(net, 2, data, all, 1, 5)) (FisherInformation.SampleLabels(net, 2, data, all, 7, 5)) "batches of 1 and 7"
        }
    ]

/// A regulariser defined outside the core, in one type plus its registration: L2 to the previous stage's
/// parameters, Σ_k (θ_k − θ*_k)² over segments 1..μ−1 (unit importances, added once per earlier exit).
type private L2Anchor(settings) =
    inherit QuadraticRegulariser(settings)
    static member val Info =
        { new IRegulariserKind with
            member _.Name = "l2anchor"
            member _.Description = "test: squared distance to the previous stage's parameters"
            member _.StrengthName = "lambda"
            member _.DefaultStrength = 1.0
            member _.Settings = [| RegulariserSetting("scale", "1", "importance of every parameter", fun v -> if fst (Double.TryParse v) then null else "not a number") |] :> IReadOnlyList<_>
            member _.ReadsProtectedExits = false
            member _.StateRead(_, protects) = protects
            member _.PenaltyForwardMacs(_, _, _) = 0.0
            member _.ConsolidationMacs(_, _, _, _, _) = 0.0
            member _.Create(s) = new L2Anchor(s) :> IRegulariser }
    override _.Kind = L2Anchor.Info
    override _.ImportanceName = "unit importance"
    override this.Importances(stage, exit) =
        let scale = float32 (Double.Parse this.Settings["scale"])
        let d = Dictionary<string, Tensor>()
        for struct (n, p) in stage.Net.SegmentParameters(exit) do d[n] <- torch.ones_like(p.detach()).mul(torch.tensor scale)
        d

let private registerL2Anchor () =
    match RegulariserRegistry.TryGet "l2anchor" with
    | true, _ -> ()
    | _ -> RegulariserRegistry.Register L2Anchor.Info

let private smoke (strategy: Strategy) =
    let r = Scales.recipe Scales.Smoke strategy "resnet34" "fashion-mnist" 0
    { r with Data = { r.Data with TrainLimit = 200; TestLimit = 100 }; Stages = r.Stages |> List.map (fun s -> { s with MaxStepsPerEpoch = 2 }) }

let private quiet: Interpreter.RunOptions =
    { OutDir = ""; Resume = false; PrefixCache = None; Scale = "smoke"; Device = Some "cpu"; Log = ignore }

let schedules =
    testList "strength schedules" [
        test "at the stage of exit μ (M = 5): constant, linear from μ = 2 to M, geometric, one value per stage (worked by hand)" {
            let at s = [ for mu in 2..5 -> Strength.at 5 mu s ]
            Expect.equal (at (Strength.Constant 100.0)) [ 100.0; 100.0; 100.0; 100.0 ] "constant"
            Expect.equal (at (Strength.Linear(10.0, 40.0))) [ 10.0; 20.0; 30.0; 40.0 ] "linear"
            Expect.equal (at (Strength.Geometric(10.0, 10.0))) [ 10.0; 100.0; 1000.0; 10000.0 ] "geometric"
            Expect.equal (at (Strength.PerStage [ 1.0; 2.0; 3.0; 4.0 ])) [ 1.0; 2.0; 3.0; 4.0 ] "per stage"
            Expect.equal (Strength.at 2 2 (Strength.Linear(7.0, 9.0))) 7.0 "one regularised stage: linear gives its first value"
        }
        testProp "text form round trip: format, then parse" (fun (NormalFloat a) (NormalFloat b) (k: PositiveInt) ->
            let a, b = abs a + 0.01, abs b + 0.01
            [ Strength.Constant a; Strength.Linear(a, b); Strength.Geometric(a, b); Strength.PerStage [ for i in 0 .. k.Get % 5 + 1 -> a + float i ] ]
            |> List.forall (fun s -> Strength.parse (Strength.format s) = Ok s))
        test "bad text is refused with what to give" {
            for bad, says in [ "fast", "give a number"; "linear:1", "give two numbers"; "geometric:a,b", "is not a list of numbers"; "", "give a number" ] do
                match Strength.parse bad with
                | Ok s -> failtestf "'%s' read as %A" bad s
                | Error e -> Expect.stringContains e says $"'{bad}'"
        }
        test "the plan resolves a schedule for every stage's exit, and the CLI takes one" {
            let r = smoke (Sequential [ penalty "ewc" (Strength.Geometric(10.0, 10.0)) ])
            let strengths = [ for i in 0 .. r.Stages.Length - 1 -> (Interpreter.plan r i None).Regularisers |> Array.map (fun u -> u.Name, u.Strength) |> List.ofArray ]
            Expect.equal strengths [ []; []; [ "ewc", 10.0 ]; [ "ewc", 100.0 ]; [ "ewc", 1000.0 ] ] "warm-up, exit 1 (nothing to protect), exits 2..4"
            match Builders.parseStrategy (Presets.forModel "resnet34") "sequential-ewc-lwf" (Map.ofList [ "lwf", Strength.Linear(0.2, 0.8) ]) with
            | Ok (Sequential [ e; l ]) ->
                Expect.equal e (ewc 100.0) "EWC takes the paper's preset"
                Expect.equal l.Strength (Strength.Linear(0.2, 0.8)) "LwF the schedule given"
            | other -> failtestf "parsed as %A" other
        }
        test "a schedule shares the stages where it equals a constant: the prefix cache key uses resolved strengths" {
            let geometric = smoke (Sequential [ penalty "ewc" (Strength.Geometric(10.0, 10.0)) ])
            let constant = smoke (Sequential [ ewc 10.0 ])
            for k in 0..2 do
                Expect.equal (Interpreter.prefixKey geometric k) (Interpreter.prefixKey constant k) $"stages 0..{k}: λ = 10 where any applies"
            Expect.notEqual (Interpreter.prefixKey geometric 3) (Interpreter.prefixKey constant 3) "stage of exit 3: λ = 100 against 10"
        }
        test "a Fisher estimator is part of the key from the first stage that computes one" {
            let empirical = smoke (Sequential [ ewc 100.0 ])
            let exact = Settings.withFisher "exact" 128 empirical
            Expect.equal (Interpreter.prefixKey empirical 0) (Interpreter.prefixKey exact 0) "the warm-up computes no Fisher"
            Expect.notEqual (Interpreter.prefixKey empirical 1) (Interpreter.prefixKey exact 1) "exit 1 consolidates with its estimator"
        }
    ]

let registry =
    testList "registry" [
        test "the built-in regularisers and their settings; unknown names and settings are refused with what is known" {
            Expect.equal [ for k in RegulariserRegistry.Kinds |> Seq.take 3 -> k.Name ] [ "ewc"; "lwf"; "mas" ] "built in"
            let e = Expect.throwsC (fun () -> RegulariserRegistry.Get "si" |> ignore) id
            Expect.stringContains e.Message "known: ewc, lwf, mas" "lists what is known"
            let e = Expect.throwsC (fun () -> RegulariserRegistry.Create("ewc", readOnlyDict [ "fisher", "exactly" ]) |> ignore) id
            Expect.stringContains e.Message "fisher: unknown value 'exactly'" "a bad value"
            let e = Expect.throwsC (fun () -> RegulariserRegistry.Register L2Anchor.Info; RegulariserRegistry.Register L2Anchor.Info) id
            Expect.stringContains e.Message "already registered" "a name is registered once"
            match Builders.parseStrategy (Presets.forModel "resnet34") "sequential-ewc-si" Map.empty with
            | Ok s -> failtestf "parsed as %A" s
            | Error m -> Expect.stringContains m "'si' is not a registered regulariser" "strategy names check the registry"
        }
        test "a regulariser registered from outside the core: strategy name, recipe JSON, validation, interpreter, saved state, resume" {
            registerL2Anchor ()
            let strategy =
                match Builders.parseStrategy (Presets.forModel "resnet34") "sequential-l2anchor" (Map.ofList [ "l2anchor", Strength.Constant 5.0 ]) with
                | Ok s -> s
                | Error e -> failtest e
            Expect.equal (strategyName strategy) "sequential-l2anchor" "its name"
            let r = { smoke strategy with RegulariserSettings = Map.ofList [ "l2anchor", Map.ofList [ "scale", "2" ] ] } |> Settings.complete
            Expect.equal (Validation.problems r) [] "valid"
            Expect.equal (RecipeJson.parse (RecipeJson.toJson r)) (Ok r) "JSON round trip"
            let bad = { r with RegulariserSettings = Map.ofList [ "l2anchor", Map.ofList [ "scale", "big" ] ] }
            Expect.contains (Validation.problems bad) "regularisers.l2anchor.scale: not a number" "its own settings check"
            use dir = new TempDir()
            let out = dir.File "run"
            let first = Interpreter.run { quiet with OutDir = out } r
            let stages = Path.Combine(out, "stages")
            let last = Directory.GetFiles(stages, "*.done.regs") |> Array.sort |> Array.last
            let d = TensorStore.Load last
            let exits = d["l2anchor/exits"].data<int64>().ToArray() |> List.ofArray
            // Scale 2 added once per consolidated exit ν ≥ segment: segment 1 has 3 × 2, segment 2 2 × 2, segment 3 1 × 2.
            let importances = d |> Seq.filter (fun kv -> kv.Key.StartsWith "l2anchor/importance/") |> Seq.toList
            let expected (key: string) = 2.0f * float32 (3 - int (key.Split('.')[1]))
            let right = importances |> List.forall (fun kv -> kv.Value.eq(torch.tensor (expected kv.Key)).all().item<bool>())
            let count = importances.Length
            for t in d.Values do t.Dispose()
            Expect.equal exits [ 1L; 2L; 3L ] "importances of exits 1..3 were consolidated (exit 4 is the last)"
            Expect.isTrue (count > 0 && right) "every importance is 2 per exit that consolidated it"
            // Resume after the last stage: the same model.
            File.Delete(Path.Combine(out, "metrics.json"))
            let resumed = Interpreter.run { quiet with OutDir = out; Resume = true } r
            Expect.equal resumed.TestAccuracy first.TestAccuracy "resumed from the saved state"
        }
    ]

let private trainArgs (args: string list) =
    let parser = Argu.ArgumentParser.Create<EarlyExit.Experiments.Cli.Arguments.TrainArgs>(programName = "earlyexit train")
    EarlyExit.Experiments.Cli.Train.resolveRecipe (parser.Parse(List.toArray (args @ [ "--out"; "unused"; "--scale"; "smoke" ])))

let commandLine =
    testList "earlyexit train: strengths, schedules and settings" [
        test "a schedule, a Fisher estimator and a setting reach the recipe" {
            match trainArgs [ "--strategy"; "sequential-ewc"; "--lambda"; "geometric:10,10"; "--fisher"; "exact"; "--setting"; "ewc.samples=500" ] with
            | Error e -> failtestf "refused: %A" e
            | Ok (r, _) ->
                Expect.equal (r.Stages |> List.last).Regularisers [ penalty "ewc" (Strength.Geometric(10.0, 10.0)) ] "the schedule"
                Expect.equal r.RegulariserSettings (Map.ofList [ "ewc", Map.ofList [ "fisher", "exact"; "samples", "500" ] ]) "the settings"
        }
        test "any registered regulariser by --strength NAME=S" {
            match trainArgs [ "--strategy"; "sequential-mas"; "--strength"; "mas=0.5" ] with
            | Error e -> failtestf "refused: %A" e
            | Ok (r, _) -> Expect.equal (r.Stages |> List.last).Regularisers [ mas 0.5 ] "MAS at 0.5"
        }
        test "what would have no effect, or cannot be read, is refused with the reason" {
            for args, says in
                [ [ "--strategy"; "joint"; "--lambda"; "5" ], "strategy joint uses no regulariser: a strength or setting of ewc would have no effect"
                  [ "--strategy"; "sequential-lwf"; "--fisher"; "exact" ], "strategy sequential-lwf uses lwf: a strength or setting of ewc would have no effect"
                  [ "--strategy"; "sequential-ewc"; "--lambda"; "fast" ], "--lambda: strength 'fast'"
                  [ "--strategy"; "sequential-ewc"; "--setting"; "ewc.fisher=wrong" ], "regularisers.ewc.fisher: unknown value 'wrong'"
                  [ "--strategy"; "sequential-ewc"; "--setting"; "fisher=exact" ], "give NAME.KEY=VALUE"
                  [ "--strategy"; "sequential-ewc"; "--strength"; "si=3" ], "unknown regulariser 'si'"
                  [ "--recipe"; "r.json"; "--lambda"; "3" ], "go with --strategy" ] do
                match trainArgs args with
                | Ok (r, _) -> failtestf "%A accepted: %A" args r
                | Error es -> Expect.exists es (fun e -> e.Contains says) $"""{String.Join(" ", args)}: {String.Join("; ", es)}"""
        }
    ]

let all = testList "regularisers" [ fisherVariants; schedules; registry; commandLine ]
