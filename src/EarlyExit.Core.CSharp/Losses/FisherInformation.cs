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
    /// <summary>How the Fisher of an exit is estimated.</summary>
    public enum FisherEstimator
    {
        /// <summary>
        /// Empirical Fisher, per sample (the paper's eq. 3): mean over samples of (∂ log ŷ_ν(true class) / ∂θ)².
        /// Per-sample gradients come from layer inputs and output gradients (one backward pass per batch).
        /// </summary>
        PerSampleEmpirical,
        /// <summary>The same quantity with one backward pass per sample: slow and obvious, the test oracle.</summary>
        PerSampleEmpiricalNaive,
        /// <summary>
        /// The common, different estimator: mean over minibatches of the squared minibatch-mean gradient of log ŷ_ν(true class)
        /// (as in Avalanche's EWC). Offered for comparison only.
        /// </summary>
        SquaredMinibatchGradient,
    }

    /// <summary>Fisher information of an exit with respect to the parameters of segments 1..ν, at the current parameters.</summary>
    public static class FisherInformation
    {
        /// <summary>
        /// Working set, in floats, of one chunk of per-sample convolution gradients (unfolded input and gradients):
        /// 2 MiB, the L2 cache of the machines we measured on (2-core AMD EPYC); larger chunks spill to memory.
        /// </summary>
        public static long PerSampleChunkFloats { get; set; } = 1L << 19;

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
            var order = Enumerable.Range(0, data.Count).ToArray();
            new Random(seed).Shuffle(order);
            int n = maxSamples > 0 ? Math.Min(maxSamples, data.Count) : data.Count;
            if (n == 0) throw new ArgumentException("the Fisher needs at least one sample");
            var indices = order.AsSpan(0, n).ToArray();

            bool wasTraining = net.training;
            var targets = net.SegmentParameters(exit).ToList();
            var savedRequiresGrad = targets.Select(t => t.parameter.requires_grad).ToArray();
            net.eval();
            try
            {
                return estimator switch
                {
                    FisherEstimator.PerSampleEmpirical => FastPerSample(net, exit, data, indices, batchSize, device, targets),
                    FisherEstimator.PerSampleEmpiricalNaive => NaivePerSample(net, exit, data, indices, device, targets),
                    FisherEstimator.SquaredMinibatchGradient => SquaredMinibatch(net, exit, data, indices, batchSize, device, targets),
                    _ => throw new ArgumentOutOfRangeException(nameof(estimator)),
                };
            }
            finally
            {
                for (int i = 0; i < targets.Count; i++) targets[i].parameter.requires_grad = savedRequiresGrad[i];
                net.zero_grad();
                net.train(wasTraining);
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
            using (var count = indices.Length.ToScalar())
                foreach (var s in sums.Values) s.div_(count);
            return sums;
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
            using (var count = batches.ToScalar())
                foreach (var s in sums.Values) s.div_(count);
            return sums;
        }

        /// <summary>A layer whose parameters get per-sample gradients from its input and output gradient.</summary>
        sealed class Capture
        {
            public required nn.Module<Tensor, Tensor> Module;
            public required string WeightName;
            public string? BiasName;
            public Tensor? Input;
            public Tensor? Output;
            public int Calls;
        }

        static Dictionary<string, Tensor> FastPerSample(MultiExitNetwork net, int exit, ImageDataset data, int[] indices, int batchSize, Device device,
            List<(string name, Parameter parameter)> targets)
        {
            // Map every parameter of segments 1..exit to a supported leaf layer.
            var captures = new List<Capture>();
            var covered = new HashSet<string>();
            for (int mu = 1; mu <= exit; mu++)
            {
                string prefix = $"segments.{mu - 1}.";
                foreach (var (name, module) in net.Segment(mu).named_modules())
                {
                    if (module.children().Any() || !module.parameters(recurse: false).Any()) continue;
                    string full = prefix + name + ".";
                    switch (module)
                    {
                        case Conv2d conv:
                            if (conv.groups != 1 || conv.padding_mode != PaddingModes.Zeros || conv.padding_type is not null)
                                throw new NotSupportedException($"per-sample Fisher: convolution {full.TrimEnd('.')} (groups {conv.groups}, padding mode {conv.padding_mode}) is not supported; use {nameof(FisherEstimator.PerSampleEmpiricalNaive)}");
                            captures.Add(new Capture { Module = conv, WeightName = full + "weight", BiasName = conv.bias is null ? null : full + "bias" });
                            break;
                        case Linear lin:
                            captures.Add(new Capture { Module = lin, WeightName = full + "weight", BiasName = lin.bias is null ? null : full + "bias" });
                            break;
                        case BatchNorm2d bn:
                            if (!bn.affine) continue;
                            if (!bn.track_running_stats) throw new NotSupportedException($"per-sample Fisher: BatchNorm {full.TrimEnd('.')} has no running statistics");
                            captures.Add(new Capture { Module = bn, WeightName = full + "weight", BiasName = full + "bias" });
                            break;
                        default:
                            throw new NotSupportedException($"per-sample Fisher: layer {full.TrimEnd('.')} of type {module.GetType().Name} is not supported; use {nameof(FisherEstimator.PerSampleEmpiricalNaive)}");
                    }
                    covered.Add(full + "weight");
                    if (captures[^1].BiasName is { } b) covered.Add(b);
                }
            }
            var missing = targets.Select(t => t.name).Where(n => !covered.Contains(n)).ToList();
            if (missing.Count > 0)
                throw new NotSupportedException($"per-sample Fisher: parameters outside supported layers: {string.Join(", ", missing)}; use {nameof(FisherEstimator.PerSampleEmpiricalNaive)}");

            var byName = targets.ToDictionary(t => t.name, t => t.parameter);
            var sums = targets.ToDictionary(t => t.name, t => zeros_like(t.parameter).DetachFromDisposeScope());
            var removers = new List<Action>();
            foreach (var c in captures)
            {
                var cap = c;
                var remover = c.Module.register_forward_hook((m, input, output) =>
                {
                    cap.Calls++;
                    // Modules run inner dispose scopes: keep what we need past them, and dispose it after the batch.
                    // The caller gets a view and may dispose it (nn.Sequential does); the original stays ours, and the
                    // gradient with respect to it is the gradient with respect to the layer's output.
                    cap.Input = input.detach().DetachFromDisposeScope();
                    cap.Output = output.DetachFromDisposeScope();
                    return output.view_as(output);
                });
                removers.Add(() => remover.remove());
            }
            try
            {
                for (int start = 0; start < indices.Length; start += batchSize)
                {
                    using var scope = NewDisposeScope();
                    var idx = indices.AsSpan(start, Math.Min(batchSize, indices.Length - start));
                    foreach (var c in captures) c.Calls = 0;
                    // The input requires grad so that a graph exists even where every parameter is frozen.
                    var x = data.Images(idx, device).requires_grad_(true);
                    var y = data.LabelTensor(idx, device);
                    // Σ_i log ŷ(y_i): samples are independent (BatchNorm in eval mode), so the gradient of the sum with
                    // respect to sample i's layer output is sample i's own gradient.
                    var total = LogLikelihoodSum(net, exit, x, y);
                    foreach (var c in captures)
                        if (c.Calls != 1)
                            throw new NotSupportedException($"per-sample Fisher: layer {c.WeightName[..^7]} ran {c.Calls} times in one forward pass; use {nameof(FisherEstimator.PerSampleEmpiricalNaive)}");
                    var outputs = captures.Select(c => c.Output!).ToList();
                    var grads = autograd.grad(new[] { total }, outputs, retain_graph: false, create_graph: false, allow_unused: true);
                    using var noGrad = no_grad();
                    for (int k = 0; k < captures.Count; k++)
                    {
                        var c = captures[k];
                        var g = grads[k];
                        if (g is null || g.IsInvalid) continue;
                        AccumulateSquared(c, c.Input!.detach(), g.detach(), sums);
                    }
                    ReleaseCaptures(captures);
                    EarlyExit.Native.NativeScalars.ReleaseDeferred();
                }
            }
            finally
            {
                ReleaseCaptures(captures);
                foreach (var r in removers) r();
            }
            using (var count = indices.Length.ToScalar())
                foreach (var s in sums.Values) s.div_(count);
            return sums;
        }

        static void ReleaseCaptures(List<Capture> captures)
        {
            foreach (var c in captures)
            {
                c.Input?.Dispose();
                c.Output?.Dispose();
                c.Input = null; c.Output = null;
            }
        }

        /// <summary>Adds Σ_i (per-sample gradient_i)² of the layer's parameters to the sums.</summary>
        static void AccumulateSquared(Capture c, Tensor a, Tensor g, Dictionary<string, Tensor> sums)
        {
            long n = a.shape[0];
            switch (c.Module)
            {
                case Linear:
                    {
                        if (a.dim() != 2) throw new NotSupportedException($"per-sample Fisher: linear layer {c.WeightName} with input of {a.dim()} dimensions");
                        sums[c.WeightName].add_((g * g).t().mm(a * a));
                        if (c.BiasName is { } b) sums[b].add_((g * g).sum(0L));
                        break;
                    }
                case Conv2d conv:
                    {
                        long cout = conv.out_channels;
                        long k = a.shape[1] * conv.kernel_size[0] * conv.kernel_size[1];
                        long l = g.shape[2] * g.shape[3];
                        var gm = g.reshape(n, cout, l);
                        // Per-sample gradients G_i U_iᵀ (Cout × K) from the unfolded input U_i (K × L), squared and summed.
                        // Unfold, product and square run on a few samples at a time, so that the unfolded input and the
                        // per-sample gradients (chunk × (Cout·K + K·L) floats) stay in cache: unfolding the whole batch
                        // (9× the activations of a 3×3 conv) and materialising N × Cout × K made this 3–8× slower
                        // (bench: results/bench, figure "per-sample Fisher").
                        long chunk = Math.Clamp(PerSampleChunkFloats / Math.Max(1, cout * k + k * l), 1, n);
                        var acc = zeros(cout, k, dtype: a.dtype, device: a.device);
                        for (long s = 0; s < n; s += chunk)
                        {
                            long len = Math.Min(chunk, n - s);
                            using var inner = NewDisposeScope();
                            var u = nn.functional.unfold(a.narrow(0, s, len), (conv.kernel_size[0], conv.kernel_size[1]),
                                (conv.dilation[0], conv.dilation[1]), (conv.padding[0], conv.padding[1]), (conv.stride[0], conv.stride[1]));
                            var perSample = gm.narrow(0, s, len).bmm(u.transpose(1, 2));
                            acc.add_(perSample.mul_(perSample).sum(0L));
                        }
                        sums[c.WeightName].add_(acc.reshape(sums[c.WeightName].shape));
                        if (c.BiasName is { } b)
                        {
                            var gb = g.sum(new long[] { 2, 3 });
                            sums[b].add_((gb * gb).sum(0L));
                        }
                        break;
                    }
                case BatchNorm2d bn:
                    {
                        var mean = bn.running_mean!.reshape(1, -1, 1, 1);
                        using var eps = bn.eps.ToScalar();
                        var invStd = bn.running_var!.add(eps).rsqrt().reshape(1, -1, 1, 1);
                        var xhat = (a - mean) * invStd;
                        var gw = (g * xhat).sum(new long[] { 2, 3 });
                        var gb = g.sum(new long[] { 2, 3 });
                        sums[c.WeightName].add_((gw * gw).sum(0L));
                        sums[c.BiasName!].add_((gb * gb).sum(0L));
                        break;
                    }
            }
        }
    }
}
