using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using TorchSharp;
using static TorchSharp.torch;
using EarlyExit.Native;

namespace EarlyExit.Training
{
    /// <summary>
    /// A small file format for named tensors (checkpoints of models, Fishers, anchors, teachers): "EETS1", a count,
    /// then name, dtype, shape and raw little-endian data per tensor. Writes go to a temp file renamed over the target.
    /// </summary>
    public static class TensorStore
    {
        const string Magic = "EETS1";

        public static void Save(string path, IReadOnlyDictionary<string, Tensor> tensors)
        {
            var dir = Path.GetDirectoryName(Path.GetFullPath(path))!;
            Directory.CreateDirectory(dir);
            var tmp = Path.Combine(dir, "." + Path.GetFileName(path) + "." + Guid.NewGuid().ToString("N") + ".tmp");
            try
            {
                using (var stream = File.Create(tmp))
                using (var w = new BinaryWriter(stream))
                {
                    w.Write(Magic);
                    w.Write(tensors.Count);
                    foreach (var (name, t) in tensors.OrderBy(kv => kv.Key, StringComparer.Ordinal))
                    {
                        using var c = t.detach().cpu().contiguous();
                        w.Write(name);
                        w.Write((int)c.dtype);
                        w.Write((int)c.dim());
                        foreach (var s in c.shape) w.Write(s);
                        if (c.dtype is not (ScalarType.Float32 or ScalarType.Float64 or ScalarType.Int64 or ScalarType.Int32 or ScalarType.Bool))
                            throw new NotSupportedException($"TensorStore cannot save {name} of type {c.dtype}");
                        TensorData.Write(w, c);  // one block: the bytes BinaryWriter writes value by value
                    }
                }
                File.Move(tmp, path, overwrite: true);
            }
            finally
            {
                if (File.Exists(tmp)) File.Delete(tmp);
            }
        }

        /// <summary>Reads every tensor (on the CPU, not in any dispose scope).</summary>
        public static Dictionary<string, Tensor> Load(string path)
        {
            if (!File.Exists(path)) throw new FileNotFoundException($"checkpoint not found: {path}", path);
            using var stream = File.OpenRead(path);
            using var r = new BinaryReader(stream);
            try
            {
                if (r.ReadString() != Magic) throw new InvalidDataException($"{path}: not an EarlyExit tensor file");
                int count = r.ReadInt32();
                var result = new Dictionary<string, Tensor>();
                for (int i = 0; i < count; i++)
                {
                    var name = r.ReadString();
                    var dtype = (ScalarType)r.ReadInt32();
                    var shape = new long[r.ReadInt32()];
                    for (int d = 0; d < shape.Length; d++) shape[d] = r.ReadInt64();
                    long n = shape.Aggregate(1L, (a, b) => a * b);
                    if (shape.Any(d => d < 0) || n < 0)
                        throw new InvalidDataException($"{path}: tensor {name} has a damaged shape [{string.Join(", ", shape)}]");
                    Tensor t = dtype switch
                    {
                        ScalarType.Float32 => tensor(TensorData.Read<float>(r, n), shape),
                        ScalarType.Float64 => tensor(TensorData.Read<double>(r, n), shape),
                        ScalarType.Int64 => tensor(TensorData.Read<long>(r, n), shape),
                        ScalarType.Int32 => tensor(TensorData.Read<int>(r, n), shape),
                        ScalarType.Bool => tensor(ReadBools(r, n), shape),
                        _ => throw new InvalidDataException($"{path}: tensor {name} has unsupported type {dtype}"),
                    };
                    result[name] = t.DetachFromDisposeScope();
                }
                return result;
            }
            catch (EndOfStreamException)
            {
                throw new InvalidDataException($"{path}: truncated tensor file");
            }
        }

        /// <summary>Booleans as BinaryReader reads them (any non-zero byte is true), so a damaged byte cannot make a
        /// bool that is neither.</summary>
        static bool[] ReadBools(BinaryReader r, long n)
        {
            var raw = TensorData.Read<byte>(r, n);
            var a = new bool[n];
            for (long i = 0; i < n; i++) a[i] = raw[i] != 0;
            return a;
        }

        /// <summary>Copies stored values into the module's parameters and buffers (names must match exactly).</summary>
        public static void LoadInto(nn.Module module, IReadOnlyDictionary<string, Tensor> state, string prefix = "")
        {
            using var noGrad = no_grad();
            var expected = module.state_dict();
            var missing = expected.Keys.Where(k => !state.ContainsKey(prefix + k)).ToList();
            if (missing.Count > 0) throw new InvalidDataException($"checkpoint lacks {missing.Count} tensors of the model, e.g. {string.Join(", ", missing.Take(3))}");
            foreach (var (name, target) in expected)
            {
                var src = state[prefix + name];
                if (!src.shape.AsSpan().SequenceEqual(target.shape))
                    throw new InvalidDataException($"checkpoint tensor {name} has shape [{string.Join(", ", src.shape)}], the model [{string.Join(", ", target.shape)}]");
                target.copy_(src);
            }
        }

        /// <summary>The module's parameters and buffers, with an optional name prefix (tensors are the module's own).</summary>
        public static Dictionary<string, Tensor> StateOf(nn.Module module, string prefix = "") =>
            module.state_dict().ToDictionary(kv => prefix + kv.Key, kv => kv.Value);
    }
}
