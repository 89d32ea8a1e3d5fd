using System;
using System.Collections.Generic;
using System.Linq;
using EarlyExit.Data;
using EarlyExit.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace EarlyExit.Analysis
{
    /// <summary>The numerical rank of one segment's output over N samples (rows: samples; columns: every feature of
    /// every scale, flattened).</summary>
    public sealed record RankResult(int Segment, long Samples, long Features, int Rank, double EffectiveRank, double Tolerance, double LargestSingularValue);

    /// <summary>
    /// Numerical rank of intermediate representations (the ICML 2025 paper's analysis of what each segment keeps):
    /// the number of singular values above σ_max · max(N, D) · ε₃₂ (NumPy's matrix_rank tolerance, with float32's ε,
    /// since the features are float32), and the effective rank exp(H(p)), p = σ / Σσ (Roy and Vetterli 2007), which is
    /// k for k equal non-zero singular values. Singular values are computed in float64.
    /// </summary>
    public static class RepresentationRank
    {
        public const double Float32Epsilon = 1.1920928955078125e-07;

        /// <summary>Rank, effective rank, the tolerance used and σ_max of an N×D matrix.</summary>
        public static (int Rank, double EffectiveRank, double Tolerance, double Largest) Of(Tensor matrix)
        {
            if (matrix.dim() != 2) throw new ArgumentException($"the rank needs an N×D matrix, got [{string.Join(", ", matrix.shape)}]");
            using var scope = NewDisposeScope();
            var sv = EarlyExit.Native.TensorData.ToArray<double>(linalg.svdvals(matrix.detach().to_type(ScalarType.Float64).cpu()));
            if (sv.Length == 0) return (0, 0, 0, 0);
            double largest = sv.Max();
            double tol = largest * Math.Max(matrix.shape[0], matrix.shape[1]) * Float32Epsilon;
            int rank = sv.Count(s => s > tol);
            double sum = sv.Where(s => s > 0).Sum();
            double entropy = sum > 0 ? -sv.Where(s => s > 0).Select(s => s / sum).Sum(p => p * Math.Log(p)) : 0;
            return (rank, sum > 0 ? Math.Exp(entropy) : 0, tol, largest);
        }

        /// <summary>
        /// The rank of every segment's output over the first <paramref name="samples"/> images of a seeded shuffle of
        /// <paramref name="data"/> (eval mode, no gradients).
        /// </summary>
        public static List<RankResult> Compute(MultiExitNetwork net, ImageDataset data, int samples, int seed, Device? device = null)
        {
            if (samples < 1) throw new ArgumentOutOfRangeException(nameof(samples), "the rank needs at least one sample");
            device ??= net.parameters().First().device;
            var order = Enumerable.Range(0, data.Count).ToArray();
            new Random(seed).Shuffle(order);
            var idx = order.Take(Math.Min(samples, data.Count)).ToArray();
            bool wasTraining = net.training;
            net.eval();
            try
            {
                using var noGrad = no_grad();
                using var scope = NewDisposeScope();
                // Segment outputs, batch by batch, flattened per sample and concatenated across scales.
                var perSegment = Enumerable.Range(0, net.ExitCount).Select(_ => new List<Tensor>()).ToArray();
                for (int start = 0; start < idx.Length; start += 128)
                {
                    var batch = idx.AsSpan(start, Math.Min(128, idx.Length - start));
                    Tensor[] state = { data.Images(batch, device) };
                    for (int mu = 1; mu <= net.ExitCount; mu++)
                    {
                        state = net.Segment(mu).call(state);
                        perSegment[mu - 1].Add(cat(state.Select(s => s.reshape(s.shape[0], -1).cpu()).ToArray(), 1));
                    }
                    EarlyExit.Native.NativeScalars.ReleaseDeferred();
                }
                var results = new List<RankResult>();
                for (int mu = 1; mu <= net.ExitCount; mu++)
                {
                    var m = cat(perSegment[mu - 1].ToArray(), 0);
                    var (rank, effective, tol, largest) = Of(m);
                    results.Add(new RankResult(mu, m.shape[0], m.shape[1], rank, effective, tol, largest));
                }
                return results;
            }
            finally
            {
                net.train(wasTraining);
            }
        }
    }
}
