using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.IO;
using System.Linq;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using System.Threading;
using TorchSharp;

namespace EarlyExit.Native
{
    /// <summary>No backend computes correct convolutions on this machine (or a forced one is unknown).</summary>
    public sealed class NumericsException : Exception
    {
        public NumericsException(string message) : base(message) { }
    }

    /// <summary>The check of one backend: passed, failed (with the fault), or crashed (the process died); and, where the
    /// guard timed it against other fallbacks that pass, its training throughput (images/s, cpu-scale ResNet).</summary>
    public sealed record BackendVerdict(string Backend, string Outcome, string Detail, double Seconds, double? ImagesPerSecond = null)
    {
        public bool Passed => Outcome == "passed";
        public override string ToString() => $"{Backend}: {Detail}";
    }

    /// <summary>What the numerics guard found and chose for this process: every run's provenance carries it.</summary>
    public sealed record NumericsVerdict(
        string Backend, string Decision, CpuInfo Cpu, LibTorchInfo LibTorch, int Threads, IReadOnlyList<BackendVerdict> Checked, string CheckedAt)
    {
        /// <summary>"onednn-avx (default failed: weight gradient off by 0.43 in ...; cached verdict of 2026-11-25)".</summary>
        public string Kernels
        {
            get
            {
                var failed = Checked.Where(c => !c.Passed).Select(c => c.ToString()).ToList();
                var found = failed.Count == 0 ? "" : string.Join("; ", failed) + "; ";
                return $"{Backend} ({found}{Decision})";
            }
        }

        /// <summary>One line for logs and reports: the CPU, libtorch and oneDNN, and the kernels in use.</summary>
        public string Describe() => $"CPU {Cpu.Describe()}; {LibTorch.Describe()}; convolution kernels {Kernels}";
    }

    /// <summary>
    /// The numerics guard. libtorch's oneDNN convolution kernels compute wrong gradients (and corrupt the heap) on
    /// some processors; which ones is decided by the CPU, not by us. Before anything trains or evaluates, the guard
    /// makes sure this process uses kernels that pass <see cref="ConvolutionCheck"/>: it tries the backends of
    /// <see cref="NumericsBackend.Ladder"/> in order, each in a fresh process (oneDNN fixes its instruction set when it
    /// first runs, and a broken kernel may crash the process that runs it), takes the first that passes (where that is
    /// a fallback below the default kernels, the fastest of the fallbacks that pass, timed), applies it
    /// to this process and caches the verdict per CPU, libtorch, oneDNN and thread count (a fresh check costs a few
    /// seconds, once; a cached one nothing). <c>EARLYEXIT_NUMERICS</c> (or <see cref="Requested"/>, which the command
    /// lines set from <c>--numerics</c>) forces a backend, for diagnosis.
    /// </summary>
    public static class NumericsGuard
    {
        /// <summary>auto (default) or a backend name: forces that backend.</summary>
        public const string Variable = "EARLYEXIT_NUMERICS";
        /// <summary>Comma-separated backends whose check is made to fail as a broken kernel would (for tests).</summary>
        public const string SimulateVariable = "EARLYEXIT_NUMERICS_SIMULATE_FAULT";
        /// <summary>Path of the probe host, where it is not beside EarlyExit.Core.dll.</summary>
        public const string ProbeVariable = "EARLYEXIT_NUMERICS_PROBE";
        public const string ProbeAssembly = "earlyexit-numerics-probe.dll";

        static readonly object Gate = new();
        static NumericsVerdict? _current;

        /// <summary>The user's own oneDNN ISA cap, if any, as the process started (before any backend was applied).</summary>
        static readonly string UserIsaCap =
            $"{Environment.GetEnvironmentVariable("ONEDNN_MAX_CPU_ISA")}/{Environment.GetEnvironmentVariable("DNNL_MAX_CPU_ISA")}";

