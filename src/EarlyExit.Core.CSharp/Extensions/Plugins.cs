using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Reflection;
using System.Runtime.Loader;

namespace EarlyExit.Extensions
{
    /// <summary>
    /// A plugin: a public class with a parameterless constructor in a user's assembly whose <see cref="Register"/>
    /// adds model families (<see cref="Models.CustomModels"/>, <see cref="Models.ModelRegistry"/>) or regularisers
    /// (<see cref="Regularisers.RegulariserRegistry"/>). The command line loads plugins named by <c>--plugin DLL</c>
    /// or by $EARLYEXIT_PLUGINS (paths separated by ':'), and passes them on to the processes it starts.
    /// </summary>
    public interface IEarlyExitPlugin
    {
        void Register();
    }

    public sealed class PluginException : Exception
    {
        public PluginException(string message, Exception? inner = null) : base(message, inner) { }
    }

    public static class Plugins
    {
        public const string Variable = "EARLYEXIT_PLUGINS";
        static readonly HashSet<string> loaded = new(StringComparer.Ordinal);
        static readonly object gate = new();

        /// <summary>The plugin assemblies loaded in this process (full paths).</summary>
        public static IReadOnlyCollection<string> Loaded { get { lock (gate) return loaded.ToArray(); } }

        /// <summary>Loads an assembly and runs every plugin in it; returns the plugin types. Loading the same path twice
        /// does nothing the second time.</summary>
        public static IReadOnlyList<string> Load(string path)
        {
            var full = Path.GetFullPath(path);
            lock (gate)
            {
                if (loaded.Contains(full)) return Array.Empty<string>();
                if (!File.Exists(full)) throw new PluginException($"plugin {full}: file not found");
                Assembly assembly;
                try { assembly = AssemblyLoadContext.Default.LoadFromAssemblyPath(full); }
                catch (Exception e) when (e is BadImageFormatException or FileLoadException)
                {
                    throw new PluginException($"plugin {full}: not a .NET assembly this runtime can load ({e.Message})", e);
                }
                Type[] types;
                try { types = assembly.GetExportedTypes(); }
                catch (ReflectionTypeLoadException e)
                {
                    throw new PluginException($"plugin {full}: its types do not load ({e.LoaderExceptions.FirstOrDefault()?.Message}); build it against this EarlyExit", e);
                }
                var plugins = types.Where(t => typeof(IEarlyExitPlugin).IsAssignableFrom(t) && t is { IsAbstract: false, IsInterface: false }).ToList();
                if (plugins.Count == 0) throw new PluginException($"plugin {full}: no public class implements EarlyExit.Extensions.IEarlyExitPlugin");
                foreach (var t in plugins)
                {
                    try { ((IEarlyExitPlugin)Activator.CreateInstance(t)!).Register(); }
                    catch (Exception e) when (e is not OutOfMemoryException)
                    {
                        var inner = e is TargetInvocationException { InnerException: { } i } ? i : e;
                        throw new PluginException($"plugin {full}: {t.FullName}.Register() failed: {inner.Message}", inner);
                    }
                }
                loaded.Add(full);
                return plugins.Select(t => t.FullName!).ToList();
            }
        }

        /// <summary>Loads the plugins named by $EARLYEXIT_PLUGINS.</summary>
        public static void LoadFromEnvironment()
        {
            var v = Environment.GetEnvironmentVariable(Variable);
            if (string.IsNullOrWhiteSpace(v)) return;
            foreach (var p in v.Split(':', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)) Load(p);
        }

        /// <summary>Adds paths to $EARLYEXIT_PLUGINS of this process, so that the processes it starts load them too.</summary>
        public static void Export(IEnumerable<string> paths)
        {
            var current = (Environment.GetEnvironmentVariable(Variable) ?? "").Split(':', StringSplitOptions.RemoveEmptyEntries).ToList();
            foreach (var p in paths.Select(Path.GetFullPath)) if (!current.Contains(p)) current.Add(p);
            Environment.SetEnvironmentVariable(Variable, string.Join(":", current));
        }
    }
}
