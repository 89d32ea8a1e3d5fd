using System;
using System.Collections.Generic;
using System.Linq;
using System.Text.RegularExpressions;

namespace EarlyExit.Regularisers
{
    /// <summary>
    /// Names of regularisers → their kinds. Recipes, the command line, strategy names ("sequential-mas"), validation,
    /// cost accounting and reports all go through here, so a new regulariser is one file plus one <see cref="Register"/>
    /// (here for the built-in ones, or from a user's code before recipes are read).
    /// </summary>
    public static class RegulariserRegistry
    {
        private static readonly List<IRegulariserKind> kinds = new();
        private static readonly object gate = new();

        static RegulariserRegistry()
        {
            Register(EwcRegulariser.KindInfo);
            Register(LwfRegulariser.KindInfo);
            Register(MasRegulariser.KindInfo);
        }

        /// <summary>Every registered kind, in registration order (the order of the built-in ones: ewc, lwf, mas).</summary>
        public static IReadOnlyList<IRegulariserKind> Kinds
        {
            get { lock (gate) return kinds.ToArray(); }
        }

        public static string KnownNames => string.Join(", ", Kinds.Select(k => k.Name));

        /// <summary>Adds a kind; its name must be new, lower case letters and digits only (it is part of strategy names).</summary>
        public static void Register(IRegulariserKind kind)
        {
            ArgumentNullException.ThrowIfNull(kind);
            if (!Regex.IsMatch(kind.Name ?? "", "^[a-z][a-z0-9]*$"))
                throw new ArgumentException($"regulariser name '{kind.Name}': use lower case letters and digits, starting with a letter");
            lock (gate)
            {
                if (kinds.Any(k => k.Name == kind.Name)) throw new ArgumentException($"a regulariser named '{kind.Name}' is already registered");
                kinds.Add(kind);
            }
        }

        public static bool TryGet(string name, out IRegulariserKind kind)
        {
            lock (gate) kind = kinds.FirstOrDefault(k => k.Name == name)!;
            return kind is not null;
        }

        public static IRegulariserKind Get(string name) =>
            TryGet(name, out var k) ? k : throw new ArgumentException($"unknown regulariser '{name}'; known: {KnownNames}");

        /// <summary>The complete settings of a kind (defaults filled in) and every problem with the given ones.</summary>
        public static (Dictionary<string, string> Settings, List<string> Problems) Resolve(IRegulariserKind kind, IReadOnlyDictionary<string, string>? given)
        {
            var problems = new List<string>();
            var settings = kind.Settings.ToDictionary(s => s.Name, s => s.Default);
            if (given is not null)
                foreach (var (key, value) in given)
                {
                    var setting = kind.Settings.FirstOrDefault(s => s.Name == key);
                    if (setting is null)
                    {
                        var known = kind.Settings.Count == 0 ? "it has none" : "known: " + string.Join(", ", kind.Settings.Select(s => s.Name));
                        problems.Add($"{key}: {kind.Name} has no setting '{key}' ({known})");
                        continue;
                    }
                    if (setting.Check(value) is { } why) problems.Add($"{key}: {why}");
                    else settings[key] = value;
                }
            return (settings, problems);
        }

        /// <summary>A fresh instance of a kind with the given settings; throws with every problem of the settings.</summary>
        public static IRegulariser Create(string name, IReadOnlyDictionary<string, string>? settings = null)
        {
            var kind = Get(name);
            var (resolved, problems) = Resolve(kind, settings);
            if (problems.Count > 0) throw new ArgumentException($"regulariser {name}: " + string.Join("; ", problems));
            return kind.Create(resolved);
        }

        // Checks shared by the built-in kinds.
        /// <summary>A check that accepts 0 and positive integers.</summary>
        public static string? NonNegativeInt(string v) =>
            int.TryParse(v, System.Globalization.NumberStyles.Integer, System.Globalization.CultureInfo.InvariantCulture, out var n) && n >= 0
                ? null : $"expected 0 (all) or a positive integer, found '{v}'";

        /// <summary>A check that accepts exactly these values.</summary>
        public static Func<string, string?> OneOf(params string[] values) =>
            v => values.Contains(v) ? null : $"unknown value '{v}' ({string.Join(", ", values)})";

        public static int IntSetting(IReadOnlyDictionary<string, string> settings, string key) =>
            int.Parse(settings[key], System.Globalization.CultureInfo.InvariantCulture);
    }
}
