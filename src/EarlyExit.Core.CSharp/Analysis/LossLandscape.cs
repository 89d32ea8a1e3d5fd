using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.Linq;
using EarlyExit.Data;
using EarlyExit.Models;
using EarlyExit.Training;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace EarlyExit.Analysis
{
    /// <summary>Which parameters a landscape moves: the backbone (every segment), the heads, or all.</summary>
    public enum PerturbedGroups { Backbone, Heads, All }

    /// <summary>Loss and accuracy of every exit on a grid of (α, β): [exit][a][b].</summary>
    public sealed record LandscapeResult(double[] Alphas, double[] Betas, double[][][] Loss, double[][][] Accuracy, string Groups,
        int Samples, int Seed, double Seconds);

    /// <summary>
    /// The loss landscape of each head on a plane through the trained weights (Li et al., NeurIPS 2018; the ICML 2025
    /// paper's public code): θ(α, β) = θ* + α·d₁ + β·d₂ with two random Gaussian directions, filter-normalised (each
    /// filter of d, a slice along the first dimension of a weight with 2 or more dimensions, scaled to the norm of the
    /// same filter of θ*); biases and BatchNorm parameters (1-dimensional) are not moved, as that code's default
    /// ("biasbn") does. The network is evaluated in eval mode (BatchNorm with θ*'s running statistics) on a fixed
    /// set of samples; θ* is restored bit for bit afterwards.
    /// </summary>
    public static class LossLandscape
    {
        static bool Moves(string name, PerturbedGroups groups) => groups switch
        {
            PerturbedGroups.Backbone => name.StartsWith("segments."),
            PerturbedGroups.Heads => name.StartsWith("heads."),
            _ => true,
        };

        /// <summary>A filter-normalised random direction for every moved parameter (zeros for 1-D ones).</summary>
        public static Dictionary<string, Tensor> Direction(MultiExitNetwork net, PerturbedGroups groups, Generator generator)
        {
            var d = new Dictionary<string, Tensor>();
            using var noGrad = no_grad();
            foreach (var (name, p) in net.named_parameters())
            {
                if (!Moves(name, groups)) continue;
                if (p.dim() <= 1) { d[name] = zeros_like(p).DetachFromDisposeScope(); continue; }
                var r = randn(p.shape, dtype: p.dtype, generator: generator).to(p.device);
                var flatR = r.reshape(p.shape[0], -1);
                var flatP = p.detach().reshape(p.shape[0], -1);
                var scale = flatP.norm(1, keepdim: true).div(flatR.norm(1, keepdim: true).add(torch.tensor(1e-10, dtype: p.dtype, device: p.device)));
                d[name] = flatR.mul(scale).reshape(p.shape).DetachFromDisposeScope();
            }
            return d;
        }

        /// <summary>Evenly spaced values from −span to span (grid ≥ 2), with 0 exactly where grid is odd.</summary>
        public static double[] Axis(int grid, double span) =>
            Enumerable.Range(0, grid).Select(i => grid % 2 == 1 && i == grid / 2 ? 0.0 : -span + 2 * span * i / (grid - 1)).ToArray();

        public static LandscapeResult Compute(MultiExitNetwork net, ImageDataset data, int samples, int grid, double span, PerturbedGroups groups,
            int seed, int batchSize = 256, Device? device = null)
        {
            if (grid < 2) throw new ArgumentOutOfRangeException(nameof(grid), "a grid needs at least 2 points per axis");
            if (samples < 1) throw new ArgumentOutOfRangeException(nameof(samples), "the landscape needs at least one sample");
            device ??= net.parameters().First().device;
            var clock = Stopwatch.StartNew();
            var order = Enumerable.Range(0, data.Count).ToArray();
            new Random(seed).Shuffle(order);
            var subset = data.Subset(order.Take(Math.Min(samples, data.Count)).ToArray());
            var generator = new Generator((ulong)seed);
            var d1 = Direction(net, groups, generator);
            var d2 = Direction(net, groups, generator);
            var parameters = net.named_parameters().Where(p => d1.ContainsKey(p.name)).ToList();
            var origin = parameters.ToDictionary(p => p.name, p => p.parameter.detach().clone().DetachFromDisposeScope());
            var alphas = Axis(grid, span);
            var betas = Axis(grid, span);
            int m = net.ExitCount;
            var loss = Enumerable.Range(0, m).Select(_ => Enumerable.Range(0, grid).Select(_ => new double[grid]).ToArray()).ToArray();
            var accuracy = Enumerable.Range(0, m).Select(_ => Enumerable.Range(0, grid).Select(_ => new double[grid]).ToArray()).ToArray();
            try
            {
                for (int a = 0; a < grid; a++)
                    for (int b = 0; b < grid; b++)
                    {
                        using (no_grad())
                        {
                            using var sa = alphas[a].ToScalar();
                            using var sb = betas[b].ToScalar();
                            foreach (var (name, p) in parameters)
                            {
                                using var moved = origin[name].add(d1[name], sa).add_(d2[name], sb);
                                p.copy_(moved);
                            }
                        }
                        var eval = Evaluator.Evaluate(net, subset, m, batchSize, device);
                        for (int e = 0; e < m; e++) { loss[e][a][b] = eval.Loss[e]; accuracy[e][a][b] = eval.Accuracy[e]; }
                    }
            }
            finally
            {
                using (no_grad())
                    foreach (var (name, p) in parameters) p.copy_(origin[name]);
                foreach (var t in origin.Values.Concat(d1.Values).Concat(d2.Values)) t.Dispose();
            }
            return new LandscapeResult(alphas, betas, loss, accuracy, groups.ToString().ToLowerInvariant(), subset.Count, seed, clock.Elapsed.TotalSeconds);
        }
    }
}
