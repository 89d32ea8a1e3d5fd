using System;
using System.Collections.Generic;
using System.Linq;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics.X86;

namespace EarlyExit.Native
{
    /// <summary>
    /// The cache sizes oneDNN plans its convolutions for, where a virtual machine hides them.
    /// <para>
    /// oneDNN learns the caches from Xbyak's CPU record (<c>dnnl::impl::cpu::x64::cpu()</c>, one static object). On an
    /// AMD processor Xbyak reads them from CPUID leaf 0x8000001D and computes each size as (ways + 1) x (partitions + 1)
    /// x (line size + 1) x (sets + 1) from fields that are one less than the value; a hypervisor that leaves that leaf
    /// empty (all zeros: the EPYC VMs here, family 26 model 2, 2026-12-08) makes that 1 x 1 x 1 x 1: oneDNN plans for
    /// an L1, L2 and L3 of one byte each. Its kernels then computed wrong convolutions there: of 288 NCHW shapes
    /// x 2 input layouts, forward or gradients off (up to infinite) or the heap corrupted ("corrupted size vs.
    /// prev_size"), under the default and every capped instruction set but SSE4.1. With the record's cache levels set
    /// to zero, which is what Xbyak leaves on a processor whose caches it cannot read (and oneDNN then plans for its
    /// own defaults, 32 KB L1, 512 KB L2 and 1 MB L3 per core; Debian's PyTorch 1.13, whose Xbyak reads no AMD caches,
    /// runs that way here and is correct), all 576 were correct with the default kernels.
    /// </para>
    /// <para>
    /// At load time, before any oneDNN kernel is planned, this finds the record through libtorch_cpu's full symbol
    /// table, checks that it holds exactly that signature (the processor's family and model where Xbyak keeps them,
    /// and three cache levels of one byte shared by one core), and only then writes the level count. Nothing is
    /// written on any other processor, on an AMD one that reports its caches, or where anything does not match
    /// (the guard and the network check still stand behind every run). <see cref="Variable"/>=as-read leaves the
    /// record as Xbyak read it.
    /// </para>
    /// </summary>
    public static class OneDnnCaches
    {
        /// <summary><c>auto</c> (the default: correct a record of 1-byte caches) or <c>as-read</c>.</summary>
        public const string Variable = "EARLYEXIT_ONEDNN_CACHES";

        /// <summary>What was found and done, one line, for provenance, <c>doctor</c> and the bench header.</summary>
        public static string Status { get; private set; } = "not checked";

        /// <summary>Whether this process rewrote oneDNN's cache record.</summary>
        public static bool Corrected { get; private set; }

        /// <summary>A short token for cache keys: "corrected", "as-read" or "as-reported".</summary>
        public static string State { get; private set; } = "as-reported";

        static IntPtr recordAddress;
        static int levelsOffset = -1;

        /// <summary>The level count oneDNN's cache record holds now, where this process found the record (null
        /// otherwise): 0 after the correction, 3 where it was left as read.</summary>
        public static int? LevelsNow() => levelsOffset >= 0 ? Marshal.ReadInt32(recordAddress, levelsOffset) : null;

        internal const string CpuFunction = "_ZN4dnnl4impl3cpu3x643cpuEv";
        internal const string CpuRecord = "_ZZN4dnnl4impl3cpu3x643cpuEvE4cpu_";
        internal const string Anchor = "_ZN2at13globalContextEv";  // exported: gives the load base

        /// <summary>Parses the variable (null or empty: auto); an <see cref="ArgumentException"/> for anything else.</summary>
        public static bool ParseCorrect(string? spec) =>
            (spec ?? "").Trim().ToLowerInvariant() switch
            {
                "" or "auto" => true,
                "as-read" or "off" => false,
                _ => throw new ArgumentException($"{Variable}={spec}: use auto (the default) or as-read"),
            };

