using System;
using System.Collections.Generic;
using System.Linq;
using EarlyExit.Models;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace EarlyExit.Flops
{
    /// <summary>How multiply-accumulates are counted. In both, one multiply-add counts as 1 (a MAC), not 2 FLOPs.</summary>
    public enum MacConvention
    {
        /// <summary>Multiply-adds of convolutions and linear layers (weights only). The budgets of this project use it.</summary>
        ConvLinear,
        /// <summary>
        /// The convention of the public MSDNet code's op counter: convolutions as above, ReLU and pooling by element,
        /// linear layers W+b, BatchNorm 0.
        /// </summary>
        MsdnetReference,
    }

    /// <summary>Cost of one exit. Cumulative figures include every earlier internal classifier a sample passed through.</summary>
    public sealed record ExitCost(
        int Exit,
        long SegmentMacs,
        long HeadMacs,
        long SegmentParameters,
        long HeadParameters,
        long CumulativeBackboneMacs,
        long CumulativeMacs,
        long CumulativeParameters,
        double FractionOfBackbone);

    /// <summary>Cost of a whole network. The backbone is every segment plus the final classifier, without internal classifiers (the 100% budget).</summary>
    public sealed record NetworkCost(
        MacConvention Convention,
        long[] InputShape,
        long BackboneMacs,
        long BackboneParameters,
        long TotalParameters,
        IReadOnlyList<ExitCost> Exits)
    {
        public const string ConventionNote = "MACs: one multiply-add = 1";
    }

    /// <summary>
    /// Counts parameters and multiply-accumulates per exit by running one sample of the real input shape through
    /// the real modules, segment by segment and head by head, with a forward hook on every leaf module.
    /// </summary>
    public static class MacCounter
    {
        public static NetworkCost Count(MultiExitNetwork net, MacConvention convention = MacConvention.ConvLinear)
        {
            int m = net.ExitCount;
            var segMacs = new long[m];
            var headMacs = new long[m];
            long[]? bucket = null;
            int bucketIndex = 0;

            var removers = new List<Action>();
            foreach (var (name, module) in net.named_modules())
            {
                if (module.children().Any()) continue;
                if (module is not nn.Module<Tensor, Tensor> leaf)
                {
                    if (module.parameters().Any())
                        throw new NotSupportedException($"MacCounter cannot count leaf module '{name}' of type {module.GetType().Name}");
                    continue;
                }
                var counter = LeafCounter(leaf, name, convention);
                var remover = leaf.register_forward_hook((mod, input, output) =>
                {
                    if (bucket is not null) bucket[bucketIndex] += counter(input, output);
                    return output;
                });
                removers.Add(() => remover.remove());
            }

            bool wasTraining = net.training;
            net.eval();
            try
            {
                using var noGrad = no_grad();
                using var unfolded = BatchNormFolding.Suspend();  // a frozen network's folded forward bypasses the hooked leaves
                using var scope = NewDisposeScope();
                var p0 = net.parameters().First();
                var x = zeros(new long[] { 1 }.Concat(net.InputShape).ToArray(), dtype: p0.dtype, device: p0.device);
                Tensor[] state = { x };
                for (int mu = 1; mu <= m; mu++)
                {
                    bucket = segMacs; bucketIndex = mu - 1;
                    state = net.Segment(mu).call(state);
                    bucket = headMacs; bucketIndex = mu - 1;
                    net.Head(mu).call(state);
                }
                bucket = null;
            }
            finally
            {
                foreach (var r in removers) r();
                net.train(wasTraining);
            }

            var segParams = Enumerable.Range(1, m).Select(mu => net.GroupParameters(MultiExitNetwork.SegmentGroup(mu)).Sum(p => p.parameter.numel())).ToArray();
            var headParams = Enumerable.Range(1, m).Select(mu => net.GroupParameters(MultiExitNetwork.HeadGroup(mu)).Sum(p => p.parameter.numel())).ToArray();
            long backboneMacs = segMacs.Sum() + headMacs[m - 1];
            long backboneParams = segParams.Sum() + headParams[m - 1];

            var exits = new List<ExitCost>();
            long cumSeg = 0, cumHead = 0, cumParams = 0;
            for (int i = 0; i < m; i++)
            {
                cumSeg += segMacs[i];
                cumHead += headMacs[i];
                cumParams += segParams[i] + headParams[i];
                long cumBackbone = cumSeg + (i == m - 1 ? headMacs[i] : 0);
                exits.Add(new ExitCost(i + 1, segMacs[i], headMacs[i], segParams[i], headParams[i],
                    cumBackbone, cumSeg + cumHead, cumParams, (double)(cumSeg + cumHead) / backboneMacs));
            }
            return new NetworkCost(convention, net.InputShape.ToArray(), backboneMacs, backboneParams,
                net.parameters().Sum(p => p.numel()), exits);
        }

        static Func<Tensor, Tensor, long> LeafCounter(nn.Module<Tensor, Tensor> leaf, string name, MacConvention convention)
        {
            bool reference = convention == MacConvention.MsdnetReference;
            static long PerSample(Tensor t) => t.numel() / t.shape[0];
            switch (leaf)
            {
                case Conv2d conv:
                    {
                        long perOutput = conv.in_channels / conv.groups * conv.kernel_size.Aggregate(1L, (a, b) => a * b);
                        return (input, output) => PerSample(output) * perOutput;
                    }
                case Linear lin:
                    {
                        long ops = lin.in_features * lin.out_features + (reference && lin.bias is not null ? lin.out_features : 0);
                        return (input, output) => ops;
                    }
                case ReLU:
                    return (input, output) => reference ? PerSample(input) : 0;
                case AdaptiveAvgPool2d:
                case AdaptiveMaxPool2d:
                    return (input, output) => reference ? PerSample(input) : 0;
                case MaxPool2d:
                case AvgPool2d:
                    return (input, output) => reference ? PerSample(input) : 0;
                case BatchNorm2d:
                case Identity:
                case Flatten:
                case Dropout:
                    return (input, output) => 0;
                default:
                    if (leaf.parameters().Any())
                        throw new NotSupportedException($"MacCounter cannot count leaf module '{name}' of type {leaf.GetType().Name}");
                    return (input, output) => 0;
            }
        }
    }
}
