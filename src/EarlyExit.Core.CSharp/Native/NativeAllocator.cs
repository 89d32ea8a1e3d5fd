using System;
using System.Linq;
using System.Runtime.InteropServices;

namespace EarlyExit.Native
{
    /// <summary>
    /// glibc's malloc settings for tensor buffers. With its defaults, libtorch's large CPU buffers (a batch's activations,
    /// megabytes each) are handed back to the operating system when freed and faulted in again on the next step:
    /// measured here in one 1-thread run of 105 steps, 2.58 million minor page faults and 17.5 s of system time, and a
    /// training loop that swung between 250 and 800 images/s from repeat to repeat. A fixed mmap threshold of 32 MiB
    /// (buffers below it come from the heap and are reused), a trim threshold of 2 GiB (freed memory at the top of the
    /// heap stays mapped) and a top pad of 256 MiB remove most of them; both thresholds are needed, one alone does not
    /// help. Set with <c>mallopt</c> when the natives load, before the first tensor, in every entry point.
    /// <c>EARLYEXIT_MALLOC=system</c> leaves glibc's settings alone, and so does any <c>MALLOC_*_</c> or
    /// <c>glibc.malloc</c> tunable the user set.
    /// </summary>
    public static class NativeAllocator
    {
        public const string Variable = "EARLYEXIT_MALLOC";

        const int M_TRIM_THRESHOLD = -1, M_TOP_PAD = -2, M_MMAP_THRESHOLD = -3;
        public const int MmapThreshold = 32 << 20;
        public const int TrimThreshold = int.MaxValue;
        public const int TopPad = 256 << 20;

        [DllImport("libc", EntryPoint = "mallopt")]
        static extern int mallopt(int param, int value);

        [DllImport("libc", EntryPoint = "getrusage")]
        static extern int getrusage(int who, [Out] long[] usage);

        static readonly object Gate = new();
        static bool _configured;

        /// <summary>What was set, for logs and provenance.</summary>
        public static string Status { get; private set; } = "not configured (TorchNativeLoader.EnsureLoaded not called)";

        /// <summary>Whether EarlyExit's settings are in force.</summary>
        public static bool Tuned { get; private set; }

        /// <summary>Sets the thresholds once per process (no-op off glibc, or where the user chose otherwise).</summary>
        public static void Configure()
        {
            lock (Gate)
            {
                if (_configured) return;
                _configured = true;
                if (!OperatingSystem.IsLinux()) { Status = "the platform's allocator (not Linux)"; return; }
                var mode = Environment.GetEnvironmentVariable(Variable)?.Trim().ToLowerInvariant();
                if (mode == "system") { Status = $"glibc's defaults ({Variable}=system)"; return; }
                if (mode is not (null or "" or "tuned"))
                    throw new ArgumentException($"{Variable}={mode}: use tuned (the default) or system");
                var user = new[] { "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX" }
                    .Where(v => Environment.GetEnvironmentVariable(v) is not null).ToList();
                if ((Environment.GetEnvironmentVariable("GLIBC_TUNABLES") ?? "").Contains("glibc.malloc")) user.Add("GLIBC_TUNABLES");
                if (user.Count > 0) { Status = $"the user's settings ({string.Join(", ", user)}); EarlyExit set nothing"; return; }
                try
                {
                    bool ok = mallopt(M_MMAP_THRESHOLD, MmapThreshold) == 1 & mallopt(M_TRIM_THRESHOLD, TrimThreshold) == 1 & mallopt(M_TOP_PAD, TopPad) == 1;
                    Tuned = ok;
                    Status = ok
                        ? $"glibc malloc with mmap threshold {MmapThreshold >> 20} MiB, trim threshold 2 GiB, top pad {TopPad >> 20} MiB (set by EarlyExit; {Variable}=system leaves glibc's defaults)"
                        : "glibc's defaults (mallopt refused the settings)";
                }
                catch (EntryPointNotFoundException) { Status = "the C library's own allocator (no mallopt: not glibc)"; }
                catch (DllNotFoundException) { Status = "the C library's own allocator (libc not found)"; }
            }
        }

        /// <summary>Minor page faults of this process so far (getrusage; -1 where unavailable).</summary>
        public static long MinorPageFaults()
        {
            if (!OperatingSystem.IsLinux()) return -1;
            // struct rusage on 64-bit Linux: two timevals (4 longs), then maxrss, ixrss, idrss, isrss, minflt, ...
            var usage = new long[18];
            return getrusage(0, usage) == 0 ? usage[8] : -1;
        }
    }
}
