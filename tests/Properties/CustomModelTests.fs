/// A network of the user's own (ComposedNetwork, CustomModels.Register) is a model family like the built-in ones:
/// every built strategy's stages leave its frozen groups bit for bit, its names follow the group scheme, it runs
/// through recipes and the interpreter, and its mistakes are clear errors. Plugins load from an assembly.
module EarlyExit.Tests.Properties.CustomModelTests

open System
open System.IO
open Expecto
open FsCheck
open TorchSharp
open EarlyExit.Models
open EarlyExit.Training
open EarlyExit.Extensions
open EarlyExit.Tests.Support
open EarlyExit.Tests.Properties.Generators
open EarlyExit.Tests.Properties.Tests
open EarlyExit.Tests.Properties.TrainingTests
open EarlyExit.Experiments.Recipes
open EarlyExit.Experiments.Runner

type M = torch.nn.Module<torch.Tensor, torch.Tensor>

let private block (cin: int64) (cout: int64) (pool: bool) : M =
    torch.nn.Sequential(
        struct ("conv", torch.nn.Conv2d(cin, cout, 3L, padding = 1L, bias = false) :> M),
        struct ("bn", torch.nn.BatchNorm2d(cout) :> M),
        struct ("relu", torch.nn.ReLU() :> M),
        struct ("pool", (if pool then torch.nn.MaxPool2d(2L) :> M else torch.nn.Identity() :> M)))
    :> M

/// Three segments; the last flattens, so its head sees flat features (a head of the user's own: a linear layer).
let private segments (o: ModelOptions) : Collections.Generic.IReadOnlyList<M> =
    let c = (defaultArg (Option.ofObj o.InputShape) [| 1L; 8L; 8L |])[0]
    [| block c 4L true; block 4L 6L false; torch.nn.Sequential(struct ("b", block 6L 8L true), struct ("flat", torch.nn.Flatten() :> M)) :> M |]

let private heads (c: HeadContext) : M =
    if c.FeatureShape.Length = 1 then torch.nn.Linear(c.FeatureShape[0], int64 c.NumClasses) :> M
    else Heads.Sdn(2L).Invoke c

/// Registered once for the whole process (the registry is process-wide).
let private family = lazy (CustomModels.Register("test-composed", "the tests' composed network", Func<_, _>(segments), Func<_, _>(heads), 3, [| 1L; 8L; 8L |]))

/// A plugin in this very assembly: Plugins.Load of the test binary finds and runs it.
type TestPlugin() =
    static member val Registered = 0 with get, set
    interface IEarlyExitPlugin with
        member _.Register() =
            TestPlugin.Registered <- TestPlugin.Registered + 1
            CustomModels.Register("test-plugin-net", "registered by the tests' plugin", Func<_, _>(segments), Func<_, _>(heads), 3, [| 1L; 8L; 8L |]) |> ignore

let private smallRecipe (strategy: Builders.Strategy) =
    family.Force() |> ignore
    let r = Scales.recipe Scales.Smoke strategy "test-composed" "fashion-mnist" 0
    { r with Model = { r.Model with Classes = Some 3; Input = Some [ 1L; 8L; 8L ] } }

