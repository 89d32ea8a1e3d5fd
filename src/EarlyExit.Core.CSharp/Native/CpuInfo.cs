using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;

namespace EarlyExit.Native
{
    /// <summary>
    /// The processor, as far as kernels care: vendor, model, and the instruction-set flags that decide which oneDNN
    /// and ATen kernels run (AVX, AVX2, AVX-512 and its extensions, AMX). Machines of one kind do not all have the same
    /// processor, and libtorch's kernels are not correct on every one, so every result records it.
    /// <see cref="Flags"/> holds the <see cref="KernelFlags"/> the CPU has, in that order.
    /// </summary>
    public sealed record CpuInfo(string Vendor, string ModelName, int Family, int Model, int Stepping, IReadOnlyList<string> Flags)
    {
        /// <summary>Flags that change which kernels run, in the order they are reported.</summary>
        public static readonly string[] KernelFlags =
        {
            "sse4_1", "avx", "avx2", "fma", "avx_vnni", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni",
            "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
        };

        /// <summary>Whether the CPU has a flag of <see cref="KernelFlags"/> (only those are kept).</summary>
        public bool Has(string flag) => Flags.Contains(flag);

        public bool HasAvx512Core => Has("avx512f") && Has("avx512bw") && Has("avx512vl") && Has("avx512dq");
        public bool HasAmx => Has("amx_tile");

        /// <summary>"AVX2, no AVX-512, no AMX" or "AVX-512 (VNNI, BF16), no AMX".</summary>
        public string Summary
        {
            get
            {
                var parts = new List<string>();
                if (HasAvx512Core)
                {
                    var ext = new[] { ("avx512_vnni", "VNNI"), ("avx512_bf16", "BF16"), ("avx512_fp16", "FP16") }.Where(e => Has(e.Item1)).Select(e => e.Item2).ToArray();
                    parts.Add(ext.Length > 0 ? $"AVX-512 ({string.Join(", ", ext)})" : "AVX-512");
                }
                else
                {
                    parts.Add(Has("avx2") ? "AVX2" : Has("avx") ? "AVX" : Has("sse4_1") ? "SSE4.1" : "no AVX");
                    parts.Add("no AVX-512");
                }
                parts.Add(HasAmx ? "AMX" : "no AMX");
                return string.Join(", ", parts);
            }
        }

        /// <summary>One line: "AMD EPYC (AuthenticAMD family 25 model 1 stepping 1; AVX2, no AVX-512, no AMX)".</summary>
        public string Describe() => $"{ModelName} ({Vendor} family {Family} model {Model} stepping {Stepping}; {Summary})";

        public static readonly CpuInfo Unknown = new("unknown", "unknown CPU", 0, 0, 0, Array.Empty<string>());

        /// <summary>The first processor of /proc/cpuinfo (Linux); <see cref="Unknown"/> elsewhere.</summary>
        public static CpuInfo Read()
        {
            const string path = "/proc/cpuinfo";
            if (!File.Exists(path)) return Unknown with { ModelName = System.Runtime.InteropServices.RuntimeInformation.ProcessArchitecture.ToString() };
            try { return Parse(File.ReadAllText(path)); }
            catch (IOException) { return Unknown; }
        }

        /// <summary>Parses the text of /proc/cpuinfo (the first processor's block).</summary>
        public static CpuInfo Parse(string text)
        {
            var fields = new Dictionary<string, string>();
            foreach (var line in text.Split('\n'))
            {
                if (line.Trim().Length == 0)
                {
                    if (fields.Count > 0) break;
                    continue;
                }
                int colon = line.IndexOf(':');
                if (colon < 0) continue;
                var key = line[..colon].Trim();
                if (!fields.ContainsKey(key)) fields[key] = line[(colon + 1)..].Trim();
            }
            int Int(string key) => fields.TryGetValue(key, out var v) && int.TryParse(v, out var i) ? i : 0;
            var all = fields.TryGetValue("flags", out var f) ? f.Split(' ', StringSplitOptions.RemoveEmptyEntries).ToHashSet() : new HashSet<string>();
            var flags = KernelFlags.Where(all.Contains).ToArray();
            return new CpuInfo(fields.GetValueOrDefault("vendor_id", "unknown"), fields.GetValueOrDefault("model name", "unknown CPU"),
                Int("cpu family"), Int("model"), Int("stepping"), flags);
        }
    }
}
