// A custom 3-exit CNN on your own images, trained the sequential way with EWC (the 2026 paper's recipe: a warm-up of
// the backbone with its final exit, then exit μ = 1..3 with segments 1..μ, EWC protecting exits 1..μ−1), through the
// C# core alone. Usage: CustomModel.CSharp IMAGE_FOLDER [EPOCHS] [STEPS_PER_EPOCH]
// IMAGE_FOLDER holds train/CLASS/*.png and test/CLASS/*.png (samples/custom-model.fsx writes one from Fashion-MNIST).
using System;
using System.Linq;
using EarlyExit.Data;
using EarlyExit.Extensions;
using EarlyExit.Flops;
using EarlyExit.Models;
using EarlyExit.Native;
using EarlyExit.Regularisers;
using EarlyExit.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace Samples
{
    /// <summary>Registers "tinycnn": three conv-BN-ReLU segments (16, 32, 64 channels, the first two halve the image),
    /// SDN heads on the first two exits and pool + linear on the last. Also a plugin of the command line.</summary>
    public sealed class TinyCnnPlugin : IEarlyExitPlugin
    {
        static nn.Module<Tensor, Tensor> Block(long cin, long cout, bool pool) =>
            nn.Sequential(
                ("conv", nn.Conv2d(cin, cout, 3, padding: 1, bias: false)),
                ("bn", nn.BatchNorm2d(cout)),
                ("relu", nn.ReLU()),
                ("pool", pool ? nn.MaxPool2d(2) : nn.Identity()));

        public void Register() =>
            CustomModels.Register("tinycnn", "a 3-exit CNN of the C# sample: conv blocks of 16, 32, 64 channels",
                o =>
                {
                    long c = (o.InputShape ?? new long[] { 1, 28, 28 })[0];
                    return new[] { Block(c, 16, true), Block(16, 32, true), Block(32, 64, false) };
                },
                Heads.SdnThenPoolLinear(), defaultClasses: 10, defaultInput: new long[] { 1, 28, 28 });
    }

    public static class Program
    {
        public static int Main(string[] args)
        {
            if (args.Length < 1) { Console.Error.WriteLine("usage: CustomModel.CSharp IMAGE_FOLDER [EPOCHS] [STEPS_PER_EPOCH]"); return 2; }
            int epochs = args.Length > 1 ? int.Parse(args[1]) : 2, steps = args.Length > 2 ? int.Parse(args[2]) : 0;
            try
            {
                new TinyCnnPlugin().Register();
                var data = DataCatalog.Load("image-folder", args[0], validationFraction: 0.1, seed: 0);
                Console.WriteLine($"{data.Train.Count} training, {data.Validation.Count} validation, {data.Test.Count} test images of {string.Join("x", data.Train.Shape)}, {data.Train.NumClasses} classes");
                // TorchSharp's first use: load it through EarlyExit first (the libstdc++ workaround and the numerics
                // check). ModelRegistry.Create would do it too, but torch.manual_seed comes before it.
                TorchNativeLoader.EnsureLoaded();
                torch.manual_seed(0);
                using var net = ModelRegistry.Create("tinycnn", new ModelOptions { NumClasses = data.Train.NumClasses, InputShape = data.Train.Shape });
                var device = torch.CPU;
                var cost = MacCounter.Count(net);
                Console.WriteLine($"{net.Describe()}; MACs per exit {string.Join(", ", cost.Exits.Select(e => e.CumulativeMacs.ToString("N0")))}");

                int m = net.ExitCount;
                string[] Segments(int upTo) => Enumerable.Range(1, upTo).Select(MultiExitNetwork.SegmentGroup).ToArray();
                StagePlan Stage(string name, int exit, string[] trainable, RegulariserUse[] regs, int[] protects, string[] consolidate) => new()
                {
                    Name = name, LossExits = new[] { exit }, LossWeights = new[] { 1.0 }, TrainableGroups = trainable,
                    StageExit = name == "warmup" ? 0 : exit, Regularisers = regs, ProtectedExits = protects, ConsolidateAfter = consolidate,
                    MaxEpochs = epochs, MaxStepsPerEpoch = steps, BatchSize = 64, LearningRate = 2e-3, CropPadding = 2, HorizontalFlip = true, Seed = exit,
                };
                using var regs = RegulariserSet.Of("ewc");
                var plans = new[] { Stage("warmup", m, Segments(m).Append(MultiExitNetwork.HeadGroup(m)).ToArray(), Array.Empty<RegulariserUse>(), Array.Empty<int>(), Array.Empty<string>()) }
                    .Concat(Enumerable.Range(1, m).Select(mu => Stage($"exit{mu}", mu, Segments(mu).Append(MultiExitNetwork.HeadGroup(mu)).ToArray(),
                        mu == 1 ? Array.Empty<RegulariserUse>() : new[] { new RegulariserUse("ewc", 100.0) },
                        Enumerable.Range(1, mu - 1).ToArray(), mu < m ? new[] { "ewc" } : Array.Empty<string>())));
                foreach (var plan in plans)
                {
                    var r = StageTrainer.Run(net, plan, data, regs, device);
                    Console.WriteLine($"stage {plan.Name}: best epoch {r.BestEpoch + 1} of {r.EpochsRun}, validation {r.BestMonitor:F4}");
                }
                net.eval();
                using var logits = Evaluator.CollectLogits(net, data.Test, 256, device);
                using var labels = torch.tensor(data.Test.Labels.Select(l => (long)l).ToArray());
                for (int e = 0; e < m; e++)
                {
                    using var pred = logits[e].argmax(1);
                    using var hits = pred.eq(labels).sum();
                    Console.WriteLine($"exit {e + 1}: test accuracy {100.0 * hits.item<long>() / data.Test.Count:F2}%");
                }
                return 0;
            }
            catch (Exception e) when (e is DataFormatException or ArgumentException)
            {
                Console.Error.WriteLine($"error: {e.Message}");
                return 1;
            }
        }
    }
}
