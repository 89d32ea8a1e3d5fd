using System;
using System.Collections.Generic;
using System.Linq;
using EarlyExit.Losses;
using EarlyExit.Models;
using EarlyExit.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace EarlyExit.Regularisers
{
    /// <summary>
    /// What EWC and MAS share: R(μ) = Σ_k (Σ_{ν&lt;μ} Ω_k(ν)) (θ_k − θ*_k)² over the parameters of segments 1..μ−1,
    /// with importances Ω(ν) of exit ν added up online after its stage and θ* the parameters after the previous stage.
    /// A subclass says how the importances of an exit are computed (<see cref="Importances"/>).
    /// </summary>
    public abstract class QuadraticRegulariser : IRegulariser
    {
        protected QuadraticRegulariser(IReadOnlyDictionary<string, string> settings) => Settings = settings;

        public abstract IRegulariserKind Kind { get; }
        public IReadOnlyDictionary<string, string> Settings { get; }
        /// <summary>The importances accumulated so far and the anchor.</summary>
        public ImportanceState State { get; } = new();
        /// <summary>What the importances are called in messages ("Fisher", "importance").</summary>
        protected abstract string ImportanceName { get; }

        /// <summary>The importances of exit <paramref name="exit"/> at the current parameters, for every parameter of
        /// segments 1..exit (detached; the caller disposes them).</summary>
        protected abstract Dictionary<string, Tensor> Importances(StageContext stage, int exit);

        public IReadOnlyList<int> Holds => State.Exits;

        public IEnumerable<string> Problems(MultiExitNetwork net, StagePlan plan)
        {
            if (plan.StageExit < 2) yield return $"{Kind.Name} needs a sequential stage μ ≥ 2";
            else if (State.Importance.Count == 0) yield return $"{Kind.Name} has no {ImportanceName} yet (no earlier exit finished)";
        }

        public IStagePenalty Bind(StageContext stage) => new Bound(State.Bind(stage.Net, stage.Plan.StageExit));

        sealed class Bound : IStagePenalty
        {
            private readonly List<(Tensor parameter, Tensor fisher, Tensor anchor)> terms;
            public Bound(List<(Tensor, Tensor, Tensor)> terms) => this.terms = terms;
            public Tensor Penalty(BatchContext batch) => Ewc.Penalty(terms);
            public void Dispose() { }
        }

        public void Consolidate(StageContext stage)
        {
            var importances = Importances(stage, stage.Plan.StageExit);
            State.Accumulate(stage.Plan.StageExit, importances);
            foreach (var f in importances.Values) f.Dispose();
            State.SetAnchor(stage.Net);
        }

        /// <summary>The importances are one running sum over exits: nothing can be released exit by exit.</summary>
        public void Release(IReadOnlySet<int> keep) { }

        public void Save(StateWriter into, string prefix)
        {
            foreach (var (k, v) in State.ToDictionary(prefix)) into.Add(k, v);
            into.AddOwned(prefix + "exits", tensor(State.Exits.Select(e => (long)e).ToArray()));
        }

        public void Load(IReadOnlyDictionary<string, Tensor> from, string prefix, MultiExitNetwork net)
        {
            var exits = from.TryGetValue(prefix + "exits", out var e) ? EarlyExit.Native.TensorData.ToArray<long>(e).Select(x => (int)x).ToArray() : Array.Empty<int>();
            State.LoadFrom(from, prefix, exits);
            var device = net.parameters().First().device;
            // The state lives beside the parameters it protects.
            if (device.type != DeviceType.CPU) State.MoveTo(device);
        }

        public string Describe()
        {
            var settings = string.Join(", ", Settings.OrderBy(kv => kv.Key, StringComparer.Ordinal).Select(kv => $"{kv.Key}={kv.Value}"));
            var held = State.Exits.Count == 0 ? "none yet" : "exits " + string.Join(",", State.Exits);
            return $"{Kind.Name} ({settings}): {ImportanceName} of {held}";
        }

        public void Dispose() => State.Dispose();
    }
}