        /// <summary>JSON of check results and verdicts (an error can be infinite).</summary>
        public static readonly JsonSerializerOptions Json = new()
        {
            WriteIndented = false,
            NumberHandling = System.Text.Json.Serialization.JsonNumberHandling.AllowNamedFloatingPointLiterals,
        };

        /// <summary>A backend name or "auto", set by a command line before the first use of torch; overrides the variable.</summary>
        public static string? Requested { get; set; }

        /// <summary>Where the guard says what it found: standard error by default.</summary>
        public static Action<string> Report { get; set; } = line => Console.Error.WriteLine(line);

        /// <summary>The verdict applied to this process (null before <see cref="Ensure"/>).</summary>
        public static NumericsVerdict? Current => _current;

        /// <summary>Backends whose check is made to fail (<see cref="SimulateVariable"/>).</summary>
        public static IReadOnlySet<string> SimulatedFaults() =>
            (Environment.GetEnvironmentVariable(SimulateVariable) ?? "")
                .Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
                .Select(n => NumericsBackend.Parse(n).Name).ToHashSet();

        /// <summary>Decides and applies the backend of this process, once; later calls return the same verdict.
        /// libtorch must be loaded (<see cref="TorchNativeLoader.EnsureLoaded"/> calls this).</summary>
        public static NumericsVerdict Ensure()
        {
            lock (Gate)
            {
                if (_current is not null) return _current;
                var requested = Requested ?? Environment.GetEnvironmentVariable(Variable);
                var cpu = CpuInfo.Read();
                var lib = LibTorchControls.Info();
                int threads = torch.get_num_threads();
                var simulated = SimulatedFaults();
                var cache = new VerdictCache(cpu, lib, threads, simulated);
                NumericsVerdict verdict;
                if (!string.IsNullOrWhiteSpace(requested) && !requested.Trim().Equals("auto", StringComparison.OrdinalIgnoreCase))
                {
                    var forced = NumericsBackend.Parse(requested);
                    var check = cache.Read()?.Checked.FirstOrDefault(c => c.Backend == forced.Name) ?? Probe(forced, threads, simulated);
                    forced.Apply();
                    verdict = new NumericsVerdict(forced.Name, $"forced by {Variable}={forced.Name}", cpu, lib, threads, new[] { check }, Today());
                    Report(check.Passed
                        ? $"numerics: {forced.Name} forced; its convolution check {check.Detail}"
                        : $"numerics: WARNING: {forced.Name} forced, and its convolution check {check.Detail}; results may be wrong");
                }
                else
                {
                    var cached = cache.Read();
                    if (cached is not null)
                    {
                        NumericsBackend.Parse(cached.Backend).Apply();
                        verdict = cached with { Decision = $"cached verdict of {cached.CheckedAt}" };
                        if (cached.Backend != NumericsBackend.Default.Name)
                            Report($"numerics: default convolution kernels fail on this CPU; using {cached.Backend} ({cached.Checked.First(c => !c.Passed)}; cached verdict, `earlyexit doctor` rechecks)");
                    }
                    else
                    {
                        verdict = Calibrate(cache, cpu, lib, threads, simulated, stopAtFirstPass: true);
                        NumericsBackend.Parse(verdict.Backend).Apply();
                        Report(verdict.Backend == NumericsBackend.Default.Name
                            ? $"numerics: convolution check passed on the default kernels ({verdict.Checked[0].Seconds:F1} s, once per CPU and library; cached)"
                            : $"numerics: {string.Join("; ", verdict.Checked.Where(c => !c.Passed))}; using {verdict.Backend}, " +
                              (verdict.Checked.Count(c => c.ImagesPerSecond is not null) > 1 ? "the fastest backend that passes" : "the first backend that passes") + " (cached)");
                    }
                }
                _current = verdict;
                return verdict;
            }
        }

