using System;
using System.Linq;
using TorchSharp;
using static TorchSharp.torch;

namespace EarlyExit.Data
{
    /// <summary>A data set file is missing, truncated or malformed; the message names the file and what is wrong.</summary>
    public sealed class DataFormatException : Exception
    {
        public string? File { get; }
        public DataFormatException(string? file, string message) : base(file is null ? message : $"{file}: {message}") { File = file; }
    }

    /// <summary>
    /// Images held in memory as bytes, sample-major and channel-planar (N×C×H×W), with integer labels.
    /// Normalisation uses per-channel mean and standard deviation in [0, 1] units.
    /// </summary>
    public sealed class ImageDataset
    {
        public string Name { get; }
        public byte[] Pixels { get; }
        public int[] Labels { get; }
        public int Channels { get; }
        public int Height { get; }
        public int Width { get; }
        public int NumClasses { get; }
        public float[] Mean { get; }
        public float[] Std { get; }

        public int Count => Labels.Length;
        public int SampleSize => Channels * Height * Width;
        public long[] Shape => new long[] { Channels, Height, Width };

        public ImageDataset(string name, byte[] pixels, int[] labels, int channels, int height, int width, int numClasses, float[] mean, float[] std)
        {
            if (pixels.LongLength != (long)labels.Length * channels * height * width)
                throw new ArgumentException($"{name}: {pixels.LongLength} pixel bytes for {labels.Length} images of {channels}x{height}x{width}");
            if (mean.Length != channels || std.Length != channels)
                throw new ArgumentException($"{name}: mean and std need {channels} values");
            for (int i = 0; i < labels.Length; i++)
                if (labels[i] < 0 || labels[i] >= numClasses)
                    throw new ArgumentException($"{name}: label {labels[i]} of sample {i} is outside 0..{numClasses - 1}");
            Name = name; Pixels = pixels; Labels = labels; Channels = channels; Height = height; Width = width;
            NumClasses = numClasses; Mean = mean; Std = std;
        }

        /// <summary>The samples at <paramref name="indices"/>, as a new data set.</summary>
        public ImageDataset Subset(int[] indices, string? name = null)
        {
            int s = SampleSize;
            var pixels = new byte[(long)indices.Length * s];
            var labels = new int[indices.Length];
            for (int i = 0; i < indices.Length; i++)
            {
                Array.Copy(Pixels, (long)indices[i] * s, pixels, (long)i * s, s);
                labels[i] = Labels[indices[i]];
            }
            return new ImageDataset(name ?? Name, pixels, labels, Channels, Height, Width, NumClasses, Mean, Std);
        }

        /// <summary>The first <paramref name="count"/> samples of a stratified, seeded shuffle (for smoke scales).</summary>
        public ImageDataset Take(int count, int seed)
        {
            if (count >= Count) return this;
            var (keep, _) = Splits.Stratified(Labels, NumClasses, (double)count / Count, seed);
            return Subset(keep, Name);
        }

        /// <summary>Images of a batch as a float tensor N×C×H×W, normalised, on <paramref name="device"/>.</summary>
        public Tensor Images(ReadOnlySpan<int> indices, Device? device = null)
        {
            int s = SampleSize;
            var buffer = new byte[(long)indices.Length * s];
            for (int i = 0; i < indices.Length; i++) Array.Copy(Pixels, (long)indices[i] * s, buffer, (long)i * s, s);
            using var scope = NewDisposeScope();
            var raw = tensor(buffer, new long[] { indices.Length, Channels, Height, Width });
            var mean = tensor(Mean).reshape(1, Channels, 1, 1);
            var std = tensor(Std).reshape(1, Channels, 1, 1);
            using var full = 255f.ToScalar();
            var x = raw.to_type(ScalarType.Float32).div_(full).sub_(mean).div_(std);
            if (device is not null && device.type != DeviceType.CPU) x = x.to(device);
            return x.MoveToOuterDisposeScope();
        }

        /// <summary>Labels of a batch as an int64 tensor.</summary>
        public Tensor LabelTensor(ReadOnlySpan<int> indices, Device? device = null)
        {
            var l = new long[indices.Length];
            for (int i = 0; i < indices.Length; i++) l[i] = Labels[indices[i]];
            var t = tensor(l);
            if (device is not null && device.type != DeviceType.CPU) { var moved = t.to(device); t.Dispose(); return moved; }
            return t;
        }

        /// <summary>Per-channel mean and standard deviation of the pixels in [0, 1] units.</summary>
        public static (float[] mean, float[] std) ChannelStatistics(byte[] pixels, int count, int channels, int plane)
        {
            var mean = new float[channels];
            var std = new float[channels];
            for (int c = 0; c < channels; c++)
            {
                double sum = 0, sq = 0;
                for (int n = 0; n < count; n++)
                {
                    long off = ((long)n * channels + c) * plane;
                    for (int p = 0; p < plane; p++) { double v = pixels[off + p] / 255.0; sum += v; sq += v * v; }
                }
                double total = (double)count * plane;
                double m = sum / total;
                mean[c] = (float)m;
                std[c] = (float)Math.Sqrt(Math.Max(sq / total - m * m, 1e-12));
            }
            return (mean, std);
        }
    }

    /// <summary>Train and test parts of a data set, plus the validation split carved from train.</summary>
    public sealed record DataSplits(ImageDataset Train, ImageDataset Validation, ImageDataset Test, string Source);
}
