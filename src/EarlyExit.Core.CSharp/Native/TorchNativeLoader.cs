using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Runtime.InteropServices;
using System.Security.Cryptography;
using System.Text;
using TorchSharp;

namespace EarlyExit.Native
{
    /// <summary>The native backend of TorchSharp could not be loaded; the message says what is missing and what to do.</summary>
    public sealed class TorchUnavailableException : Exception
    {
        public TorchUnavailableException(string message, Exception? inner = null) : base(message, inner) { }
    }

    /// <summary>
    /// Runtime layer of the libstdc++ workaround, and the numerics guard. Call <see cref="EnsureLoaded"/> first thing
    /// in every entry point, before any other use of TorchSharp: TorchSharp caches a failed load for the life of the
    /// process, and oneDNN fixes its instruction set when it first runs (see <see cref="NumericsGuard"/>).
    /// <para>
    /// It preloads libtorch by absolute path, then tries libLibTorchSharp.so as shipped. Only if that fails
    /// (typically: GLIBCXX_3.4.32 not found) does it write a copy with that version-needs entry marked weak
    /// to a per-user cache directory and load the copy; TorchSharp's own load by name then finds the library
    /// already loaded under its soname. It never writes next to TorchSharp.dll, so a NuGet cache is never
    /// modified. Where the system libstdc++ is new enough the shipped library loads and nothing is written.
    /// </para>
    /// </summary>
    public static class TorchNativeLoader
    {
        static readonly object Gate = new();
        static LoadReport? _report;

        /// <summary>What the loader did, for logs and <c>earlyexit doctor</c>.</summary>
        public sealed record LoadReport(string NativeDirectory, string LibTorchSharpPath, bool Patched, string Detail);

        /// <summary>Environment variable naming a directory that holds libtorch and libLibTorchSharp.so.</summary>
        public const string NativeDirVariable = "EARLYEXIT_TORCH_NATIVE_DIR";

        static bool _threadsApplied;

        /// <summary>libtorch_cpu as loaded by absolute path (zero before loading, or where it was left to TorchSharp).</summary>
        public static IntPtr LibTorchCpuHandle { get; private set; }

        /// <summary>libc10 as loaded by absolute path (zero before loading, or where it was left to TorchSharp).</summary>
        public static IntPtr LibC10Handle { get; private set; }

        /// <summary>Makes TorchSharp usable in this process and runs the numerics guard (which chooses convolution
        /// kernels that pass its check, before any of them runs), or throws <see cref="TorchUnavailableException"/>
        /// or <see cref="NumericsException"/>.</summary>
        public static LoadReport EnsureLoaded()
        {
            var report = LoadNatives();
            lock (Gate)
            {
                if (!_threadsApplied) { TorchThreads.Apply(); _threadsApplied = true; }
            }
            NumericsGuard.Ensure();
            _ = ConvolutionLayout.Training;  // a bad EARLYEXIT_TRAINING_LAYOUT fails here, before any work
            return report;
        }

        /// <summary>Loads the natives only, without the numerics guard: for the guard's own probe process.</summary>
        public static LoadReport LoadNatives()
        {
            lock (Gate)
            {
                if (_report is not null) return _report;
                NativeAllocator.Configure();  // before the first tensor
                var report = OperatingSystem.IsLinux() ? PrepareLinux() : new LoadReport("", "", false, "not Linux: TorchSharp loads as shipped");
                Verify(report);
                if (report.NativeDirectory.Length > 0) OneDnnCaches.Configure(Path.Combine(report.NativeDirectory, "libtorch_cpu.so"));
                Nnpack.Configure();
                _report = report;
                return report;
            }
        }

        /// <summary>The libraries that must sit beside libLibTorchSharp.so (a CUDA build adds its own).</summary>
        static readonly string[] RequiredBeside = { "libc10.so", "libtorch_cpu.so", "libtorch.so" };

        static IEnumerable<string> CandidateDirectories()
        {
            var env = Environment.GetEnvironmentVariable(NativeDirVariable);
            if (!string.IsNullOrWhiteSpace(env)) yield return env;
            // typeof does not run torch's static constructor.
            var torchDir = Path.GetDirectoryName(typeof(torch).Assembly.Location);
            if (!string.IsNullOrEmpty(torchDir))
            {
                yield return torchDir;
                yield return Path.Combine(torchDir, "runtimes", "linux-x64", "native");
            }
            var baseDir = AppContext.BaseDirectory;
            yield return baseDir;
            yield return Path.Combine(baseDir, "runtimes", "linux-x64", "native");
        }

