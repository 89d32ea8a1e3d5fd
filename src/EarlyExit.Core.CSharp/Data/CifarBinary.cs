using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;

namespace EarlyExit.Data
{
    /// <summary>
    /// CIFAR-10 and CIFAR-100 in the official binary format: per record, label byte(s) then 3072 bytes of a
    /// 32×32 RGB image, channel-planar (1024 R, 1024 G, 1024 B). CIFAR-100 records carry a coarse and a fine label.
    /// </summary>
    public static class CifarBinary
    {
        public const int ImageBytes = 3 * 32 * 32;

        public sealed record Variant(string Name, int LabelBytes, int LabelIndex, int NumClasses, string Folder, string[] TrainFiles, string[] TestFiles, float[] Mean, float[] Std);

        public static readonly Variant Cifar100 = new("cifar100", 2, 1, 100, "cifar-100-binary",
            new[] { "train.bin" }, new[] { "test.bin" },
            new[] { 0.5071f, 0.4865f, 0.4409f }, new[] { 0.2673f, 0.2564f, 0.2762f });

        public static readonly Variant Cifar10 = new("cifar10", 1, 0, 10, "cifar-10-batches-bin",
            Enumerable.Range(1, 5).Select(i => $"data_batch_{i}.bin").ToArray(), new[] { "test_batch.bin" },
            new[] { 0.4914f, 0.4822f, 0.4465f }, new[] { 0.2470f, 0.2435f, 0.2616f });

        /// <summary>Reads one or more files of the variant into one data set; every problem names its file.</summary>
        public static ImageDataset Read(Variant v, IEnumerable<string> files, string name)
        {
            int record = v.LabelBytes + ImageBytes;
            var pixels = new List<byte[]>();
            var labels = new List<int>();
            foreach (var file in files)
            {
                if (!File.Exists(file)) throw new DataFormatException(file, $"file not found ({v.Name} binary format expected)");
                var bytes = File.ReadAllBytes(file);
                if (bytes.Length == 0) throw new DataFormatException(file, "file is empty");
                if (bytes.Length % record != 0)
                    throw new DataFormatException(file, $"truncated or malformed: {bytes.Length} bytes is not a whole number of {record}-byte {v.Name} records");
                int n = bytes.Length / record;
                var px = new byte[(long)n * ImageBytes];
                for (int i = 0; i < n; i++)
                {
                    int off = i * record;
                    for (int l = 0; l < v.LabelBytes; l++)
                    {
                        int limit = v.LabelBytes == 2 && l == 0 ? 20 : v.NumClasses;
                        if (bytes[off + l] >= limit)
                            throw new DataFormatException(file, $"record {i}: label {bytes[off + l]} is out of range 0..{limit - 1}" +
                                (v.LabelBytes == 2 ? (l == 0 ? " (coarse label)" : " (fine label)") : ""));
                    }
                    labels.Add(bytes[off + v.LabelIndex]);
                    Buffer.BlockCopy(bytes, off + v.LabelBytes, px, i * ImageBytes, ImageBytes);
                }
                pixels.Add(px);
            }
            var all = new byte[pixels.Sum(p => (long)p.Length)];
            long at = 0;
            foreach (var p in pixels) { Buffer.BlockCopy(p, 0, all, (int)at, p.Length); at += p.Length; }
            return new ImageDataset(name, all, labels.ToArray(), 3, 32, 32, v.NumClasses, v.Mean, v.Std);
        }

        /// <summary>Reads train and test from <paramref name="folder"/> (the extracted archive's folder).</summary>
        public static (ImageDataset train, ImageDataset test) ReadFolder(Variant v, string folder)
        {
            var missing = v.TrainFiles.Concat(v.TestFiles).Where(f => !File.Exists(Path.Combine(folder, f))).ToList();
            if (missing.Count > 0)
                throw new DataFormatException(null,
                    $"{v.Name} not found: looked for {string.Join(", ", missing)} in {folder}. " +
                    $"Download it with `earlyexit data download {v.Name}` (needs internet), or copy the extracted '{v.Folder}' folder there.");
            return (Read(v, v.TrainFiles.Select(f => Path.Combine(folder, f)), v.Name + "/train"),
                    Read(v, v.TestFiles.Select(f => Path.Combine(folder, f)), v.Name + "/test"));
        }

        /// <summary>Writes records in the official format (used by tests and by anyone making small fixtures).</summary>
        public static void Write(Variant v, string file, byte[] pixels, int[] labels, int[]? coarseLabels = null)
        {
            if (pixels.Length != labels.Length * ImageBytes) throw new ArgumentException("pixels must hold 3072 bytes per label");
            using var stream = File.Create(file);
            for (int i = 0; i < labels.Length; i++)
            {
                if (v.LabelBytes == 2) stream.WriteByte((byte)(coarseLabels?[i] ?? labels[i] / 5));
                stream.WriteByte((byte)labels[i]);
                stream.Write(pixels, i * ImageBytes, ImageBytes);
            }
        }
    }
}
