using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.IO;
using System.Linq;
using System.Text.Json;
using EarlyExit.Data;
using EarlyExit.Losses;
using EarlyExit.Models;
using EarlyExit.Regularisers;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace EarlyExit.Training
{
    public enum LrSchedule { Constant, Cosine }

    /// <summary>One training stage, resolved: what the interpreter of a recipe hands to the loop.</summary>
    public sealed record StagePlan
    {
        public required string Name { get; init; }
        /// <summary>1-based exits whose cross-entropy enters the loss, with their weights.</summary>
        public required int[] LossExits { get; init; }
        public required double[] LossWeights { get; init; }
        /// <summary>Groups ("segment3", "head2", ...) that train; every other group is frozen.</summary>
        public required string[] TrainableGroups { get; init; }
        /// <summary>μ of a sequential stage (the exit being added); 0 when the stage is not sequential.</summary>
        public int StageExit { get; init; }
        /// <summary>Exits ν whose knowledge the regularisers protect (ν &lt; μ).</summary>
        public int[] ProtectedExits { get; init; } = Array.Empty<int>();
        /// <summary>The regularisers whose penalties this stage adds to the loss, in this order, each with its strength here
        /// (the recipe's schedule resolved for μ): loss = Σ_e w_e CE_e + Σ_r strength_r · R_r.</summary>
        public RegulariserUse[] Regularisers { get; init; } = Array.Empty<RegulariserUse>();
        public double LearningRate { get; init; } = 1e-3;
        public double WeightDecay { get; init; }
        public LrSchedule Schedule { get; init; } = LrSchedule.Cosine;
        public int BatchSize { get; init; } = 128;
        public int MaxEpochs { get; init; } = 1;
        /// <summary>Early-stopping patience in epochs on the validation split (0: never stop early).</summary>
        public int Patience { get; init; }
        /// <summary>Cap on optimiser steps per epoch (0: a full pass over the training split).</summary>
        public int MaxStepsPerEpoch { get; init; }
        public int CropPadding { get; init; } = 4;
        public bool HorizontalFlip { get; init; } = true;
        /// <summary>Mixup/CutMix settings, or null for plain labels.</summary>
        public MixSettings? Mix { get; init; }
        public int Seed { get; init; }
        /// <summary>Directory for per-epoch checkpoints of this stage (resume point); null: none.</summary>
        public string? CheckpointDirectory { get; init; }
        /// <summary>Batch size of validation passes.</summary>
        public int EvalBatchSize { get; init; } = 256;
        /// <summary>The regularisers that consolidate after this stage, by name: they keep what later stages read about
        /// exit <see cref="StageExit"/> (EWC: its Fisher and the anchor; LwF: a frozen teacher).</summary>
        public string[] ConsolidateAfter { get; init; } = Array.Empty<string>();

        /// <summary>Exits whose mean validation accuracy early stopping watches: the trained and the protected ones.</summary>
        public int[] MonitorExits => LossExits.Concat(ProtectedExits).Distinct().OrderBy(e => e).ToArray();
    }

    /// <summary>Per-epoch report.</summary>
    public sealed record EpochReport(string Stage, int Epoch, double TrainLoss, double[] ValidationAccuracy, double Monitor,
        bool Improved, double Seconds, double LearningRate, int Steps);

    /// <summary>Result of a stage: the best epoch (restored into the network) and the history.</summary>
    public sealed record StageResult(string Stage, int BestEpoch, double BestMonitor, int EpochsRun, bool StoppedEarly, IReadOnlyList<EpochReport> History);

    /// <summary>A NaN or infinite loss: the run stops, the last good checkpoint stays.</summary>
    public sealed class NonFiniteLossException : Exception
    {
        public NonFiniteLossException(string message) : base(message) { }
    }

    /// <summary>One exit's term of a batch's loss: its cross-entropy (a scalar in the batch's graph) and its weight.</summary>
    public sealed record ExitLoss(int Exit, double Weight, Tensor Loss);

    /// <summary>
    /// A measurement the loop makes room for (the training-dynamics metrics): at the steps it wants, it sees the batch
    /// and every exit's loss term before the backward pass, in the batch's graph (it may take gradients of them with
    /// retain_graph; it must not change parameters or their .grad).
    /// </summary>
    public interface ITrainingProbe
    {
        /// <summary>Whether this step (0-based, counted over the stage's epochs) is one it measures.</summary>
        bool Wants(int stageStep);
        void OnLosses(StageContext stage, BatchContext batch, IReadOnlyList<ExitLoss> losses, int stageStep);
    }

    /// <summary>Hooks of the loop: progress and the end of an epoch.</summary>
    public interface ITrainingObserver
    {
        void OnStageStart(StagePlan plan, int startEpoch, int batchesPerEpoch) { }
        void OnBatch(StagePlan plan, int epoch, int batch, int batches, double loss) { }
        void OnEpochEnd(StagePlan plan, EpochReport report) { }
    }

    /// <summary>
    /// The training loop of one stage. Fixed structure; what varies is in the <see cref="StagePlan"/>:
    /// which exits give a loss, which groups train (the rest frozen: no gradient, not in the optimiser, BatchNorm in
    /// eval mode), and which regularisers apply. The loop's points, for regularisers (<see cref="IRegulariser"/>):
    /// stage start (bind), each batch's loss (penalty), after backward, after the optimiser step, stage end
    /// (consolidate, after the best epoch is restored); for observers: stage start, batch, epoch end.
    /// One dispose scope per batch.
    /// </summary>
    public static class StageTrainer
    {
        public static StageResult Run(MultiExitNetwork net, StagePlan plan, DataSplits data, RegulariserSet regs, Device device,
            ITrainingObserver? observer = null, IReadOnlyList<ITrainingProbe>? probes = null)
        {
            Validate(net, plan, regs);
            var trainable = new HashSet<string>(plan.TrainableGroups);
            var trainParams = new List<Parameter>();
            foreach (var g in net.Groups())
                foreach (var (_, p) in net.GroupParameters(g))
                {
                    p.requires_grad = trainable.Contains(g);
                    if (p.requires_grad) trainParams.Add(p);
                }

            using var optimizer = optim.AdamW(trainParams, lr: plan.LearningRate, weight_decay: plan.WeightDecay);
            var context = new StageContext(net, plan, data, device);
            var penalties = new List<(RegulariserUse use, IStagePenalty penalty)>();
            try
            {
                foreach (var use in plan.Regularisers) penalties.Add((use, regs[use.Name].Bind(context)));
                var result = RunEpochs(context, observer, probes ?? Array.Empty<ITrainingProbe>(), trainable, optimizer, penalties, regs);
                foreach (var name in plan.ConsolidateAfter) regs[name].Consolidate(context);
                return result;
            }
            finally
            {
                foreach (var (_, penalty) in penalties) penalty.Dispose();
            }
        }

        static StageResult RunEpochs(StageContext context, ITrainingObserver? observer, IReadOnlyList<ITrainingProbe> probes,
            HashSet<string> trainable, OptimizerHelper optimizer, List<(RegulariserUse use, IStagePenalty penalty)> penalties, RegulariserSet regs)
        {
            var (net, plan, data, device) = (context.Net, context.Plan, context.Data, context.Device);
            var frozenGroups = net.Groups().Where(g => !trainable.Contains(g)).ToList();
            int forwardUpTo = plan.LossExits.Concat(plan.ProtectedExits).Max();
            var needed = new bool[forwardUpTo];
            foreach (var e in plan.LossExits) needed[e - 1] = true;
            if (plan.Regularisers.Any(u => regs[u.Name].Kind.ReadsProtectedExits))
                foreach (var e in plan.ProtectedExits) needed[e - 1] = true;

            var history = new List<EpochReport>();
            int startEpoch = 0, badEpochs = 0, bestEpoch = -1;
            double best = double.NegativeInfinity;
            Dictionary<string, Tensor>? bestState = null;
            if (plan.CheckpointDirectory is { } dir && EpochCheckpoint.TryLoad(dir, net, optimizer, out var resumed))
            {
                startEpoch = resumed.NextEpoch; badEpochs = resumed.BadEpochs; best = resumed.Best; bestEpoch = resumed.BestEpoch;
                bestState = resumed.BestState; history.AddRange(resumed.History);
            }

            var train = data.Train;
            int stepsPerEpoch = (train.Count + plan.BatchSize - 1) / plan.BatchSize;
            if (plan.MaxStepsPerEpoch > 0) stepsPerEpoch = Math.Min(stepsPerEpoch, plan.MaxStepsPerEpoch);
            observer?.OnStageStart(plan, startEpoch, stepsPerEpoch);
            bool stoppedEarly = plan.Patience > 0 && badEpochs >= plan.Patience;

            for (int epoch = startEpoch; epoch < plan.MaxEpochs && !stoppedEarly; epoch++)
            {
                var clock = Stopwatch.StartNew();
                double lr = plan.Schedule == LrSchedule.Cosine && plan.MaxEpochs > 1
                    ? plan.LearningRate * 0.5 * (1 + Math.Cos(Math.PI * epoch / plan.MaxEpochs))
                    : plan.LearningRate;
                foreach (var g in optimizer.ParamGroups) g.LearningRate = lr;

                net.train();
                foreach (var g in frozenGroups) net.GroupModule(g).eval();

                int epochSeed = StableSeed(plan.Seed, plan.Name, epoch);
                var order = Enumerable.Range(0, train.Count).ToArray();
                new Random(epochSeed).Shuffle(order);
                var cropFlip = plan.CropPadding > 0 || plan.HorizontalFlip ? new CropFlip(plan.CropPadding, plan.HorizontalFlip, epochSeed) : null;
                var mix = plan.Mix is null ? null : new MixupCutmix(plan.Mix, train.NumClasses, epochSeed);

                double lossSum = 0;
                int steps = 0;
                for (int b = 0; b < stepsPerEpoch; b++)
                {
                    using var scope = NewDisposeScope();
                    int start = b * plan.BatchSize;
                    var idx = order.AsSpan(start, Math.Min(plan.BatchSize, train.Count - start));
                    var x = train.Images(idx, device);
                    var y = train.LabelTensor(idx, device);
                    if (cropFlip is not null) x = cropFlip.Apply(x);
                    Tensor targets = y;
                    if (mix is not null) (x, targets, _) = mix.Apply(x, y);

                    var logits = net.ForwardSelected(x, needed);
                    var exitLosses = ExitLossesOf(logits, plan, targets);
                    var loss = Sum(exitLosses);
                    var batch = new BatchContext(x, logits, targets, epoch, b);
                    int stageStep = epoch * stepsPerEpoch + b;
                    foreach (var probe in probes)
                        if (probe.Wants(stageStep)) probe.OnLosses(context, batch, exitLosses, stageStep);
                    foreach (var (use, penalty) in penalties)
                    {
                        using var strength = use.Strength.ToScalar();
                        loss = loss + penalty.Penalty(batch).mul(strength);
                    }

                    double value = loss.item<float>();
                    if (!double.IsFinite(value))
                        throw new NonFiniteLossException(NonFiniteMessage(plan.Name, epoch, b, value));
                    optimizer.zero_grad();
                    loss.backward();
                    foreach (var (_, penalty) in penalties) penalty.AfterBackward(batch);
                    optimizer.step();
                    foreach (var (_, penalty) in penalties) penalty.AfterStep(batch);
                    lossSum += value;
                    steps++;
                    observer?.OnBatch(plan, epoch, b, stepsPerEpoch, value);
                    EarlyExit.Native.NativeScalars.ReleaseDeferred();
                }

                var eval = Evaluator.Evaluate(net, data.Validation, forwardUpTo, plan.EvalBatchSize, device);
                double monitor = plan.MonitorExits.Average(e => eval.Accuracy[e - 1]);
                bool improved = monitor > best;
                if (improved)
                {
                    best = monitor; bestEpoch = epoch; badEpochs = 0;
                    DisposeAll(bestState);
                    bestState = Snapshot(net);
                }
                else badEpochs++;
                var report = new EpochReport(plan.Name, epoch, steps > 0 ? lossSum / steps : double.NaN, eval.Accuracy, monitor, improved,
                    clock.Elapsed.TotalSeconds, lr, steps);
                history.Add(report);
                if (plan.CheckpointDirectory is { } cdir)
                    EpochCheckpoint.Save(cdir, net, optimizer, new EpochCheckpoint.Progress(epoch + 1, badEpochs, best, bestEpoch, history), bestState!);
                observer?.OnEpochEnd(plan, report);
                if (plan.Patience > 0 && badEpochs >= plan.Patience) stoppedEarly = true;
            }

            if (bestState is not null)
            {
                TensorStore.LoadInto(net, bestState);
                DisposeAll(bestState);
            }
            return new StageResult(plan.Name, bestEpoch, best, history.Count, stoppedEarly, history);
        }

        /// <summary>The NaN stop: what happened, and the two usual causes (settings, or kernels that compute wrong
        /// gradients on this CPU, which the numerics check looks for).</summary>
        public static string NonFiniteMessage(string stage, int epoch, int batch, double value)
        {
            var kernels = EarlyExit.Native.NumericsGuard.Current?.Kernels ?? "not checked in this process";
            return $"stage {stage}, epoch {epoch + 1}, batch {batch + 1}: the loss is {value}; stopping (the last good checkpoint is kept). " +
                   "A learning rate too high or bad input data can cause this; so can convolution kernels that compute wrong gradients on " +
                   $"this CPU. The numerics check chose: {kernels}. Run `earlyexit doctor --recheck --all` to check every backend again, " +
                   "and --numerics NAME (or EARLYEXIT_NUMERICS) to force one.";
        }

        /// <summary>A seed from (seed, stage, epoch) that is the same in every process (string.GetHashCode is not).</summary>
        public static int StableSeed(int seed, string stage, int epoch)
        {
            unchecked
            {
                uint h = 2166136261;
                foreach (char c in stage) h = (h ^ c) * 16777619;
                h = (h ^ (uint)seed) * 16777619;
                h = (h ^ (uint)epoch) * 16777619;
                return (int)(h & 0x7fffffff);
            }
        }

        /// <summary>Each loss exit's cross-entropy with its weight, in the plan's order.</summary>
        static List<ExitLoss> ExitLossesOf(Tensor?[] logits, StagePlan plan, Tensor targets)
        {
            var losses = new List<ExitLoss>(plan.LossExits.Length);
            for (int i = 0; i < plan.LossExits.Length; i++)
            {
                var l = logits[plan.LossExits[i] - 1]!;
                var ce = targets.dim() == 2 ? ExitLosses.SoftCrossEntropy(l, targets) : ExitLosses.CrossEntropy(l, targets);
                losses.Add(new ExitLoss(plan.LossExits[i], plan.LossWeights[i], ce));
            }
            return losses;
        }

        /// <summary>Σ_e w_e CE_e, in the plan's order.</summary>
        static Tensor Sum(List<ExitLoss> losses)
        {
            Tensor? total = null;
            foreach (var term in losses)
            {
                using var weight = term.Weight.ToScalar();
                var weighted = term.Loss.mul(weight);
                total = total is null ? weighted : total + weighted;
            }
            return total!;
        }

        static Dictionary<string, Tensor> Snapshot(MultiExitNetwork net)
        {
            using var noGrad = no_grad();
            return net.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone().DetachFromDisposeScope());
        }

        static void DisposeAll(Dictionary<string, Tensor>? d)
        {
            if (d is null) return;
            foreach (var t in d.Values) t.Dispose();
        }

        /// <summary>Refuses a plan that cannot run, with the reason, before any native call.</summary>
        public static void Validate(MultiExitNetwork net, StagePlan plan, RegulariserSet regs)
        {
            var problems = new List<string>();
            int m = net.ExitCount;
            if (plan.LossExits.Length == 0) problems.Add("no exit contributes a loss");
            if (plan.LossExits.Length != plan.LossWeights.Length) problems.Add($"{plan.LossExits.Length} loss exits but {plan.LossWeights.Length} weights");
            foreach (var e in plan.LossExits.Concat(plan.ProtectedExits))
                if (e < 1 || e > m) problems.Add($"exit {e} is out of range 1..{m}");
            var groups = net.Groups().ToHashSet();
            foreach (var g in plan.TrainableGroups)
                if (!groups.Contains(g)) problems.Add($"unknown group '{g}'");
            if (plan.TrainableGroups.Length == 0) problems.Add("the stage trains nothing");
            if (plan.BatchSize < 1) problems.Add("batch size must be positive");
            if (plan.MaxEpochs < 1) problems.Add("at least one epoch is needed");
            if (plan.LearningRate <= 0 || !double.IsFinite(plan.LearningRate)) problems.Add("learning rate must be positive");
            if (plan.Regularisers.Any(u => !(u.Strength > 0) || !double.IsFinite(u.Strength))) problems.Add("regulariser strengths must be positive and finite");
            if (plan.Regularisers.Length > 0 && plan.ProtectedExits.Length == 0) problems.Add("a regulariser needs an earlier exit to protect");
            foreach (var g in plan.Regularisers.GroupBy(u => u.Name).Where(g => g.Count() > 1)) problems.Add($"regulariser '{g.Key}' is listed twice");
            foreach (var use in plan.Regularisers)
            {
                if (!regs.Contains(use.Name)) problems.Add($"the run has no regulariser '{use.Name}'");
                else if (plan.ProtectedExits.Length > 0) problems.AddRange(regs[use.Name].Problems(net, plan));
            }
            foreach (var name in plan.ConsolidateAfter)
            {
                if (!regs.Contains(name)) problems.Add($"the run has no regulariser '{name}' to consolidate");
                if (plan.StageExit < 1) problems.Add($"{name} can consolidate only after a stage that adds an exit (μ ≥ 1)");
            }
            if (problems.Count > 0) throw new ArgumentException($"stage '{plan.Name}': " + string.Join("; ", problems));
        }
    }

    /// <summary>Per-epoch checkpoint of a stage: model, optimiser, best state and progress. The JSON is written last.</summary>
    public static class EpochCheckpoint
    {
        public sealed record Progress(int NextEpoch, int BadEpochs, double Best, int BestEpoch, IReadOnlyList<EpochReport> History);
        public sealed record Resumed(int NextEpoch, int BadEpochs, double Best, int BestEpoch, Dictionary<string, Tensor>? BestState, List<EpochReport> History);

        public static void Save(string dir, MultiExitNetwork net, OptimizerHelper optimizer, Progress progress, IReadOnlyDictionary<string, Tensor> bestState)
        {
            Directory.CreateDirectory(dir);
            var tensors = TensorStore.StateOf(net, "model/");
            foreach (var (k, v) in bestState) tensors["best/" + k] = v;
            TensorStore.Save(Path.Combine(dir, "epoch.tensors"), tensors);
            var optTmp = Path.Combine(dir, ".optimizer." + Guid.NewGuid().ToString("N") + ".tmp");
            optimizer.save_state_dict(optTmp);
            File.Move(optTmp, Path.Combine(dir, "optimizer.bin"), overwrite: true);
            var json = JsonSerializer.Serialize(new
            {
                nextEpoch = progress.NextEpoch,
                badEpochs = progress.BadEpochs,
                best = double.IsFinite(progress.Best) ? progress.Best : -1,
                bestEpoch = progress.BestEpoch,
                history = progress.History,
            }, new JsonSerializerOptions { WriteIndented = true });
            var tmp = Path.Combine(dir, ".epoch.json.tmp");
            File.WriteAllText(tmp, json);
            File.Move(tmp, Path.Combine(dir, "epoch.json"), overwrite: true);
        }

        public static bool TryLoad(string dir, MultiExitNetwork net, OptimizerHelper optimizer, out Resumed resumed)
        {
            resumed = null!;
            var jsonPath = Path.Combine(dir, "epoch.json");
            if (!File.Exists(jsonPath)) return false;
            using var doc = JsonDocument.Parse(File.ReadAllText(jsonPath));
            var root = doc.RootElement;
            var tensors = TensorStore.Load(Path.Combine(dir, "epoch.tensors"));
            try
            {
                TensorStore.LoadInto(net, tensors, "model/");
                optimizer.load_state_dict(Path.Combine(dir, "optimizer.bin"));
                var best = tensors.Where(kv => kv.Key.StartsWith("best/")).ToDictionary(kv => kv.Key[5..], kv => kv.Value.clone().DetachFromDisposeScope());
                var history = JsonSerializer.Deserialize<List<EpochReport>>(root.GetProperty("history").GetRawText(), new JsonSerializerOptions { PropertyNameCaseInsensitive = true }) ?? new();
                resumed = new Resumed(root.GetProperty("nextEpoch").GetInt32(), root.GetProperty("badEpochs").GetInt32(),
                    root.GetProperty("best").GetDouble(), root.GetProperty("bestEpoch").GetInt32(), best.Count > 0 ? best : null, history);
                return true;
            }
            finally
            {
                foreach (var t in tensors.Values) t.Dispose();
            }
        }
    }
}