        /// <summary>
        /// Makes <paramref name="backend"/> this process's verdict without checking it: for the guard's own probe
        /// process, which runs a backend it was told to measure (a later <see cref="Ensure"/>, from model code, must not
        /// apply the cached verdict over it). Throws if another backend was already decided.
        /// </summary>
        public static NumericsVerdict Adopt(NumericsBackend backend, string decision)
        {
            lock (Gate)
            {
                if (_current is not null)
                {
                    if (_current.Backend != backend.Name)
                        throw new InvalidOperationException($"numerics backend {_current.Backend} already in use; cannot adopt {backend.Name}");
                    return _current;
                }
                backend.Apply();
                _current = new NumericsVerdict(backend.Name, decision, CpuInfo.Read(), LibTorchControls.Info(), torch.get_num_threads(),
                    Array.Empty<BackendVerdict>(), Today());
                return _current;
            }
        }

        /// <summary>
        /// Turns oneDNN off in this process (it can be, at any time: ATen reads its switch at every convolution) because
        /// a check found the kernels in use wrong after the guard had chosen them (<see cref="NetworkCheck"/>): the
        /// verdict becomes <c>no-onednn</c> with <paramref name="why"/> in its decision, and one line says so. The cached
        /// verdict is left as it is (the next process checks its network again).
        /// </summary>
        public static NumericsVerdict SwitchOffOneDnn(string why)
        {
            lock (Gate)
            {
                var before = _current ?? Ensure();
                NumericsBackend.NoOneDnn.Apply();
                _current = before with
                {
                    Backend = NumericsBackend.NoOneDnn.Name,
                    Decision = $"switched in this process from {before.Backend}: {why}",
                };
                Report($"numerics: {why}; oneDNN switched off in this process (no-onednn)");
                return _current;
            }
        }

        /// <summary>
        /// Checks the backends again, each in a fresh process, ignoring the cache, and writes the new verdict
        /// (<c>earlyexit doctor --recheck</c>). With <paramref name="all"/> every backend of the ladder is checked, not
        /// only up to the first that passes. This process keeps the backend it already uses.
        /// </summary>
        public static NumericsVerdict Recheck(bool all)
        {
            lock (Gate)
            {
                var cpu = CpuInfo.Read();
                var lib = LibTorchControls.Info();
                int threads = torch.get_num_threads();
                var simulated = SimulatedFaults();
                return Calibrate(new VerdictCache(cpu, lib, threads, simulated), cpu, lib, threads, simulated, stopAtFirstPass: !all, ignoreCache: true);
            }
        }

        static string Today() => DateTime.UtcNow.ToString("yyyy-MM-dd HH:mm") + " UTC";

        static NumericsVerdict Calibrate(VerdictCache cache, CpuInfo cpu, LibTorchInfo lib, int threads, IReadOnlySet<string> simulated,
            bool stopAtFirstPass, bool ignoreCache = false)
        {
            using var held = cache.Lock();
            // Another process may have checked while this one waited for the lock.
            if (!ignoreCache && cache.Read() is { } done) return done with { Decision = $"cached verdict of {done.CheckedAt}" };
            var ladder = NumericsBackend.Ladder(cpu);
            bool inProcess = ProbeHost() is null;
            if (inProcess) ladder = new[] { NumericsBackend.Default, NumericsBackend.NoOneDnn };
            var checkedSoFar = new List<BackendVerdict>();
            string? chosen = null;
            foreach (var backend in ladder)
            {
                var v = inProcess ? CheckInThisProcess(backend, simulated) : Probe(backend, threads, simulated);
                checkedSoFar.Add(v);
                if (v.Passed && chosen is null)
                {
                    chosen = backend.Name;
                    // The default kernels (also behind default-nchw) are the fastest there are; below them the ladder's
                    // order is a guess that depends on the CPU, so the other fallbacks are checked too, and timed.
                    if (stopAtFirstPass && !IsFallback(backend)) break;
                }
            }
            if (chosen is null)
                throw new NumericsException(
                    "no convolution backend computes correct gradients on this machine:\n  " + string.Join("\n  ", checkedSoFar) +
                    $"\nTraining here would give wrong results. To run anyway (for diagnosis), force a backend with {Variable}=NAME or --numerics NAME.");
            var how = inProcess
                ? $"checked in this process ({ProbeAssembly} not found beside EarlyExit.Core.dll: only default and no-onednn tried, not cached)"
                : "checked now";
            if (!inProcess && IsFallback(NumericsBackend.Parse(chosen)))
                (chosen, how) = Fastest(checkedSoFar, chosen, threads, how);
            var verdict = new NumericsVerdict(chosen, how, cpu, lib, threads, checkedSoFar, Today());
            if (!inProcess) cache.Write(verdict);
            return verdict;
        }

