using System;
using System.Collections;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using EarlyExit.Training;
using TorchSharp;
using TorchSharp.PyBridge;
using static TorchSharp.torch;

namespace EarlyExit.Interop
{
    /// <summary>A weights file that cannot be read, or that does not fit the network; the message names the file.</summary>
    public sealed class WeightFileException : Exception
    {
        public string File { get; }
        public WeightFileException(string file, string message) : base($"{file}: {message}") { File = file; }
    }

    /// <summary>The formats a state dict is exchanged in.</summary>
    public enum WeightFormat
    {
        /// <summary>safetensors (Hugging Face): a JSON index and the raw bytes; no code runs on load.</summary>
        Safetensors,
        /// <summary>What PyTorch's torch.save(model.state_dict()) writes (a zip of a pickle and the tensors).</summary>
        PyTorch,
        /// <summary>EarlyExit's own TensorStore file (what run folders hold).</summary>
        EarlyExit,
    }

    /// <summary>
    /// State dicts in and out of .NET, under the network's own names, which are already PyTorch's dotted names:
    /// <c>segments.{μ−1}.…</c> for backbone segment μ and <c>heads.{μ−1}.…</c> for exit μ (the ResNets:
    /// <c>segments.0.layers.stem.conv.weight</c>, <c>segments.2.layers.block3.shortcutBn.running_var</c>,
    /// <c>heads.0.alpha</c>, <c>heads.0.linear.weight</c>), BatchNorm buffers included
    /// (<c>running_mean</c>, <c>running_var</c>, <c>num_batches_tracked</c>). Written through TorchSharp.PyBridge.
    /// </summary>
    public static class WeightFiles
    {
        /// <summary>The format a file name implies: .safetensors; .pt, .pth, .bin; .tensors.</summary>
        public static WeightFormat FormatOf(string path) => Path.GetExtension(path).ToLowerInvariant() switch
        {
            ".safetensors" => WeightFormat.Safetensors,
            ".pt" or ".pth" or ".bin" => WeightFormat.PyTorch,
            ".tensors" or ".model" => WeightFormat.EarlyExit,
            var other => throw new WeightFileException(path, $"unknown weights format '{other}': name the file .safetensors, .pt (.pth, .bin) or .tensors"),
        };

        public static WeightFormat Parse(string name) => name.Trim().ToLowerInvariant() switch
        {
            "safetensors" => WeightFormat.Safetensors,
            "pt" or "pth" or "pytorch" or "torch" => WeightFormat.PyTorch,
            "tensors" or "earlyexit" => WeightFormat.EarlyExit,
            _ => throw new ArgumentException($"unknown weights format '{name}': give safetensors, pt or tensors"),
        };

        public static string Extension(WeightFormat f) => f switch
        {
            WeightFormat.Safetensors => ".safetensors",
            WeightFormat.PyTorch => ".pt",
            _ => ".tensors",
        };

        /// <summary>Writes the module's state dict (parameters and buffers) to <paramref name="path"/>, atomically.</summary>
        public static void Save(nn.Module module, string path, WeightFormat format)
        {
            var dir = Path.GetDirectoryName(Path.GetFullPath(path));
            if (dir is not null) Directory.CreateDirectory(dir);
            var partial = path + ".part";
            using (var scope = NewDisposeScope())
            {
                var state = module.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().cpu().contiguous());
                switch (format)
                {
                    case WeightFormat.Safetensors:
                        using (var f = File.Create(partial)) Safetensors.SaveStateDict(f, state);
                        break;
                    case WeightFormat.PyTorch:
                        using (var f = File.Create(partial)) PyTorchPickler.PickleStateDict(f, state);
                        break;
                    default:
                        TensorStore.Save(partial, state);
                        break;
                }
            }
            File.Move(partial, path, overwrite: true);
        }

