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
    /// <summary>What is summed over samples of each per-sample gradient: its square (Fishers) or its absolute value (MAS).</summary>
    public enum PerSampleReduction { Square, Absolute }

    /// <summary>
    /// Σ_i r(∂φ_i/∂θ) over samples i, for every parameter θ of segments 1..ν, where φ_i is a per-sample scalar computed
    /// from exit ν's logits and r is the square or the absolute value — without one backward pass per sample. Per-sample
    /// gradients of a layer's parameters come from its input and the gradient with respect to its output (captured by
    /// forward hooks; the output gradient of Σ_i φ_i is sample i's own, since BatchNorm runs in eval mode and samples do
    /// not interact). Supported layers: Conv2d (groups 1, zero padding), Linear (2-D input), affine BatchNorm2d with
    /// running statistics. One forward per batch; one gradient pass per objective.
    /// </summary>
    public static class PerSampleGradients
    {
        /// <summary>Working set, in floats, of one chunk of per-sample convolution gradients (unfolded input and gradients):
        /// 2 MiB, the L2 cache of the machines we measured on (2-core AMD EPYC); larger chunks spill to memory.</summary>
        public static long ChunkFloats { get; set; } = 1L << 19;

        /// <summary>
        /// Runs <paramref name="body"/> with the network in eval mode and every parameter of segments 1..exit requiring
        /// gradients, then restores both and clears the gradients. <paramref name="indices"/>: the first
        /// <paramref name="maxSamples"/> of a seeded shuffle (all when ≤ 0).
        /// </summary>
        public static T WithSamples<T>(MultiExitNetwork net, int exit, ImageDataset data, int maxSamples, int seed,
            Func<int[], List<(string name, Parameter parameter)>, T> body)
        {
            net.CheckExit(exit);
            var order = Enumerable.Range(0, data.Count).ToArray();
            new Random(seed).Shuffle(order);
            int n = maxSamples > 0 ? Math.Min(maxSamples, data.Count) : data.Count;
            if (n == 0) throw new ArgumentException("at least one sample is needed");
            var indices = order.AsSpan(0, n).ToArray();
            bool wasTraining = net.training;
            var targets = net.SegmentParameters(exit).ToList();
            var savedRequiresGrad = targets.Select(t => t.parameter.requires_grad).ToArray();
            net.eval();
            try
            {
                return body(indices, targets);
            }
            finally
            {
                for (int i = 0; i < targets.Count; i++) targets[i].parameter.requires_grad = savedRequiresGrad[i];
                net.zero_grad();
                net.train(wasTraining);
            }
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

        /// <summary>
        /// Sums r(per-sample gradient) of every parameter in <paramref name="targets"/> (segments 1..exit) over the samples
        /// <paramref name="indices"/>, in batches. <paramref name="objectives"/> maps a batch's logits of exit ν and its
        /// sample indices to one or more scalars, each a sum over the batch of per-sample terms; every objective's
        /// per-sample gradients are reduced and added. Returns the sums (not divided by the number of samples).
        /// </summary>
        public static Dictionary<string, Tensor> Sum(MultiExitNetwork net, int exit, ImageDataset data, int[] indices, int batchSize, Device device,
            List<(string name, Parameter parameter)> targets, PerSampleReduction reduction, Func<Tensor, int[], IReadOnlyList<Tensor>> objectives,
            string what)
        {
            if (batchSize < 1) throw new ArgumentOutOfRangeException(nameof(batchSize), "batch size must be positive");
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
                                throw new NotSupportedException($"{what}: convolution {full.TrimEnd('.')} (groups {conv.groups}, padding mode {conv.padding_mode}) is not supported; use the naive estimator");
                            captures.Add(new Capture { Module = conv, WeightName = full + "weight", BiasName = conv.bias is null ? null : full + "bias" });
                            break;
                        case Linear lin:
                            captures.Add(new Capture { Module = lin, WeightName = full + "weight", BiasName = lin.bias is null ? null : full + "bias" });
                            break;
                        case BatchNorm2d bn:
                            if (!bn.affine) continue;
                            if (!bn.track_running_stats) throw new NotSupportedException($"{what}: BatchNorm {full.TrimEnd('.')} has no running statistics");
                            captures.Add(new Capture { Module = bn, WeightName = full + "weight", BiasName = full + "bias" });
                            break;
                        default:
                            throw new NotSupportedException($"{what}: layer {full.TrimEnd('.')} of type {module.GetType().Name} is not supported; use the naive estimator");
                    }
                    covered.Add(full + "weight");
                    if (captures[^1].BiasName is { } b) covered.Add(b);
                }
            }
            var missing = targets.Select(t => t.name).Where(n => !covered.Contains(n)).ToList();
            if (missing.Count > 0)
                throw new NotSupportedException($"{what}: parameters outside supported layers: {string.Join(", ", missing)}; use the naive estimator");

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
                    var idx = indices.AsSpan(start, Math.Min(batchSize, indices.Length - start)).ToArray();
                    foreach (var c in captures) c.Calls = 0;
                    // The input requires grad so that a graph exists even where every parameter is frozen.
                    var x = data.Images(idx, device).requires_grad_(true);
                    var logits = net.ForwardExit(x, exit);
                    foreach (var c in captures)
                        if (c.Calls != 1)
                            throw new NotSupportedException($"{what}: layer {c.WeightName[..^7]} ran {c.Calls} times in one forward pass; use the naive estimator");
                    var totals = objectives(logits, idx);
                    var outputs = captures.Select(c => c.Output!).ToList();
                    for (int o = 0; o < totals.Count; o++)
                    {
                        bool last = o == totals.Count - 1;
                        var grads = autograd.grad(new[] { totals[o] }, outputs, retain_graph: !last, create_graph: false, allow_unused: true);
                        using var noGrad = no_grad();
                        for (int k = 0; k < captures.Count; k++)
                        {
                            var c = captures[k];
                            var g = grads[k];
                            if (g is null || g.IsInvalid) continue;
                            Accumulate(c, c.Input!.detach(), g.detach(), sums, reduction);
                        }
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

        /// <summary>r(x) in place: x² or |x|.</summary>
        static Tensor Reduce_(Tensor x, PerSampleReduction r) => r == PerSampleReduction.Square ? x.mul_(x) : x.abs_();

        /// <summary>Adds Σ_i r(per-sample gradient_i) of the layer's parameters to the sums.</summary>
        static void Accumulate(Capture c, Tensor a, Tensor g, Dictionary<string, Tensor> sums, PerSampleReduction reduction)
        {
            long n = a.shape[0];
            bool square = reduction == PerSampleReduction.Square;
            switch (c.Module)
            {
                case Linear:
                    {
                        if (a.dim() != 2) throw new NotSupportedException($"per-sample gradients: linear layer {c.WeightName} with input of {a.dim()} dimensions");
                        // Per-sample weight gradient g_i a_iᵀ: its square is g_i² (a_i²)ᵀ and its absolute value |g_i| |a_i|ᵀ.
                        if (square)
                        {
                            sums[c.WeightName].add_((g * g).t().mm(a * a));
                            if (c.BiasName is { } b) sums[b].add_((g * g).sum(0L));
                        }
                        else
                        {
                            sums[c.WeightName].add_(g.abs().t().mm(a.abs()));
                            if (c.BiasName is { } b) sums[b].add_(g.abs().sum(0L));
                        }
                        break;
                    }
                case Conv2d conv:
                    {
                        long cout = conv.out_channels;
                        long k = a.shape[1] * conv.kernel_size[0] * conv.kernel_size[1];
                        long l = g.shape[2] * g.shape[3];
                        var gm = g.reshape(n, cout, l);
                        // Per-sample gradients G_i U_iᵀ (Cout × K) from the unfolded input U_i (K × L), reduced and summed.
                        // Unfold, product and reduction run on a few samples at a time, so that the unfolded input and the
                        // per-sample gradients (chunk × (Cout·K + K·L) floats) stay in cache: unfolding the whole batch
                        // (9× the activations of a 3×3 conv) and materialising N × Cout × K made this 3–8× slower
                        // (bench: results/bench, figure "per-sample Fisher").
                        long chunk = Math.Clamp(ChunkFloats / Math.Max(1, cout * k + k * l), 1, n);
                        var acc = zeros(cout, k, dtype: a.dtype, device: a.device);
                        for (long s = 0; s < n; s += chunk)
                        {
                            long len = Math.Min(chunk, n - s);
                            using var inner = NewDisposeScope();
                            var u = nn.functional.unfold(a.narrow(0, s, len), (conv.kernel_size[0], conv.kernel_size[1]),
                                (conv.dilation[0], conv.dilation[1]), (conv.padding[0], conv.padding[1]), (conv.stride[0], conv.stride[1]));
                            var perSample = gm.narrow(0, s, len).bmm(u.transpose(1, 2));
                            acc.add_(Reduce_(perSample, reduction).sum(0L));
                        }
                        sums[c.WeightName].add_(acc.reshape(sums[c.WeightName].shape));
                        if (c.BiasName is { } b)
                        {
                            var gb = g.sum(new long[] { 2, 3 });
                            sums[b].add_(square ? (gb * gb).sum(0L) : gb.abs().sum(0L));
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
                        sums[c.WeightName].add_(square ? (gw * gw).sum(0L) : gw.abs().sum(0L));
                        sums[c.BiasName!].add_(square ? (gb * gb).sum(0L) : gb.abs().sum(0L));
                        break;
                    }
            }
        }

        /// <summary>Divides every sum by the number of samples (in place) and returns them.</summary>
        public static Dictionary<string, Tensor> Mean(Dictionary<string, Tensor> sums, int count)
        {
            using var c = count.ToScalar();
            foreach (var s in sums.Values) s.div_(c);
            return sums;
        }
    }
}