        /// <summary>A backend below the default kernels: oneDNN capped at a lower instruction set, or oneDNN off.</summary>
        static bool IsFallback(NumericsBackend b) => b.MaxIsa is not null || !b.OneDnn;

        /// <summary>Training steps the guard times per fallback that passes (after two warm-up steps; about 3 s each
        /// here for the cpu-scale ResNet).</summary>
        public const int TimedSteps = 6;

        /// <summary>
        /// Of the fallbacks that passed, the one that trains fastest on this CPU (cpu-scale ResNet, batch 128, this
        /// process's threads, <see cref="TimedSteps"/> steps each in a fresh process): the ladder's order does not hold
        /// everywhere. On an AVX2 EPYC oneDNN capped at SSE4.1 trained 1.6x as fast as oneDNN off (177 against 112
        /// images/s), on an AVX-512 Zen 5 (family 26 model 2) oneDNN off 1.5x as fast as SSE4.1 on 1 thread (629
        /// against 426) and 1.1x on 2. A lone fallback that passes is not timed; one whose timing fails is not chosen
        /// unless none is timed. The times are kept in the verdicts.
        /// </summary>
        static (string Chosen, string How) Fastest(List<BackendVerdict> verdicts, string first, int threads, string how)
        {
            var passing = verdicts.Select((v, i) => (v, i)).Where(p => p.v.Passed && IsFallback(NumericsBackend.Parse(p.v.Backend))).ToList();
            if (passing.Count < 2) return (first, how);
            foreach (var (v, i) in passing)
                verdicts[i] = v with { ImagesPerSecond = TimeTraining(v.Backend, threads) };
            var timed = passing.Select(p => verdicts[p.i]).Where(v => v.ImagesPerSecond is > 0).OrderByDescending(v => v.ImagesPerSecond).ToList();
            if (timed.Count == 0) return (first, how + $"; timing {string.Join(" and ", passing.Select(p => p.v.Backend))} failed, the first that passes is kept");
            var rates = string.Join(", ", timed.Select(v => $"{v.Backend} {v.ImagesPerSecond:F0}"));
            return (timed[0].Backend, how + $"; of the fallbacks that pass, {timed[0].Backend} trains fastest here (images/s, cpu-scale ResNet, batch 128, {threads} thread(s): {rates})");
        }

        /// <summary>Images/s of joint training steps under one backend, in a fresh process (the probe's throughput
        /// mode); null when the probe fails.</summary>
        static double? TimeTraining(string backend, int threads)
        {
            var (code, stdout, _) = RunProbe(new[] { "throughput", "--backend", backend, "--threads", threads.ToString(), "--steps", TimedSteps.ToString() });
            var json = LastJsonLine(stdout);
            if (code != 0 || json is null) return null;
            try
            {
                using var doc = JsonDocument.Parse(json);
                return doc.RootElement.TryGetProperty("imagesPerSecond", out var r) && r.TryGetDouble(out var v) && double.IsFinite(v) ? v : null;
            }
            catch (JsonException) { return null; }
        }

        /// <summary>Fallback without the probe host: the check in this process (default first, then oneDNN off, which
        /// can still be switched once oneDNN has run).</summary>
        static BackendVerdict CheckInThisProcess(NumericsBackend backend, IReadOnlySet<string> simulated)
        {
            backend.Apply();
            var r = ConvolutionCheck.Run(backend.Name, simulated.Contains(backend.Name));
            return new BackendVerdict(backend.Name, r.Passed ? "passed" : "failed", r.Summary(), r.Seconds);
        }

