using System;
using System.Linq;
using EarlyExit.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace EarlyExit.Inference
{
    /// <summary>Per sample: the predicted class, the exit it left at (1-based) and the confidence there.</summary>
    public sealed record EarlyExitResult(long[] Predictions, int[] Exits, float[] Confidences);

    /// <summary>When a sample leaves: maximum softmax probability strictly above t (the papers' rule), softmax entropy
    /// strictly below t (nats), or the prediction unchanged over t consecutive exits (PBEE; t = 0 leaves at exit 1).</summary>
    public enum ExitPolicy { Softmax, Entropy, Patience }

    /// <summary>
    /// Early-exit inference. Exit rule (default): a sample leaves at the first exit whose maximum softmax probability is
    /// strictly greater than the threshold; a sample that never does takes the last exit. <see cref="ExitPolicy"/>
    /// names the others.
    /// </summary>
    public static class EarlyExitInference
    {
        public static EarlyExitResult Run(MultiExitNetwork net, Tensor x, double threshold) => Run(net, x, ExitPolicy.Softmax, threshold);

        /// <summary>
        /// Real early exit: computes segment μ+1 only for the samples still in the network after exit μ, so a batch
        /// shrinks as samples leave (batch 1 stops as soon as its sample leaves). The network must be in eval mode
        /// for per-sample results to be independent of the batch.
        /// </summary>
        public static EarlyExitResult Run(MultiExitNetwork net, Tensor x, ExitPolicy policy, double parameter)
        {
            net.CheckInput(x);
            int patience = (int)Math.Round(parameter);
            long n = x.shape[0];
            var predictions = new long[n];
            var exits = new int[n];
            var confidences = new float[n];
            using var noGrad = no_grad();
            using var scope = NewDisposeScope();
            Tensor[] state = { x };
            // Positions (in the original batch) of the samples still running.
            long[] alive = Enumerable.Range(0, (int)n).Select(i => (long)i).ToArray();
            // Patience: each running sample's previous prediction and its count of consecutive agreements.
            long[] previous = new long[n];
            int[] agreements = new int[n];
            int m = net.ExitCount;
            for (int mu = 1; mu <= m && alive.Length > 0; mu++)
            {
                state = net.Segment(mu).call(state);
                var logits = net.Head(mu).call(state);
                var probs = nn.functional.softmax(logits.to_type(ScalarType.Float32), 1);
                var (conf, pred) = probs.max(1);
                var confArr = conf.cpu().data<float>().ToArray();
                var predArr = pred.cpu().data<long>().ToArray();
                float[]? entropyArr = null;
                if (policy == ExitPolicy.Entropy)
                {
                    // From float32 logits, as the evaluation from cached (float32) logits computes it.
                    var logp = nn.functional.log_softmax(logits.to_type(ScalarType.Float32).to_type(ScalarType.Float64), 1);
                    using var zero = 0.0.ToScalar();
                    entropyArr = (-(logp.exp() * logp).sum(1L)).clamp_min(zero).to_type(ScalarType.Float32).cpu().data<float>().ToArray();
                }
                var stay = new System.Collections.Generic.List<long>();
                for (int i = 0; i < alive.Length; i++)
                {
                    long at0 = alive[i];
                    if (policy == ExitPolicy.Patience)
                    {
                        agreements[at0] = mu > 1 && predArr[i] == previous[at0] ? agreements[at0] + 1 : 0;
                        previous[at0] = predArr[i];
                    }
                    bool leaves = policy switch
                    {
                        ExitPolicy.Softmax => confArr[i] > parameter,
                        ExitPolicy.Entropy => entropyArr![i] < parameter,
                        _ => agreements[at0] >= patience,
                    };
                    if (mu == m || leaves)
                    {
                        long at = alive[i];
                        predictions[at] = predArr[i];
                        exits[at] = mu;
                        confidences[at] = confArr[i];
                    }
                    else stay.Add(i);
                }
                if (mu == m || stay.Count == 0) break;
                if (stay.Count == alive.Length) continue;
                var keep = tensor(stay.ToArray(), device: x.device);
                state = state.Select(s => s.index_select(0, keep)).ToArray();
                alive = stay.Select(i => alive[i]).ToArray();
            }
            EarlyExit.Native.NativeScalars.ReleaseDeferred();
            return new EarlyExitResult(predictions, exits, confidences);
        }
    }
}
