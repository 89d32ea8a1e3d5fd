using System;
using System.Collections.Generic;
using EarlyExit.Losses;
using static TorchSharp.torch;

namespace EarlyExit.Regularisers
{
    /// <summary>
    /// Elastic Weight Consolidation, online, as in the 2026 paper (eq. 2–3): R_EWC(μ) = Σ_k (Σ_{ν&lt;μ} F_k(ν)) (θ_k − θ*_k)²
    /// over the parameters of segments 1..μ−1. F(ν) is computed after exit ν's stage over the training split (setting
    /// "samples", 0 for all) by the estimator of setting "fisher": "empirical" (per-sample empirical Fisher, the
    /// paper's, default), "exact", "sampled", "squared-minibatch" (the common minibatch estimator) or "empirical-naive"
    /// (one backward pass per sample; the oracle). See <see cref="FisherEstimator"/>.
    /// </summary>
    public sealed class EwcRegulariser : QuadraticRegulariser
    {
        public static readonly IRegulariserKind KindInfo = new EwcKind();

        public EwcRegulariser(IReadOnlyDictionary<string, string> settings) : base(settings)
        {
            Estimator = FisherInformation.Parse(settings["fisher"]);
            Samples = RegulariserRegistry.IntSetting(settings, "samples");
        }

        public FisherEstimator Estimator { get; }
        /// <summary>Cap on the training samples of each Fisher (0: all).</summary>
        public int Samples { get; }

        public override IRegulariserKind Kind => KindInfo;
        protected override string ImportanceName => "Fisher";

        protected override Dictionary<string, Tensor> Importances(StageContext stage, int exit) =>
            FisherInformation.Compute(stage.Net, exit, stage.Data.Train, Estimator, Samples, Math.Min(stage.Plan.EvalBatchSize, 128), stage.Plan.Seed, stage.Device);

        sealed class EwcKind : IRegulariserKind
        {
            public string Name => "ewc";
            public string Description => "elastic weight consolidation: the Fisher of each earlier exit, added up online, weighs the squared change of segments 1..μ−1 since the previous stage";
            public string StrengthName => "lambda";
            public double DefaultStrength => 100;
            public IReadOnlyList<RegulariserSetting> Settings { get; } = new[]
            {
                new RegulariserSetting("fisher", "empirical", "Fisher estimator: " + string.Join(", ", FisherInformation.Names), RegulariserRegistry.OneOf(FisherInformation.Names), FisherInformation.Names),
                new RegulariserSetting("samples", "0", "training samples of each Fisher (0: all)", RegulariserRegistry.NonNegativeInt, Integer: true),
            };
            public bool ReadsProtectedExits => false;
            public IReadOnlyList<int> StateRead(IReadOnlyDictionary<string, string> settings, IReadOnlyList<int> protects) => protects;
            public double PenaltyForwardMacs(IReadOnlyDictionary<string, string> settings, IReadOnlyList<int> protects, IReadOnlyList<long> exitMacs) => 0;

            /// <summary>One forward and, per sample, one backward pass (≈ 2× forward) per class for the exact Fisher, one
            /// otherwise; the sampled Fisher adds a forward pass to draw its labels.</summary>
            public double ConsolidationMacs(IReadOnlyDictionary<string, string> settings, int stageExit, int trainImages, int classes, IReadOnlyList<long> exitMacs)
            {
                int samples = RegulariserRegistry.IntSetting(settings, "samples");
                long n = samples > 0 ? Math.Min(samples, trainImages) : trainImages;
                var estimator = FisherInformation.Parse(settings["fisher"]);
                double forwards = 1.0 + 2.0 * FisherInformation.BackwardPassesPerSample(estimator, classes) + (estimator == FisherEstimator.Sampled ? 1.0 : 0.0);
                return n * forwards * exitMacs[stageExit - 1];
            }

            public IRegulariser Create(IReadOnlyDictionary<string, string> settings) => new EwcRegulariser(settings);
        }
    }
}
