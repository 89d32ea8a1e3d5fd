using System;
using System.IO;
using System.Linq;
using TorchSharp;

namespace EarlyExit.Native
{
    /// <summary>
    /// How many threads torch uses in this process, chosen before the numerics guard runs (its verdict is per thread
    /// count) and before any training. Measured on this 2-core machine (cpu-scale ResNet, batch 128): one job on 2
    /// threads 199 images/s alone, 77 beside one busy process (2.6× slower; OpenMP threads wait for a sibling the busy
    /// process has descheduled), and two such jobs together 133 in all; one job on 1 thread 120 alone and 129 beside a
    /// busy process, and two 1-thread jobs 248 in all. OpenMP's passive wait policy recovers part of it beside a busy
    /// process (104) but costs 20% alone (156–178 against 189–270), so it is not set.
    /// <list type="bullet">
    /// <item><c>auto</c> (the default): the cores minus the other processes runnable when the process starts
    /// (<c>procs_running</c> of /proc/stat), at least 1; OMP_NUM_THREADS, when set, wins over it.</item>
    /// <item>a number: exactly that many (what <c>--threads N</c> and the executor's jobs use, and what a deterministic
    /// run records: the same code, seed and thread count give the same bits).</item>
    /// </list>
    /// </summary>
    public static class TorchThreads
    {
        public const string Variable = "EARLYEXIT_THREADS";

        /// <summary>"auto" or a positive number, set by a command line before the first use of torch; overrides the variable.</summary>
        public static string? Requested { get; set; }

        /// <summary>What was chosen and why, for logs and provenance.</summary>
        public static string Status { get; private set; } = "not set (TorchNativeLoader.EnsureLoaded not called)";

        /// <summary>Parses "auto" or a positive number (an <see cref="ArgumentException"/> otherwise).</summary>
        public static int? Parse(string spec)
        {
            var s = spec.Trim();
            if (s.Equals("auto", StringComparison.OrdinalIgnoreCase)) return null;
            if (int.TryParse(s, out var n) && n >= 1) return n;
            throw new ArgumentException($"--threads {spec}: give a positive number of threads, or auto");
        }

        /// <summary>Other processes runnable right now (procs_running of /proc/stat, without this one); 0 where unknown.</summary>
        public static int OthersRunnable()
        {
            try
            {
                var line = File.ReadLines("/proc/stat").FirstOrDefault(l => l.StartsWith("procs_running "));
                return line is not null && int.TryParse(line["procs_running ".Length..].Trim(), out var n) ? Math.Max(0, n - 1) : 0;
            }
            catch (IOException) { return 0; }
            catch (UnauthorizedAccessException) { return 0; }
        }

        /// <summary>Applies the requested thread count (libtorch must be loaded).</summary>
        internal static void Apply()
        {
            var spec = Requested ?? Environment.GetEnvironmentVariable(Variable);
            int cores = Environment.ProcessorCount;
            if (spec is not null && Parse(spec) is int n)
            {
                torch.set_num_threads(n);
                Status = $"{n} (asked for; {cores} cores)";
            }
            else if (spec is null && Environment.GetEnvironmentVariable("OMP_NUM_THREADS") is { } omp)
                Status = $"{torch.get_num_threads()} (OMP_NUM_THREADS={omp}; {cores} cores)";
            else
            {
                int chosen = Auto(out int busy);
                torch.set_num_threads(chosen);
                Status = $"{chosen} (auto: {cores} cores, {busy} other runnable process(es) at start)";
            }
        }

        /// The automatic choice: the cores minus the other processes runnable now, at least 1.
        public static int Auto(out int othersRunnable)
        {
            othersRunnable = OthersRunnable();
            return Math.Max(1, Environment.ProcessorCount - othersRunnable);
        }
    }
}
