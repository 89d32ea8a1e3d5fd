using System;
using System.Collections.Generic;
using EarlyExit.Data;
using EarlyExit.Models;
using EarlyExit.Training;
using static TorchSharp.torch;

namespace EarlyExit.Regularisers
{
    /// <summary>One regulariser in one stage: its registry name and its strength there (λ, ρ, ...), already resolved
    /// from the recipe's schedule for the stage's exit μ.</summary>
    public sealed record RegulariserUse(string Name, double Strength);

    /// <summary>The stage as the loop runs it: the network, the resolved plan, the data and the device.</summary>
    public sealed record StageContext(MultiExitNetwork Net, StagePlan Plan, DataSplits Data, Device Device);

    /// <summary>
    /// One training batch as the loop computed it: the (augmented) input, the logits of the exits the stage forwards
    /// (index μ−1, null for the exits it does not compute) and the targets (labels, or soft targets under Mixup/CutMix).
    /// </summary>
    public sealed record BatchContext(Tensor Input, Tensor?[] Logits, Tensor Targets, int Epoch, int Batch);

    /// <summary>A setting of a regulariser kind: its name, default value, what it means, a check of a value (null when
    /// the value is fine, else the reason it is not), and for the recipe schema the values it takes (null: any that
    /// passes the check) and whether it is a non-negative integer.</summary>
    public sealed record RegulariserSetting(string Name, string Default, string Description, Func<string, string?> Check,
        string[]? Values = null, bool Integer = false);

    /// <summary>
    /// What a regulariser is, without any state: its name in recipes, its settings, and what the interpreter needs to
    /// plan and cost a recipe before anything runs (which earlier exits' state a stage reads, which outputs it
    /// needs, how many MACs it adds). <see cref="Create"/> makes the stateful instance a run uses.
    /// A new regulariser is one class implementing this and <see cref="IRegulariser"/>, registered in
    /// <see cref="RegulariserRegistry"/>.
    /// </summary>
    public interface IRegulariserKind
    {
        /// <summary>Name in recipes, on the command line and in strategy names ("ewc", "lwf", "mas"): lower case, no '-'.</summary>
        string Name { get; }
        /// <summary>One line: what it penalises.</summary>
        string Description { get; }
        /// <summary>The name of its strength in the papers and in recipe JSON ("lambda", "rho").</summary>
        string StrengthName { get; }
        /// <summary>Its strength when a recipe builder is given none and no paper preset applies.</summary>
        double DefaultStrength { get; }
        IReadOnlyList<RegulariserSetting> Settings { get; }
        /// <summary>Whether the penalty reads the protected exits' outputs: then the loop forwards those exits, and the
        /// penalty's gradients reach their heads (the sequential builder trains them too).</summary>
        bool ReadsProtectedExits { get; }
        /// <summary>The earlier exits whose consolidated state a stage that protects <paramref name="protects"/> reads.
        /// A stage consolidates after it only if a later stage reads its exit; state no later stage reads is released.</summary>
        IReadOnlyList<int> StateRead(IReadOnlyDictionary<string, string> settings, IReadOnlyList<int> protects);
        /// <summary>Forward MACs per training image the penalty adds (teacher forwards), for the cost accounting;
        /// <paramref name="exitMacs"/> are cumulative MACs per exit (index μ−1).</summary>
        double PenaltyForwardMacs(IReadOnlyDictionary<string, string> settings, IReadOnlyList<int> protects, IReadOnlyList<long> exitMacs);
        /// <summary>MACs of consolidating after a stage that adds exit <paramref name="stageExit"/> (the Fisher's passes).</summary>
        double ConsolidationMacs(IReadOnlyDictionary<string, string> settings, int stageExit, int trainImages, int classes, IReadOnlyList<long> exitMacs);
        /// <summary>A fresh instance with these settings (complete: <see cref="RegulariserRegistry.Resolve"/> fills defaults).</summary>
        IRegulariser Create(IReadOnlyDictionary<string, string> settings);
    }

    /// <summary>
    /// A regulariser of one run: the state it carries across stages (Fisher and anchor, teachers, importances) and the
    /// loop points it implements. The loop is fixed (<see cref="StageTrainer"/>): at the start of a stage it binds every
    /// regulariser the stage uses; for each batch it adds strength × <see cref="IStagePenalty.Penalty"/> to the loss, in
    /// the order the stage lists them; after the stage (best epoch restored) it consolidates those the plan names.
    /// The interpreter saves and loads the state with every stage (resume, prefix cache) and releases what no later
    /// stage reads.
    /// </summary>
    public interface IRegulariser : IDisposable
    {
        IRegulariserKind Kind { get; }
        /// <summary>Complete settings (defaults filled in).</summary>
        IReadOnlyDictionary<string, string> Settings { get; }
        /// <summary>Why a stage cannot run with this regulariser now (no state yet for an exit it protects); empty when it can.</summary>
        IEnumerable<string> Problems(MultiExitNetwork net, StagePlan plan);
        /// <summary>Stage start: the penalty of this stage, bound to the network's parameters.</summary>
        IStagePenalty Bind(StageContext stage);
        /// <summary>Stage end, the best epoch's state restored: keep what later stages read about exit μ.</summary>
        void Consolidate(StageContext stage);
        /// <summary>Frees the state of every exit not in <paramref name="keep"/> (no later stage reads it).</summary>
        void Release(IReadOnlySet<int> keep);
        /// <summary>Writes the state under <paramref name="prefix"/>.</summary>
        void Save(StateWriter into, string prefix);
        /// <summary>Replaces the state with what <see cref="Save"/> wrote under <paramref name="prefix"/> (none: empty state).</summary>
        void Load(IReadOnlyDictionary<string, Tensor> from, string prefix, MultiExitNetwork net);
        /// <summary>Exits whose state it holds now.</summary>
        IReadOnlyList<int> Holds { get; }
        /// <summary>Name, settings and held state in one line, for logs and reports.</summary>
        string Describe();
    }

    /// <summary>A regulariser bound to one stage: its penalty per batch, and the loop's later points of a step.</summary>
    public interface IStagePenalty : IDisposable
    {
        /// <summary>The unscaled penalty of this batch (the loop multiplies it by the stage's strength and adds it to the loss).</summary>
        Tensor Penalty(BatchContext batch);
        /// <summary>After the backward pass, before the optimiser step (gradients are in place).</summary>
        void AfterBackward(BatchContext batch) { }
        /// <summary>After the optimiser step.</summary>
        void AfterStep(BatchContext batch) { }
    }

    /// <summary>Tensors to write to one file: borrowed ones (state the regulariser keeps) and owned ones, disposed
    /// with the writer (index tensors made for the file).</summary>
    public sealed class StateWriter : IDisposable
    {
        private readonly List<Tensor> owned = new();
        public Dictionary<string, Tensor> Tensors { get; } = new();

        public void Add(string name, Tensor tensor) => Tensors.Add(name, tensor);

        public void AddOwned(string name, Tensor tensor)
        {
            Tensors.Add(name, tensor);
            owned.Add(tensor);
        }

        public void Dispose()
        {
            foreach (var t in owned) t.Dispose();
            owned.Clear();
        }
    }
}
