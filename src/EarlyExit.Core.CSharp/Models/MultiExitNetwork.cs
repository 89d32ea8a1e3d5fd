using System;
using System.Collections.Generic;
using System.Linq;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace EarlyExit.Models
{
    /// <summary>
    /// A multi-exit network: M consecutive backbone segments Θ1..ΘM and M exit heads IC1..ICM.
    /// Segment μ maps the features after segment μ−1 (a list of tensors, one per scale; one for a ResNet)
    /// to the features after segment μ; head μ reads them and returns the logits of exit μ.
    /// The last head is the backbone's own classifier.
    /// <para>Parameter and buffer names start with <c>segments.{i}.</c> or <c>heads.{i}.</c> (0-based i), so every
    /// tensor of the network belongs to exactly one group (see <see cref="GroupOf"/>).</para>
    /// </summary>
    public abstract class MultiExitNetwork : nn.Module<Tensor, Tensor[]>
    {
        protected MultiExitNetwork(string name) : base(name) { }

        /// <summary>Registers the submodules, then, where the numerics backend in use needs it, makes every convolution
        /// of the network take NCHW inputs (<see cref="Native.ConvolutionLayout"/>).</summary>
        protected override void RegisterComponents()
        {
            base.RegisterComponents();
            Native.ConvolutionLayout.Attach(this);
        }

        /// <summary>Number of exits M (equal to the number of segments).</summary>
        public abstract int ExitCount { get; }
        /// <summary>Classes predicted by every exit.</summary>
        public abstract int NumClasses { get; }
        /// <summary>Input shape of one sample (C, H, W).</summary>
        public abstract long[] InputShape { get; }
        /// <summary>The family this network was built from and the options that built it, for reports.</summary>
        public abstract string Describe();

        /// <summary>A new network of the same architecture and options (fresh parameters, on the CPU).</summary>
        public abstract MultiExitNetwork CreateSibling();

        /// <summary>A frozen copy: same architecture, same parameters and buffers, eval mode, no gradients
        /// (<see cref="Freeze"/>).</summary>
        public MultiExitNetwork FrozenCopy()
        {
            var copy = CreateSibling();
            var device = parameters().First().device;
            copy.to(device);
            using (no_grad())
            {
                var mine = state_dict();
                foreach (var (name, t) in copy.state_dict()) t.copy_(mine[name]);
            }
            copy.Freeze();
            return copy;
        }

        /// <summary>
        /// Makes this network an inference-only one: no gradients, eval mode, and every batch norm that follows a
        /// convolution folded into it (<see cref="IBatchNormFoldable"/>), which eval forwards without gradients then use.
        /// The fold is taken from the parameters and running statistics as they are now: call Freeze again after
        /// changing them (loading weights, say), or the forwards keep computing with the old ones. A forward in train
        /// mode or with gradients enabled never uses the fold. Same logits as before up to float rounding (a frozen copy
        /// against its source: a few 1e-6 relative at the cpu scale). A folded forward calls no Conv2d, BatchNorm2d or
        /// ReLU module, so a tool that hooks those leaves runs its forward inside <see cref="BatchNormFolding.Suspend"/>,
        /// as the MAC counter does.
        /// </summary>
        public void Freeze()
        {
            foreach (var p in parameters()) p.requires_grad = false;
            eval();
            foreach (var m in modules())
                if (m is IBatchNormFoldable f) f.FoldBatchNorm();
        }

        /// <summary>
        /// Runs segments 1..needed.Length and returns the logits of the exits marked in <paramref name="needed"/>
        /// (index μ−1), null for the others: heads that are not needed are not computed.
        /// </summary>
        public Tensor?[] ForwardSelected(Tensor x, bool[] needed)
        {
            int upTo = needed.Length;
            CheckExit(upTo, "needed.Length");
            CheckInput(x);
            // The segments' outputs are released when this returns; only the logits go to the caller's dispose scope.
            // Without this, a caller with no scope of its own (a loop of eval forwards in a script) left every feature
            // map to the garbage collector: resident memory grew by about 18 MB per teacher forward at batch 128, and
            // the fresh pages cost ~19,000 minor faults and a fifth of the time of four teacher forwards (151 against
            // 121 ms, 1 thread). Autograd keeps what it saved for backward on its own, so training is unaffected.
            using var scope = NewDisposeScope();
            var logits = new Tensor?[upTo];
            Tensor[] state = { x };
            for (int mu = 1; mu <= upTo; mu++)
            {
                state = Segment(mu).call(state);
                if (needed[mu - 1]) logits[mu - 1] = Head(mu).call(state);
            }
            foreach (var l in logits) l?.MoveToOuterDisposeScope();
            return logits;
        }

        /// <summary>Segment Θμ for μ = 1..M.</summary>
        public abstract nn.Module<Tensor[], Tensor[]> Segment(int exit);
        /// <summary>Head ICμ for μ = 1..M.</summary>
        public abstract nn.Module<Tensor[], Tensor> Head(int exit);

        /// <summary>Runs segments 1..<paramref name="upTo"/> and returns the logits of exits 1..<paramref name="upTo"/>.</summary>
        public Tensor[] ForwardUpTo(Tensor x, int upTo)
        {
            CheckExit(upTo, nameof(upTo));
            var needed = new bool[upTo];
            Array.Fill(needed, true);
            return ForwardSelected(x, needed).Select(t => t!).ToArray();
        }

        /// <summary>Runs segments 1..<paramref name="upTo"/> and returns only the logits of exit <paramref name="upTo"/>.</summary>
        public Tensor ForwardExit(Tensor x, int upTo)
        {
            CheckExit(upTo, nameof(upTo));
            var needed = new bool[upTo];
            needed[upTo - 1] = true;
            return ForwardSelected(x, needed)[upTo - 1]!;
        }

        /// <summary>Logits of every exit, shallow to deep.</summary>
        public override Tensor[] forward(Tensor x) => ForwardUpTo(x, ExitCount);

        public void CheckExit(int exit, string what = "exit")
        {
            if (exit < 1 || exit > ExitCount)
                throw new ArgumentOutOfRangeException(what, exit, $"exit must be in 1..{ExitCount} for this network");
        }

        /// <summary>Refuses inputs whose shape does not match the network before they reach libtorch.</summary>
        public void CheckInput(Tensor x)
        {
            var s = InputShape;
            if (x.dim() != 4 || x.shape[1] != s[0] || x.shape[2] != s[1] || x.shape[3] != s[2])
                throw new ArgumentException(
                    $"input of shape [{string.Join(", ", x.shape)}] does not fit this network, which takes [N, {s[0]}, {s[1]}, {s[2]}]");
        }

        /// <summary>Group name of a parameter or buffer: "segment{μ}" or "head{μ}" (1-based).</summary>
        public static string GroupOf(string tensorName)
        {
            var parts = tensorName.Split('.');
            if (parts.Length >= 2 && int.TryParse(parts[1], out var i))
            {
                if (parts[0] == "segments") return $"segment{i + 1}";
                if (parts[0] == "heads") return $"head{i + 1}";
            }
            throw new ArgumentException($"'{tensorName}' belongs to no segment or head");
        }

        public static string SegmentGroup(int exit) => $"segment{exit}";
        public static string HeadGroup(int exit) => $"head{exit}";

        /// <summary>All groups in order: segment1, head1, segment2, head2, ...</summary>
        public IEnumerable<string> Groups()
        {
            for (int mu = 1; mu <= ExitCount; mu++) { yield return SegmentGroup(mu); yield return HeadGroup(mu); }
        }

        /// <summary>Named parameters of one group (names as in <c>named_parameters()</c>).</summary>
        public IEnumerable<(string name, Parameter parameter)> GroupParameters(string group) =>
            named_parameters().Where(p => GroupOf(p.name) == group);

        /// <summary>Named buffers of one group (BatchNorm running statistics and the like).</summary>
        public IEnumerable<(string name, Tensor buffer)> GroupBuffers(string group) =>
            named_buffers().Where(b => GroupOf(b.name) == group);

        /// <summary>Parameters of segments 1..<paramref name="upTo"/> (the set EWC protects).</summary>
        public IEnumerable<(string name, Parameter parameter)> SegmentParameters(int upTo) =>
            named_parameters().Where(p => { var g = GroupOf(p.name); return g.StartsWith("segment") && int.Parse(g[7..]) <= upTo; });

        /// <summary>Modules of one group (used to put frozen BatchNorm layers in eval mode).</summary>
        public nn.Module GroupModule(string group)
        {
            if (group.StartsWith("segment")) return Segment(int.Parse(group[7..]));
            if (group.StartsWith("head")) return Head(int.Parse(group[4..]));
            throw new ArgumentException($"unknown group '{group}'");
        }
    }
}