let composed =
    testList "a network of one's own" [
        test "feature shapes found by a dry run, names in the group scheme, heads from the factory, siblings of the same architecture" {
            family.Force() |> ignore
            use net = ModelRegistry.Create("test-composed", ModelOptions(NumClasses = 3, InputShape = [| 1L; 8L; 8L |]))
            let c = net :?> ComposedNetwork
            Expect.equal (c.FeatureShapes |> Seq.map List.ofArray |> List.ofSeq) [ [ 4L; 4L; 4L ]; [ 6L; 4L; 4L ]; [ 32L ] ] "features after each segment"
            Expect.equal net.ExitCount 3 "three exits"
            for (name, _) in net.named_parameters() do
                Expect.isTrue (name.StartsWith "segments." || name.StartsWith "heads.") $"{name} is in a group"
                MultiExitNetwork.GroupOf name |> ignore
            use x = torch.randn(5L, 1L, 8L, 8L)
            let logits = net.forward x
            Expect.equal (logits |> Array.map (fun l -> List.ofArray l.shape)) [| [ 5L; 3L ]; [ 5L; 3L ]; [ 5L; 3L ] |] "logits of every exit"
            use sib = net.CreateSibling()
            Expect.equal (sib.state_dict().Keys |> Set.ofSeq) (net.state_dict().Keys |> Set.ofSeq) "a sibling has the same tensors"
            Expect.stringContains (net.Describe()) "test-composed: 3 segments (features 4x4x4, 6x4x4, 32)" "described"
            Expect.equal (Validation.exitCount (smallRecipe Builders.Joint).Model) 3 "recipes count its exits"
        }

        testPropertyWithConfig { configWithArbs with maxTest = 7 } "after every stage of every built strategy, its frozen groups are bit-for-bit unchanged" (fun (pick: NonNegativeInt) ->
            let strategies = [| Builders.Joint; Builders.Disjoint; Builders.Mixed; Builders.BranchWise; Builders.Separate; Builders.Sequential [ Builders.ewc 10.0 ]; Builders.Sequential [ Builders.lwf 0.5 ] |]
            let recipe = smallRecipe strategies[pick.Get % strategies.Length]
            match Validation.validate recipe with
            | Error e -> failwithf "%A" e
            | Ok recipe ->
                torch.manual_seed 1L |> ignore
                use net = ModelRegistry.Create("test-composed", Validation.modelOptions recipe.Model)
                use regs = Interpreter.regulariserSet recipe
                let data = synthetic 1 3 [| 1L; 8L; 8L |] 24
                recipe.Stages
                |> List.indexed
                |> List.forall (fun (i, s) ->
                    let frozen = net.Groups() |> Seq.filter (fun g -> not (List.contains g s.Trainable)) |> Seq.toList
                    let before = [ for g in frozen do
                                     for (n, p) in net.GroupParameters g -> n, p.detach().clone()
                                     for (n, b) in net.GroupBuffers g -> n, b.detach().clone() ]
                    StageTrainer.Run(net, Interpreter.plan recipe i None, data, regs, torch.CPU) |> ignore
                    let after = dict [ for g in frozen do
                                         for (n, p) in net.GroupParameters g -> n, p.detach().clone()
                                         for (n, b) in net.GroupBuffers g -> n, b.detach().clone() ]
                    let ok = before |> List.forall (fun (n, t) -> same t after[n])
                    for (_, t) in before do t.Dispose()
                    for t in after.Values do t.Dispose()
                    ok))

        test "through the interpreter: a run folder, eval's inputs, a finished run recognised" {
            use dir = new TempDir()
            let r = smallRecipe (Builders.Sequential [ Builders.ewc 100.0 ])
            // Fashion-MNIST is 1×28×28; the family takes the data's shape.
            let r = { r with Model = { r.Model with Input = Some [ 1L; 28L; 28L ]; Classes = Some 10 }; Data = { r.Data with TrainLimit = 200; TestLimit = 100 } }
            let quiet: Interpreter.RunOptions = { OutDir = dir.File "run"; Resume = false; PrefixCache = None; Scale = "smoke"; Device = Some "cpu"; Log = ignore }
            let first = Interpreter.run quiet r
            Expect.equal first.TestAccuracy.Length 3 "three exits evaluated"
            Expect.isTrue (Interpreter.run quiet r).AlreadyFinished "finished"
            let info = EarlyExit.Experiments.Evaluation.RunFolder.readInfo (dir.File "run")
            Expect.stringContains info.Model "test-composed" "the run names the network"
        }

        test "mistakes of a custom network are clear errors" {
            let msg (f: unit -> 'a) = try f () |> ignore; "" with :? ArgumentException as e -> e.Message
            let noSegments = msg (fun () -> new ComposedNetwork("empty", Func<_>(fun () -> [||] :> Collections.Generic.IReadOnlyList<M>), Func<_, _>(heads), 3, [| 1L; 8L; 8L |]))
            Expect.stringContains noSegments "the segment factory returned no segments" "no segments"
            let badChain =
                msg (fun () -> new ComposedNetwork("chain", Func<_>(fun () -> [| block 1L 4L false; block 5L 4L false |] :> Collections.Generic.IReadOnlyList<M>), Func<_, _>(heads), 3, [| 1L; 8L; 8L |]))
            Expect.stringContains badChain "chain: segment 2 fails on the features of shape [1, 4, 8, 8]" "a segment that does not fit the one before"
            let badHead =
                msg (fun () -> new ComposedNetwork("heads", Func<_>(fun () -> [| block 1L 4L true |] :> Collections.Generic.IReadOnlyList<M>), Func<_, _>(fun (c: HeadContext) -> Heads.Sdn(2L).Invoke(HeadContext(c.Exit, c.ExitCount, c.FeatureShape, 5))), 3, [| 1L; 8L; 8L |]))
            Expect.stringContains badHead "exit 1 gives logits of shape [1, 5]; an exit must give [N, 3]" "a head with the wrong classes"
            family.Force() |> ignore
            let width = msg (fun () -> ModelRegistry.Create("test-composed", ModelOptions(BaseWidth = 8)))
            Expect.stringContains width "width: this model takes no width" "an option the family does not read"
            Expect.stringContains (msg (fun () -> ModelRegistry.Get "nosuchnet")) "--plugin ASSEMBLY.dll" "unknown: how to register one"
        }

        test "plugins: an assembly's IEarlyExitPlugin classes run once; missing, foreign and plugin-less files are clear errors" {
            let me = typeof<TestPlugin>.Assembly.Location
            let found = Plugins.Load me
            Expect.contains found typeof<TestPlugin>.FullName "the plugin class was found"
            Expect.equal TestPlugin.Registered 1 "and run"
            Expect.isEmpty (Plugins.Load me) "loading it again does nothing"
            Expect.equal TestPlugin.Registered 1 "still once"
            Expect.equal (ModelRegistry.Get "test-plugin-net").Name "test-plugin-net" "its model is registered"
            let err (p: string) = try Plugins.Load p |> ignore; "" with :? PluginException as e -> e.Message
            use dir = new TempDir()
            Expect.stringContains (err (dir.File "none.dll")) "file not found" "missing"
            File.WriteAllText(dir.File "junk.dll", "not an assembly")
            Expect.stringContains (err (dir.File "junk.dll")) "not a .NET assembly" "not an assembly"
            let core = typeof<ComposedNetwork>.Assembly.Location
            Expect.stringContains (err core) "no public class implements EarlyExit.Extensions.IEarlyExitPlugin" "an assembly without plugins"
        }
    ]

let all = testList "custom models" [ composed ]
