using System;
using System.Collections.Generic;
using System.Linq;
using EarlyExit.Models;
using EarlyExit.Training;
using static TorchSharp.torch;

namespace EarlyExit.Regularisers
{
    /// <summary>
    /// The regularisers of one run, each with the state it carries across stages, by name. The stages of a recipe
    /// share it; the interpreter saves it after every stage (one tensor file, each regulariser under "NAME/").
    /// </summary>
    public sealed class RegulariserSet : IDisposable
    {
        private readonly List<IRegulariser> items;

        public RegulariserSet(IEnumerable<IRegulariser> regularisers)
        {
            items = regularisers.ToList();
            var duplicate = items.GroupBy(r => r.Kind.Name).FirstOrDefault(g => g.Count() > 1);
            if (duplicate is not null) throw new ArgumentException($"regulariser '{duplicate.Key}' is in the set twice");
        }

        /// <summary>A set with no regularisers (recipes whose stages use none).</summary>
        public RegulariserSet() : this(Array.Empty<IRegulariser>()) { }

        /// <summary>A set of the named regularisers with their default settings.</summary>
        public static RegulariserSet Of(params string[] names) => new(names.Select(n => RegulariserRegistry.Create(n)));

        public IReadOnlyList<IRegulariser> All => items;

        public bool Contains(string name) => items.Any(r => r.Kind.Name == name);

        public IRegulariser this[string name] =>
            items.FirstOrDefault(r => r.Kind.Name == name)
            ?? throw new ArgumentException($"the run has no regulariser '{name}' (it has: {(items.Count == 0 ? "none" : string.Join(", ", items.Select(r => r.Kind.Name)))})");

        /// <summary>The one regulariser of type <typeparamref name="T"/>.</summary>
        public T Get<T>() where T : IRegulariser =>
            items.OfType<T>().SingleOrDefault() ?? throw new ArgumentException($"the run has no {typeof(T).Name}");

        public void Save(string path)
        {
            using var writer = new StateWriter();
            foreach (var r in items) r.Save(writer, r.Kind.Name + "/");
            TensorStore.Save(path, writer.Tensors);
        }

        /// <summary>Replaces every regulariser's state with what <see cref="Save"/> wrote.</summary>
        public void Load(string path, MultiExitNetwork net)
        {
            var d = TensorStore.Load(path);
            try
            {
                foreach (var r in items) r.Load(d, r.Kind.Name + "/", net);
            }
            finally
            {
                foreach (var t in d.Values) t.Dispose();
            }
        }

        public string Describe() => items.Count == 0 ? "none" : string.Join("; ", items.Select(r => r.Describe()));

        public void Dispose()
        {
            foreach (var r in items) r.Dispose();
        }
    }
}
