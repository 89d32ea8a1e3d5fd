using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.Linq;
using EarlyExit.Models;
using EarlyExit.Regularisers;
using EarlyExit.Training;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace EarlyExit.Analysis
{
    /// <summary>
    /// One measurement of which exit drives each segment's update: for every trainable segment s and every loss exit e
    /// at or after it, the norm of w_e ∇_{θ_s} CE_e (the exit's weighted share of the stage's gradient), each exit's
    /// share of the segment (its norm over the sum of the exits' norms), and the cosine similarity of the exits'
    /// gradients on the segment. Index [i] of Exits, [s − 1] of segments.
    /// </summary>
    public sealed record GradientSample(int Step, int[] Exits, double[][] Norms, double[][] Shares, double[][][] Cosines);

    /// <summary>
    /// Gradient dominance (the ICML 2025 paper's per-exit gradient contributions): measured every
    /// <see cref="Every"/> optimiser steps of a stage from the batch's own loss terms (one extra gradient pass per loss
    /// exit, with the graph retained, so the training step itself is unchanged), only on the segments the stage trains.
    /// Cost: the measured seconds are in <see cref="Seconds"/>.
    /// </summary>
    public sealed class GradientDominanceProbe : ITrainingProbe
    {
        public GradientDominanceProbe(int every)
        {
            if (every < 1) throw new ArgumentOutOfRangeException(nameof(every), "measure at least every step (1) or not at all");
            Every = every;
        }

        public int Every { get; }
        public List<GradientSample> Samples { get; } = new();
        public double Seconds { get; private set; }

        public bool Wants(int stageStep) => stageStep % Every == 0;

        public void OnLosses(StageContext stage, BatchContext batch, IReadOnlyList<ExitLoss> losses, int stageStep)
        {
            var clock = Stopwatch.StartNew();
            var sample = Measure(stage.Net, losses, stageStep);
            if (sample is not null) Samples.Add(sample);
            Seconds += clock.Elapsed.TotalSeconds;
        }

        /// <summary>
        /// The measurement itself, from loss terms in a live graph: per trainable segment, each exit's weighted gradient
        /// norm, share and the cosines between exits. Null when no segment trains. Leaves parameters and their .grad
        /// untouched.
        /// </summary>
        public static GradientSample? Measure(MultiExitNetwork net, IReadOnlyList<ExitLoss> losses, int step)
        {
            int m = net.ExitCount;
            // The trainable parameters of each segment (frozen segments get no update, so nothing drives them).
            var segments = Enumerable.Range(1, m)
                .Select(s => net.GroupParameters(MultiExitNetwork.SegmentGroup(s)).Select(p => p.parameter).Where(p => p.requires_grad).ToArray())
                .ToArray();
            if (segments.All(ps => ps.Length == 0) || losses.Count == 0) return null;
            var exits = losses.Select(l => l.Exit).ToArray();
            // Per exit, per segment: the flattened gradient of w_e CE_e (null where the exit's loss cannot reach it).
            var grads = new Tensor?[losses.Count][];
            using var scope = NewDisposeScope();
            for (int i = 0; i < losses.Count; i++)
            {
                grads[i] = new Tensor?[m];
                int reach = losses[i].Exit;
                var inputs = Enumerable.Range(0, reach).SelectMany(s => segments[s]).ToArray();
                if (inputs.Length == 0 || !losses[i].Loss.requires_grad) continue;
                var g = autograd.grad(new[] { losses[i].Loss }, inputs, retain_graph: true, create_graph: false, allow_unused: true);
                using var weight = losses[i].Weight.ToScalar();
                int k = 0;
                for (int s = 0; s < reach; s++)
                {
                    var parts = new List<Tensor>();
                    for (int j = 0; j < segments[s].Length; j++, k++)
                        parts.Add(g[k] is { } t && !t.IsInvalid ? t.detach().reshape(-1) : zeros(segments[s][j].numel(), device: segments[s][j].device));
                    if (parts.Count > 0) grads[i][s] = cat(parts.ToArray()).mul(weight).to_type(ScalarType.Float64);
                }
            }
            var norms = new double[losses.Count][];
            var shares = new double[losses.Count][];
            for (int i = 0; i < losses.Count; i++)
            {
                norms[i] = new double[m];
                shares[i] = new double[m];
                for (int s = 0; s < m; s++) norms[i][s] = grads[i][s] is { } v ? v.norm().item<double>() : 0;
            }
            var cosines = new double[m][][];
            for (int s = 0; s < m; s++)
            {
                double total = Enumerable.Range(0, losses.Count).Sum(i => norms[i][s]);
                for (int i = 0; i < losses.Count; i++) shares[i][s] = total > 0 ? norms[i][s] / total : 0;
                cosines[s] = new double[losses.Count][];
                for (int i = 0; i < losses.Count; i++)
                {
                    cosines[s][i] = new double[losses.Count];
                    for (int j = 0; j < losses.Count; j++)
                    {
                        var (a, b) = (grads[i][s], grads[j][s]);
                        double denominator = norms[i][s] * norms[j][s];
                        cosines[s][i][j] = a is null || b is null || denominator == 0 ? double.NaN : a.dot(b).item<double>() / denominator;
                    }
                }
            }
            EarlyExit.Native.NativeScalars.ReleaseDeferred();
            return new GradientSample(step, exits, norms, shares, cosines);
        }
    }
}
