using System;
using TorchSharp;
using static TorchSharp.torch;

namespace EarlyExit.Data
{
    /// <summary>
    /// Random crop with zero padding and horizontal flip, applied to a whole batch with tensor operations
    /// (one gather per axis), seeded by its own generator.
    /// </summary>
    public sealed class CropFlip
    {
        private readonly Generator generator;
        public int Padding { get; }
        public bool Flip { get; }

        public CropFlip(int padding, bool flip, long seed)
        {
            if (padding < 0) throw new ArgumentOutOfRangeException(nameof(padding), "padding must be non-negative");
            Padding = padding; Flip = flip;
            generator = new Generator((ulong)seed);
        }

        public Tensor Apply(Tensor x)
        {
            if (x.dim() != 4) throw new ArgumentException($"CropFlip expects N×C×H×W, got [{string.Join(", ", x.shape)}]");
            using var scope = NewDisposeScope();
            long n = x.shape[0], c = x.shape[1], h = x.shape[2], w = x.shape[3];
            var y = x;
            if (Padding > 0)
            {
                int p = Padding;
                var padded = nn.functional.pad(x, new long[] { p, p, p, p });
                var dy = randint(0, 2 * p + 1, new long[] { n, 1 }, generator: generator).to(x.device);
                var dx = randint(0, 2 * p + 1, new long[] { n, 1 }, generator: generator).to(x.device);
                using var height = h.ToScalar();
                using var width = w.ToScalar();
                var rows = (dy + arange(height, device: x.device).unsqueeze(0)).reshape(n, 1, h, 1).expand(n, c, h, w + 2 * p);
                y = padded.gather(2, rows);
                var cols = (dx + arange(width, device: x.device).unsqueeze(0)).reshape(n, 1, 1, w).expand(n, c, h, w);
                y = y.gather(3, cols);
            }
            if (Flip)
            {
                using var half = 0.5.ToScalar();
                var mask = rand(new long[] { n }, generator: generator).lt(half).to(x.device).reshape(n, 1, 1, 1);
                y = where(mask, y.flip(3), y);
            }
            return (ReferenceEquals(y, x) ? x.clone() : y).MoveToOuterDisposeScope();
        }
    }

    /// <summary>Settings of Mixup and CutMix, timm style. Defaults: mixup α 0.8, cutmix α 1.0, switch probability 0.5, smoothing 0.1.</summary>
    public sealed record MixSettings
    {
        public double MixupAlpha { get; init; } = 0.8;
        public double CutmixAlpha { get; init; } = 1.0;
        /// <summary>Probability of mixing a batch at all.</summary>
        public double Probability { get; init; } = 1.0;
        /// <summary>Probability of CutMix instead of Mixup when both are enabled.</summary>
        public double SwitchProbability { get; init; } = 0.5;
        public double LabelSmoothing { get; init; } = 0.1;
    }

    /// <summary>What a mix did to a batch (for tests and logs).</summary>
    public sealed record MixInfo(bool Mixed, bool Cutmix, double Lambda, int Top, int Bottom, int Left, int Right);

    /// <summary>
    /// Mixup and CutMix in timm's batch mode: one λ per batch, the batch mixed with its own reverse, soft targets
    /// one_hot·λ + one_hot(reversed)·(1−λ) with label smoothing. CutMix λ is corrected to the pasted area.
    /// </summary>
    public sealed class MixupCutmix
    {
        private readonly Random rng;
        public MixSettings Settings { get; }
        public int NumClasses { get; }

        public MixupCutmix(MixSettings settings, int numClasses, int seed)
        {
            if (settings.MixupAlpha < 0 || settings.CutmixAlpha < 0) throw new ArgumentException("mix alphas must be non-negative");
            if (settings.Probability < 0 || settings.Probability > 1 || settings.SwitchProbability < 0 || settings.SwitchProbability > 1)
                throw new ArgumentException("mix probabilities must lie in [0, 1]");
            if (settings.LabelSmoothing < 0 || settings.LabelSmoothing >= 1) throw new ArgumentException("label smoothing must lie in [0, 1)");
            Settings = settings; NumClasses = numClasses; rng = new Random(seed);
        }

        /// <summary>One-hot targets with smoothing: off = s/C, on = 1 − s + s/C.</summary>
        public static Tensor SmoothOneHot(Tensor labels, int numClasses, double smoothing)
        {
            double off = smoothing / numClasses, on = 1.0 - smoothing + off;
            using var scope = NewDisposeScope();
            using var offValue = off.ToScalar();
            using var onValue = on.ToScalar();
            var t = full(new long[] { labels.shape[0], numClasses }, offValue, dtype: ScalarType.Float32, device: labels.device);
            t.scatter_(1, labels.unsqueeze(1), full(new long[] { labels.shape[0], 1 }, onValue, dtype: ScalarType.Float32, device: labels.device));
            return t.MoveToOuterDisposeScope();
        }