        /// <summary>The processor's identification as Xbyak stores it after the cache fields (from CPUID leaf 1).</summary>
        public static int[] XbyakSignature(uint leaf1Eax, bool intel)
        {
            int stepping = (int)(leaf1Eax & 0xf), model = (int)((leaf1Eax >> 4) & 0xf), family = (int)((leaf1Eax >> 8) & 0xf);
            int extModel = (int)((leaf1Eax >> 16) & 0xf), extFamily = (int)((leaf1Eax >> 20) & 0xff);
            int displayFamily = family == 0xf ? family + extFamily : family;
            int displayModel = (intel && family == 6) || family == 0xf ? (extModel << 4) + model : model;
            return new[] { model, family, stepping, extModel, extFamily, displayFamily, displayModel };
        }

        /// <summary>The cache fields of a record: where the level count is (byte offset), the count, and the sizes and
        /// sharing counts of the levels it names.</summary>
        public sealed record CacheFields(int LevelsOffset, uint Levels, uint[] Sizes, uint[] Sharing)
        {
            /// <summary>Three levels, each one byte, each shared by one core: Xbyak's reading of an empty leaf 0x8000001D.</summary>
            public bool IsEmptyLeafReading => Levels == 3 && Sizes.All(s => s == 1) && Sharing.All(s => s == 1);
        }

        const int MaxLevels = 10;  // Xbyak's maxNumberCacheLevels

        /// <summary>
        /// Finds the 1-byte reading in the bytes of Xbyak's record: the signature must occur exactly once; before it lie
        /// the level count (with Xbyak 7's AVX10 version word between, or directly, in older Xbyak), and before that ten
        /// sizes and ten sharing counts. Null where no such layout holds that reading.
        /// </summary>
        public static CacheFields? LocateEmptyLeafReading(ReadOnlySpan<byte> record, int[] signature)
        {
            var words = MemoryMarshal.Cast<byte, int>(record[..(record.Length / 4 * 4)]).ToArray();
            var hits = new List<int>();
            for (int i = 0; i + signature.Length <= words.Length; i++)
                if (words.AsSpan(i, signature.Length).SequenceEqual(signature)) hits.Add(i);
            if (hits.Count != 1) return null;
            foreach (int gap in new[] { 2, 1 })
            {
                int levels = hits[0] - gap;
                int sharing = levels - MaxLevels, sizes = sharing - MaxLevels;
                if (sizes < 0 || (uint)words[levels] > MaxLevels) continue;
                int count = words[levels];
                var fields = new CacheFields(levels * 4, (uint)count,
                    Enumerable.Range(sizes, count).Select(i => (uint)words[i]).ToArray(),
                    Enumerable.Range(sharing, count).Select(i => (uint)words[i]).ToArray());
                if (fields.IsEmptyLeafReading) return fields;
            }
            return null;
        }

        /// <summary>What CPUID says about the caches the way Xbyak reads them.</summary>
        public readonly record struct CpuidCaches(bool Amd, bool LeafEmpty, uint Leaf1Eax);

        /// <summary>Whether CPUID says the caches cannot be read the way Xbyak reads them on an AMD processor: vendor
        /// AuthenticAMD and leaf 0x8000001D's first sub-leaf of type "no cache". Null off x86.</summary>
        public static CpuidCaches? ReadCpuid()
        {
            if (!X86Base.IsSupported) return null;
            var (_, ebx, ecx, edx) = X86Base.CpuId(0, 0);
            bool amd = ebx == 0x68747541 && edx == 0x69746e65 && ecx == 0x444d4163;  // "Auth" "enti" "cAMD"
            var (maxExtended, _, _, _) = X86Base.CpuId(unchecked((int)0x80000000), 0);
            bool empty = (uint)maxExtended < 0x8000001D || (X86Base.CpuId(unchecked((int)0x8000001D), 0).Eax & 0x1f) == 0;
            return new CpuidCaches(amd, empty, (uint)X86Base.CpuId(1, 0).Eax);
        }

