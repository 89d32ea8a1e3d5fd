/// `EarlyExit.Tests.Properties gc-stress STEPS`: the training loop (data pipeline, crop/flip, Mixup/CutMix, joint loss,
/// EWC and LwF penalties, AdamW, evaluation, the per-sample Fisher) for STEPS optimiser steps while another thread
/// forces garbage collections without pause. A native object that .NET frees while native code still reads it (an
/// implicit TorchSharp Scalar nothing keeps alive) then aborts the process (exit 134) instead of once in many runs.
/// Run in a child process by the property "the training loop survives garbage collections during native calls".
module EarlyExit.Tests.Properties.GcStress

open System
open System.Threading
open TorchSharp
open EarlyExit.Data
open EarlyExit.Models
open EarlyExit.Native
open EarlyExit.Training

let run (steps: int) =
    TorchNativeLoader.EnsureLoaded() |> ignore
    torch.set_num_threads 1
    let mutable stop = false
    let mutable collections = 0
    let collector =
        Thread((fun () ->
            while not (Volatile.Read &stop) do
                GC.Collect()
                GC.WaitForPendingFinalizers()
                Interlocked.Increment &collections |> ignore), IsBackground = true)
    collector.Start()
    let data = TrainingTests.synthetic 7 4 [| 1L; 12L; 12L |] 256
    torch.manual_seed 7L |> ignore
    use net = ModelRegistry.Create("resnet34", ModelOptions(NumClasses = 4, InputShape = [| 1L; 12L; 12L |], BaseWidth = 4, Blocks = [| 1; 1 |], ExitPositions = [| 1; 2 |]))
    use regs =
        new EarlyExit.Regularisers.RegulariserSet(
            [ EarlyExit.Regularisers.RegulariserRegistry.Create("ewc", readOnlyDict [ "samples", "64" ])
              EarlyExit.Regularisers.RegulariserRegistry.Create("lwf") ])
    let batch = 32
    let perEpoch = data.Train.Count / batch
    let plan name exits groups stageExit protects epochs lambda rho consolidate =
        StagePlan(Name = name, LossExits = exits, LossWeights = Array.create exits.Length 1.0, TrainableGroups = groups,
                  StageExit = stageExit, ProtectedExits = protects,
                  Regularisers = [| if lambda > 0.0 then EarlyExit.Regularisers.RegulariserUse("ewc", lambda)
                                    if rho > 0.0 then EarlyExit.Regularisers.RegulariserUse("lwf", rho) |],
                  BatchSize = batch, MaxEpochs = epochs, Mix = MixSettings(), CropPadding = 2, HorizontalFlip = true, Schedule = LrSchedule.Cosine,
                  ConsolidateAfter = (if consolidate then [| "ewc"; "lwf" |] else [||]), EvalBatchSize = 64, Seed = 7)
    StageTrainer.Run(net, plan "exit1" [| 1 |] [| "segment1"; "head1" |] 1 [||] 1 0.0 0.0 true, data, regs, torch.CPU) |> ignore
    let epochs = max 1 (steps / perEpoch)
    StageTrainer.Run(net, plan "exit2" [| 2 |] [| "segment1"; "segment2"; "head1"; "head2" |] 2 [| 1 |] epochs 100.0 0.5 false, data, regs, torch.CPU) |> ignore
    Volatile.Write(&stop, true)
    collector.Join()
    let deferred, released, pending = NativeScalars.Counts() |> fun struct (d, r, p) -> d, r, p
    printfn "gc-stress: %d steps, %d forced garbage collections, no abort; native scalars: %s; %d deferred, %d released, %d pending"
        ((epochs + 1) * perEpoch) collections NativeScalars.Status deferred released pending
    0