        /// <summary>
        /// Reads a state dict. A PyTorch file may hold the state dict itself or a checkpoint dict with it under
        /// "state_dict" or "model"; keys all prefixed "module." (DataParallel) lose the prefix.
        /// </summary>
        public static Dictionary<string, Tensor> Load(string path, WeightFormat? format = null)
        {
            if (!System.IO.File.Exists(path)) throw new WeightFileException(path, "file not found");
            var f = format ?? FormatOf(path);
            Dictionary<string, Tensor> state;
            try
            {
                state = f switch
                {
                    WeightFormat.Safetensors => Safetensors.LoadStateDict(path),
                    WeightFormat.PyTorch => FromPickle(path, PyTorchUnpickler.UnpickleStateDict(path)),
                    _ => TensorStore.Load(path),
                };
            }
            catch (WeightFileException) { throw; }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                var what = f switch
                {
                    WeightFormat.Safetensors => "a safetensors file",
                    WeightFormat.PyTorch => "a zip-format torch.save file (PyTorch 1.6 or newer)",
                    _ => "an EarlyExit tensor file",
                };
                throw new WeightFileException(path, $"could not be read as {what}: {e.Message}");
            }
            if (state.Count > 0 && state.Keys.All(k => k.StartsWith("module.", StringComparison.Ordinal)))
                state = state.ToDictionary(kv => kv.Key.Substring("module.".Length), kv => kv.Value);
            return state;
        }

        static Dictionary<string, Tensor> FromPickle(string path, Hashtable table)
        {
            foreach (var key in new[] { "state_dict", "model" })
                if (table.ContainsKey(key) && table[key] is Hashtable inner) return FromPickle(path, inner);
            var state = new Dictionary<string, Tensor>();
            foreach (DictionaryEntry e in table)
            {
                if (e.Value is not Tensor t)
                    throw new WeightFileException(path, $"entry '{e.Key}' is a {e.Value?.GetType().Name ?? "null"}, not a tensor: save model.state_dict()");
                state[(string)e.Key] = t;
            }
            return state;
        }

        /// <summary>
        /// Copies a state dict into a module, strictly: every tensor of the module must be there with its shape, and
        /// nothing else may be (a list of each kind of mismatch, with the closest names). Floating tensors are
        /// converted to the module's dtype.
        /// </summary>
        public static void LoadInto(nn.Module module, IReadOnlyDictionary<string, Tensor> state, string file)
        {
            var expected = module.state_dict();
            var missing = expected.Keys.Where(k => !state.ContainsKey(k)).ToList();
            var unexpected = state.Keys.Where(k => !expected.ContainsKey(k)).ToList();
            var shapes = expected.Where(kv => state.TryGetValue(kv.Key, out var s) && !s.shape.SequenceEqual(kv.Value.shape))
                .Select(kv => $"{kv.Key}: file [{string.Join(", ", state[kv.Key].shape)}], network [{string.Join(", ", kv.Value.shape)}]").ToList();
            if (missing.Count + unexpected.Count + shapes.Count > 0)
            {
                static string List(IEnumerable<string> xs, int n) { var l = xs.ToList(); return string.Join(", ", l.Take(n)) + (l.Count > n ? $", … ({l.Count} in all)" : ""); }
                var parts = new List<string>();
                if (missing.Count > 0) parts.Add($"{missing.Count} tensor(s) of the network are not in the file: {List(missing, 5)}");
                if (unexpected.Count > 0) parts.Add($"{unexpected.Count} tensor(s) of the file are not in the network: {List(unexpected, 5)}");
                if (shapes.Count > 0) parts.Add($"{shapes.Count} shape(s) differ: {List(shapes, 3)}");
                throw new WeightFileException(file, string.Join("; ", parts) + ". The names are the network's own (earlyexit export writes them; see the README's weights section)");
            }
            using var noGrad = no_grad();
            foreach (var (name, target) in expected)
            {
                var src = state[name];
                if (src.dtype != target.dtype && !(src.is_floating_point() && target.is_floating_point()) && !(src.dtype == ScalarType.Int64 || src.dtype == ScalarType.Int32))
                    throw new WeightFileException(file, $"{name} is {src.dtype}, the network's is {target.dtype}");
                using var converted = src.to(target.dtype, target.device);
                target.copy_(converted);
            }
        }
    }
}
