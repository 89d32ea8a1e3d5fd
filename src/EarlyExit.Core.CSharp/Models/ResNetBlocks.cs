using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace EarlyExit.Models
{
    /// <summary>
    /// ResNet BasicBlock: 3×3 conv, BN, ReLU, 3×3 conv, BN, plus a shortcut (1×1 conv + BN when the shape changes), ReLU.
    /// A strided shortcut is computed as the stride-1 1×1 convolution of the input's every stride-th pixel, which is the
    /// same arithmetic as a strided 1×1 convolution: libtorch 2.10 (oneDNN v3.7.1) runs the backward-data of a strided
    /// 1×1 convolution as <c>brgconv_strided</c> on NHWC with reorders around it, and the slice's backward (a strided
    /// copy into zeros) plus the stride-1 kernel took 2.5, 1.6 and 1.6 ms per forward and backward at batch 128 where
    /// the strided convolution took 6.3, 3.0 and 1.8 ms (8→16 channels at 28×28, 16→32 at 14×14, 32→64 at 7×7; 1 thread,
    /// AVX-512 Zen 4). Its weight, and the parameter names, are those of a strided 1×1 convolution.
    /// </summary>
    public sealed class BasicBlock : nn.Module<Tensor, Tensor>
    {
        private readonly Conv2d conv1;
        private readonly BatchNorm2d bn1;
        private readonly ReLU relu1;
        private readonly Conv2d conv2;
        private readonly BatchNorm2d bn2;
        private readonly Conv2d? shortcutConv;
        private readonly BatchNorm2d? shortcutBn;
        private readonly long shortcutStride;
        private readonly ReLU relu2;

        public BasicBlock(string name, long inChannels, long outChannels, long stride) : base(name)
        {
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
            var y = bn2.call(conv2.call(relu1.call(bn1.call(conv1.call(x)))));
            var s = shortcutConv is null ? x : shortcutBn!.call(shortcutConv.call(Subsample(x, shortcutStride)));
            // Out-of-place add: forward hooks (MAC counter, per-sample Fisher) may hold on to bn2's output.
            return relu2.call(y + s).MoveToOuterDisposeScope();
        }

        /// <summary>Every <paramref name="stride"/>-th pixel of an N×C×H×W map, from the first (a view): what a strided 1×1
        /// convolution without padding reads.</summary>
        internal static Tensor Subsample(Tensor x, long stride) =>
            stride == 1 ? x : x.slice(2, 0, x.shape[2], stride).slice(3, 0, x.shape[3], stride);
    }

    /// <summary>CIFAR stem: 3×3 conv, stride 1, BN, ReLU (no max-pool).</summary>
    public sealed class CifarStem : nn.Module<Tensor, Tensor>
    {
        private readonly Conv2d conv;
        private readonly BatchNorm2d bn;
        private readonly ReLU relu;

        public CifarStem(string name, long inChannels, long outChannels) : base(name)
        {
            conv = nn.Conv2d(inChannels, outChannels, 3, stride: 1, padding: 1, bias: false);
            bn = nn.BatchNorm2d(outChannels);
            relu = nn.ReLU();
            RegisterComponents();
        }

        public override Tensor forward(Tensor x) => relu.call(bn.call(conv.call(x)));
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
            var x = state[0].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2);
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