        /// <summary>Mixes the batch (a new tensor) and returns soft targets N×C.</summary>
        public (Tensor images, Tensor targets, MixInfo info) Apply(Tensor x, Tensor labels)
        {
            long n = x.shape[0];
            if (labels.shape[0] != n) throw new ArgumentException($"{n} images but {labels.shape[0]} labels");
            bool useMix = rng.NextDouble() < Settings.Probability && (Settings.MixupAlpha > 0 || Settings.CutmixAlpha > 0);
            using var scope = NewDisposeScope();
            if (!useMix)
            {
                // Not mixed: plain targets, without smoothing (timm applies smoothing only through the mixing path).
                var plain = SmoothOneHot(labels, NumClasses, 0.0);
                return (x.clone().MoveToOuterDisposeScope(), plain.MoveToOuterDisposeScope(), new MixInfo(false, false, 1, 0, 0, 0, 0));
            }
            bool cutmix = Settings.MixupAlpha > 0 && Settings.CutmixAlpha > 0
                ? rng.NextDouble() < Settings.SwitchProbability
                : Settings.CutmixAlpha > 0;
            double lam = Beta(cutmix ? Settings.CutmixAlpha : Settings.MixupAlpha);
            var reversed = x.flip(0);
            Tensor mixed;
            MixInfo info;
            if (cutmix)
            {
                int h = (int)x.shape[2], w = (int)x.shape[3];
                double cutRatio = Math.Sqrt(1 - lam);
                int cutH = (int)(h * cutRatio), cutW = (int)(w * cutRatio);
                int cy = rng.Next(h), cx = rng.Next(w);
                int top = Math.Clamp(cy - cutH / 2, 0, h), bottom = Math.Clamp(cy + cutH / 2, 0, h);
                int left = Math.Clamp(cx - cutW / 2, 0, w), right = Math.Clamp(cx + cutW / 2, 0, w);
                mixed = x.clone();
                if (bottom > top && right > left)
                    mixed[.., .., TensorIndex.Slice(top, bottom), TensorIndex.Slice(left, right)] =
                        reversed[.., .., TensorIndex.Slice(top, bottom), TensorIndex.Slice(left, right)];
                lam = 1 - (double)(bottom - top) * (right - left) / (h * w);
                info = new MixInfo(true, true, lam, top, bottom, left, right);
            }
            else
            {
                using var keep = lam.ToScalar();
                using var take = (1 - lam).ToScalar();
                mixed = x.mul(keep) + reversed.mul(take);
                info = new MixInfo(true, false, lam, 0, 0, 0, 0);
            }
            var y1 = SmoothOneHot(labels, NumClasses, Settings.LabelSmoothing);
            var y2 = SmoothOneHot(labels.flip(0), NumClasses, Settings.LabelSmoothing);
            using var weight1 = lam.ToScalar();
            using var weight2 = (1 - lam).ToScalar();
            var targets = y1.mul(weight1) + y2.mul(weight2);
            return (mixed.MoveToOuterDisposeScope(), targets.MoveToOuterDisposeScope(), info);
        }

        double Beta(double alpha)
        {
            double a = Gamma(alpha), b = Gamma(alpha);
            return a + b == 0 ? 0.5 : a / (a + b);
        }

        // Marsaglia and Tsang (2000); for shape < 1 the boost Gamma(a) = Gamma(a+1)·U^(1/a).
        double Gamma(double shape)
        {
            if (shape < 1) return Gamma(shape + 1) * Math.Pow(rng.NextDouble(), 1.0 / shape);
            double d = shape - 1.0 / 3, c = 1 / Math.Sqrt(9 * d);
            while (true)
            {
                double x, v;
                do
                {
                    double u1 = 1.0 - rng.NextDouble(), u2 = rng.NextDouble();
                    x = Math.Sqrt(-2 * Math.Log(u1)) * Math.Cos(2 * Math.PI * u2);
                    v = 1 + c * x;
                } while (v <= 0);
                v = v * v * v;
                double u = rng.NextDouble();
                if (u < 1 - 0.0331 * x * x * x * x) return d * v;
                if (Math.Log(u) < 0.5 * x * x + d * (1 - v + Math.Log(v))) return d * v;
            }
        }
    }
}
