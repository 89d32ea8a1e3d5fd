using System;
using System.Collections.Generic;
using System.Linq;
using EarlyExit.Native;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace EarlyExit.Models
{
    /// <summary>What a head factory is told about the features it reads: the exit (1-based), the shape of one sample's
    /// features after that segment (C, H, W, or just (D) for flat features), and the number of classes.</summary>
    public sealed record HeadContext(int Exit, int ExitCount, long[] FeatureShape, int NumClasses)
    {
        public bool IsLast => Exit == ExitCount;
        public long Channels => FeatureShape[0];
    }

    /// <summary>Ready-made exit heads for <see cref="ComposedNetwork"/>.</summary>
    public static class Heads
    {
        /// <summary>The papers' choice: SDN heads (α·max-pool + (1−α)·average-pool to k×k, linear) on internal exits,
        /// global average pool + linear on the last.</summary>
        public static Func<HeadContext, nn.Module<Tensor, Tensor>> SdnThenPoolLinear(long poolSize = 4) =>
            c => c.IsLast ? PoolLinear()(c) : Sdn(poolSize)(c);

        /// <summary>SDN head on every exit.</summary>
        public static Func<HeadContext, nn.Module<Tensor, Tensor>> Sdn(long poolSize = 4) =>
            c => new SingleTensorHead($"head{c.Exit}", new SdnHead("sdn", RequireMap(c).Channels, c.NumClasses, poolSize));

        /// <summary>Global average pool + linear on every exit.</summary>
        public static Func<HeadContext, nn.Module<Tensor, Tensor>> PoolLinear() =>
            c => new SingleTensorHead($"head{c.Exit}", new PoolLinearHead("pool", RequireMap(c).Channels, c.NumClasses));

        static HeadContext RequireMap(HeadContext c) =>
            c.FeatureShape.Length == 3 ? c : throw new ArgumentException($"exit {c.Exit}: this head pools a C×H×W feature map; the segment gives [{string.Join(", ", c.FeatureShape)}]");
    }

    /// <summary>Adapts one of our heads (which take the list of feature tensors) to a single tensor.</summary>
    sealed class SingleTensorHead : nn.Module<Tensor, Tensor>
    {
        readonly nn.Module<Tensor[], Tensor> inner;
        public SingleTensorHead(string name, nn.Module<Tensor[], Tensor> inner) : base(name) { this.inner = inner; RegisterComponents(); }
        public override Tensor forward(Tensor x) => inner.call(new[] { x });
    }

    /// <summary>A user's segment or head, as a segment or head of a multi-exit network (one feature tensor).</summary>
    sealed class UserSegment : nn.Module<Tensor[], Tensor[]>
    {
        readonly nn.Module<Tensor, Tensor> body;
        public UserSegment(string name, nn.Module<Tensor, Tensor> body) : base(name) { this.body = body; RegisterComponents(); }
        public override Tensor[] forward(Tensor[] state) => new[] { body.call(state[0]) };
    }

    sealed class UserHead : nn.Module<Tensor[], Tensor>
    {
        readonly nn.Module<Tensor, Tensor> body;
        public UserHead(string name, nn.Module<Tensor, Tensor> body) : base(name) { this.body = body; RegisterComponents(); }
        public override Tensor forward(Tensor[] state) => body.call(state[0]);
    }

    /// <summary>
    /// A multi-exit network from a user's own TorchSharp backbone: M segments (each a module from the previous
    /// segment's features to its own) and a head factory that makes exit μ's classifier from the shape of segment μ's
    /// features (found by running the segments once on a zero input). Every strategy, regulariser, budget and analysis
    /// works on it as on the built-in families: parameters are named <c>segments.{μ−1}.body.…</c> and
    /// <c>heads.{μ−1}.body.…</c>.
    /// </summary>
    public sealed class ComposedNetwork : MultiExitNetwork
    {
        readonly ModuleList<nn.Module<Tensor[], Tensor[]>> segments;
        readonly ModuleList<nn.Module<Tensor[], Tensor>> heads;
        readonly Func<IReadOnlyList<nn.Module<Tensor, Tensor>>> makeSegments;
        readonly Func<HeadContext, nn.Module<Tensor, Tensor>> makeHead;
        readonly string family;
        readonly int classes;
        readonly long[] input;
        readonly long[][] featureShapes;

        /// <summary>Builds the network: <paramref name="makeSegments"/> returns fresh segments each call (siblings and
        /// frozen copies call it again), <paramref name="makeHead"/> one head per exit.</summary>
        public ComposedNetwork(string family, Func<IReadOnlyList<nn.Module<Tensor, Tensor>>> makeSegments,
            Func<HeadContext, nn.Module<Tensor, Tensor>> makeHead, int numClasses, long[] inputShape) : base("ComposedNetwork")
        {
            TorchNativeLoader.EnsureLoaded();
            if (numClasses < 2) throw new ArgumentException($"{family}: {numClasses} classes; give at least 2");
            if (inputShape.Length != 3 || inputShape.Any(v => v < 1)) throw new ArgumentException($"{family}: the input shape must be C×H×W with positive sizes");
            this.family = family; this.makeSegments = makeSegments; this.makeHead = makeHead;
            classes = numClasses; input = inputShape.ToArray();
            var bodies = makeSegments();
            if (bodies is null || bodies.Count < 1) throw new ArgumentException($"{family}: the segment factory returned no segments");
            // The features after each segment, on one zero sample (eval mode: BatchNorm must not see a batch of one).
            featureShapes = new long[bodies.Count][];
            using (no_grad())
            using (var scope = NewDisposeScope())
            {
                var x = zeros(new[] { 1L }.Concat(input).ToArray());
                for (int i = 0; i < bodies.Count; i++)
                {
                    bodies[i].eval();
                    try { x = bodies[i].call(x); }
                    catch (Exception e) when (e is not OutOfMemoryException)
                    {
                        throw new ArgumentException($"{family}: segment {i + 1} fails on the features of shape [{string.Join(", ", x.shape)}]: {e.Message}");
                    }
                    featureShapes[i] = x.shape.Skip(1).ToArray();
                    bodies[i].train();
                }
            }
            var segs = new List<nn.Module<Tensor[], Tensor[]>>();
            var hs = new List<nn.Module<Tensor[], Tensor>>();
            for (int i = 0; i < bodies.Count; i++)
            {
                segs.Add(new UserSegment($"segment{i + 1}", bodies[i]));
                var head = makeHead(new HeadContext(i + 1, bodies.Count, featureShapes[i], numClasses))
                    ?? throw new ArgumentException($"{family}: the head factory returned no head for exit {i + 1}");
                hs.Add(new UserHead($"head{i + 1}", head));
            }
            segments = nn.ModuleList(segs.ToArray());
            heads = nn.ModuleList(hs.ToArray());
            RegisterComponents();
            // Every exit must give one logit per class.
            using (no_grad())
            using (var scope = NewDisposeScope())
            {
                eval();
                var logits = forward(zeros(new[] { 1L }.Concat(input).ToArray()));
                for (int e = 0; e < logits.Length; e++)
                    if (logits[e].dim() != 2 || logits[e].shape[1] != numClasses)
                        throw new ArgumentException($"{family}: exit {e + 1} gives logits of shape [{string.Join(", ", logits[e].shape)}]; an exit must give [N, {numClasses}]");
                train();
            }
        }

        public override int ExitCount => segments.Count;
        public override int NumClasses => classes;
        public override long[] InputShape => input;
        /// <summary>The shape of one sample's features after each segment.</summary>
        public IReadOnlyList<long[]> FeatureShapes => featureShapes;
        public override nn.Module<Tensor[], Tensor[]> Segment(int exit) { CheckExit(exit); return segments[exit - 1]; }
        public override nn.Module<Tensor[], Tensor> Head(int exit) { CheckExit(exit); return heads[exit - 1]; }
        public override MultiExitNetwork CreateSibling() => new ComposedNetwork(family, makeSegments, makeHead, classes, input);

        public override string Describe() =>
            $"{family}: {ExitCount} segments (features {string.Join(", ", featureShapes.Select(s => string.Join("x", s)))}), " +
            $"{ExitCount} exits, {classes} classes, input {string.Join("x", input)}";
    }

    /// <summary>
    /// Registers a user's network as a model family, so recipes (<c>"model": {"name": NAME}</c>), describe, train, eval
    /// and analyze build it by name. The factory gets the options a recipe may set (classes and input shape always;
    /// width, blocks and exits if the family reads them; <paramref name="problems"/> refuses the rest).
    /// </summary>
    public static class CustomModels
    {
        public static ModelFamily Register(string name, string summary,
            Func<ModelOptions, IReadOnlyList<nn.Module<Tensor, Tensor>>> segments,
            Func<HeadContext, nn.Module<Tensor, Tensor>> heads,
            int defaultClasses, long[] defaultInput,
            Func<ModelOptions, IReadOnlyList<string>>? problems = null)
        {
            if (string.IsNullOrWhiteSpace(name)) throw new ArgumentException("a model family needs a name");
            int Classes(ModelOptions o) => o.NumClasses ?? defaultClasses;
            long[] Input(ModelOptions o) => o.InputShape ?? defaultInput;
            IReadOnlyList<string> Check(ModelOptions o)
            {
                var p = (problems?.Invoke(o) ?? Array.Empty<string>()).ToList();
                if (problems is null)
                {
                    if (o.BaseWidth is not null) p.Add("width: this model takes no width");
                    if (o.Blocks is not null) p.Add("blocks: this model takes no blocks");
                    if (o.ExitPositions is not null) p.Add("exits: this model's exits are its segments");
                }
                p.AddRange(o.MsdNetOnlyOptionsSet().Select(n => $"{n}: an MSDNet option"));
                return p;
            }
            int? exitCount = null;
            var family = new ModelFamily(
                name, summary, $"{defaultClasses} classes; input {string.Join("x", defaultInput)}",
                o => new ComposedNetwork(name, () => segments(o), heads, Classes(o), Input(o)),
                o =>
                {
                    // The number of exits is the number of segments: built once (on the CPU) and remembered per options.
                    if (exitCount is { } n && o == ModelOptions.Default) return n;
                    TorchNativeLoader.EnsureLoaded();
                    var built = segments(o);
                    int count = built.Count;
                    foreach (var m in built) m.Dispose();
                    if (o == ModelOptions.Default) exitCount = count;
                    return count;
                },
                Check);
            ModelRegistry.Register(family);
            return family;
        }
    }
}
