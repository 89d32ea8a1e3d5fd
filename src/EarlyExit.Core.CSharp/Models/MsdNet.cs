using System;
using System.Collections.Generic;
using System.Linq;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace EarlyExit.Models
{
    /// <summary>
    /// Configuration of MSDNet (Huang et al. 2018), with the settings of its public code for CIFAR anytime prediction
    /// as defaults: 7 blocks, step mode even, step 2, base 4, 16 channels, growth rate 6, grFactor 1-2-4,
    /// bnFactor 1-2-4, bottlenecks, max-pool pruning of scales, reduction 0.5.
    /// </summary>
    public sealed record MsdNetConfig
    {
        public int Blocks { get; init; } = 7;
        /// <summary>"even" (every block after the first has <see cref="Step"/> layers) or "lin_grow" (step·i + 1).</summary>
        public string StepMode { get; init; } = "even";
        public int Step { get; init; } = 2;
        /// <summary>Layers of the first block.</summary>
        public int Base { get; init; } = 4;
        public int Channels { get; init; } = 16;
        public int GrowthRate { get; init; } = 6;
        public int[] GrowthFactor { get; init; } = { 1, 2, 4 };
        public int[] BottleneckFactor { get; init; } = { 1, 2, 4 };
        public bool Bottleneck { get; init; } = true;
        public double Reduction { get; init; } = 0.5;
        public int NumClasses { get; init; } = 100;
        public long[] InputShape { get; init; } = { 3, 32, 32 };

        public int Scales => GrowthFactor.Length;

        public int[] LayersPerBlock() =>
            Enumerable.Range(0, Blocks).Select(i => i == 0 ? Base : StepMode == "even" ? Step : Step * i + 1).ToArray();

        public IReadOnlyList<string> Problems()
        {
            var p = new List<string>();
            if (Blocks < 1) p.Add("blocks: at least one block");
            if (Base < 1 || Step < 1) p.Add("base and step must be positive");
            if (StepMode != "even" && StepMode != "lin_grow") p.Add($"step mode '{StepMode}' is not even or lin_grow");
            if (Channels < 1 || GrowthRate < 1) p.Add("channels and growth rate must be positive");
            if (GrowthFactor.Length == 0 || GrowthFactor.Length != BottleneckFactor.Length) p.Add("growth and bottleneck factors need one value per scale");
            if (Reduction < 0 || Reduction > 1) p.Add("reduction must lie in [0, 1]");
            if (NumClasses < 2) p.Add($"classes: {NumClasses} is fewer than 2");
            if (InputShape.Length != 3 || InputShape.Any(s => s < 1)) p.Add("input: must be C×H×W with positive sizes");
            else
            {
                // The classifiers halve the coarsest scale twice and pool 2×2: it must keep at least 5 pixels.
                long coarsest = Math.Min(InputShape[1], InputShape[2]);
                for (int s = 1; s < Scales; s++) coarsest = (coarsest - 1) / 2 + 1;
                if (coarsest < 5) p.Add($"input: {InputShape[1]}×{InputShape[2]} is too small: its coarsest scale ({coarsest} pixels) must keep at least 5 for the classifiers");
            }
            return p;
        }
    }

    /// <summary>3×3 (or k×k) convolution, BatchNorm, ReLU: ConvBasic of the reference.</summary>
    public sealed class ConvBnRelu : nn.Module<Tensor, Tensor>, IBatchNormFoldable
    {
        private readonly Conv2d conv;
        private readonly BatchNorm2d bn;
        private readonly ReLU relu;
        private readonly long stride, padding;
        private FoldedConv? folded;

        public ConvBnRelu(string name, long nIn, long nOut, long kernel = 3, long stride = 1, long padding = 1) : base(name)
        {
            conv = nn.Conv2d(nIn, nOut, kernel, stride: stride, padding: padding, bias: false);
            bn = nn.BatchNorm2d(nOut);
            relu = nn.ReLU();
            this.stride = stride;
            this.padding = padding;
            RegisterComponents();
        }

        public override Tensor forward(Tensor x) =>
            folded is not null && !training && !is_grad_enabled() && folded.Serves(x)
                ? folded.Forward(x).relu_()
                : relu.call(bn.call(conv.call(x)));

        public bool IsFolded => folded is not null;

        public void FoldBatchNorm()
        {
            folded?.Dispose();
            folded = new FoldedConv(conv, bn, stride, padding);
        }

        protected override void Dispose(bool disposing)
        {
            if (disposing) { folded?.Dispose(); folded = null; }
            base.Dispose(disposing);
        }
    }

    /// <summary>ConvBN of the reference: optional 1×1 bottleneck, then a 3×3 convolution (stride 2 when "down").</summary>
    public sealed class MsdConvBn : nn.Module<Tensor, Tensor>
    {
        private readonly ConvBnRelu? bottleneck;
        private readonly ConvBnRelu conv;

        public MsdConvBn(string name, long nIn, long nOut, bool down, bool useBottleneck, int bnWidth) : base(name)
        {
            long inner = nIn;
            if (useBottleneck)
            {
                inner = Math.Min(nIn, bnWidth * nOut);
                bottleneck = new ConvBnRelu("bottleneck", nIn, inner, kernel: 1, stride: 1, padding: 0);
            }
            conv = new ConvBnRelu("conv", inner, nOut, kernel: 3, stride: down ? 2 : 1, padding: 1);
            RegisterComponents();
        }

        public override Tensor forward(Tensor x) => conv.call(bottleneck is null ? x : bottleneck.call(x));
    }

    /// <summary>One output scale of an MSDNet layer: [finer input (downsampled) and] same-scale input, concatenated with the input.</summary>
    public sealed class MsdScaleUnit : nn.Module<Tensor[], Tensor>
    {
        private readonly MsdConvBn? down;
        private readonly MsdConvBn normal;

        /// <summary>With <paramref name="nInFiner"/> &gt; 0 the unit reads (finer, same) scales: ConvDownNormal; else ConvNormal.</summary>
        public MsdScaleUnit(string name, long nInFiner, long nIn, long nOut, bool useBottleneck, int bnWidthFiner, int bnWidth) : base(name)
        {
            if (nInFiner > 0)
            {
                down = new MsdConvBn("down", nInFiner, nOut / 2, true, useBottleneck, bnWidthFiner);
                normal = new MsdConvBn("normal", nIn, nOut / 2, false, useBottleneck, bnWidth);
            }
            else normal = new MsdConvBn("normal", nIn, nOut, false, useBottleneck, bnWidth);
            RegisterComponents();
        }

        public override Tensor forward(Tensor[] x) =>
            down is null
                ? cat(new[] { x[0], normal.call(x[0]) }, 1)
                : cat(new[] { x[1], down.call(x[0]), normal.call(x[1]) }, 1);
    }

    /// <summary>An MSDNet layer: from inScales input scales to outScales output scales (the finest are dropped as depth grows).</summary>
    public sealed class MsdLayer : nn.Module<Tensor[], Tensor[]>
    {
        private readonly ModuleList<MsdScaleUnit> units;
        private readonly int discard;

        public MsdLayer(string name, MsdNetConfig c, long nIn, long nOut, int inScales, int outScales) : base(name)
        {
            int offset = c.Scales - outScales;
            discard = inScales - outScales;
            var list = new List<MsdScaleUnit>();
            var g = c.GrowthFactor;
            var b = c.BottleneckFactor;
            if (discard > 0)
                list.Add(new MsdScaleUnit("0", nIn * g[offset - 1], nIn * g[offset], nOut * g[offset], c.Bottleneck, b[offset - 1], b[offset]));
            else
                list.Add(new MsdScaleUnit("0", 0, nIn * g[offset], nOut * g[offset], c.Bottleneck, 0, b[offset]));
            for (int i = offset + 1; i < c.Scales; i++)
                list.Add(new MsdScaleUnit($"{i - offset}", nIn * g[i - 1], nIn * g[i], nOut * g[i], c.Bottleneck, b[i - 1], b[i]));
            units = nn.ModuleList(list.ToArray());
            RegisterComponents();
        }

        public override Tensor[] forward(Tensor[] x)
        {
            var res = new Tensor[units.Count];
            for (int i = 0; i < units.Count; i++)
            {
                // Unit i reads scales (i−1, i) of the input, shifted by the discarded finest scales.
                int at = i + discard;
                res[i] = discard > 0 || i > 0 ? units[i].call(new[] { x[at - 1], x[at] }) : units[i].call(new[] { x[0] });
            }
            return res;
        }
    }

    /// <summary>First layer: a 3×3 ConvBasic per scale, each scale downsampling the previous one (CIFAR variant).</summary>
    public sealed class MsdFirstLayer : nn.Module<Tensor[], Tensor[]>
    {
        private readonly ModuleList<ConvBnRelu> convs;

        public MsdFirstLayer(string name, MsdNetConfig c) : base(name)
        {
            var list = new List<ConvBnRelu> { new ConvBnRelu("0", c.InputShape[0], c.Channels * c.GrowthFactor[0]) };
            for (int i = 1; i < c.Scales; i++)
                list.Add(new ConvBnRelu($"{i}", c.Channels * c.GrowthFactor[i - 1], c.Channels * c.GrowthFactor[i], stride: 2));
            convs = nn.ModuleList(list.ToArray());
            RegisterComponents();
        }

        public override Tensor[] forward(Tensor[] x)
        {
            var res = new Tensor[convs.Count];
            var h = x[0];
            for (int i = 0; i < convs.Count; i++) { h = convs[i].call(h); res[i] = h; }
            return res;
        }
    }

    /// <summary>Transition after pruning a scale: a 1×1 ConvBasic per remaining scale reducing the channels.</summary>
    public sealed class MsdTransition : nn.Module<Tensor[], Tensor[]>
    {
        private readonly ModuleList<ConvBnRelu> convs;

        public MsdTransition(string name, MsdNetConfig c, long nIn, long nOut, int outScales) : base(name)
        {
            int offset = c.Scales - outScales;
            convs = nn.ModuleList(Enumerable.Range(0, outScales)
                .Select(i => new ConvBnRelu($"{i}", nIn * c.GrowthFactor[offset + i], nOut * c.GrowthFactor[offset + i], kernel: 1, stride: 1, padding: 0)).ToArray());
            RegisterComponents();
        }

        public override Tensor[] forward(Tensor[] x) => x.Select((t, i) => convs[i].call(t)).ToArray();
    }

    /// <summary>A block of MSDNet as a segment: its layers in order (first layer, MSDNet layers, transitions).</summary>
    public sealed class MsdBlock : nn.Module<Tensor[], Tensor[]>
    {
        private readonly ModuleList<nn.Module<Tensor[], Tensor[]>> layers;

        public MsdBlock(string name, IEnumerable<nn.Module<Tensor[], Tensor[]>> items) : base(name)
        {
            layers = nn.ModuleList(items.ToArray());
            RegisterComponents();
        }

        public override Tensor[] forward(Tensor[] x)
        {
            foreach (var l in layers) x = l.call(x);
            return x;
        }
    }

    /// <summary>CIFAR classifier of MSDNet on the coarsest scale: two strided ConvBasic, 2×2 average pool, linear.</summary>
    public sealed class MsdClassifier : nn.Module<Tensor[], Tensor>
    {
        private readonly ConvBnRelu conv1;
        private readonly ConvBnRelu conv2;
        private readonly AvgPool2d pool;
        private readonly Linear linear;

        public MsdClassifier(string name, long nIn, int numClasses, long coarsestSide) : base(name)
        {
            const long inter = 128;
            conv1 = new ConvBnRelu("conv1", nIn, inter, stride: 2);
            conv2 = new ConvBnRelu("conv2", inter, inter, stride: 2);
            pool = nn.AvgPool2d(2);
            long side = ((coarsestSide - 1) / 2 + 1 - 1) / 2 + 1;
            long pooled = side / 2;
            linear = nn.Linear(inter * pooled * pooled, numClasses);
            RegisterComponents();
        }

        public override Tensor forward(Tensor[] x) => linear.call(pool.call(conv2.call(conv1.call(x[^1]))).flatten(1));
    }

    /// <summary>
    /// MSDNet as a multi-exit network: segment μ is everything block μ adds, exit μ its classifier on the coarsest scale.
    /// </summary>
    public sealed class MsdNet : MultiExitNetwork
    {
        private readonly ModuleList<nn.Module<Tensor[], Tensor[]>> segments;
        private readonly ModuleList<nn.Module<Tensor[], Tensor>> heads;

        public MsdNetConfig Config { get; }

        public MsdNet(MsdNetConfig config) : base("MsdNet")
        {
            var problems = config.Problems();
            if (problems.Count > 0) throw new ArgumentException("invalid MSDNet configuration: " + string.Join("; ", problems));
            Config = config;
            var steps = config.LayersPerBlock();
            int all = steps.Sum(), current = 0;
            long nIn = config.Channels;
            int interval = (int)Math.Ceiling((double)all / config.Scales);
            var segmentList = new List<nn.Module<Tensor[], Tensor[]>>();
            var headList = new List<nn.Module<Tensor[], Tensor>>();
            long coarsest = config.InputShape[1];
            for (int s = 1; s < config.Scales; s++) coarsest = (coarsest - 1) / 2 + 1;
            for (int blk = 0; blk < config.Blocks; blk++)
            {
                var items = new List<nn.Module<Tensor[], Tensor[]>>();
                if (current == 0) items.Add(new MsdFirstLayer("first", config));
                for (int i = 0; i < steps[blk]; i++)
                {
                    current++;
                    // Max-pool pruning: the number of scales drops every `interval` layers.
                    int inScales = config.Scales - Math.Max(0, current - 2) / interval;
                    int outScales = config.Scales - (current - 1) / interval;
                    items.Add(new MsdLayer($"layer{current}", config, nIn, config.GrowthRate, inScales, outScales));
                    nIn += config.GrowthRate;
                    if (inScales > outScales && config.Reduction > 0)
                    {
                        long nOut = (long)Math.Floor(config.Reduction * nIn);
                        items.Add(new MsdTransition($"transition{current}", config, nIn, nOut, outScales));
                        nIn = nOut;
                    }
                }
                segmentList.Add(new MsdBlock($"block{blk + 1}", items));
                headList.Add(new MsdClassifier($"classifier{blk + 1}", nIn * config.GrowthFactor[^1], config.NumClasses, coarsest));
            }
            segments = nn.ModuleList(segmentList.ToArray());
            heads = nn.ModuleList(headList.ToArray());
            RegisterComponents();
        }

        public override MultiExitNetwork CreateSibling() => new MsdNet(Config);
        public override int ExitCount => segments.Count;
        public override int NumClasses => Config.NumClasses;
        public override long[] InputShape => Config.InputShape;
        public override nn.Module<Tensor[], Tensor[]> Segment(int exit) { CheckExit(exit); return segments[exit - 1]; }
        public override nn.Module<Tensor[], Tensor> Head(int exit) { CheckExit(exit); return heads[exit - 1]; }

        public override string Describe() =>
            $"msdnet: {Config.Blocks} blocks (layers {string.Join(",", Config.LayersPerBlock())}, step mode {Config.StepMode}), " +
            $"{Config.Channels} channels, growth {Config.GrowthRate}, grFactor {string.Join("-", Config.GrowthFactor)}, bnFactor {string.Join("-", Config.BottleneckFactor)}, " +
            $"reduction {Config.Reduction}, {Config.NumClasses} classes, input {string.Join("x", Config.InputShape)}";
    }
}
