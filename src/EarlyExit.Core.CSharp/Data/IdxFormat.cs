using System;
using System.IO;
using System.IO.Compression;

namespace EarlyExit.Data
{
    /// <summary>
    /// The IDX format of MNIST and Fashion-MNIST (big-endian magic 0x00000801 for labels, 0x00000803 for images,
    /// then the dimensions), plain or gzipped (recognised by the gzip magic bytes, not the file name).
    /// </summary>
    public static class IdxFormat
    {
        public const int LabelMagic = 0x00000801;
        public const int ImageMagic = 0x00000803;

        static byte[] ReadMaybeGzip(string file)
        {
            if (!File.Exists(file)) throw new DataFormatException(file, "file not found");
            var raw = File.ReadAllBytes(file);
            if (raw.Length >= 2 && raw[0] == 0x1f && raw[1] == 0x8b)
            {
                try
                {
                    using var gz = new GZipStream(new MemoryStream(raw), CompressionMode.Decompress);
                    using var ms = new MemoryStream();
                    gz.CopyTo(ms);
                    return ms.ToArray();
                }
                catch (InvalidDataException e) { throw new DataFormatException(file, $"corrupt gzip stream: {e.Message}"); }
                catch (EndOfStreamException) { throw new DataFormatException(file, "truncated gzip stream"); }
            }
            return raw;
        }

        static void CheckMagic(string file, byte[] b, int expected, string kind)
        {
            if (b.Length < 4) throw new DataFormatException(file, $"truncated: {b.Length} bytes, too short for an IDX {kind} file");
            int magic = BigEndian(b, 0);
            if (magic != expected) throw new DataFormatException(file, $"wrong magic number 0x{magic:x8}; an IDX {kind} file starts with 0x{expected:x8}");
        }

        static int BigEndian(byte[] b, int at) => b[at] << 24 | b[at + 1] << 16 | b[at + 2] << 8 | b[at + 3];

        public static int[] ReadLabels(string file, int numClasses)
        {
            var b = ReadMaybeGzip(file);
            CheckMagic(file, b, LabelMagic, "label");
            if (b.Length < 8) throw new DataFormatException(file, $"truncated: {b.Length} bytes, an IDX label file has at least 8");
            int n = BigEndian(b, 4);
            if (n < 0 || b.Length != 8 + n)
                throw new DataFormatException(file, $"truncated or malformed: header says {n} labels, file holds {b.Length - 8}");
            var labels = new int[n];
            for (int i = 0; i < n; i++)
            {
                labels[i] = b[8 + i];
                if (labels[i] >= numClasses) throw new DataFormatException(file, $"label {labels[i]} of sample {i} is out of range 0..{numClasses - 1}");
            }
            return labels;
        }

        public static (byte[] pixels, int count, int height, int width) ReadImages(string file)
        {
            var b = ReadMaybeGzip(file);
            CheckMagic(file, b, ImageMagic, "image");
            if (b.Length < 16) throw new DataFormatException(file, $"truncated: {b.Length} bytes, an IDX image file has at least 16");
            int n = BigEndian(b, 4), h = BigEndian(b, 8), w = BigEndian(b, 12);
            if (n < 0 || h <= 0 || w <= 0) throw new DataFormatException(file, $"malformed header: {n} images of {h}x{w}");
            long expected = 16 + (long)n * h * w;
            if (b.LongLength != expected)
                throw new DataFormatException(file, $"truncated or malformed: header says {n} images of {h}x{w} ({expected} bytes), file holds {b.LongLength}");
            var pixels = new byte[(long)n * h * w];
            Buffer.BlockCopy(b, 16, pixels, 0, pixels.Length);
            return (pixels, n, h, w);
        }

        public static void WriteLabels(string file, int[] labels, bool gzip)
        {
            var b = new byte[8 + labels.Length];
            Put(b, 0, LabelMagic); Put(b, 4, labels.Length);
            for (int i = 0; i < labels.Length; i++) b[8 + i] = (byte)labels[i];
            Write(file, b, gzip);
        }

        public static void WriteImages(string file, byte[] pixels, int count, int height, int width, bool gzip)
        {
            var b = new byte[16 + pixels.Length];
            Put(b, 0, ImageMagic); Put(b, 4, count); Put(b, 8, height); Put(b, 12, width);
            Buffer.BlockCopy(pixels, 0, b, 16, pixels.Length);
            Write(file, b, gzip);
        }

        static void Put(byte[] b, int at, int v) { b[at] = (byte)(v >> 24); b[at + 1] = (byte)(v >> 16); b[at + 2] = (byte)(v >> 8); b[at + 3] = (byte)v; }

        static void Write(string file, byte[] b, bool gzip)
        {
            using var f = File.Create(file);
            if (gzip) { using var gz = new GZipStream(f, CompressionLevel.Fastest); gz.Write(b); }
            else f.Write(b);
        }
    }

    /// <summary>Fashion-MNIST (Xiao et al. 2017): 60,000 training and 10,000 test images, 1×28×28, 10 classes.</summary>
    public static class FashionMnist
    {
        public const string DebianFolder = "/usr/share/datasets/fashion-mnist";
        public static readonly float[] Mean = { 0.2860f };
        public static readonly float[] Std = { 0.3530f };

        static string Find(string folder, string stem)
        {
            foreach (var candidate in new[] { stem + ".gz", stem })
            {
                var p = Path.Combine(folder, candidate);
                if (File.Exists(p)) return p;
            }
            throw NotFound(stem, folder);
        }

        /// <summary>The error for a missing file: what was looked for, where (<paramref name="places"/>), and how to get it.</summary>
        internal static DataFormatException NotFound(string stem, string places) =>
            new(null, $"Fashion-MNIST not found: looked for {stem}(.gz) in {places}. " +
                      $"Install it with `apt-get install -y dataset-fashion-mnist` (puts it in {DebianFolder}), or pass the folder that holds the IDX files.");

        public static (ImageDataset train, ImageDataset test) ReadFolder(string folder)
        {
            ImageDataset Part(string images, string labels, string name)
            {
                var imageFile = Find(folder, images);
                var labelFile = Find(folder, labels);
                var (pixels, n, h, w) = IdxFormat.ReadImages(imageFile);
                var l = IdxFormat.ReadLabels(labelFile, 10);
                if (l.Length != n) throw new DataFormatException(labelFile, $"{l.Length} labels for {n} images in {imageFile}");
                return new ImageDataset(name, pixels, l, 1, h, w, 10, Mean, Std);
            }
            return (Part("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "fashion-mnist/train"),
                    Part("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "fashion-mnist/test"));
        }
    }
}
