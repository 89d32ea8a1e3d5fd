using System;
using System.IO;
using System.Linq;
using System.Runtime.InteropServices;
using TorchSharp;

namespace EarlyExit.Native
{
    /// <summary>
    /// Keeps TorchSharp's native scalars alive until no native call can be reading them.
    /// <para>
    /// TorchSharp hands a <see cref="Scalar"/> to native code as a raw handle and keeps nothing alive for the duration
    /// of the call, and it creates such scalars itself on every <c>tensor + tensor</c> (alpha = 1), every operator with
    /// a number, and in its optimisers. The garbage collector may finalize one while the call still reads it; measured
    /// here, a training loop with garbage collections forced from another thread aborted in 5 runs of 6 within
    /// seconds ("Unknown scalar type", "alpha must not be a floating point number", freed memory read back), and a
    /// training run about once in 17 without forcing.
    /// </para>
    /// <para>
    /// The fix is at the native free: <c>libearlyexit-scalars.so</c> (built from <c>scalar_release.c</c> beside this file
    /// at build time) defines <c>THSTorch_dispose_scalar</c> to queue the scalar instead of freeing it, and TorchSharp's
    /// imports of LibTorchSharp resolve to it (it finds every other symbol in libLibTorchSharp.so). Queued scalars are
    /// freed at safe points, <see cref="ReleaseDeferred"/>, which the training loop, evaluation, the Fisher and
    /// inference call between batches: the scalars queued before the previous safe point. Our own code also holds its
    /// scalars explicitly (an analyzer refuses implicit ones in the hot paths), which keeps the queue short.
    /// </para>
    /// </summary>
    public static unsafe class NativeScalars
    {
        public const string Library = "libearlyexit-scalars.so";
        /// <summary>"immediate" keeps TorchSharp's own behaviour (scalars freed by the finalizer), for diagnosis.</summary>
        public const string Variable = "EARLYEXIT_SCALAR_RELEASE";

        static IntPtr _shim;
        static delegate* unmanaged<nuint> _release;
        static delegate* unmanaged<ulong*, ulong*, ulong*, void> _counts;

        /// <summary>Whether scalars are released at safe points (false: TorchSharp's finalizer frees them).</summary>
        public static bool Active => _release != null;

        /// <summary>One line for logs and provenance.</summary>
        public static string Status { get; private set; } = "not installed (TorchNativeLoader.EnsureLoaded not called)";

        /// <summary>
        /// Makes TorchSharp's LibTorchSharp imports resolve to the shim. Must run after libLibTorchSharp.so is loaded
        /// (<paramref name="libTorchSharp"/>) and before TorchSharp's first native call.
        /// </summary>
        internal static void Install(IntPtr libTorchSharp, string nativeDirectory)
        {
            if (Environment.GetEnvironmentVariable(Variable) is { } mode && mode.Trim().Equals("immediate", StringComparison.OrdinalIgnoreCase))
            {
                Status = $"off ({Variable}=immediate): TorchSharp's finalizer frees scalars, which can abort a run";
                return;
            }
            var beside = Path.GetDirectoryName(typeof(NativeScalars).Assembly.Location) ?? AppContext.BaseDirectory;
            var path = new[] { Path.Combine(beside, Library), Path.Combine(nativeDirectory, Library) }.FirstOrDefault(File.Exists);
            if (path is null)
            {
                Status = $"off: {Library} was not built (no C compiler at build time?); TorchSharp's finalizer frees scalars, which can abort a run";
                return;
            }
            if (!NativeLibrary.TryLoad(path, out var shim))
            {
                Status = $"off: {path} does not load; TorchSharp's finalizer frees scalars, which can abort a run";
                return;
            }
            var setDispose = (delegate* unmanaged<IntPtr, void>)NativeLibrary.GetExport(shim, "EarlyExit_set_scalar_dispose");
            setDispose(NativeLibrary.GetExport(libTorchSharp, "THSTorch_dispose_scalar"));
            try
            {
                NativeLibrary.SetDllImportResolver(typeof(torch).Assembly,
                    (name, _, _) => name == "LibTorchSharp" || name == "libLibTorchSharp" || name == "libLibTorchSharp.so" ? shim : IntPtr.Zero);
            }
            catch (InvalidOperationException)
            {
                Status = "off: TorchSharp's import resolver was already set by other code; TorchSharp's finalizer frees scalars";
                return;
            }
            _shim = shim;
            _release = (delegate* unmanaged<nuint>)NativeLibrary.GetExport(shim, "EarlyExit_release_scalars");
            _counts = (delegate* unmanaged<ulong*, ulong*, ulong*, void>)NativeLibrary.GetExport(shim, "EarlyExit_scalar_counts");
            Status = $"deferred release ({path})";
        }

        /// <summary>
        /// A safe point: frees the scalars queued before the previous safe point. Call it between batches of the
        /// thread that runs torch (none of its native calls is then in flight). Returns how many were freed.
        /// </summary>
        public static long ReleaseDeferred() => _release != null ? (long)_release() : 0;

        /// <summary>Scalars queued so far, freed so far, and waiting now (zeros when not active).</summary>
        public static (ulong Deferred, ulong Released, ulong Pending) Counts()
        {
            if (_counts == null) return (0, 0, 0);
            ulong d, r, p;
            _counts(&d, &r, &p);
            return (d, r, p);
        }
    }
}
