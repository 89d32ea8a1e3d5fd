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

        /// <summary>The default of <c>RunStreamed</c>'s <c>maxCarriedShare</c>: a batch goes on whole while at most
        /// 1/8 of it has left. A carried sample costs its share of the next segment (for the cpu-scale ResNet on 2 threads
        /// at batch 64, about 32 µs in segment 2), a compaction a copy of every staying sample's map (25 KB each after
        /// the first block), and a second one where the next batch is put together from two chunks. Measured there
        /// (1024 Fashion-MNIST test images, about half leaving early, 30 alternated pairs each against the full pass):
        /// speed-up 0.927 of the latency-predicted one always compacting, 0.948 carrying up to 1/8, 0.953 up to 1/4 at
        /// threshold 0.165; 0.915, 0.922 and 0.930 at the bench's 0.16. On the cpu-scale MSDNet 0.992, 0.990, 0.987.</summary>
        public const double DefaultMaxCarriedShare = 0.125;

        /// <summary>The id of a carried sample (one that has left, riding along in its batch) in a queued chunk.</summary>
        const long Carried = -1;

        /// <summary>
        /// Real early exit: computes segment μ+1 only for the samples still in the network after exit μ, so a batch
        /// shrinks as samples leave (batch 1 stops as soon as its sample leaves). The network must be in eval mode
        /// for per-sample results to be independent of the batch.
        /// </summary>
        public static EarlyExitResult Run(MultiExitNetwork net, Tensor x, ExitPolicy policy, double parameter)
        {
            net.CheckInput(x);
            long n = x.shape[0];
            var rule = new ExitRule(net.ExitCount, policy, parameter, n);
            using var noGrad = no_grad();
            using var scope = NewDisposeScope();
            Tensor[] state = { x };
            // Positions (in the original batch) of the samples still running.
            long[] alive = Enumerable.Range(0, (int)n).Select(i => (long)i).ToArray();
            int m = net.ExitCount;
            for (int mu = 1; mu <= m && alive.Length > 0; mu++)
            {
                state = net.Segment(mu).call(state);
                var stay = rule.Decide(mu, net.Head(mu).call(state), alive);
                if (mu == m || stay.Count == 0) break;
                if (stay.Count == alive.Length) continue;
                var keep = tensor(stay.ToArray(), device: x.device);
                state = state.Select(s => s.index_select(0, keep)).ToArray();
                alive = stay.Select(i => alive[i]).ToArray();
            }
            EarlyExit.Native.NativeScalars.ReleaseDeferred();
            return rule.Result();
        }

        /// <summary>
        /// Early exit over many samples at a steady batch size (throughput, as a server or an offline evaluation
        /// runs it): each segment has a queue, and runs when its queue holds <paramref name="batchSize"/> samples,
        /// deepest first; samples that stay join the next segment's queue. So every segment runs full batches
        /// (except the tail when the input runs out), where <see cref="Run(MultiExitNetwork, Tensor, ExitPolicy, double)"/>
        /// batch by batch lets its batches shrink as samples leave, and a small batch costs more per sample.
        /// Per sample the same exits and predictions as <c>Run</c> (eval mode), in the input's order; at most about
        /// <paramref name="batchSize"/> × 2 feature maps per segment are held at a time.
        /// <para>Compacting a batch (copying the maps of the samples that stay) costs a copy of every one of them,
        /// twice where the next batch is put together from two queued chunks; when few samples leave, carrying them on
        /// through the next segment costs less. So a batch whose share of samples that have left (at this exit or
        /// carried from earlier ones) is at most <paramref name="maxCarriedShare"/> goes on whole, its leavers'
        /// results ignored; a batch with more is compacted and sheds them all. 0 always compacts; 1 never does.</para>
        /// </summary>
        public static EarlyExitResult RunStreamed(MultiExitNetwork net, Tensor x, ExitPolicy policy, double parameter, int batchSize,
                                                  double maxCarriedShare = DefaultMaxCarriedShare)
        {
            if (batchSize < 1) throw new ArgumentOutOfRangeException(nameof(batchSize), batchSize, "the batch size must be at least 1");
            if (!(maxCarriedShare >= 0.0 && maxCarriedShare <= 1.0))
                throw new ArgumentOutOfRangeException(nameof(maxCarriedShare), maxCarriedShare, "the share of carried samples must be between 0 and 1");
            net.CheckInput(x);
            long n = x.shape[0];
            int m = net.ExitCount;
            var rule = new ExitRule(m, policy, parameter, n);
            using var noGrad = no_grad();
            // queue[μ−1]: samples waiting for segment μ (their state after segment μ−1, and their positions in x); the
            // input feeds queue 1 a batch at a time. Queued tensors live outside any scope, and are disposed when taken.
            var queues = Enumerable.Range(0, m).Select(_ => new System.Collections.Generic.List<(Tensor[] State, long[] Ids)>()).ToArray();
            int Queued(int k) => queues[k].Sum(chunk => chunk.Ids.Length);
            long fed = 0;
            try
            {
                while (true)
                {
                    int level = -1;
                    for (int k = m - 1; k >= 0 && level < 0; k--)
                        if (Queued(k) >= batchSize) level = k;
                    if (level < 0 && fed < n)
                    {
                        long take = Math.Min(batchSize, n - fed);
                        var ids = Enumerable.Range(0, (int)take).Select(i => fed + i).ToArray();
                        queues[0].Add((new[] { x.narrow(0, fed, take).DetachFromDisposeScope() }, ids));
                        fed += take;
                        continue;
                    }
                    if (level < 0)
                        for (int k = 0; k < m && level < 0; k++)  // the input is spent: flush, shallowest first
                            if (queues[k].Count > 0) level = k;
                    if (level < 0) break;
                    using var step = NewDisposeScope();
                    var (state, alive, taken) = Take(queues[level], batchSize);
                    foreach (var t in taken) step.Attach(t);  // released with the step's own tensors
                    int mu = level + 1;
                    state = net.Segment(mu).call(state);
                    var stay = rule.Decide(mu, net.Head(mu).call(state), alive);
                    if (mu == m || stay.Count == 0) continue;
                    Tensor[] next;
                    long[] nextIds;
                    if (alive.Length - stay.Count <= maxCarriedShare * alive.Length)
                    {
                        // On whole: the samples that have left ride along as carried (id −1), and nothing is copied.
                        next = state.Select(s => s.alias()).ToArray();
                        nextIds = new long[alive.Length];
                        Array.Fill(nextIds, Carried);
                        foreach (var i in stay) nextIds[i] = alive[i];
                    }
                    else
                    {
                        next = state.Select(s => s.index_select(0, tensor(stay.ToArray(), device: x.device))).ToArray();
                        nextIds = stay.Select(i => alive[i]).ToArray();
                    }
                    foreach (var t in next) t.DetachFromDisposeScope();
                    queues[mu].Add((next, nextIds));
                }
            }
            finally
            {
                foreach (var q in queues)
                    foreach (var (state, _) in q)
                        foreach (var t in state) t.Dispose();
            }
            EarlyExit.Native.NativeScalars.ReleaseDeferred();
            return rule.Result();
        }

        /// <summary>Up to <paramref name="count"/> samples from the front of a queue, as one batch (inside the caller's
        /// scope), and the queued tensors taken (the caller attaches them to its scope); a chunk split in two leaves
        /// its rest at the front.</summary>
        static (Tensor[] State, long[] Ids, System.Collections.Generic.List<Tensor> Taken) Take(System.Collections.Generic.List<(Tensor[] State, long[] Ids)> queue, int count)
        {
            var taken = new System.Collections.Generic.List<Tensor>();
            var parts = new System.Collections.Generic.List<Tensor[]>();
            var ids = new System.Collections.Generic.List<long>();
            while (ids.Count < count && queue.Count > 0)
            {
                var (state, chunkIds) = queue[0];
                queue.RemoveAt(0);
                int want = count - ids.Count;
                taken.AddRange(state);
                if (chunkIds.Length <= want)
                {
                    parts.Add(state);
                    ids.AddRange(chunkIds);
                }
                else
                {
                    parts.Add(state.Select(t => t.narrow(0, 0, want)).ToArray());
                    var rest = state.Select(t => t.narrow(0, want, chunkIds.Length - want).DetachFromDisposeScope()).ToArray();
                    queue.Insert(0, (rest, chunkIds[want..]));
                    ids.AddRange(chunkIds[..want]);
                }
            }
            var batch = parts.Count == 1
                ? parts[0]
                : Enumerable.Range(0, parts[0].Length).Select(j => cat(parts.Select(p => p[j]).ToArray(), 0)).ToArray();
            return (batch, ids.ToArray(), taken);
        }

        /// <summary>
        /// Of one row of logits: the maximum softmax probability, the predicted class (the first maximum) and, when
        /// asked, the softmax entropy in nats (clamped at 0; else 0), in double from the float32 logits: with m the
        /// maximum, z = Σ exp(x_c − m), confidence 1/z, entropy −Σ p log p with log p = (x_c − m) − log z. Real early exit
        /// and the evaluation from cached logits (<c>Budget.fromLogits</c>) both decide with it.
        /// </summary>
        public static (float Confidence, long Prediction, float Entropy) Confidence(ReadOnlySpan<float> row, bool entropy = true)
        {
            if (row.Length == 0) throw new ArgumentException("a row of logits needs at least one class", nameof(row));
            int arg = 0;
            for (int c = 1; c < row.Length; c++)
                if (row[c] > row[arg]) arg = c;
            float max = row[arg];
            double z = 0.0;
            for (int c = 0; c < row.Length; c++)
                z += Math.Exp((double)(row[c] - max));
            double h = 0.0;
            if (entropy)
            {
                double logZ = Math.Log(z);
                for (int c = 0; c < row.Length; c++)
                {
                    double lp = (double)(row[c] - max) - logZ;
                    h -= Math.Exp(lp) * lp;
                }
            }
            return ((float)(1.0 / z), arg, (float)Math.Max(0.0, h));
        }

        /// <summary>The exit decision of both runs: per sample (by its position in the input) the policy's state,
        /// and the results of the samples that have left.</summary>
        sealed class ExitRule
        {
            readonly int m;
            readonly ExitPolicy policy;
            readonly double parameter;
            readonly int patience;
            readonly long[] predictions, previous;
            readonly int[] exits, agreements;
            readonly float[] confidences;

            public ExitRule(int exitCount, ExitPolicy policy, double parameter, long n)
            {
                m = exitCount;
                this.policy = policy;
                this.parameter = parameter;
                patience = (int)Math.Round(parameter);
                predictions = new long[n];
                previous = new long[n];
                exits = new int[n];
                agreements = new int[n];
                confidences = new float[n];
            }

            /// <summary>Records the samples that leave at exit <paramref name="mu"/>; returns the batch positions of
            /// those that stay (none at the last exit). A negative position in <paramref name="alive"/> is a carried
            /// sample: skipped.</summary>
            public System.Collections.Generic.List<long> Decide(int mu, Tensor logits, long[] alive)
            {
                // One copy of the float32 logits to managed memory, and per row the maximum softmax probability, the
                // argmax (first index on ties) and the entropy by Confidence, which the evaluation from cached logits
                // (Budget.fromLogits) calls too: so real early exit and the evaluation agree bit for bit, and a
                // decision costs one native copy instead of a kernel and a copy per quantity.
                float[] rows;
                using (var scope = NewDisposeScope())
                    rows = EarlyExit.Native.TensorData.ToArray<float>(logits.to_type(ScalarType.Float32));
                int classes = (int)logits.shape[1];
                var stay = new System.Collections.Generic.List<long>();
                for (int i = 0; i < alive.Length; i++)
                {
                    long at = alive[i];
                    if (at < 0) continue;  // carried: it has left already
                    var (conf, pred, entropy) = Confidence(rows.AsSpan(i * classes, classes), policy == ExitPolicy.Entropy);
                    if (policy == ExitPolicy.Patience)
                    {
                        agreements[at] = mu > 1 && pred == previous[at] ? agreements[at] + 1 : 0;
                        previous[at] = pred;
                    }
                    bool leaves = policy switch
                    {
                        ExitPolicy.Softmax => conf > parameter,
                        ExitPolicy.Entropy => entropy < parameter,
                        _ => agreements[at] >= patience,
                    };
                    if (mu == m || leaves)
                    {
                        predictions[at] = pred;
                        exits[at] = mu;
                        confidences[at] = conf;
                    }
                    else stay.Add(i);
                }
                return stay;
            }

            public EarlyExitResult Result() => new(predictions, exits, confidences);
        }
    }
}