        static LoadReport PrepareLinux()
        {
            var dir = CandidateDirectories().FirstOrDefault(d => File.Exists(Path.Combine(d, "libLibTorchSharp.so")));
            if (dir is null)
                return new LoadReport("", "", false, "libLibTorchSharp.so not found beside TorchSharp.dll; leaving the load to TorchSharp");

            // A missing bundled library would otherwise be resolved by the dynamic loader elsewhere (Debian's
            // python3-torch puts a libtorch_cpu.so 1.13 in /usr/lib) and fail later with a misleading message.
            var missing = RequiredBeside.Where(lib => !File.Exists(Path.Combine(dir, lib))).ToArray();
            if (missing.Length > 0)
                throw new TorchUnavailableException(
                    $"TorchSharp's native libraries are incomplete: {string.Join(", ", missing)} missing from {dir}\n" +
                    "Rebuild the project (dotnet build) so that the natives are restored, or point " + NativeDirVariable + " at a folder holding libtorch and libLibTorchSharp.so.");

            // Preload libtorch by absolute path: a copy of libLibTorchSharp.so in another directory then finds
            // its DT_NEEDED libraries already loaded under their sonames.
            foreach (var lib in new[] { "libgomp-98b21ff3.so.1", "libc10.so", "libtorch_cpu.so", "libc10_cuda.so", "libtorch_cuda.so", "libtorch.so" })
            {
                var path = Path.Combine(dir, lib);
                if (File.Exists(path) && NativeLibrary.TryLoad(path, out var handle))
                {
                    if (lib == "libtorch_cpu.so") LibTorchCpuHandle = handle;
                    if (lib == "libc10.so") LibC10Handle = handle;
                }
            }

            var shipped = Path.Combine(dir, "libLibTorchSharp.so");
            string? firstError = null;
            try
            {
                NativeScalars.Install(NativeLibrary.Load(shipped), dir);
                return new LoadReport(dir, shipped, false, "loaded as shipped");
            }
            catch (DllNotFoundException e) { firstError = e.Message; }
            catch (BadImageFormatException e) { firstError = e.Message; }

            if (!firstError.Contains(ElfVersionNeedPatcher.Glibcxx33432, StringComparison.Ordinal))
                throw new TorchUnavailableException(
                    $"TorchSharp's native library {shipped} does not load: {firstError}\n" +
                    "Rebuild the project (dotnet build) so that the natives are restored, or point " + NativeDirVariable + " at a folder holding libtorch and libLibTorchSharp.so.");

            var patched = PatchedCopyPath(shipped);
            if (!File.Exists(patched))
                ElfVersionNeedPatcher.PatchFile(shipped, patched, ElfVersionNeedPatcher.Glibcxx33432);
            try
            {
                NativeScalars.Install(NativeLibrary.Load(patched), dir);
            }
            catch (Exception e) when (e is DllNotFoundException or BadImageFormatException)
            {
                throw new TorchUnavailableException(
                    $"TorchSharp's native library needs {ElfVersionNeedPatcher.Glibcxx33432} from libstdc++, which this system lacks, " +
                    $"and the patched copy {patched} does not load either: {e.Message}\n" +
                    "Install a newer libstdc++ (GCC 13 or later, for example Debian 13 or Ubuntu 24.04), or report this with the message above.", e);
            }
            return new LoadReport(dir, patched, true,
                $"system libstdc++ lacks {ElfVersionNeedPatcher.Glibcxx33432}; loaded a copy with that entry marked weak");
        }

        /// <summary>Per-user cache path of the patched copy, keyed by a hash of the shipped file.</summary>
        public static string PatchedCopyPath(string shipped)
        {
            string key;
            using (var stream = File.OpenRead(shipped))
                key = Convert.ToHexString(SHA256.HashData(stream))[..16].ToLowerInvariant();
            return Path.Combine(UserCache.Root(), "native", key, "libLibTorchSharp.so");
        }

        static void Verify(LoadReport report)
        {
            try
            {
                torch.InitializeDeviceType(DeviceType.CPU);
            }
            catch (Exception e)
            {
                var inner = e is TypeInitializationException { InnerException: { } i } ? i : e;
                var first = inner.Message.Split('\n').FirstOrDefault(l => l.Trim().Length > 0)?.Trim() ?? inner.GetType().Name;
                throw new TorchUnavailableException(
                    $"TorchSharp does not load in this process ({report.Detail}): {first}\n" +
                    "What to do: build with `dotnet build` (it patches the natives in the output folder), make sure nothing used TorchSharp " +
                    "before EarlyExit.Native.TorchNativeLoader.EnsureLoaded(), or set " + NativeDirVariable + " to a folder with libtorch and libLibTorchSharp.so.", inner);
            }
        }

        /// <summary>One line for logs: where the natives came from.</summary>
        public static string Describe(LoadReport r) =>
            (r.LibTorchSharpPath.Length == 0 ? r.Detail : $"{r.LibTorchSharpPath} ({r.Detail})") + $"; native scalars: {NativeScalars.Status}; allocator: {NativeAllocator.Status}; NNPACK: {Nnpack.Status}; oneDNN caches: {OneDnnCaches.Status}";
    }
}