        /// <summary>The probe host (earlyexit-numerics-probe.dll with its runtimeconfig), or null.</summary>
        public static string? ProbeHost()
        {
            var env = Environment.GetEnvironmentVariable(ProbeVariable);
            var dir = Path.GetDirectoryName(typeof(NumericsGuard).Assembly.Location) ?? AppContext.BaseDirectory;
            var path = string.IsNullOrWhiteSpace(env) ? Path.Combine(dir, ProbeAssembly) : env;
            return File.Exists(path) && File.Exists(Path.ChangeExtension(path, ".runtimeconfig.json")) ? path : null;
        }

        /// <summary>The dotnet host of the running runtime (shared/Microsoft.NETCore.App/VERSION/ is three levels down).</summary>
        public static string DotnetHost()
        {
            var fromEnv = Environment.GetEnvironmentVariable("DOTNET_HOST_PATH");
            if (!string.IsNullOrEmpty(fromEnv) && File.Exists(fromEnv)) return fromEnv;
            var runtimeDir = System.Runtime.InteropServices.RuntimeEnvironment.GetRuntimeDirectory();
            var root = Path.GetFullPath(Path.Combine(runtimeDir, "..", "..", ".."));
            var host = Path.Combine(root, OperatingSystem.IsWindows() ? "dotnet.exe" : "dotnet");
            return File.Exists(host) ? host : "dotnet";
        }

        /// <summary>Runs the probe host with <paramref name="args"/> (after "exec probe.dll"); its exit code, output and error.</summary>
        public static (int ExitCode, string Stdout, string Stderr) RunProbe(IEnumerable<string> args, IReadOnlyDictionary<string, string>? environment = null, int timeoutSeconds = 600)
        {
            var probe = ProbeHost() ?? throw new FileNotFoundException($"{ProbeAssembly} not found beside EarlyExit.Core.dll (set {ProbeVariable})");
            var psi = new ProcessStartInfo(DotnetHost()) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
            psi.ArgumentList.Add("exec");
            psi.ArgumentList.Add(probe);
            foreach (var a in args) psi.ArgumentList.Add(a);
            psi.Environment.Remove(Variable);
            if (environment is not null) foreach (var (k, v) in environment) psi.Environment[k] = v;
            using var p = Process.Start(psi) ?? throw new InvalidOperationException("could not start the numerics probe");
            var stdout = p.StandardOutput.ReadToEndAsync();
            var stderr = p.StandardError.ReadToEndAsync();
            if (!p.WaitForExit(timeoutSeconds * 1000))
            {
                try { p.Kill(true); } catch (InvalidOperationException) { }
                return (-1, stdout.Result, $"timed out after {timeoutSeconds} s");
            }
            return (p.ExitCode, stdout.Result, stderr.Result);
        }

        /// <summary>The check of one backend in a fresh process.</summary>
        static BackendVerdict Probe(NumericsBackend backend, int threads, IReadOnlySet<string> simulated)
        {
            var clock = Stopwatch.StartNew();
            var (code, stdout, stderr) = RunProbe(new[] { "check", "--backend", backend.Name, "--threads", threads.ToString() });
            var json = LastJsonLine(stdout);
            if (code == 0 && json is not null)
            {
                var r = JsonSerializer.Deserialize<ConvCheckResult>(json, Json)!;
                return new BackendVerdict(backend.Name, r.Passed ? "passed" : "failed", r.Summary(), clock.Elapsed.TotalSeconds);
            }
            var last = LastMessage(stderr);
            var how = code > 128 ? $"killed by signal {code - 128}" : code < 0 ? "did not finish" : $"exit code {code}";
            return new BackendVerdict(backend.Name, "crashed", $"crashed: the check process died ({how}){(last.Length > 0 ? ": " + last : "")}", clock.Elapsed.TotalSeconds);
        }

