using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.Linq;
using EarlyExit.Data;
using EarlyExit.Models;
using EarlyExit.Training;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace EarlyExit.Analysis
{
    /// <summary>Loss and accuracy of every exit at one point of a path (index e − 1).</summary>
    public sealed record PathPoint(double T, double[] Loss, double[] Accuracy);

    /// <summary>
    /// The linear path between two runs' weights: every point with BatchNorm statistics re-estimated on training images,
    /// the two ends also with each run's own statistics (what the runs report), and per exit the loss barrier
    /// max_t [L(t) − ((1 − t)·L(0) + t·L(1))] and the accuracy barrier max_t [((1 − t)·A(0) + t·A(1)) − A(t)] over the
    /// re-estimated path (Frankle et al. 2020's definition; 0 when the path never rises above the chord).
    /// </summary>
    public sealed record ConnectivityResult(PathPoint[] Path, PathPoint OwnStatisticsA, PathPoint OwnStatisticsB, double[] LossBarrier,
        double[] AccuracyBarrier, int EvaluationSamples, int BatchNormSamples, double Seconds);

    /// <summary>
    /// Mode connectivity (the ICML 2025 paper's claim: disjoint and mixed solutions lie in one basin, joint in
    /// another): θ(t) = (1 − t)·θ_A + t·θ_B for evenly spaced t in [0, 1], parameters and BatchNorm buffers
    /// interpolated, then BatchNorm's running statistics re-estimated at every point (reset, then the cumulative mean
    /// over <c>bnSamples</c> training images in train mode without gradients: statistics of interpolated weights are
    /// not interpolated statistics), then every exit evaluated in eval mode on a fixed evaluation set.
    /// </summary>
    public static class ModeConnectivity
    {
        static int[] Pick(ImageDataset data, int samples, int seed)
        {
            var order = Enumerable.Range(0, data.Count).ToArray();
            new Random(seed).Shuffle(order);
            return order.Take(Math.Min(samples, data.Count)).ToArray();
        }

        /// <summary>Resets every BatchNorm's running statistics and re-estimates them as the cumulative mean over the images.</summary>
        public static void ReestimateBatchNorm(MultiExitNetwork net, ImageDataset images, int batchSize, Device device)
        {
            var norms = net.modules().OfType<BatchNorm2d>().Where(b => b.track_running_stats).ToList();
            var saved = norms.Select(b => b.momentum).ToList();
            bool wasTraining = net.training;
            try
            {
                foreach (var b in norms) { b.reset_running_stats(); b.momentum = null; }
                net.train();
                using var noGrad = no_grad();
                var all = Enumerable.Range(0, images.Count).ToArray();
                for (int start = 0; start < images.Count; start += batchSize)
                {
                    using var scope = NewDisposeScope();
                    net.forward(images.Images(all.AsSpan(start, Math.Min(batchSize, images.Count - start)), device));
                    EarlyExit.Native.NativeScalars.ReleaseDeferred();
                }
            }
            finally
            {
                for (int i = 0; i < norms.Count; i++) norms[i].momentum = saved[i];
                net.train(wasTraining);
            }
        }

        public static ConnectivityResult Compute(MultiExitNetwork a, MultiExitNetwork b, ImageDataset train, ImageDataset evaluation, int points,
            int bnSamples, int evalSamples, int seed, int batchSize = 256, Device? device = null)
        {
            if (points < 2) throw new ArgumentOutOfRangeException(nameof(points), "a path needs at least its two ends");
            if (a.Describe() != b.Describe()) throw new ArgumentException($"the two networks differ: {a.Describe()} against {b.Describe()}");
            device ??= a.parameters().First().device;
            var clock = Stopwatch.StartNew();
            var eval = evaluation.Subset(Pick(evaluation, evalSamples, seed));
            var bnImages = train.Subset(Pick(train, bnSamples, seed + 1));
            int m = a.ExitCount;
            PathPoint At(double t, MultiExitNetwork net)
            {
                var r = Evaluator.Evaluate(net, eval, m, batchSize, device);
                return new PathPoint(t, r.Loss, r.Accuracy);
            }
            var ownA = At(0, a);
            var ownB = At(1, b);
            using var mix = a.CreateSibling();
            mix.to(device);
            var stateA = a.state_dict();
            var stateB = b.state_dict();
            var path = new List<PathPoint>();
            for (int k = 0; k < points; k++)
            {
                double t = (double)k / (points - 1);
                using (no_grad())
                {
                    using var wa = (1 - t).ToScalar();
                    using var wb = t.ToScalar();
                    foreach (var (name, target) in mix.state_dict())
                    {
                        var (ta, tb) = (stateA[name], stateB[name]);
                        if (target.is_floating_point())
                        {
                            using var mixed = ta.mul(wa).add_(tb, wb);
                            target.copy_(mixed);
                        }
                        else target.copy_(t < 0.5 ? ta : tb);
                    }
                }
                ReestimateBatchNorm(mix, bnImages, batchSize, device);
                path.Add(At(t, mix));
            }
            var lossBarrier = new double[m];
            var accuracyBarrier = new double[m];
            for (int e = 0; e < m; e++)
            {
                double l0 = path[0].Loss[e], l1 = path[^1].Loss[e], a0 = path[0].Accuracy[e], a1 = path[^1].Accuracy[e];
                lossBarrier[e] = Math.Max(0, path.Max(p => p.Loss[e] - ((1 - p.T) * l0 + p.T * l1)));
                accuracyBarrier[e] = Math.Max(0, path.Max(p => (1 - p.T) * a0 + p.T * a1 - p.Accuracy[e]));
            }
            return new ConnectivityResult(path.ToArray(), ownA, ownB, lossBarrier, accuracyBarrier, eval.Count, bnImages.Count, clock.Elapsed.TotalSeconds);
        }
    }
}
