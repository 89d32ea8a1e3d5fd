using System;
using System.Collections.Generic;
using System.Linq;

namespace EarlyExit.Native
{
    /// <summary>
    /// Which kernels compute convolutions on the CPU: libtorch's oneDNN as shipped (<c>default</c>), oneDNN capped at
    /// a lower instruction set (<c>onednn-avx2</c>, ...: oneDNN's <c>ONEDNN_MAX_CPU_ISA</c>, read once, when oneDNN first
    /// runs), ATen's own convolutions with oneDNN switched off (<c>no-onednn</c>), or the default kernels with every
    /// convolution of a network fed NCHW inputs (<c>default-nchw</c>: <see cref="ConvolutionLayout"/>).
    /// </summary>
    public sealed record NumericsBackend(string Name, string? MaxIsa, bool OneDnn, bool NchwInputs = false)
    {
        public static readonly NumericsBackend Default = new("default", null, true);
        public static readonly NumericsBackend DefaultNchw = new("default-nchw", null, true, NchwInputs: true);
        public static readonly NumericsBackend Avx512Core = new("onednn-avx512_core", "AVX512_CORE", true);
        public static readonly NumericsBackend Avx2 = new("onednn-avx2", "AVX2", true);
        public static readonly NumericsBackend Avx = new("onednn-avx", "AVX", true);
        public static readonly NumericsBackend Sse41 = new("onednn-sse41", "SSE41", true);
        public static readonly NumericsBackend NoOneDnn = new("no-onednn", null, false);

        /// <summary>Every backend, in the order the guard tries them: fastest first on an AVX2 EPYC (cpu-scale ResNet
        /// training at 350, 275, 177 and 112 images/s for default (AVX2), AVX, SSE41 and no-onednn; MSDNet 185, 145, 82,
        /// 40; default-nchw runs the default's kernels). Below the default kernels the order of speed depends on the CPU
        /// (on a Zen 5, no-onednn 612 against SSE41's 412 on 1 thread), so the guard times the fallbacks that pass.</summary>
        public static readonly IReadOnlyList<NumericsBackend> All = new[] { Default, DefaultNchw, Avx512Core, Avx2, Avx, Sse41, NoOneDnn };

        public static IEnumerable<string> Names => All.Select(b => b.Name);

        /// <summary>A backend by name; an unknown name is an <see cref="ArgumentException"/> listing the known ones.</summary>
        public static NumericsBackend Parse(string name) =>
            All.FirstOrDefault(b => b.Name.Equals(name.Trim(), StringComparison.OrdinalIgnoreCase))
            ?? throw new ArgumentException($"unknown numerics backend '{name}'; use auto, {string.Join(", ", Names)}");

        /// <summary>
        /// The backends to try on this CPU, in the order the guard tries them: the default, then the default kernels on
        /// NCHW inputs only (a fault in channels-last kernels alone costs nothing then), then oneDNN capped at each
        /// lower instruction set the CPU has (an ISA the default already is, judged from the flags, is left out), then
        /// oneDNN off, which does not depend on the CPU's vector units.
        /// </summary>
        public static IReadOnlyList<NumericsBackend> Ladder(CpuInfo cpu)
        {
            var supported = new List<NumericsBackend>();
            if (cpu.HasAvx512Core) supported.Add(Avx512Core);
            if (cpu.Has("avx2") && cpu.Has("fma")) supported.Add(Avx2);
            if (cpu.Has("avx")) supported.Add(Avx);
            if (cpu.Has("sse4_1")) supported.Add(Sse41);
            // oneDNN's default is the highest ISA it knows; the extensions below take it above the plain names.
            bool aboveTop = new[] { "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "avx_vnni" }.Any(cpu.Has);
            if (supported.Count > 0 && !aboveTop) supported.RemoveAt(0);
            return new[] { Default, DefaultNchw }.Concat(supported).Append(NoOneDnn).ToArray();
        }

        /// <summary>
        /// Makes this backend the one the process uses. Must run before oneDNN first runs (it reads its maximum ISA
        /// once); libtorch must be loaded. Sets ONEDNN_MAX_CPU_ISA, which oneDNN reads before DNNL_MAX_CPU_ISA.
        /// </summary>
        public void Apply()
        {
            if (MaxIsa is not null) LibTorchControls.SetNativeEnvironment("ONEDNN_MAX_CPU_ISA", MaxIsa);
            if (!OneDnn)
            {
                LibTorchControls.OneDnnEnabled = false;
                if (LibTorchControls.OneDnnEnabled) throw new InvalidOperationException("ATen's oneDNN switch did not turn off");
            }
            if (NchwInputs) ConvolutionLayout.NchwInputs = true;
        }

        public override string ToString() => Name;
    }
}
