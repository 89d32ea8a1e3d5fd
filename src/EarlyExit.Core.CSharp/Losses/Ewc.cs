using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using EarlyExit.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace EarlyExit.Losses
{
    /// <summary>
    /// Elastic Weight Consolidation, online form, as in the 2026 paper (eq. 2):
    /// R_EWC(μ) = Σ_k (Σ_{ν&lt;μ} F_k(ν)) (θ_k − θ*_k)² over the parameters of segments 1..μ−1,
    /// with θ* the values at the end of the previous stage.
    /// </summary>
    public static class Ewc
    {
        /// <summary>Σ_k F_k (θ_k − θ*_k)². Zero at θ = θ*, never negative for F ≥ 0, quadratic in the displacement.
        /// MAS uses the same form with its importances Ω in place of F.</summary>
        public static Tensor Penalty(IReadOnlyList<(Tensor parameter, Tensor fisher, Tensor anchor)> terms)
        {
            if (terms.Count == 0) throw new ArgumentException("the penalty needs at least one parameter with an importance to protect");
            using var scope = NewDisposeScope();
            Tensor? total = null;
            foreach (var (p, f, a) in terms)
            {
                if (!p.shape.AsSpan().SequenceEqual(f.shape) || !p.shape.AsSpan().SequenceEqual(a.shape))
                    throw new ArgumentException($"shapes differ: parameter [{string.Join(", ", p.shape)}], importance [{string.Join(", ", f.shape)}], anchor [{string.Join(", ", a.shape)}]");
                var d = p - a;
                var term = (f * d * d).sum();
                total = total is null ? term : total + term;
            }
            return total!.MoveToOuterDisposeScope();
        }
    }

    /// <summary>
    /// Long-lived state of a quadratic regulariser: per-parameter importances accumulated over the exits trained so far
    /// (the Fisher of online EWC, Ω of MAS) and the anchor θ*. Every stored tensor is detached and owned here (not by
    /// any dispose scope). The penalty of its terms is <see cref="Ewc.Penalty"/>, Σ_k importance_k (θ_k − θ*_k)².
    /// </summary>
    public sealed class ImportanceState : IDisposable
    {
        private readonly Dictionary<string, Tensor> fisher = new();
        private readonly Dictionary<string, Tensor> anchor = new();

        public IReadOnlyDictionary<string, Tensor> Importance => fisher;
        public IReadOnlyDictionary<string, Tensor> Anchor => anchor;
        /// <summary>Exits whose importances have been added, in order.</summary>
        public List<int> Exits { get; } = new();

        /// <summary>Adds the importances of one exit to the running sum (tensors are copied and detached).</summary>
        public void Accumulate(int exit, IReadOnlyDictionary<string, Tensor> exitFisher)
        {
            foreach (var (name, f) in exitFisher)
            {
                var detached = f.detach().clone().DetachFromDisposeScope();
                if (fisher.TryGetValue(name, out var old))
                {
                    fisher[name] = old.add(detached).DetachFromDisposeScope();
                    old.Dispose(); detached.Dispose();
                }
                else fisher[name] = detached;
            }
            Exits.Add(exit);
        }

        /// <summary>θ* := the current parameters (detached copies).</summary>
        public void SetAnchor(MultiExitNetwork net)
        {
            foreach (var t in anchor.Values) t.Dispose();
            anchor.Clear();
            using var noGrad = no_grad();
            foreach (var (name, p) in net.named_parameters())
                if (fisher.ContainsKey(name)) anchor[name] = p.detach().clone().DetachFromDisposeScope();
        }

        /// <summary>The terms of R(μ): parameters of segments 1..μ−1 that have an importance, bound once per stage.</summary>
        public List<(Tensor parameter, Tensor fisher, Tensor anchor)> Bind(MultiExitNetwork net, int stageExit)
        {
            var terms = new List<(Tensor, Tensor, Tensor)>();
            foreach (var (name, p) in net.SegmentParameters(stageExit - 1))
                if (fisher.TryGetValue(name, out var f))
                {
                    if (!anchor.TryGetValue(name, out var a)) throw new InvalidOperationException($"parameter {name} has an importance but no anchor");
                    terms.Add((p, f.to(p.device), a.to(p.device)));
                }
            return terms;
        }

        public void MoveTo(Device device)
        {
            foreach (var k in fisher.Keys.ToList()) { var old = fisher[k]; fisher[k] = old.to(device).DetachFromDisposeScope(); if (!ReferenceEquals(old, fisher[k])) old.Dispose(); }
            foreach (var k in anchor.Keys.ToList()) { var old = anchor[k]; anchor[k] = old.to(device).DetachFromDisposeScope(); if (!ReferenceEquals(old, anchor[k])) old.Dispose(); }
        }

        public Dictionary<string, Tensor> ToDictionary(string prefix)
        {
            var d = new Dictionary<string, Tensor>();
            foreach (var (k, v) in fisher) d[$"{prefix}importance/{k}"] = v;
            foreach (var (k, v) in anchor) d[$"{prefix}anchor/{k}"] = v;
            return d;
        }

        public void LoadFrom(IReadOnlyDictionary<string, Tensor> d, string prefix, IEnumerable<int> exits)
        {
            Dispose();
            foreach (var (k, v) in d)
            {
                if (k.StartsWith(prefix + "importance/")) fisher[k[(prefix.Length + 11)..]] = v.detach().clone().DetachFromDisposeScope();
                else if (k.StartsWith(prefix + "anchor/")) anchor[k[(prefix.Length + 7)..]] = v.detach().clone().DetachFromDisposeScope();
            }
            Exits.Clear(); Exits.AddRange(exits);
        }

        public void Dispose()
        {
            foreach (var t in fisher.Values) t.Dispose();
            foreach (var t in anchor.Values) t.Dispose();
            fisher.Clear(); anchor.Clear();
        }
    }
}
