using System;
using System.Collections.Generic;
using EarlyExit.Losses;
using static TorchSharp.torch;

namespace EarlyExit.Regularisers
{
    /// <summary>
    /// Memory Aware Synapses (Aljundi et al., ECCV 2018), for sequentially trained exits: after exit ν's stage, the
    /// importance of a parameter is the mean over training samples of the absolute value of the per-sample gradient of
    /// the squared L2 norm of exit ν's logits, Ω_k(ν) = mean_i |∂‖z_ν(x_i)‖² / ∂θ_k| (no labels needed), computed per
    /// sample like the Fisher (<see cref="PerSampleGradients"/>); setting "samples" caps the samples (0: all).
    /// Importances add up online over exits and weigh the squared change since the previous stage:
    /// R_MAS(μ) = Σ_k (Σ_{ν&lt;μ} Ω_k(ν)) (θ_k − θ*_k)² over segments 1..μ−1, as EWC with Ω in place of F.
    /// </summary>
    public sealed class MasRegulariser : QuadraticRegulariser
    {
        public static readonly IRegulariserKind KindInfo = new MasKind();

        public MasRegulariser(IReadOnlyDictionary<string, string> settings) : base(settings) => Samples = RegulariserRegistry.IntSetting(settings, "samples");

        /// <summary>Cap on the training samples of each importance estimate (0: all).</summary>
        public int Samples { get; }
        public override IRegulariserKind Kind => KindInfo;
        protected override string ImportanceName => "importance";

        protected override Dictionary<string, Tensor> Importances(StageContext stage, int exit) =>
            Compute(stage.Net, exit, stage.Data.Train, Samples, Math.Min(stage.Plan.EvalBatchSize, 128), stage.Plan.Seed, stage.Device);

        /// <summary>Ω(ν) for every parameter of segments 1..<paramref name="exit"/> over the first <paramref name="maxSamples"/>
        /// samples of a seeded shuffle (all when ≤ 0), network in eval mode, no augmentation; owned by the caller.</summary>
        public static Dictionary<string, Tensor> Compute(Models.MultiExitNetwork net, int exit, Data.ImageDataset data, int maxSamples = 0,
            int batchSize = 64, int seed = 0, Device? device = null)
        {
            device ??= System.Linq.Enumerable.First(net.parameters()).device;
            return PerSampleGradients.WithSamples(net, exit, data, maxSamples, seed, (indices, targets) =>
                PerSampleGradients.Mean(PerSampleGradients.Sum(net, exit, data, indices, batchSize, device, targets, PerSampleReduction.Absolute,
                    (logits, _) => new[] { (logits * logits).sum() }, "MAS importance"), indices.Length));
        }

        sealed class MasKind : IRegulariserKind
        {
            public string Name => "mas";
            public string Description => "memory aware synapses: the mean absolute gradient of ‖logits‖² of each earlier exit, added up online, weighs the squared change of segments 1..μ−1 since the previous stage";
            public string StrengthName => "lambda";
            public double DefaultStrength => 1;
            public IReadOnlyList<RegulariserSetting> Settings { get; } = new[]
            {
                new RegulariserSetting("samples", "0", "training samples of each importance estimate (0: all)", RegulariserRegistry.NonNegativeInt, Integer: true),
            };
            public bool ReadsProtectedExits => false;
            public IReadOnlyList<int> StateRead(IReadOnlyDictionary<string, string> settings, IReadOnlyList<int> protects) => protects;
            public double PenaltyForwardMacs(IReadOnlyDictionary<string, string> settings, IReadOnlyList<int> protects, IReadOnlyList<long> exitMacs) => 0;
            public double ConsolidationMacs(IReadOnlyDictionary<string, string> settings, int stageExit, int trainImages, int classes, IReadOnlyList<long> exitMacs)
            {
                int samples = RegulariserRegistry.IntSetting(settings, "samples");
                return (samples > 0 ? Math.Min(samples, trainImages) : trainImages) * 3.0 * exitMacs[stageExit - 1];
            }
            public IRegulariser Create(IReadOnlyDictionary<string, string> settings) => new MasRegulariser(settings);
        }
    }
}
