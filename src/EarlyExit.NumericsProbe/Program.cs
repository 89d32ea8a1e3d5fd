using System;
using System.Diagnostics;
using System.Linq;
using System.Text.Json;
using EarlyExit.Models;
using EarlyExit.Native;
using TorchSharp;
using static TorchSharp.torch;

namespace EarlyExit.NumericsProbe
{
    /// <summary>
    /// earlyexit-numerics-probe check --backend NAME [--threads N]
    ///     runs <see cref="ConvolutionCheck"/> under one backend and prints its result as one JSON line;
    /// earlyexit-numerics-probe throughput --backend NAME [--threads N] [--steps S] [--model resnet34|msdnet]
    ///     times joint training steps of the cpu-scale model (batch 128) and prints images/s and minor page faults per
    ///     step as one JSON line (the benchmark runs it under each backend, and with each allocator setting).
    /// Exit code 0 when it ran (whatever the check found), 2 for bad arguments; a crash is the caller's finding.
    /// </summary>
    public static class Program
    {
        public static int Main(string[] args)
        {
            string? Arg(string name) => Array.IndexOf(args, name) is var i and >= 0 && i + 1 < args.Length ? args[i + 1] : null;
            var mode = args.FirstOrDefault();
            if (mode is not ("check" or "throughput") || Arg("--backend") is not { } name)
            {
                Console.Error.WriteLine("usage: earlyexit-numerics-probe check|throughput --backend NAME [--threads N] [--steps S] [--model resnet34|msdnet]");
                return 2;
            }
            NumericsBackend backend;
            try { backend = NumericsBackend.Parse(name); }
            catch (ArgumentException e) { Console.Error.WriteLine("error: " + e.Message); return 2; }

            // The thread count and the backend asked for are this process's own: model code calls
            // TorchNativeLoader.EnsureLoaded, which would otherwise apply the automatic thread count and the cached
            // verdict over them (it did: --threads 1 ran on 2 threads, and "default" on the cached backend's kernels).
            if (Arg("--threads") is { } threadSpec)
            {
                try { TorchThreads.Parse(threadSpec); }
                catch (ArgumentException e) { Console.Error.WriteLine("error: " + e.Message); return 2; }
                TorchThreads.Requested = threadSpec;
            }
            TorchNativeLoader.LoadNatives();
            NumericsGuard.Adopt(backend, "asked for by the probe's caller");  // before any convolution runs
            TorchNativeLoader.EnsureLoaded();  // threads; the guard keeps the adopted backend

            if (mode == "check")
            {
                var result = ConvolutionCheck.Run(backend.Name, NumericsGuard.SimulatedFaults().Contains(backend.Name));
                Console.WriteLine(JsonSerializer.Serialize(result, NumericsGuard.Json));
                return 0;
            }
            int steps = int.TryParse(Arg("--steps"), out var s) && s > 0 ? s : 12;
            var model = Arg("--model") ?? "resnet34";
            var (imagesPerSecond, perStep, faultsPerStep) = Throughput(model, steps);
            Console.WriteLine(JsonSerializer.Serialize(new
            {
                backend = backend.Name, model, threads = get_num_threads(), steps, imagesPerSecond, secondsPerStep = perStep,
                minorFaultsPerStep = faultsPerStep, allocator = NativeAllocator.Status, trainingLayout = ConvolutionLayout.TrainingStatus,
            }, NumericsGuard.Json));
            return 0;
        }

        /// <summary>Joint-loss AdamW steps of the cpu-scale model of Table 1 on random Fashion-MNIST-shaped batches of
        /// 128; the median step after two warm-up steps.</summary>
        static (double ImagesPerSecond, double SecondsPerStep, double MinorFaultsPerStep) Throughput(string model, int steps)
        {
            const int batch = 128;
            manual_seed(0);
            var options = model.StartsWith("msdnet")
                ? new ModelOptions { NumClasses = 10, InputShape = new long[] { 1, 28, 28 }, BaseWidth = 8, Blocks = new[] { 5 } }
                : new ModelOptions { NumClasses = 10, InputShape = new long[] { 1, 28, 28 }, BaseWidth = 8, Blocks = new[] { 2, 2, 2, 2 }, ExitPositions = new[] { 1, 2, 4, 6, 8 } };
            using var net = ModelRegistry.Create(model, options);
            net.train();
            using var optimizer = optim.AdamW(net.parameters(), lr: 1e-3);
            using var x = randn(batch, 1, 28, 28);
            using var y = randint(10, new long[] { batch });
            var times = new double[steps];
            long faults = 0;
            for (int i = 0; i < steps + 2; i++)
            {
                if (i == 2) faults = NativeAllocator.MinorPageFaults();
                var clock = Stopwatch.StartNew();
                using (NewDisposeScope())
                {
                    var logits = net.forward(x);
                    var loss = logits.Select(l => nn.functional.cross_entropy(l, y)).Aggregate((a, b) => a + b);
                    optimizer.zero_grad();
                    loss.backward();
                    optimizer.step();
                }
                if (i >= 2) times[i - 2] = clock.Elapsed.TotalSeconds;
            }
            double faultsPerStep = (double)(NativeAllocator.MinorPageFaults() - faults) / steps;
            Array.Sort(times);
            double median = times[steps / 2];
            return (batch / median, median, faultsPerStep);
        }
    }
}
