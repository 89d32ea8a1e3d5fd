using System;
using System.Collections.Generic;
using System.Linq;

namespace EarlyExit.Models
{
    /// <summary>Options a user may set on any family; null means "the family's default".</summary>
    public sealed record ModelOptions
    {
        public int? NumClasses { get; init; }
        /// <summary>Input (C, H, W), e.g. 1×28×28 for Fashion-MNIST.</summary>
        public long[]? InputShape { get; init; }
        /// <summary>Width of the first stage; later stages double it (ResNet) or scale the growth (MSDNet).</summary>
        public int? BaseWidth { get; init; }
        /// <summary>Blocks per stage (ResNet) or number of blocks (MSDNet, one value).</summary>
        public int[]? Blocks { get; init; }
        /// <summary>1-based positions of the exits (ResNet: after which block).</summary>
        public int[]? ExitPositions { get; init; }
        /// <summary>MSDNet: growth rate (channels each layer adds at the finest scale).</summary>
        public int? GrowthRate { get; init; }
        /// <summary>MSDNet: "even" or "lin_grow".</summary>
        public string? StepMode { get; init; }
        /// <summary>MSDNet: layers of the first block.</summary>
        public int? Base { get; init; }
        /// <summary>MSDNet: layers of later blocks (even) or the slope (lin_grow).</summary>
        public int? Step { get; init; }
        /// <summary>MSDNet: growth factor per scale (its length is the number of scales).</summary>
        public int[]? GrowthFactors { get; init; }
        /// <summary>MSDNet: bottleneck width factor per scale.</summary>
        public int[]? BottleneckFactors { get; init; }

        /// <summary>Names of the MSDNet-only options that are set (a ResNet refuses them).</summary>
        public IEnumerable<string> MsdNetOnlyOptionsSet()
        {
            if (GrowthRate is not null) yield return "growth";
            if (StepMode is not null) yield return "stepMode";
            if (Base is not null) yield return "base";
            if (Step is not null) yield return "step";
            if (GrowthFactors is not null) yield return "grFactor";
            if (BottleneckFactors is not null) yield return "bnFactor";
        }

        public static readonly ModelOptions Default = new();
    }

    /// <summary>A registered family: its name, what it is, its defaults, and the factory.</summary>
    public sealed record ModelFamily(string Name, string Summary, string Defaults, Func<ModelOptions, MultiExitNetwork> Create,
        Func<ModelOptions, int> ExitCount, Func<ModelOptions, IReadOnlyList<string>> Problems);

    /// <summary>The model zoo: names mapped to factories, each family's defaults beside it.</summary>
    public static class ModelRegistry
    {
        static readonly Dictionary<string, ModelFamily> families = new(StringComparer.OrdinalIgnoreCase);

        static ModelRegistry()
        {
            Register(new ModelFamily(
                "resnet34",
                "ResNet-34, CIFAR stem, BasicBlocks [3,4,6,3], 8 exits after blocks 2,4,...,16 (SDN heads, final avg-pool + linear)",
                "blocks 3,4,6,3; width 64 (64-128-256-512); exits 2,4,6,8,10,12,14,16; 100 classes; input 3x32x32",
                CreateResNet34,
                o => ResNet34Config(o).ExitAfterBlocks.Length,
                o => ResNet34Config(o).Problems().Concat(o.MsdNetOnlyOptionsSet().Select(n => $"{n}: an MSDNet option, not a ResNet one")).ToList()));
            Register(new ModelFamily(
                "msdnet",
                "MSDNet (Huang et al. 2018), CIFAR variant: 7 blocks / 7 exits, 3 scales, dense multi-scale layers, classifiers on the coarsest scale",
                "blocks 7 (layers 4,2,2,2,2,2,2); 16 channels; growth 6; grFactor 1-2-4; bnFactor 1-2-4; reduction 0.5; 100 classes; input 3x32x32",
                o => new MsdNet(MsdNetConfigOf(o)),
                o => MsdNetConfigOf(o).Blocks,
                o =>
                {
                    var p = MsdNetConfigOf(o).Problems().ToList();
                    if (o.ExitPositions is not null) p.Add("exits: MSDNet has one exit per block; set the number of blocks instead");
                    if (o.Blocks is { Length: not 1 }) p.Add("blocks: MSDNet takes one value, the number of blocks");
                    return p;
                }));
        }

        public static MsdNetConfig MsdNetConfigOf(ModelOptions o)
        {
            var d = new MsdNetConfig();
            return d with
            {
                Blocks = o.Blocks is { Length: 1 } b ? b[0] : d.Blocks,
                Channels = o.BaseWidth ?? d.Channels,
                NumClasses = o.NumClasses ?? d.NumClasses,
                InputShape = o.InputShape ?? d.InputShape,
                GrowthRate = o.GrowthRate ?? d.GrowthRate,
                StepMode = o.StepMode ?? d.StepMode,
                Base = o.Base ?? d.Base,
                Step = o.Step ?? d.Step,
                GrowthFactor = o.GrowthFactors ?? d.GrowthFactor,
                BottleneckFactor = o.BottleneckFactors ?? d.BottleneckFactor,
            };
        }

        public static void Register(ModelFamily family) => families[family.Name] = family;

        public static IReadOnlyList<ModelFamily> Families => families.Values.OrderBy(f => f.Name).ToList();

        public static ModelFamily Get(string name) =>
            families.TryGetValue(name, out var f)
                ? f
                : throw new ArgumentException($"unknown model '{name}'; known models: {string.Join(", ", families.Keys.OrderBy(k => k))} " +
                    "(a model of your own is registered by its plugin: --plugin ASSEMBLY.dll or $EARLYEXIT_PLUGINS)");

        /// <summary>Builds a registered model; options that do not fit the family are refused with every reason.</summary>
        public static MultiExitNetwork Create(string name, ModelOptions? options = null)
        {
            var family = Get(name);
            options ??= ModelOptions.Default;
            // A library user's first use may be here: TorchSharp must be loadable before any module is made.
            Native.TorchNativeLoader.EnsureLoaded();
            var problems = family.Problems(options);
            if (problems.Count > 0) throw new ArgumentException($"{family.Name}: " + string.Join("; ", problems));
            return family.Create(options);
        }

        /// <summary>Default exits of a ResNet with <paramref name="totalBlocks"/> blocks: after every second block and after the last.</summary>
        public static int[] EverySecondBlock(int totalBlocks) =>
            Enumerable.Range(1, totalBlocks).Where(b => b % 2 == 0 || b == totalBlocks).ToArray();

        public static ResNetConfig ResNet34Config(ModelOptions o)
        {
            var blocks = o.Blocks ?? new[] { 3, 4, 6, 3 };
            int w = o.BaseWidth ?? 64;
            return new ResNetConfig
            {
                Blocks = blocks,
                Widths = Enumerable.Range(0, blocks.Length).Select(i => w << i).ToArray(),
                ExitAfterBlocks = o.ExitPositions ?? EverySecondBlock(blocks.Sum()),
                NumClasses = o.NumClasses ?? 100,
                InputShape = o.InputShape ?? new long[] { 3, 32, 32 },
            };
        }

        static MultiExitNetwork CreateResNet34(ModelOptions o) => new MultiExitResNet(ResNet34Config(o), "resnet34");
    }
}
