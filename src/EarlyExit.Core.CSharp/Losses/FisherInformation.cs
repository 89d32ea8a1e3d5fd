using System;
using System.Collections.Generic;
using System.Linq;
using EarlyExit.Data;
using EarlyExit.Models;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace EarlyExit.Losses
{
    /// <summary>How the Fisher of an exit is estimated. Each is named by what it computes (van de Ven, "On the computation
    /// of the Fisher information in continual learning", ICLR 2025 blog track, compares them).</summary>
    public enum FisherEstimator
    {
        /// <summary>
        /// Empirical Fisher, per sample (the 2026 paper's eq. 3, and the default): mean over samples of
        /// (∂ log ŷ_ν(true class) / ∂θ)². Per-sample gradients come from layer inputs and output gradients (one backward
        /// pass per batch). Recipe name "empirical".
        /// </summary>
        PerSampleEmpirical,
        /// <summary>The same quantity with one backward pass per sample: slow and obvious, the test oracle. "empirical-naive".</summary>
        PerSampleEmpiricalNaive,
        /// <summary>
        /// The common, different estimator: mean over minibatches of the squared minibatch-mean gradient of log ŷ_ν(true class)
        /// (as in Avalanche's EWC). Offered for comparison only. "squared-minibatch".
        /// </summary>
        SquaredMinibatchGradient,
        /// <summary>
        /// The exact Fisher: mean over samples of the expectation over the model's own predicted distribution,
        /// Σ_c ŷ_ν(c) (∂ log ŷ_ν(c) / ∂θ)², per sample; one gradient pass per class and batch (C× the empirical one). "exact".
        /// </summary>
        Exact,
        /// <summary>
        /// The sampled Fisher: per sample one label drawn from the model's predicted distribution (a seeded draw that does
        /// not depend on batching, <see cref="FisherInformation.SampleLabels"/>), then the squared gradient of its log
        /// probability; one extra forward pass to draw the labels. "sampled".
        /// </summary>
        Sampled,
    }

    /// <summary>Fisher information of an exit with respect to the parameters of segments 1..ν, at the current parameters.</summary>
    public static class FisherInformation
    {
        /// <summary>See <see cref="PerSampleGradients.ChunkFloats"/>.</summary>
        public static long PerSampleChunkFloats
        {
            get => PerSampleGradients.ChunkFloats;
            set => PerSampleGradients.ChunkFloats = value;
        }

        /// <summary>The recipe name of an estimator (the EWC regulariser's "fisher" setting).</summary>
        public static string NameOf(FisherEstimator e) => e switch
        {
            FisherEstimator.PerSampleEmpirical => "empirical",
            FisherEstimator.PerSampleEmpiricalNaive => "empirical-naive",
            FisherEstimator.SquaredMinibatchGradient => "squared-minibatch",
            FisherEstimator.Exact => "exact",
            FisherEstimator.Sampled => "sampled",
            _ => throw new ArgumentOutOfRangeException(nameof(e)),
        };

        public static readonly string[] Names = Enum.GetValues<FisherEstimator>().Select(NameOf).ToArray();

        public static FisherEstimator Parse(string name)
        {
            foreach (var e in Enum.GetValues<FisherEstimator>())
                if (NameOf(e) == name) return e;
            throw new ArgumentException($"unknown Fisher estimator '{name}' ({string.Join(", ", Names)})");
        }

        /// <summary>Gradient passes per sample of an estimator, beside one forward (for the cost accounting): C for the exact Fisher.</summary>
        public static double BackwardPassesPerSample(FisherEstimator e, int classes) => e == FisherEstimator.Exact ? classes : 1;

        /// <summary>
        /// Computes F(ν) for every parameter of segments 1..<paramref name="exit"/> over the first <paramref name="maxSamples"/>
        /// samples of a seeded shuffle of <paramref name="data"/> (all when maxSamples ≤ 0), without augmentation,
        /// with BatchNorm in eval mode (running statistics, so samples are independent). Returned tensors are detached
        /// and owned by the caller.
        /// </summary>
        public static Dictionary<string, Tensor> Compute(MultiExitNetwork net, int exit, ImageDataset data, FisherEstimator estimator,
            int maxSamples = 0, int batchSize = 64, int seed = 0, Device? device = null)
        {
            net.CheckExit(exit);
            if (batchSize < 1) throw new ArgumentOutOfRangeException(nameof(batchSize), "batch size must be positive");
            device ??= net.parameters().First().device;
            if (data.Count == 0) throw new ArgumentException("the Fisher needs at least one sample");
            return PerSampleGradients.WithSamples(net, exit, data, maxSamples, seed, (indices, targets) => estimator switch
            {
                FisherEstimator.PerSampleEmpirical => Empirical(net, exit, data, indices, null, batchSize, device, targets),
                FisherEstimator.PerSampleEmpiricalNaive => NaivePerSample(net, exit, data, indices, device, targets),
                FisherEstimator.SquaredMinibatchGradient => SquaredMinibatch(net, exit, data, indices, batchSize, device, targets),
                FisherEstimator.Exact => ExactFisher(net, exit, data, indices, batchSize, device, targets),
                FisherEstimator.Sampled => Empirical(net, exit, data, indices, SampleLabels(net, exit, data, indices, batchSize, seed, device), batchSize, device, targets),
                _ => throw new ArgumentOutOfRangeException(nameof(estimator)),
            });
        }

        /// <summary>
        /// One label per sample drawn from exit ν's predicted distribution (network in eval mode): sample i gets the class
        /// where the cumulative probability first exceeds a uniform number derived from (seed, i) by a stable hash, so the
        /// draw does not depend on the batch a sample is in. Aligned with <paramref name="indices"/>.
        /// </summary>
        public static long[] SampleLabels(MultiExitNetwork net, int exit, ImageDataset data, int[] indices, int batchSize, int seed, Device? device = null)
        {
            device ??= net.parameters().First().device;
            var labels = new long[indices.Length];
            bool wasTraining = net.training;
            net.eval();
            try
            {
                for (int start = 0; start < indices.Length; start += batchSize)
                {
                    using var scope = NewDisposeScope();
                    using var noGrad = no_grad();
                    var idx = indices.AsSpan(start, Math.Min(batchSize, indices.Length - start));
                    var p = nn.functional.softmax(net.ForwardExit(data.Images(idx, device), exit), 1).to(float64).cpu();
                    var probs = EarlyExit.Native.TensorData.ToArray<double>(p);
                    int classes = (int)p.shape[1];
                    for (int i = 0; i < idx.Length; i++)
                        labels[start + i] = DrawLabel(probs.AsSpan(i * classes, classes), Uniform(seed, idx[i]));
                    EarlyExit.Native.NativeScalars.ReleaseDeferred();
                }
            }
            finally
            {
                net.train(wasTraining);
            }
            return labels;
        }

        /// <summary>The class whose cumulative probability first exceeds <paramref name="u"/> (the last class when rounding
        /// leaves the total below u): inverse-CDF sampling of one draw.</summary>
        public static int DrawLabel(ReadOnlySpan<double> probabilities, double u)
        {
            double cumulative = 0;
            for (int c = 0; c < probabilities.Length; c++)
            {
                cumulative += probabilities[c];
                if (u < cumulative) return c;
            }
            return probabilities.Length - 1;
        }

        /// <summary>A uniform number in [0, 1) from (seed, sample index), the same in every process (SplitMix64).</summary>
        public static double Uniform(int seed, int sample)
        {
            unchecked
            {
                ulong z = ((ulong)(uint)seed << 32 | (uint)sample) + 0x9E3779B97F4A7C15UL;
                z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
                z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
                z ^= z >> 31;
                return (z >> 11) * (1.0 / (1UL << 53));
            }
        }

        static Tensor LogLikelihoodSum(MultiExitNetwork net, int exit, Tensor x, Tensor y)
        {
            var logits = net.ForwardExit(x, exit);
            return nn.functional.log_softmax(logits, 1).gather(1, y.unsqueeze(1)).sum();
        }

        static Dictionary<string, Tensor> NaivePerSample(MultiExitNetwork net, int exit, ImageDataset data, int[] indices, Device device,
            List<(string name, Parameter parameter)> targets)
        {
            foreach (var t in targets) t.parameter.requires_grad = true;
            var sums = targets.ToDictionary(t => t.name, t => zeros_like(t.parameter).DetachFromDisposeScope());
            foreach (var i in indices)
            {
                using var scope = NewDisposeScope();
                net.zero_grad();
                var x = data.Images(new[] { i }, device);
                var y = data.LabelTensor(new[] { i }, device);
                LogLikelihoodSum(net, exit, x, y).backward();
                using var noGrad = no_grad();
                foreach (var (name, p) in targets)
                    if (p.grad is { } g) sums[name].add_(g * g);
                EarlyExit.Native.NativeScalars.ReleaseDeferred();
            }
            return PerSampleGradients.Mean(sums, indices.Length);
        }

        static Dictionary<string, Tensor> SquaredMinibatch(MultiExitNetwork net, int exit, ImageDataset data, int[] indices, int batchSize, Device device,
            List<(string name, Parameter parameter)> targets)
        {
            foreach (var t in targets) t.parameter.requires_grad = true;
            var sums = targets.ToDictionary(t => t.name, t => zeros_like(t.parameter).DetachFromDisposeScope());
            int batches = 0;
            for (int start = 0; start < indices.Length; start += batchSize)
            {
                using var scope = NewDisposeScope();
                var idx = indices.AsSpan(start, Math.Min(batchSize, indices.Length - start));
                net.zero_grad();
                var x = data.Images(idx, device);
                var y = data.LabelTensor(idx, device);
                using var size = idx.Length.ToScalar();
                LogLikelihoodSum(net, exit, x, y).div(size).backward();
                using var noGrad = no_grad();
                foreach (var (name, p) in targets)
                    if (p.grad is { } g) sums[name].add_(g * g);
                batches++;
                EarlyExit.Native.NativeScalars.ReleaseDeferred();
            }
            return PerSampleGradients.Mean(sums, batches);
        }

        /// <summary>Per-sample empirical Fisher with the data's labels, or with the given ones (aligned with indices).</summary>
        static Dictionary<string, Tensor> Empirical(MultiExitNetwork net, int exit, ImageDataset data, int[] indices, long[]? labels, int batchSize, Device device,
            List<(string name, Parameter parameter)> targets)
        {
            var position = labels is null ? null : indices.Select((sample, k) => (sample, k)).ToDictionary(t => t.sample, t => t.k);
            var sums = PerSampleGradients.Sum(net, exit, data, indices, batchSize, device, targets, PerSampleReduction.Square, (logits, idx) =>
            {
                // Σ_i log ŷ(y_i): its gradient with respect to sample i's layer outputs is sample i's own.
                var y = labels is null ? data.LabelTensor(idx, device) : tensor(idx.Select(i => labels[position![i]]).ToArray(), device: device);
                return new[] { nn.functional.log_softmax(logits, 1).gather(1, y.unsqueeze(1)).sum() };
            }, "per-sample Fisher");
            return PerSampleGradients.Mean(sums, indices.Length);
        }

        /// <summary>Σ_c of √ŷ(c)·log ŷ(c) summed over the batch, one objective per class: the square of its per-sample
        /// gradient is ŷ(c)(∂ log ŷ(c))², and their sum over c the exact Fisher of the sample.</summary>
        static Dictionary<string, Tensor> ExactFisher(MultiExitNetwork net, int exit, ImageDataset data, int[] indices, int batchSize, Device device,
            List<(string name, Parameter parameter)> targets)
        {
            var sums = PerSampleGradients.Sum(net, exit, data, indices, batchSize, device, targets, PerSampleReduction.Square, (logits, idx) =>
            {
                var logp = nn.functional.log_softmax(logits, 1);
                var weight = logp.detach().exp().sqrt();
                var weighted = logp * weight;
                return Enumerable.Range(0, (int)logits.shape[1]).Select(c => weighted.select(1, c).sum()).ToArray();
            }, "exact Fisher");
            return PerSampleGradients.Mean(sums, indices.Length);
        }
    }
}
