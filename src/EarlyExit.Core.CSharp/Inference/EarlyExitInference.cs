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

        /// <summary>The default of <c>RunStreamed</c>'s <c>maxHoleShare</c>: a batch in which at most 1/4 of the samples
        /// have left goes on to the next queue whole, its leavers' rows later overwritten by staying samples from other
        /// batches; one with more has its staying samples copied into the next queue's pending batch. Measured on the
        /// cpu-scale ResNet (2 threads, batch 64, 1024 Fashion-MNIST test images, threshold 0.16: 6% leave at exit 1, 57%
        /// at exit 2), against the same samples sorted by their exit, 60 alternated rounds, twice: 0.969 and 0.973 at
        /// 1/4, 0.963 at 1/2, 0.965 at 3/4; the earlier scheme (queue compacted copies, concatenate them, carry leavers
        /// while at most 1/8 of a batch) 0.948.</summary>
        public const double DefaultMaxHoleShare = 0.25;

        /// <summary>The id of a hole (a row whose sample has left, or has been moved to another batch) in a queued chunk.</summary>
        const long Hole = -1;

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
        /// <para>Each staying sample's maps are copied at most once between two segments, one row at a time: a batch in
        /// which at most <paramref name="maxHoleShare"/> of the samples have left is queued as it is (no copy), and when
        /// it is taken its holes (the leavers' rows) are overwritten with staying samples from the queue's pending batch
        /// or from other such batches; from a batch with more leavers, the staying samples are copied into the pending
        /// batch, which is queued once full. 0 always copies the stayers; 1 queues every batch whole. Only a segment
        /// output on the CPU, contiguous, and sharing no memory with its input or with another of its tensors is written
        /// to (a segment that returns its input, or a GPU or channels-last run, has its stayers gathered with
        /// <c>index_select</c> and batches put together with <c>cat</c> instead); only the tail, when the input has
        /// run out, runs a batch with holes in it.</para>
        /// </summary>
        public static EarlyExitResult RunStreamed(MultiExitNetwork net, Tensor x, ExitPolicy policy, double parameter, int batchSize,
                                                  double maxHoleShare = DefaultMaxHoleShare)
        {
            if (batchSize < 1) throw new ArgumentOutOfRangeException(nameof(batchSize), batchSize, "the batch size must be at least 1");
            if (!(maxHoleShare >= 0.0 && maxHoleShare <= 1.0))
                throw new ArgumentOutOfRangeException(nameof(maxHoleShare), maxHoleShare, "the share of holes must be between 0 and 1");
            net.CheckInput(x);
            long n = x.shape[0];
            int m = net.ExitCount;
            var rule = new ExitRule(m, policy, parameter, n);
            using var noGrad = no_grad();
            // queues[μ−1]: samples waiting for segment μ (their state after segment μ−1, and their positions in x); the
            // input feeds queue 1 a batch at a time. Queued tensors live outside any scope, and are disposed when taken.
            var queues = Enumerable.Range(0, m).Select(_ => new SegmentQueue()).ToArray();
            long fed = 0;
            try
            {
                while (true)
                {
                    int level = -1;
                    for (int k = m - 1; k >= 0 && level < 0; k--)
                        if (queues[k].Live >= batchSize) level = k;
                    if (level < 0 && fed < n)
                    {
                        long take = Math.Min(batchSize, n - fed);
                        var ids = Enumerable.Range(0, (int)take).Select(i => fed + i).ToArray();
                        queues[0].Chunks.Add(new Chunk(new[] { x.narrow(0, fed, take).DetachFromDisposeScope() }, ids, writable: false));
                        fed += take;
                        continue;
                    }
                    if (level < 0)
                        for (int k = 0; k < m && level < 0; k++)  // the input is spent: flush, shallowest first
                            if (!queues[k].Empty) level = k;
                    if (level < 0) break;
                    using var step = NewDisposeScope();
                    var (input, alive) = queues[level].TakeBatch(batchSize, step);
                    int mu = level + 1;
                    var state = net.Segment(mu).call(input);
                    var stay = rule.Decide(mu, net.Head(mu).call(state), alive);
                    if (mu == m || stay.Count == 0) continue;
                    var q = queues[mu];
                    int holes = alive.Length - stay.Count;
                    if (holes == 0)
                        q.Chunks.Add(new Chunk(state.Select(s => s.alias().DetachFromDisposeScope()).ToArray(), alive, writable: false));
                    else if (!RowsCopyable(state))
                    {
                        var keep = tensor(stay.ToArray(), device: x.device);
                        q.Chunks.Add(new Chunk(state.Select(s => s.index_select(0, keep).DetachFromDisposeScope()).ToArray(),
                                               stay.Select(i => alive[i]).ToArray(), writable: false));
                    }
                    else if (holes <= maxHoleShare * alive.Length && alive.Length == batchSize && SharesNoMemory(state, input))
                    {
                        var ids = new long[alive.Length];
                        Array.Fill(ids, Hole);
                        foreach (var i in stay) ids[i] = alive[i];
                        q.Chunks.Add(new Chunk(state.Select(s => s.alias().DetachFromDisposeScope()).ToArray(), ids, writable: true));
                    }
                    else
                        foreach (var i in stay) q.AddToPending(state, (int)i, alive[i], batchSize);
                }
            }
            finally
            {
                foreach (var q in queues) q.Dispose();
            }
            EarlyExit.Native.NativeScalars.ReleaseDeferred();
            return rule.Result();
        }

        /// <summary>Whether every tensor of a state is a contiguous CPU tensor (whose rows can be copied as bytes).</summary>
        static bool RowsCopyable(Tensor[] state)
        {
            foreach (var t in state)
                if (t.device_type != DeviceType.CPU || !t.is_contiguous() || t.numel() == 0) return false;
            return true;
        }

        /// <summary>Whether the tensors of a segment's output (contiguous, on the CPU) overlap neither each other's
        /// memory nor that of any tensor of its input: only then may rows of the output be overwritten.</summary>
        static bool SharesNoMemory(Tensor[] outputs, Tensor[] inputs)
        {
            if (!RowsCopyable(inputs)) return false;
            static bool Overlap(Tensor a, Tensor b)
            {
                var sa = a.bytes;
                var sb = b.bytes;
                long offset = (long)System.Runtime.CompilerServices.Unsafe.ByteOffset(
                    ref System.Runtime.InteropServices.MemoryMarshal.GetReference(sa),
                    ref System.Runtime.InteropServices.MemoryMarshal.GetReference(sb));
                return offset > -sb.Length && offset < sa.Length;
            }
            for (int i = 0; i < outputs.Length; i++)
            {
                for (int j = i + 1; j < outputs.Length; j++)
                    if (Overlap(outputs[i], outputs[j])) return false;
                foreach (var t in inputs)
                    if (Overlap(outputs[i], t)) return false;
            }
            return true;
        }

        /// <summary>Copies row <paramref name="fromRow"/> of every tensor of a state into row <paramref name="toRow"/>
        /// of the same tensor of another (both contiguous, on the CPU, of the same row sizes).</summary>
        static void CopyRow(Tensor[] from, int fromRow, Tensor[] to, int toRow)
        {
            for (int j = 0; j < from.Length; j++)
            {
                var source = from[j].bytes;
                var target = to[j].bytes;
                int row = source.Length / (int)from[j].shape[0];
                source.Slice(fromRow * row, row).CopyTo(target.Slice(toRow * row, row));
            }
        }

        /// <summary>Queued samples: a state and each row's position in the input (<see cref="Hole"/> for none); a
        /// writable chunk is a segment's own output, whose hole rows may be overwritten.</summary>
        sealed class Chunk
        {
            public readonly Tensor[] State;
            public readonly long[] Ids;
            public readonly bool Writable;
            public int Live;
            public Chunk(Tensor[] state, long[] ids, bool writable)
            {
                State = state; Ids = ids; Writable = writable;
                Live = ids.Count(i => i != Hole);
            }
        }

        /// <summary>The samples waiting for one segment: queued chunks, and a pending batch that staying samples are copied
        /// into row by row (its first <c>Filled</c> rows), queued as a chunk once full.</summary>
        sealed class SegmentQueue
        {
            public readonly System.Collections.Generic.List<Chunk> Chunks = new();
            Tensor[]? pending;
            long[]? pendingIds;
            int filled;

            public int Live
            {
                get
                {
                    int s = filled;
                    foreach (var c in Chunks) s += c.Live;
                    return s;
                }
            }

            public bool Empty => Chunks.Count == 0 && filled == 0;

            public void AddToPending(Tensor[] state, int row, long id, int batchSize)
            {
                if (pending == null)
                {
                    pending = state.Select(s =>
                    {
                        var shape = (long[])s.shape.Clone();
                        shape[0] = batchSize;
                        return empty(shape, s.dtype, s.device).DetachFromDisposeScope();
                    }).ToArray();
                    pendingIds = new long[batchSize];
                    filled = 0;
                }
                CopyRow(state, row, pending, filled);
                pendingIds![filled++] = id;
                if (filled == batchSize)
                {
                    Chunks.Add(new Chunk(pending, pendingIds, writable: false));
                    pending = null;
                    pendingIds = null;
                    filled = 0;
                }
            }

            /// <summary>The next batch of up to <paramref name="count"/> samples, its tensors attached to
            /// <paramref name="step"/>: a full chunk as it is; else the writable chunk with the most samples, its holes
            /// filled from the pending batch's last rows and then from the other chunks, the emptiest first; else (the
            /// tail, or tensors that cannot be written row by row) the chunks and the pending rows concatenated.</summary>
            public (Tensor[] State, long[] Ids) TakeBatch(int count, DisposeScope step)
            {
                int b = -1;
                for (int i = 0; i < Chunks.Count; i++)
                {
                    var c = Chunks[i];
                    if (c.Ids.Length == count && c.Live == count) { b = i; break; }
                    if (c.Writable && c.Ids.Length == count && (b < 0 || c.Live > Chunks[b].Live)) b = i;
                }
                if (b < 0)
                {
                    var parts = Chunks.Select(c => (c.State, c.Ids)).ToList();
                    Chunks.Clear();
                    if (filled > 0)
                    {
                        parts.Add((pending!.Select(t => t.narrow(0, 0, filled).DetachFromDisposeScope()).ToArray(), pendingIds![..filled]));
                        foreach (var t in pending!) t.Dispose();
                        pending = null;
                        pendingIds = null;
                        filled = 0;
                    }
                    var (state, ids, taken) = Take(parts, count);
                    foreach (var t in taken) step.Attach(t);
                    foreach (var (s, i) in parts) Chunks.Add(new Chunk(s, i, writable: false));
                    return (state, ids);
                }
                var batch = Chunks[b];
                Chunks.RemoveAt(b);
                foreach (var t in batch.State) step.Attach(t);
                int hole = 0;
                void NextHole() { while (hole < batch.Ids.Length && batch.Ids[hole] != Hole) hole++; }
                NextHole();
                void Move(Tensor[] from, int row, long id)
                {
                    CopyRow(from, row, batch.State, hole);
                    batch.Ids[hole] = id;
                    batch.Live++;
                    NextHole();
                }
                while (hole < batch.Ids.Length && filled > 0)
                {
                    filled--;
                    Move(pending!, filled, pendingIds![filled]);
                }
                while (hole < batch.Ids.Length)
                {
                    int d = -1;
                    for (int i = 0; i < Chunks.Count; i++)
                        if (Chunks[i].Live > 0 && RowsCopyable(Chunks[i].State) && (d < 0 || Chunks[i].Live < Chunks[d].Live)) d = i;
                    if (d < 0) break;
                    var donor = Chunks[d];
                    for (int r = donor.Ids.Length - 1; r >= 0 && hole < batch.Ids.Length; r--)
                    {
                        if (donor.Ids[r] == Hole) continue;
                        Move(donor.State, r, donor.Ids[r]);
                        donor.Ids[r] = Hole;
                        donor.Live--;
                    }
                    if (donor.Live == 0)
                    {
                        foreach (var t in donor.State) t.Dispose();
                        Chunks.RemoveAt(d);
                    }
                }
                return (batch.State, batch.Ids);
            }

            public void Dispose()
            {
                foreach (var c in Chunks)
                    foreach (var t in c.State) t.Dispose();
                if (pending != null)
                    foreach (var t in pending) t.Dispose();
            }
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
