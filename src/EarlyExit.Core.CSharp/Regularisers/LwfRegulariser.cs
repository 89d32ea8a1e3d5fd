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
    /// Learning without Forgetting, as in the 2026 paper (eq. 4): R_LwF(μ) = Σ_{ν&lt;μ} KL(ŷ_ν ‖ ŷ*_ν) on the same
    /// augmented batch (<see cref="Lwf.Penalty"/>), where ŷ*_ν comes from a frozen teacher kept after exit ν's stage.
    /// Setting "teachers": "per-exit" (the paper: one copy per protected exit, as the network was when that exit
    /// finished) or "previous-stage" (classic LwF: one copy, the network after the deepest protected exit's stage).
    /// </summary>
    public sealed class LwfRegulariser : IRegulariser
    {
        // Initialised before KindInfo, whose settings check against it (static fields initialise in textual order).
        public static readonly string[] PolicyNames = { "per-exit", "previous-stage" };

        public static readonly IRegulariserKind KindInfo = new LwfKind();

        public static string NameOf(LwfTeacherPolicy p) => p == LwfTeacherPolicy.PerExit ? "per-exit" : "previous-stage";

        public static LwfTeacherPolicy ParsePolicy(string name) => name switch
        {
            "per-exit" => LwfTeacherPolicy.PerExit,
            "previous-stage" => LwfTeacherPolicy.PreviousStage,
            _ => throw new ArgumentException($"unknown LwF teacher policy '{name}' ({string.Join(", ", PolicyNames)})"),
        };

        public LwfRegulariser(IReadOnlyDictionary<string, string> settings)
        {
            Settings = settings;
            Policy = ParsePolicy(settings["teachers"]);
        }

        public IRegulariserKind Kind => KindInfo;
        public IReadOnlyDictionary<string, string> Settings { get; }
        public LwfTeacherPolicy Policy { get; }
        /// <summary>Frozen copies of the network as it was when exit ν finished (the teachers), by ν.</summary>
        public Dictionary<int, MultiExitNetwork> Teachers { get; } = new();
        public IReadOnlyList<int> Holds => Teachers.Keys.OrderBy(k => k).ToArray();

        /// <summary>The teachers a stage protecting <paramref name="protects"/> reads.</summary>
        public static IReadOnlyList<int> TeachersFor(LwfTeacherPolicy policy, IReadOnlyList<int> protects) =>
            protects.Count == 0 ? Array.Empty<int>() : policy == LwfTeacherPolicy.PerExit ? protects : new[] { protects.Max() };

        public IEnumerable<string> Problems(MultiExitNetwork net, StagePlan plan)
        {
            foreach (var nu in TeachersFor(Policy, plan.ProtectedExits))
                if (!Teachers.ContainsKey(nu)) yield return $"LwF has no teacher for exit {nu}";
        }

        public IStagePenalty Bind(StageContext stage) => new Bound(this, stage.Plan.ProtectedExits);

        sealed class Bound : IStagePenalty
        {
            private readonly LwfRegulariser owner;
            private readonly int[] protects;
            public Bound(LwfRegulariser owner, int[] protects) { this.owner = owner; this.protects = protects; }

            public Tensor Penalty(BatchContext batch)
            {
                List<Tensor> teacher;
                using (no_grad()) teacher = owner.TeacherLogits(protects, batch.Input);
                var current = protects.Select(nu => batch.Logits[nu - 1]!).ToList();
                return Lwf.Penalty(current, teacher);
            }

            public void Dispose() { }
        }

        /// <summary>The teachers' logits of the protected exits, in the order of <paramref name="protects"/>.</summary>
        List<Tensor> TeacherLogits(int[] protects, Tensor x)
        {
            if (Policy == LwfTeacherPolicy.PerExit)
                return protects.Select(nu => Teachers[nu].ForwardExit(x, nu)).ToList();
            int deepest = protects.Max();
            var needed = new bool[deepest];
            foreach (var nu in protects) needed[nu - 1] = true;
            var all = Teachers[deepest].ForwardSelected(x, needed);
            return protects.Select(nu => all[nu - 1]!).ToList();
        }

        public void Consolidate(StageContext stage)
        {
            int mu = stage.Plan.StageExit;
            if (Teachers.Remove(mu, out var old)) old.Dispose();
            Teachers[mu] = stage.Net.FrozenCopy();
        }

        public void Release(IReadOnlySet<int> keep)
        {
            foreach (var nu in Teachers.Keys.ToList())
                if (!keep.Contains(nu))
                {
                    Teachers[nu].Dispose();
                    Teachers.Remove(nu);
                }
        }

        public void Save(StateWriter into, string prefix)
        {
            into.AddOwned(prefix + "teachers", tensor(Holds.Select(e => (long)e).ToArray()));
            foreach (var (nu, t) in Teachers)
                foreach (var (k, v) in TensorStore.StateOf(t, $"{prefix}teacher{nu}/")) into.Add(k, v);
        }

        /// <summary>Teachers are rebuilt as frozen siblings of <paramref name="net"/>, on its device.</summary>
        public void Load(IReadOnlyDictionary<string, Tensor> from, string prefix, MultiExitNetwork net)
        {
            DisposeTeachers();
            if (!from.TryGetValue(prefix + "teachers", out var index)) return;
            var device = net.parameters().First().device;
            foreach (var nu in EarlyExit.Native.TensorData.ToArray<long>(index))
            {
                var teacher = net.CreateSibling();
                TensorStore.LoadInto(teacher, from, $"{prefix}teacher{nu}/");
                teacher.to(device);
                teacher.Freeze();
                Teachers[(int)nu] = teacher;
            }
        }

        public string Describe()
        {
            var held = Teachers.Count == 0 ? "none yet" : "exits " + string.Join(",", Holds);
            return $"lwf (teachers={Settings["teachers"]}): teachers of {held}";
        }

        void DisposeTeachers()
        {
            foreach (var t in Teachers.Values) t.Dispose();
            Teachers.Clear();
        }

        public void Dispose() => DisposeTeachers();

        sealed class LwfKind : IRegulariserKind
        {
            public string Name => "lwf";
            public string Description => "learning without forgetting: KL from each earlier exit's current distribution to a frozen teacher's, on the same batch";
            public string StrengthName => "rho";
            public double DefaultStrength => 0.7;
            public IReadOnlyList<RegulariserSetting> Settings { get; } = new[]
            {
                new RegulariserSetting("teachers", "per-exit", "per-exit (the paper: one frozen copy per protected exit) or previous-stage (classic LwF: one copy, one teacher forward per step)", RegulariserRegistry.OneOf(PolicyNames), PolicyNames),
            };
            public bool ReadsProtectedExits => true;
            public IReadOnlyList<int> StateRead(IReadOnlyDictionary<string, string> settings, IReadOnlyList<int> protects) =>
                TeachersFor(ParsePolicy(settings["teachers"]), protects);

            /// <summary>Per-exit teachers run up to each protected exit; one previous-stage teacher up to the deepest.</summary>
            public double PenaltyForwardMacs(IReadOnlyDictionary<string, string> settings, IReadOnlyList<int> protects, IReadOnlyList<long> exitMacs) =>
                protects.Count == 0 ? 0
                : ParsePolicy(settings["teachers"]) == LwfTeacherPolicy.PerExit ? protects.Sum(nu => (double)exitMacs[nu - 1])
                : exitMacs[protects.Max() - 1];

            public double ConsolidationMacs(IReadOnlyDictionary<string, string> settings, int stageExit, int trainImages, int classes, IReadOnlyList<long> exitMacs) => 0;
            public IRegulariser Create(IReadOnlyDictionary<string, string> settings) => new LwfRegulariser(settings);
        }
    }
}
