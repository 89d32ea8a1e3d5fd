using System;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace EarlyExit.Models
{
    /// <summary>
    /// A module that can fold its batch norms into the convolutions before them, for a network that will only run
    /// inference from now on (<see cref="MultiExitNetwork.Freeze"/>): in eval mode a batch norm is a per-channel affine
    /// map, so conv∘BN is one convolution with scaled weights and a bias, and the pass of BN over the feature map goes.
    /// </summary>
    public interface IBatchNormFoldable
    {
        /// <summary>Computes the folded weights from the current parameters and running statistics (again on every call).</summary>
        void FoldBatchNorm();
        /// <summary>Whether folded weights are held.</summary>
        bool IsFolded { get; }
    }

    /// <summary>
    /// Switches folded forwards off on this thread while a tool that hooks leaf modules runs one (the MAC counter): a
    /// folded forward calls no Conv2d, BatchNorm2d or ReLU module, so their hooks would not fire. Nests.
    /// </summary>
    public static class BatchNormFolding
    {
        [ThreadStatic] static int suspended;

        /// <summary>Whether folded forwards may run on this thread.</summary>
        public static bool Active => suspended == 0;

        /// <summary>Folded forwards are off on this thread until the returned object is disposed.</summary>
        public static IDisposable Suspend()
        {
            suspended++;
            return new Resume();
        }

        sealed class Resume : IDisposable
        {
            bool done;
            public void Dispose()
            {
                if (done) return;
                done = true;
                suspended--;
            }
        }
    }

    /// <summary>The weight and bias of conv∘BN in eval mode, and the forward that uses them.</summary>
    internal sealed class FoldedConv : IDisposable
    {
        public readonly Tensor Weight;
        public readonly Tensor Bias;
        private readonly long[] stride;
        private readonly long[] padding;

        /// <summary>W' = W·γ/√(σ²+ε) per output channel, b' = β − μ·γ/√(σ²+ε) (computed in float64, stored in W's type).</summary>
        public FoldedConv(Conv2d conv, BatchNorm2d bn, long stride, long padding)
        {
            using var scope = NewDisposeScope();
            using var _ = no_grad();
            var w = conv.weight!;
            var mean = bn.running_mean!.to(float64);
            using var eps = bn.eps.ToScalar();
            var scale = bn.weight!.to(float64) / bn.running_var!.to(float64).add(eps).sqrt();
            Weight = (w.to(float64) * scale.reshape(-1, 1, 1, 1)).to(w.dtype).contiguous().MoveToOuterDisposeScope();
            var shift = bn.bias!.to(float64) - mean * scale;
            if (conv.bias is not null) shift = shift + conv.bias.to(float64) * scale;
            Bias = shift.to(w.dtype).MoveToOuterDisposeScope();
            this.stride = new[] { stride, stride };
            this.padding = new[] { padding, padding };
        }

        /// <summary>Whether this fold can serve an input: folding not suspended, same device and type as the folded weights.</summary>
        public bool Serves(Tensor x) => BatchNormFolding.Active && x.device_type == Weight.device_type && x.device_index == Weight.device_index && x.dtype == Weight.dtype;

        public Tensor Forward(Tensor x)
        {
            // What ConvolutionLayout's pre-hook does for the module, for the backends that need NCHW inputs.
            var input = Native.ConvolutionLayout.NchwInputs && !x.is_contiguous() ? x.contiguous() : x;
            return nn.functional.conv2d(input, Weight, Bias, strides: stride, padding: padding);
        }

        public void Dispose()
        {
            Weight.Dispose();
            Bias.Dispose();
        }
    }

    /// <summary>
    /// ResNet BasicBlock: 3×3 conv, BN, ReLU, 3×3 conv, BN, plus a shortcut (1×1 conv + BN when the shape changes), ReLU.
    /// A strided shortcut is computed as the stride-1 1×1 convolution of the input's every stride-th pixel, which is the
    /// same arithmetic as a strided 1×1 convolution: libtorch 2.10 (oneDNN v3.7.1) runs the backward-data of a strided
    /// 1×1 convolution as <c>brgconv_strided</c> on NHWC with reorders around it, and the slice's backward (a strided
    /// copy into zeros) plus the stride-1 kernel took 2.5, 1.6 and 1.6 ms per forward and backward at batch 128 where
    /// the strided convolution took 6.3, 3.0 and 1.8 ms (8→16 channels at 28×28, 16→32 at 14×14, 32→64 at 7×7; 1 thread,
    /// AVX-512 Zen 4). Its weight, and the parameter names, are those of a strided 1×1 convolution.
    /// </summary>
    public sealed class BasicBlock : nn.Module<Tensor, Tensor>, IBatchNormFoldable
    {
        private readonly Conv2d conv1;
        private readonly BatchNorm2d bn1;
        private readonly ReLU relu1;
        private readonly Conv2d conv2;
        private readonly BatchNorm2d bn2;
        private readonly Conv2d? shortcutConv;
        private readonly BatchNorm2d? shortcutBn;
        private readonly long shortcutStride;
        private readonly long stride;
        private readonly ReLU relu2;
        private FoldedConv? folded1, folded2, foldedShortcut;

        public BasicBlock(string name, long inChannels, long outChannels, long stride) : base(name)
        {
            this.stride = stride;
            conv1 = nn.Conv2d(inChannels, outChannels, 3, stride: stride, padding: 1, bias: false);
            bn1 = nn.BatchNorm2d(outChannels);
            relu1 = nn.ReLU();
            conv2 = nn.Conv2d(outChannels, outChannels, 3, stride: 1, padding: 1, bias: false);
            bn2 = nn.BatchNorm2d(outChannels);
            if (stride != 1 || inChannels != outChannels)
            {
                shortcutConv = nn.Conv2d(inChannels, outChannels, 1, stride: 1, bias: false);
                shortcutStride = stride;
                shortcutBn = nn.BatchNorm2d(outChannels);
            }
            relu2 = nn.ReLU();
            RegisterComponents();
        }

        public override Tensor forward(Tensor x)
        {
            using var scope = NewDisposeScope();
            if (folded1 is not null && !training && !is_grad_enabled() && folded1.Serves(x))
            {
                // Folded inference (a frozen network): conv+bias, ReLU in place, conv+bias, the shortcut added in place.
                // Every tensor written here is a fresh output of this forward, so nothing a caller holds is changed.
                var h = folded1.Forward(x).relu_();
                var z = folded2!.Forward(h);
                var t = foldedShortcut is null ? x : foldedShortcut.Forward(Subsample(x, shortcutStride));
                return z.add_(t).relu_().MoveToOuterDisposeScope();
            }
            var y = bn2.call(conv2.call(relu1.call(bn1.call(conv1.call(x)))));
            var s = shortcutConv is null ? x : shortcutBn!.call(shortcutConv.call(Subsample(x, shortcutStride)));
            // Out-of-place add: forward hooks (MAC counter, per-sample Fisher) may hold on to bn2's output.
            return relu2.call(y + s).MoveToOuterDisposeScope();
        }

        public bool IsFolded => folded1 is not null;

        public void FoldBatchNorm()
        {
            DisposeFolds();
            folded1 = new FoldedConv(conv1, bn1, stride, 1);
            folded2 = new FoldedConv(conv2, bn2, 1, 1);
            if (shortcutConv is not null) foldedShortcut = new FoldedConv(shortcutConv, shortcutBn!, 1, 0);
        }

        void DisposeFolds()
        {
            folded1?.Dispose();
            folded2?.Dispose();
            foldedShortcut?.Dispose();
            folded1 = folded2 = foldedShortcut = null;
        }

        protected override void Dispose(bool disposing)
        {
            if (disposing) DisposeFolds();
            base.Dispose(disposing);
        }

        /// <summary>Every <paramref name="stride"/>-th pixel of an N×C×H×W map, from the first (a view): what a strided 1×1
        /// convolution without padding reads.</summary>
        internal static Tensor Subsample(Tensor x, long stride) =>
            stride == 1 ? x : x.slice(2, 0, x.shape[2], stride).slice(3, 0, x.shape[3], stride);
    }

    /// <summary>CIFAR stem: 3×3 conv, stride 1, BN, ReLU (no max-pool). In a training forward its output is handed on in
    /// the layout <see cref="Native.ConvolutionLayout.Training"/> chooses (by default channels-last on 1 thread, and on
    /// more from 16 channels), which the rest of the network keeps.</summary>
    public sealed class CifarStem : nn.Module<Tensor, Tensor>, IBatchNormFoldable
    {
        private readonly Conv2d conv;
        private readonly BatchNorm2d bn;
        private readonly ReLU relu;
        private FoldedConv? folded;

        public CifarStem(string name, long inChannels, long outChannels) : base(name)
        {
            conv = nn.Conv2d(inChannels, outChannels, 3, stride: 1, padding: 1, bias: false);
            bn = nn.BatchNorm2d(outChannels);
            relu = nn.ReLU();
            RegisterComponents();
        }

        public override Tensor forward(Tensor x) =>
            folded is not null && !training && !is_grad_enabled() && folded.Serves(x)
                ? folded.Forward(x).relu_()
                : training  // with or without gradients: a train-mode forward is the same either way
                    ? Native.ConvolutionLayout.ForTraining(relu.call(bn.call(conv.call(x))))
                    : relu.call(bn.call(conv.call(x)));

        public bool IsFolded => folded is not null;

        public void FoldBatchNorm()
        {
            folded?.Dispose();
            folded = new FoldedConv(conv, bn, 1, 1);
        }

        protected override void Dispose(bool disposing)
        {
            if (disposing) { folded?.Dispose(); folded = null; }
            base.Dispose(disposing);
        }
    }

    /// <summary>A backbone segment that carries a single feature map: a sequence of modules applied to state[0].</summary>
    public sealed class SequentialSegment : nn.Module<Tensor[], Tensor[]>
    {
        private readonly Sequential layers;

        public SequentialSegment(string name, Sequential layers) : base(name)
        {
            this.layers = layers;
            RegisterComponents();
        }

        public override Tensor[] forward(Tensor[] state) => new[] { layers.call(state[0]) };
    }

    /// <summary>
    /// SDN internal classifier (Kaya et al. 2019): α·AdaptiveMaxPool(k) + (1−α)·AdaptiveAvgPool(k), flatten, linear.
    /// α is a learnable scalar initialised uniformly in [0, 1), used as is (no sigmoid).
    /// </summary>
    public sealed class SdnHead : nn.Module<Tensor[], Tensor>
    {
        private readonly Parameter alpha;
        private readonly AdaptiveMaxPool2d maxPool;
        private readonly AdaptiveAvgPool2d avgPool;
        private readonly Linear linear;

        public SdnHead(string name, long channels, long numClasses, long poolSize = 4) : base(name)
        {
            alpha = nn.Parameter(rand(1));
            maxPool = nn.AdaptiveMaxPool2d(new[] { poolSize, poolSize });
            avgPool = nn.AdaptiveAvgPool2d(new[] { poolSize, poolSize });
            linear = nn.Linear(channels * poolSize * poolSize, numClasses);
            RegisterComponents();
        }

        public override Tensor forward(Tensor[] state)
        {
            using var scope = NewDisposeScope();
            // Pooled in channels-last layout: libtorch's CPU adaptive pooling is vectorised over channels there, which
            // makes this head 3–6× faster at batch 64 (forward and backward) for a copy of the feature map; at batch 1
            // it costs ~10 µs more. Same values up to float rounding of the averages (bench: early-exit inference).
            var x = Native.ConvolutionLayout.ToChannelsLast(state[0]);
            using var one = 1.ToScalar();
            var pooled = alpha * maxPool.call(x) + alpha.negative().add(one) * avgPool.call(x);
            if (!is_grad_enabled())
                return linear.call(pooled.flatten(1)).MoveToOuterDisposeScope();
            // Training: flatten(1) of the channels-last pooled map is a copy into C,H,W order, and its backward hands
            // the pools an NCHW gradient for a channels-last input, libtorch's slow mixed-layout path (the head's
            // backward 2.6× slower at 64×4×4, 1.5× at 8×28×28, batch 128). So the features are taken in H,W,C order
            // (a view) and the linear's weight columns reordered to match (classes × 16C, a small copy): the same
            // products summed in another order; the parameters keep PyTorch's layout (weight files, tests/Interop's twin).
            long n = pooled.shape[0], c = pooled.shape[1], h = pooled.shape[2], w = pooled.shape[3];
            var features = pooled.permute(0, 2, 3, 1).reshape(n, h * w * c);
            var weight = linear.weight!;
            var reordered = weight.view(weight.shape[0], c, h, w).permute(0, 2, 3, 1).reshape(weight.shape[0], h * w * c);
            return nn.functional.linear(features, reordered, linear.bias).MoveToOuterDisposeScope();
        }
    }

    /// <summary>The backbone's own classifier: adaptive average pool to 1×1, flatten, linear.</summary>
    public sealed class PoolLinearHead : nn.Module<Tensor[], Tensor>
    {
        private readonly AdaptiveAvgPool2d pool;
        private readonly Linear linear;

        public PoolLinearHead(string name, long channels, long numClasses) : base(name)
        {
            pool = nn.AdaptiveAvgPool2d(1);
            linear = nn.Linear(channels, numClasses);
            RegisterComponents();
        }

        public override Tensor forward(Tensor[] state) => linear.call(pool.call(state[0]).flatten(1));
    }
}
