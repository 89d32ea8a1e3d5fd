using System;
using System.Linq;
using EarlyExit.Data;
using EarlyExit.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace EarlyExit.Training
{
    /// <summary>Accuracy and mean cross-entropy of exits 1..k on a data set.</summary>
    public sealed record ExitEvaluation(double[] Accuracy, double[] Loss, int Count);

    public static class Evaluator
    {
        /// <summary>Evaluates exits 1..<paramref name="upToExit"/> in eval mode without gradients; restores the mode after.</summary>
        public static ExitEvaluation Evaluate(MultiExitNetwork net, ImageDataset data, int upToExit, int batchSize, Device device)
        {
            net.CheckExit(upToExit);
            bool wasTraining = net.training;
            net.eval();
            var correct = new long[upToExit];
            var lossSum = new double[upToExit];
            try
            {
                using var noGrad = no_grad();
                var all = Enumerable.Range(0, data.Count).ToArray();
                for (int start = 0; start < data.Count; start += batchSize)
                {
                    using var scope = NewDisposeScope();
                    var idx = all.AsSpan(start, Math.Min(batchSize, data.Count - start));
                    var x = data.Images(idx, device);
                    var y = data.LabelTensor(idx, device);
                    var logits = net.ForwardUpTo(x, upToExit);
                    for (int e = 0; e < upToExit; e++)
                    {
                        correct[e] += logits[e].argmax(1).eq(y).sum().item<long>();
                        lossSum[e] += nn.functional.cross_entropy(logits[e], y, reduction: nn.Reduction.Sum).item<float>();
                    }
                    EarlyExit.Native.NativeScalars.ReleaseDeferred();
                }
            }
            finally { net.train(wasTraining); }
            int n = Math.Max(1, data.Count);
            return new ExitEvaluation(correct.Select(c => (double)c / n).ToArray(), lossSum.Select(l => l / n).ToArray(), data.Count);
        }

        /// <summary>Logits of every exit over the whole data set, as one CPU float tensor M×N×C (for caching).</summary>
        public static Tensor CollectLogits(MultiExitNetwork net, ImageDataset data, int batchSize, Device device)
        {
            bool wasTraining = net.training;
            net.eval();
            try
            {
                using var noGrad = no_grad();
                using var outer = NewDisposeScope();
                var parts = new System.Collections.Generic.List<Tensor>();
                var all = Enumerable.Range(0, data.Count).ToArray();
                for (int start = 0; start < data.Count; start += batchSize)
                {
                    var idx = all.AsSpan(start, Math.Min(batchSize, data.Count - start));
                    using var scope = NewDisposeScope();
                    var logits = net.forward(data.Images(idx, device));
                    parts.Add(stack(logits.Select(l => l.to_type(ScalarType.Float32).cpu()).ToArray()).MoveToOuterDisposeScope());
                    EarlyExit.Native.NativeScalars.ReleaseDeferred();
                }
                return cat(parts.ToArray(), 1).MoveToOuterDisposeScope();
            }
            finally { net.train(wasTraining); }
        }
    }
}