        /// <summary>Checks, and where it finds the 1-byte reading corrects, oneDNN's cache record. Runs once, after
        /// libtorch_cpu is loaded by absolute path and before any oneDNN kernel is planned. Never throws for what it
        /// finds (a bad <see cref="Variable"/> is an <see cref="ArgumentException"/>).</summary>
        internal static void Configure(string libTorchCpuPath)
        {
            bool correct = ParseCorrect(Environment.GetEnvironmentVariable(Variable));
            if (TorchNativeLoader.LibTorchCpuHandle == IntPtr.Zero) { Status = "not checked (libtorch was not loaded by path)"; return; }
            if (ReadCpuid() is not { } cpuid) { Status = "not checked (not an x86 processor)"; return; }
            if (!cpuid.Amd) { Status = "left alone (not an AMD processor: Xbyak reads Intel caches through leaf 4, and uses oneDNN's defaults where it reads none)"; return; }
            if (!cpuid.LeafEmpty) { Status = "left alone (the processor reports its caches through CPUID leaf 0x8000001D)"; return; }
            try
            {
                var symbols = ElfSymbols.Find(libTorchCpuPath, new[] { CpuFunction, CpuRecord, Anchor });
                ElfSymbol? One(string name, Func<ElfSymbol, bool> kind) =>
                    symbols.Where(s => s.Name == name && kind(s)).ToArray() is { Length: 1 } one ? one[0] : null;
                var function = One(CpuFunction, s => s.IsFunction);
                var record = One(CpuRecord, s => s.IsObject);
                var anchor = One(Anchor, s => s.IsFunction);
                if (function is null || record is null || anchor is null || record.Size is < 64 or > 4096)
                {
                    Status = "not corrected: the CPU hides its caches (CPUID leaf 0x8000001D empty), but oneDNN's cache record was not found in libtorch_cpu's symbol table";
                    return;
                }
                long baseAddress = (long)NativeLibrary.GetExport(TorchNativeLoader.LibTorchCpuHandle, Anchor) - (long)anchor.Value;
                IntPtr address;
                unsafe { address = ((delegate* unmanaged<IntPtr>)(IntPtr)(baseAddress + (long)function.Value))(); }  // initialises the record
                if ((long)address != baseAddress + (long)record.Value)
                {
                    Status = "not corrected: oneDNN's cache record is not where the symbol table says";
                    return;
                }
                var bytes = new byte[record.Size];
                Marshal.Copy(address, bytes, 0, bytes.Length);
                var fields = LocateEmptyLeafReading(bytes, XbyakSignature(cpuid.Leaf1Eax, intel: false));
                if (fields is null)
                {
                    Status = "not corrected: the CPU hides its caches (CPUID leaf 0x8000001D empty), but oneDNN's cache record does not hold the 1-byte reading in a layout this code knows";
                    return;
                }
                (recordAddress, levelsOffset) = (address, fields.LevelsOffset);
                if (!correct)
                {
                    State = "as-read";
                    Status = $"left as read ({Variable}=as-read): the CPU hides its caches (CPUID leaf 0x8000001D empty), and oneDNN plans its convolutions for an L1, L2 and L3 of 1 byte each";
                    return;
                }
                Marshal.WriteInt32(address, fields.LevelsOffset, 0);
                Corrected = true;
                State = "corrected";
                Status = "corrected: the CPU hides its caches (CPUID leaf 0x8000001D empty) and oneDNN had read an L1, L2 and L3 of 1 byte each; " +
                         "set to no cache levels read, so oneDNN plans for its defaults (32 KB L1, 512 KB L2, 1 MB L3 per core)";
            }
            catch (Exception e) when (e is System.IO.IOException or InvalidOperationException or EntryPointNotFoundException or UnauthorizedAccessException or System.IO.InvalidDataException)
            {
                Status = $"not checked ({e.GetType().Name}: {e.Message})";
            }
        }
    }
}
