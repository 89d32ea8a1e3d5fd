using System;

namespace EarlyExit.Native
{
    /// <summary>
    /// NNPACK on CPUs it does not know. libtorch asks for NNPACK whenever a float32 convolution does not go to oneDNN
    /// (batch 1 with a small input, a 1x1 kernel on one thread, ...), and where NNPACK failed to initialise it logs
    /// "Could not initialize NNPACK! Reason: Unsupported hardware." at every such call: on an AMD EPYC family 26 model 2
    /// (2026-12-07) that was about 150,000 lines in one run of the test command, and a line per convolution in batch-1
    /// inference. Where NNPACK is unavailable, ATen's NNPACK switch is turned off at load time, which changes no kernel
    /// (NNPACK could not run anyway) and silences the warning; where it is available nothing is touched.
    /// </summary>
    public static class Nnpack
    {
        /// <summary>"available (left on)", "unavailable on this CPU (ATen's NNPACK switch turned off ...)", or "not checked".</summary>
        public static string Status { get; private set; } = "not checked";

        /// <summary>Whether this process turned ATen's NNPACK switch off.</summary>
        public static bool SwitchedOff { get; private set; }

        /// <summary>Checks NNPACK once, after libtorch is loaded by absolute path (otherwise leaves it alone).</summary>
        internal static void Configure()
        {
            if (TorchNativeLoader.LibTorchCpuHandle == IntPtr.Zero) return;
            try
            {
                if (LibTorchControls.NnpackAvailable()) { Status = "available (left on)"; return; }
                LibTorchControls.NnpackEnabled = false;
                SwitchedOff = true;
                Status = "unavailable on this CPU (ATen's NNPACK switch turned off, so that libtorch does not warn at every convolution)";
            }
            catch (EntryPointNotFoundException e)
            {
                Status = $"not checked ({e.Message})";
            }
        }
    }
}
