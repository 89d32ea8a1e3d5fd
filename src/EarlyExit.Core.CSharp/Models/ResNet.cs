using System;
using System.Collections.Generic;
using System.Linq;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace EarlyExit.Models
{
    /// <summary>Configuration of a multi-exit ResNet with a CIFAR stem. Defaults: the paper's ResNet-34 with 8 exits.</summary>
    public sealed record ResNetConfig
    {
        /// <summary>BasicBlocks per stage.</summary>
        public int[] Blocks { get; init; } = { 3, 4, 6, 3 };
        /// <summary>Channels of each stage (the stem has the first stage's width).</summary>
        public int[] Widths { get; init; } = { 64, 128, 256, 512 };
        /// <summary>1-based block indices after which an exit sits; the last must be the last block.</summary>
        public int[] ExitAfterBlocks { get; init; } = { 2, 4, 6, 8, 10, 12, 14, 16 };
        public int NumClasses { get; init; } = 100;
        /// <summary>Input (C, H, W).</summary>
        public long[] InputShape { get; init; } = { 3, 32, 32 };
        /// <summary>Output side of the SDN pooling of the internal classifiers.</summary>
        public int SdnPoolSize { get; init; } = 4;

        public int TotalBlocks => Blocks.Sum();

        /// <summary>Every problem with this configuration, each as one sentence; empty when it is valid.</summary>
        public IReadOnlyList<string> Problems()
        {
            var p = new List<string>();
            if (Blocks.Length == 0 || Blocks.Any(b => b < 1)) p.Add("blocks: every stage needs at least one block");
            if (Widths.Length != Blocks.Length) p.Add($"widths: {Widths.Length} widths for {Blocks.Length} stages");
            if (Widths.Any(w => w < 1)) p.Add("widths: must be positive");
            if (NumClasses < 2) p.Add($"classes: {NumClasses} is fewer than 2");
            if (InputShape.Length != 3 || InputShape.Any(s => s < 1)) p.Add("input: must be C×H×W with positive sizes");
            else if (InputShape[1] < 1 << (Blocks.Length - 1) || InputShape[2] < 1 << (Blocks.Length - 1))
                p.Add($"input: {InputShape[1]}×{InputShape[2]} is too small for {Blocks.Length} stages");
            if (ExitAfterBlocks.Length == 0) p.Add("exits: at least one exit is needed");
            else
            {
                for (int i = 1; i < ExitAfterBlocks.Length; i++)
                    if (ExitAfterBlocks[i] <= ExitAfterBlocks[i - 1]) { p.Add("exits: block indices must increase strictly"); break; }
                if (ExitAfterBlocks[0] < 1) p.Add("exits: block indices start at 1");
                if (ExitAfterBlocks[^1] != TotalBlocks) p.Add($"exits: the last exit must sit after the last block ({TotalBlocks}), not after {ExitAfterBlocks[^1]}");
            }
            if (SdnPoolSize < 1) p.Add("sdn pool size must be positive");
            return p;
        }
    }

    /// <summary>
    /// Multi-exit ResNet (CIFAR stem: 3×3 conv, stride 1, no max-pool; BasicBlocks). Exits 1..M−1 are SDN heads,
    /// exit M is adaptive average pooling and a linear layer. Segment 1 holds the stem.
    /// </summary>
    public sealed class MultiExitResNet : MultiExitNetwork
    {
        private readonly ModuleList<nn.Module<Tensor[], Tensor[]>> segments;
        private readonly ModuleList<nn.Module<Tensor[], Tensor>> heads;
        private readonly string family;

        public ResNetConfig Config { get; }

        public MultiExitResNet(ResNetConfig config, string family = "resnet") : base("MultiExitResNet")
        {
            var problems = config.Problems();
            if (problems.Count > 0) throw new ArgumentException("invalid ResNet configuration: " + string.Join("; ", problems));
            Config = config;
            this.family = family;

            // Block plan: (stage, index in stage) for every block, 1-based block numbers.
            var plan = new List<(int stage, int inStage)>();
            for (int s = 0; s < config.Blocks.Length; s++)
                for (int b = 0; b < config.Blocks[s]; b++) plan.Add((s, b));

            var segmentList = new List<nn.Module<Tensor[], Tensor[]>>();
            var headList = new List<nn.Module<Tensor[], Tensor>>();
            long channels = config.Widths[0];
            int start = 0;
            for (int e = 0; e < config.ExitAfterBlocks.Length; e++)
            {
                var layers = new List<(string, nn.Module<Tensor, Tensor>)>();
                if (e == 0) layers.Add(("stem", new CifarStem("stem", config.InputShape[0], config.Widths[0])));
                for (int blk = start; blk < config.ExitAfterBlocks[e]; blk++)
                {
                    var (stage, inStage) = plan[blk];
                    long outCh = config.Widths[stage];
                    long stride = stage > 0 && inStage == 0 ? 2 : 1;
                    layers.Add(($"block{blk + 1}", new BasicBlock($"block{blk + 1}", channels, outCh, stride)));
                    channels = outCh;
                }
                start = config.ExitAfterBlocks[e];
                segmentList.Add(new SequentialSegment($"segment{e + 1}", nn.Sequential(layers)));
                bool last = e == config.ExitAfterBlocks.Length - 1;
                headList.Add(last
                    ? new PoolLinearHead($"head{e + 1}", channels, config.NumClasses)
                    : new SdnHead($"head{e + 1}", channels, config.NumClasses, config.SdnPoolSize));
            }
            segments = nn.ModuleList(segmentList.ToArray());
            heads = nn.ModuleList(headList.ToArray());
            RegisterComponents();
        }

        public override MultiExitNetwork CreateSibling() => new MultiExitResNet(Config, family);

        public override int ExitCount => segments.Count;
        public override int NumClasses => Config.NumClasses;
        public override long[] InputShape => Config.InputShape;
        public override nn.Module<Tensor[], Tensor[]> Segment(int exit) { CheckExit(exit); return segments[exit - 1]; }
        public override nn.Module<Tensor[], Tensor> Head(int exit) { CheckExit(exit); return heads[exit - 1]; }

        public override string Describe() =>
            $"{family}: blocks [{string.Join(",", Config.Blocks)}], widths [{string.Join(",", Config.Widths)}], " +
            $"exits after blocks [{string.Join(",", Config.ExitAfterBlocks)}], {Config.NumClasses} classes, input {string.Join("x", Config.InputShape)}";
    }
}
