using System;
using System.Linq;
using System.Runtime.CompilerServices;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace EarlyExit.Native
{
    /// <summary>
    /// The memory layouts convolutions get: the layout a ResNet trains in (<see cref="Training"/>), and the layout half of
    /// the <c>default-nchw</c> backend. On some processors libtorch's oneDNN kernels are wrong
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

        /// <summary>The variable that sets <see cref="Training"/>: <c>auto</c> (the default), <c>nchw</c> or <c>channels-last</c>.</summary>
        public const string TrainingVariable = "EARLYEXIT_TRAINING_LAYOUT";

        static TrainingLayout? training;

        /// <summary>
        /// The memory layout a ResNet trains in (its stem hands the first block a channels-last map, and every later
        /// convolution, batch norm, ReLU and add keeps that layout; <see cref="Models.CifarStem"/>). Measured with the
        /// numerics probe's training mode (cpu-scale ResNet, batch 128, joint loss, AdamW, default kernels; Intel Xeon
        /// family 6 model 207, AVX-512 without AMX; six alternated pairs of 60-step runs): on 1 thread channels-last / NCHW
        /// 0.90, 1.46, 1.22, 1.12, 1.16, 1.15 (993–1031 against 831–893 images/s in the last five), because oneDNN then
        /// runs its NHWC kernels on the map itself where an NCHW map is reordered to a blocked layout and back around
        /// every convolution (oneDNN's own account per step: 67.0 against 87.4 ms in all, of which reorders 2.3 against 25.8);
        /// on 2 threads 0.88, 0.91, 1.10, 0.89, 0.89, 0.98. What costs it on 2 threads is ATen's channels-last batch norm
        /// on maps of fewer channels than an AVX-512 vector holds: forward and backward at 128×8×28×28 took 7.06 against
        /// 1.45 ms NCHW on 2 threads (3.64 against 3.62 on 1), at 8×14×14 1.91 against 0.58, while from 16 channels on it is
        /// faster channels-last (16×28×28: 2.84 against 3.49; 64×28×28: 15.3 against 17.0). And the same network at width 16
        /// on 2 threads trained faster channels-last in 5 of 5 alternated rounds (step time 0.89–0.94 of NCHW's), at width
        /// 8 slower in 3 of 5 (0.94–1.25). So <c>auto</c> trains channels-last on 1 thread, and on more threads where the
        /// stem's map has at least <see cref="MinChannelsOnManyThreads"/> channels; the bench's "layout" section measures
        /// the cpu-scale network (width 8) again on every machine.
        /// Every train-mode forward (with gradients or without) takes it; every eval-mode pass, inference among them, stays NCHW. The layout changes the order of float sums only (a golden
        /// test: the same loss and gradients within float rounding). Never channels-last under a backend that needs
        /// NCHW inputs (<see cref="NchwInputs"/>), nor off the CPU.
        /// </summary>
        public static TrainingLayout Training
        {
            get => training ??= ParseTraining(Environment.GetEnvironmentVariable(TrainingVariable));
            set => training = value;
        }

        /// <summary>Parses the variable's value (null or empty: auto); an <see cref="ArgumentException"/> for anything else.</summary>
        public static TrainingLayout ParseTraining(string? spec) =>
            (spec ?? "").Trim().ToLowerInvariant() switch
            {
                "" or "auto" => TrainingLayout.Auto,
                "nchw" => TrainingLayout.Nchw,
                "channels-last" or "channels_last" or "nhwc" => TrainingLayout.ChannelsLast,
                _ => throw new ArgumentException($"{TrainingVariable}={spec}: use auto (the default), nchw or channels-last"),
            };

        /// <summary>The fewest channels the stem's map must have for <c>auto</c> to train channels-last on more than one
        /// thread (16 floats: one AVX-512 vector; below it ATen's channels-last batch norm is slow on several threads).</summary>
        public const long MinChannelsOnManyThreads = 16;

        /// <summary>Whether a training forward in this process, on the threads torch has now, runs a network whose stem
        /// has <paramref name="channels"/> channels channels-last.</summary>
        public static bool TrainsChannelsLast(long channels) =>
            !NchwInputs && Training switch
            {
                TrainingLayout.ChannelsLast => true,
                TrainingLayout.Nchw => false,
                _ => torch.get_num_threads() == 1 || channels >= MinChannelsOnManyThreads,
            };

        /// <summary>What the training layout is and why, for provenance (run.json, metrics.json, bench.json).</summary>
        public static string TrainingStatus =>
            NchwInputs ? "NCHW (the kernels in use need NCHW inputs)"
            : Training switch
            {
                TrainingLayout.ChannelsLast => $"channels-last ({TrainingVariable}=channels-last)",
                TrainingLayout.Nchw => $"NCHW ({TrainingVariable}=nchw)",
                _ => $"auto: channels-last on 1 thread, and on more where the stem has at least {MinChannelsOnManyThreads} channels (now {torch.get_num_threads()} thread(s))",
            };

        /// <summary>A training forward's feature map in the layout <see cref="TrainsChannelsLast"/> chooses for its channel
        /// count (a copy when it
        /// changes layout, the map itself otherwise). A map with one channel is left alone (both layouts are the same
        /// there), and so is one off the CPU (the measurement is of oneDNN's CPU kernels).</summary>
        public static Tensor ForTraining(Tensor x) =>
            x.dim() == 4 && x.shape[1] > 1 && x.device_type == DeviceType.CPU && TrainsChannelsLast(x.shape[1]) && !IsChannelsLast(x) ? ToChannelsLast(x) : x;

        /// <summary>An N×C×H×W tensor laid out N,H,W,C in memory (TorchSharp has no memory-format argument: a permuted
        /// contiguous copy, permuted back).</summary>
        public static Tensor ToChannelsLast(Tensor x) => x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2);

        /// <summary>Whether a 4-D tensor is dense in N,H,W,C order.</summary>
        public static bool IsChannelsLast(Tensor x)
        {
            if (x.dim() != 4) return false;
            var (shape, stride) = (x.shape, x.stride());
            return stride[1] == 1 && stride[3] == shape[1] && stride[2] == shape[1] * shape[3] && stride[0] == shape[1] * shape[2] * shape[3];
        }

        /// <summary>Convolutions hooked in this process (for tests and reports).</summary>
        public static int HookedCount { get; private set; }

        /// <summary>
        /// The fewest input channels a strided 1×1 convolution may have and still read a channels-last input. oneDNN
        /// (v3.7.1 in libtorch 2.10; upstream issue uxlfoundation/oneDNN#6035, open) computes the backward-weights of a
        /// strided 1×1 convolution on an NHWC source by first copying the strided pixels into a per-thread workspace
        /// ("reduce to unit stride"), and where the input has fewer channels than its kernel's channel block (16 with
        /// AVX-512, 8 with AVX2) it writes past that workspace. Measured here (AMD EPYC family 26 model 2, default
        /// kernels, caches corrected, 2 threads): the weight gradients of 1×1 stride-2 convolutions from 5-15 channels on
        /// channels-last inputs aborted the process with "corrupted size vs. prev_size" or a segmentation fault in every
        /// run of 18 such shapes (inputs and forward passes alone: never; NCHW inputs, which take oneDNN's blocked
        /// path: never, 144 of 144 correct).
        /// </summary>
        public const long MinChannelsForStridedPointwise = 16;

        /// <summary>Whether a convolution is a strided 1×1 one with fewer input channels than
        /// <see cref="MinChannelsForStridedPointwise"/>: such a convolution of a network always reads NCHW inputs.</summary>
        public static bool IsSmallStridedPointwise(Conv2d conv) =>
            conv.kernel_size.All(k => k == 1) && conv.stride.Any(s => s > 1) && conv.in_channels < MinChannelsForStridedPointwise;

        /// <summary>Hooks the convolutions under <paramref name="root"/> that must read NCHW inputs: every
        /// <see cref="Conv2d"/> when the backend in use needs NCHW inputs (or with <paramref name="always"/>), and
        /// otherwise the strided 1×1 convolutions of few channels (<see cref="IsSmallStridedPointwise"/>). A hooked
        /// convolution's non-contiguous (channels-last) input is made contiguous before libtorch chooses its kernel. A convolution is hooked once however often it is asked.</summary>
        public static void Attach(nn.Module root, bool always = false)
        {
            if (!always) TorchNativeLoader.EnsureLoaded();  // the verdict decides
            bool all = always || NchwInputs;
            foreach (var m in root.modules())
            {
                if (m is not Conv2d conv || !(all || IsSmallStridedPointwise(conv))) continue;
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

    /// <summary>The layout a network trains in (<see cref="ConvolutionLayout.Training"/>).</summary>
    public enum TrainingLayout
    {
        /// <summary>Channels-last on 1 thread, and on more where the stem has at least
        /// <see cref="ConvolutionLayout.MinChannelsOnManyThreads"/> channels; NCHW otherwise (measured; the default).</summary>
        Auto,
        /// <summary>Always NCHW.</summary>
        Nchw,
        /// <summary>Always channels-last (where the kernels allow it).</summary>
        ChannelsLast,
    }
}
