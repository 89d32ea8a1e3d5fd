using System;
using System.Collections.Generic;
using TorchSharp;
using static TorchSharp.torch;

namespace EarlyExit.Losses
{
    /// <summary>Cross-entropy kernels for the exits of a multi-exit network.</summary>
    public static class ExitLosses
    {
        /// <summary>Mean over the batch of −Σ_c target_c · log softmax(logits)_c (soft targets, e.g. from Mixup/CutMix).</summary>
        public static Tensor SoftCrossEntropy(Tensor logits, Tensor targets)
        {
            if (logits.dim() != 2 || !logits.shape.AsSpan().SequenceEqual(targets.shape))
                throw new ArgumentException($"soft cross-entropy needs logits and targets of the same shape N×C, got [{string.Join(", ", logits.shape)}] and [{string.Join(", ", targets.shape)}]");
            using var scope = NewDisposeScope();
            var loss = -(targets * nn.functional.log_softmax(logits, 1)).sum(1L).mean();
            return loss.MoveToOuterDisposeScope();
        }

        /// <summary>Mean cross-entropy with integer labels.</summary>
        public static Tensor CrossEntropy(Tensor logits, Tensor labels)
        {
            if (logits.dim() != 2 || labels.dim() != 1 || logits.shape[0] != labels.shape[0])
                throw new ArgumentException($"cross-entropy needs N×C logits and N labels, got [{string.Join(", ", logits.shape)}] and [{string.Join(", ", labels.shape)}]");
            return nn.functional.cross_entropy(logits, labels);
        }

        /// <summary>
        /// Σ_e w_e · CE(logits of exit e). <paramref name="exits"/> are 1-based; <paramref name="logits"/> holds exits 1..k.
        /// Targets are soft (N×C float) or hard (N int64).
        /// </summary>
        public static Tensor WeightedExitLoss(IReadOnlyList<Tensor> logits, IReadOnlyList<int> exits, IReadOnlyList<double> weights, Tensor targets)
        {
            if (exits.Count != weights.Count) throw new ArgumentException($"{exits.Count} exits but {weights.Count} weights");
            if (exits.Count == 0) throw new ArgumentException("a loss needs at least one exit");
            using var scope = NewDisposeScope();
            Tensor? total = null;
            for (int i = 0; i < exits.Count; i++)
            {
                int e = exits[i];
                if (e < 1 || e > logits.Count) throw new ArgumentOutOfRangeException(nameof(exits), e, $"exit {e} has no logits (have exits 1..{logits.Count})");
                var ce = targets.dim() == 2 ? SoftCrossEntropy(logits[e - 1], targets) : CrossEntropy(logits[e - 1], targets);
                using var weight = weights[i].ToScalar();
                var term = ce.mul(weight);
                total = total is null ? term : total + term;
            }
            return total!.MoveToOuterDisposeScope();
        }
    }
}