        /// <summary>The last line of a process's standard output that is a JSON object (trimmed), or null: how the probe
        /// (and the benchmark's PyTorch peer) answer.</summary>
        public static string? LastJsonLine(string stdout) =>
            stdout.Split('\n').Select(l => l.Trim()).LastOrDefault(l => l.StartsWith('{'));

        /// <summary>The last line of a dead probe's standard error that says why it died: libtorch's own warnings
        /// (<c>[W1207 21:45:06.04 NNPACK.cpp:56] Could not initialize NNPACK!</c>, printed at every convolution that asks
        /// for NNPACK on a CPU it does not know) are passed over unless there is nothing else.</summary>
        public static string LastMessage(string stderr)
        {
            var lines = stderr.Split('\n').Select(l => l.Trim()).Where(l => l.Length > 0).ToList();
            static bool TorchWarning(string l) => l.Length > 2 && l[0] == '[' && l[1] == 'W' && char.IsDigit(l[2]);
            return lines.LastOrDefault(l => !TorchWarning(l)) ?? lines.LastOrDefault() ?? "";
        }

        /// <summary>The verdict file of one (CPU, libtorch, oneDNN, threads, simulated faults, check version, and whether
        /// oneDNN's cache record was corrected: <see cref="OneDnnCaches"/>).</summary>
        sealed class VerdictCache
        {
            readonly string _path;

            public VerdictCache(CpuInfo cpu, LibTorchInfo lib, int threads, IReadOnlySet<string> simulated)
            {
                var identity = string.Join("|", ConvolutionCheck.Version, cpu.Vendor, cpu.ModelName, cpu.Family, cpu.Model, cpu.Stepping,
                    string.Join(",", cpu.Flags), lib.TorchVersion, lib.OneDnnVersion, lib.TorchSharpVersion, threads, UserIsaCap,
                    string.Join(",", simulated.OrderBy(s => s)), OneDnnCaches.State);
                var key = Convert.ToHexString(SHA256.HashData(Encoding.UTF8.GetBytes(identity)))[..16].ToLowerInvariant();
                _path = Path.Combine(UserCache.Root(), "numerics", key + ".json");
            }

            public NumericsVerdict? Read()
            {
                try { return File.Exists(_path) ? JsonSerializer.Deserialize<NumericsVerdict>(File.ReadAllText(_path), Json) : null; }
                catch (Exception e) when (e is JsonException or IOException or NotSupportedException) { return null; }
            }

            public void Write(NumericsVerdict v)
            {
                Directory.CreateDirectory(Path.GetDirectoryName(_path)!);
                var tmp = _path + "." + Guid.NewGuid().ToString("N") + ".tmp";
                File.WriteAllText(tmp, JsonSerializer.Serialize(v, new JsonSerializerOptions(Json) { WriteIndented = true }));
                File.Move(tmp, _path, overwrite: true);
            }

            /// <summary>An exclusive lock on the verdict (processes started together check once).</summary>
            public IDisposable Lock()
            {
                Directory.CreateDirectory(Path.GetDirectoryName(_path)!);
                var deadline = DateTime.UtcNow.AddMinutes(15);
                while (true)
                {
                    try { return new FileStream(_path + ".lock", FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None); }
                    catch (IOException) when (DateTime.UtcNow < deadline) { Thread.Sleep(200); }
                }
            }
        }
    }

    /// <summary>The per-user cache folder: $XDG_CACHE_HOME/earlyexit or ~/.cache/earlyexit.</summary>
    public static class UserCache
    {
        public static string Root()
        {
            var cacheRoot = Environment.GetEnvironmentVariable("XDG_CACHE_HOME");
            if (string.IsNullOrWhiteSpace(cacheRoot))
                cacheRoot = Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".cache");
            return Path.Combine(cacheRoot, "earlyexit");
        }
    }
}
