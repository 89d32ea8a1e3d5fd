using System;
using System.Runtime.CompilerServices;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace EarlyExit.Native
{
    /// <summary>
    /// The layout half of the <c>default-nchw</c> backend. On some processors libtorch's oneDNN kernels are wrong
    /// (or corrupt the heap) only for convolutions whose input arrives channels-last (measured on an AVX2 EPYC,
    /// family 25 model 1: <c>brgconv_1x1:avx2</c>, a 1×1 stride-2 convolution of a channels-last input, crashes with
    /// "corrupted double-linked list"), while the NCHW kernels the model zoo runs (<c>jit:avx2</c> on blocked layouts)
    /// pass the check and train 1.5–2× faster than oneDNN capped at AVX there. Under that backend every
    /// <see cref="Conv2d"/> of a <see cref="Models.MultiExitNetwork"/> gets a forward pre-hook that makes a
    /// non-contiguous input contiguous (NCHW) before libtorch chooses its kernel; an NCHW input passes untouched.
    /// The guard checks this backend on the check's cases with NCHW inputs only (output gradients still arrive
    /// channels-last where an SDN head sends them so).
    /// Convolutions outside a multi-exit network (a bare <c>nn.functional.conv2d</c>) are not covered.
    /// </summary>
    public static class ConvolutionLayout
    {
        static readonly ConditionalWeakTable<Conv2d, object> Hooked = new();

        /// <summary>Whether the backend in use needs NCHW inputs (set by <see cref="NumericsBackend.Apply"/>).</summary>
        public static bool NchwInputs { get; internal set; }

        /// <summary>Convolutions hooked in this process (for tests and reports).</summary>
        public static int HookedCount { get; private set; }

        /// <summary>Hooks every <see cref="Conv2d"/> under <paramref name="root"/> when the backend in use needs NCHW
        /// inputs (or always, with <paramref name="always"/>); a convolution is hooked once however often it is asked.</summary>
        public static void Attach(nn.Module root, bool always = false)
        {
            if (!always)
            {
                TorchNativeLoader.EnsureLoaded();  // the verdict decides
                if (!NchwInputs) return;
            }
            foreach (var m in root.modules())
            {
                if (m is not Conv2d conv) continue;
                lock (Hooked)
                {
                    if (Hooked.TryGetValue(conv, out _)) continue;
                    Hooked.Add(conv, true);
                    HookedCount++;
                }
                conv.register_forward_pre_hook((_, x) => x.is_contiguous() ? x : x.contiguous());
            }
        }
    }
}
