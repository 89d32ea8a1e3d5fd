using System;
using System.Buffers.Binary;
using System.Globalization;
using System.IO;
using System.Linq;
using System.Text;
using System.Text.RegularExpressions;

namespace EarlyExit.Data
{
    /// <summary>
    /// NumPy's .npy format (versions 1.0, 2.0 and 3.0): the magic "\x93NUMPY", a version, a header length, then a
    /// Python dict literal with 'descr', 'fortran_order' and 'shape', then the array in C order. Read: images as uint8
    /// or float32/float64 in [0, 1] (stored as the bytes round(255·x)), labels as any integer type; written: what the
    /// tests and the exporters need.
    /// </summary>
    public static class NpyFormat
    {
        static readonly byte[] Magic = { 0x93, (byte)'N', (byte)'U', (byte)'M', (byte)'P', (byte)'Y' };

        /// <summary>The header of an array: its dtype ('&lt;f4', '|u1', ...), memory order, shape and where its data begins.</summary>
        public sealed record Header(string Descr, bool FortranOrder, long[] Shape, int DataOffset)
        {
            public long Count => Shape.Aggregate(1L, (a, b) => a * b);
            public char Kind => Descr[^2];
            public int ItemSize => int.Parse(Descr.Substring(2), CultureInfo.InvariantCulture);
            public bool BigEndian => Descr[0] == '>';
        }

        static readonly Regex DescrRx = new(@"'descr'\s*:\s*'([^']*)'", RegexOptions.Compiled);
        static readonly Regex FortranRx = new(@"'fortran_order'\s*:\s*(True|False)", RegexOptions.Compiled);
        static readonly Regex ShapeRx = new(@"'shape'\s*:\s*\(([^)]*)\)", RegexOptions.Compiled);

        /// <summary>Parses the header of the bytes of an .npy file; the message of every failure names the file.</summary>
        public static Header ReadHeader(string file, ReadOnlySpan<byte> b)
        {
            if (b.Length < 10 || !b.Slice(0, 6).SequenceEqual(Magic))
                throw new DataFormatException(file, "not a NumPy .npy file (it does not start with \\x93NUMPY)");
            int major = b[6];
            int headerLength, start;
            if (major == 1) { headerLength = BinaryPrimitives.ReadUInt16LittleEndian(b.Slice(8)); start = 10; }
            else if (major is 2 or 3)
            {
                if (b.Length < 12) throw new DataFormatException(file, "truncated .npy header");
                headerLength = checked((int)BinaryPrimitives.ReadUInt32LittleEndian(b.Slice(8))); start = 12;
            }
            else throw new DataFormatException(file, $".npy format version {major}.{b[7]} is not supported (1.0, 2.0 and 3.0 are)");
            if (start + headerLength > b.Length) throw new DataFormatException(file, $"truncated: the header says {headerLength} bytes, the file holds {b.Length - start}");
            var text = (major == 3 ? Encoding.UTF8 : Encoding.Latin1).GetString(b.Slice(start, headerLength));
            var descr = DescrRx.Match(text);
            var fortran = FortranRx.Match(text);
            var shape = ShapeRx.Match(text);
            if (!descr.Success || !fortran.Success || !shape.Success)
                throw new DataFormatException(file, $"malformed .npy header: {text.Trim()}");
            var d = descr.Groups[1].Value;
            if (!Regex.IsMatch(d, @"^[<>|=][uif][1248]$"))
                throw new DataFormatException(file, $"dtype '{d}' is not supported: give unsigned or signed integers or floats (e.g. '|u1', '<f4', '<i8')");
            if (d[0] == '=') d = (BitConverter.IsLittleEndian ? "<" : ">") + d.Substring(1);
            long[] dims;
            try
            {
                dims = shape.Groups[1].Value.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
                    .Select(s => long.Parse(s.TrimEnd('L'), CultureInfo.InvariantCulture)).ToArray();
            }
            catch (FormatException) { throw new DataFormatException(file, $"malformed shape ({shape.Groups[1].Value})"); }
            var h = new Header(d, fortran.Groups[1].Value == "True", dims, start + headerLength);
            long expected = h.Count * h.ItemSize;
            if (b.Length - h.DataOffset != expected)
                throw new DataFormatException(file, $"truncated or padded: shape ({string.Join(", ", dims)}) of {d} needs {expected} data bytes, the file holds {b.Length - h.DataOffset}");
            return h;
        }

        static byte[] ReadAll(string file)
        {
            if (!File.Exists(file)) throw new DataFormatException(file, "file not found");
            return File.ReadAllBytes(file);
        }

        /// <summary>The header of a file (reads the whole file: the header check includes its length).</summary>
        public static Header ReadHeader(string file) => ReadHeader(file, ReadAll(file));

        static double Element(ReadOnlySpan<byte> data, Header h, long i)
        {
            int size = h.ItemSize;
            var s = data.Slice(checked((int)(i * size)), size);
            Span<byte> buf = stackalloc byte[8];
            s.CopyTo(buf);
            if (h.BigEndian != !BitConverter.IsLittleEndian) buf.Slice(0, size).Reverse();
            return (h.Kind, size) switch
            {
                ('u', 1) => buf[0],
                ('i', 1) => (sbyte)buf[0],
                ('u', 2) => BitConverter.ToUInt16(buf),
                ('i', 2) => BitConverter.ToInt16(buf),
                ('u', 4) => BitConverter.ToUInt32(buf),
                ('i', 4) => BitConverter.ToInt32(buf),
                ('u', 8) => BitConverter.ToUInt64(buf),
                ('i', 8) => BitConverter.ToInt64(buf),
                ('f', 4) => BitConverter.ToSingle(buf),
                ('f', 8) => BitConverter.ToDouble(buf),
                _ => throw new InvalidOperationException($"dtype {h.Descr}"),
            };
        }

        /// <summary>
        /// Images as bytes N×C×H×W. Shapes: (N, H, W) grey; (N, H, W, C) with C = 1 or 3 (NumPy's and PIL's
        /// convention); (N, C, H, W) with C = 1 or 3 where the last axis is not 1 or 3. uint8 as is; floats must lie
        /// in [0, 1] and are stored as round(255·x).
        /// </summary>
        public static (byte[] Pixels, int N, int C, int H, int W) ReadImages(string file)
        {
            var bytes = ReadAll(file);
            var h = ReadHeader(file, bytes);
            if (h.FortranOrder) throw new DataFormatException(file, "a Fortran-order array; save it with numpy.ascontiguousarray first");
            if (h.Kind == 'i' || (h.Kind == 'u' && h.ItemSize != 1))
                throw new DataFormatException(file, $"images of dtype '{h.Descr}': give uint8 (0..255) or float32 in [0, 1]");
            var s = h.Shape;
            bool channelsLast;
            int n, c, height, width;
            if (s.Length == 3) { channelsLast = true; (n, height, width, c) = ((int)s[0], (int)s[1], (int)s[2], 1); }
            else if (s.Length == 4 && (s[3] == 1 || s[3] == 3)) { channelsLast = true; (n, height, width, c) = ((int)s[0], (int)s[1], (int)s[2], (int)s[3]); }
            else if (s.Length == 4 && (s[1] == 1 || s[1] == 3)) { channelsLast = false; (n, c, height, width) = ((int)s[0], (int)s[1], (int)s[2], (int)s[3]); }
            else throw new DataFormatException(file, $"images of shape ({string.Join(", ", s)}): give (N, H, W), (N, H, W, C) or (N, C, H, W) with C = 1 or 3");
            if (n == 0 || height == 0 || width == 0) throw new DataFormatException(file, "no images (an axis of length 0)");
            var data = bytes.AsSpan(h.DataOffset);
            var pixels = new byte[(long)n * c * height * width];
            int plane = height * width;
            for (long i = 0; i < h.Count; i++)
            {
                byte v;
                if (h.Kind == 'u') v = data[(int)i];
                else
                {
                    var x = Element(data, h, i);
                    if (!(x >= 0.0 && x <= 1.0))
                        throw new DataFormatException(file, $"element {i} is {x.ToString(CultureInfo.InvariantCulture)}: float images must lie in [0, 1]");
                    v = (byte)Math.Round(255.0 * x, MidpointRounding.AwayFromZero);
                }
                long target;
                if (channelsLast)
                {
                    long sample = i / ((long)plane * c), rest = i % ((long)plane * c);
                    long pixel = rest / c, channel = rest % c;
                    target = sample * plane * c + channel * plane + pixel;
                }
                else target = i;
                pixels[target] = v;
            }
            return (pixels, n, c, height, width);
        }

        /// <summary>Labels: a 1-D array of any integer type, each ≥ 0.</summary>
        public static int[] ReadLabels(string file)
        {
            var bytes = ReadAll(file);
            var h = ReadHeader(file, bytes);
            if (h.Kind == 'f') throw new DataFormatException(file, $"labels of dtype '{h.Descr}': give integers (e.g. int64)");
            if (h.Shape.Length != 1) throw new DataFormatException(file, $"labels of shape ({string.Join(", ", h.Shape)}): give a 1-D array, one class index per image");
            var data = bytes.AsSpan(h.DataOffset);
            var labels = new int[h.Count];
            for (long i = 0; i < h.Count; i++)
            {
                var x = Element(data, h, i);
                if (x < 0 || x > int.MaxValue) throw new DataFormatException(file, $"label {x.ToString(CultureInfo.InvariantCulture)} of sample {i}: a class index is an integer ≥ 0");
                labels[i] = (int)x;
            }
            return labels;
        }

        /// <summary>Writes an array in format 1.0 (C order); <paramref name="data"/> holds its bytes in the dtype given.</summary>
        public static void Write(string file, string descr, long[] shape, ReadOnlySpan<byte> data)
        {
            var shapeText = shape.Length == 1 ? $"({shape[0]},)" : "(" + string.Join(", ", shape) + ")";
            var dict = $"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shapeText}, }}";
            int unpadded = 10 + dict.Length + 1;
            int pad = (64 - unpadded % 64) % 64;
            var header = dict + new string(' ', pad) + "\n";
            using var f = File.Create(file);
            f.Write(Magic);
            f.WriteByte(1); f.WriteByte(0);
            Span<byte> len = stackalloc byte[2];
            BinaryPrimitives.WriteUInt16LittleEndian(len, (ushort)header.Length);
            f.Write(len);
            f.Write(Encoding.Latin1.GetBytes(header));
            f.Write(data);
        }
    }

    /// <summary>
    /// A data set of .npy files in one folder: train-images.npy, train-labels.npy, test-images.npy, test-labels.npy.
    /// The number of classes is one more than the largest label; channel means and deviations come from the training images.
    /// </summary>
    public static class NpyFolder
    {
        public static readonly string[] Files = { "train-images.npy", "train-labels.npy", "test-images.npy", "test-labels.npy" };

        public static bool IsPresent(string folder) => Files.All(f => File.Exists(Path.Combine(folder, f)));

        static (byte[] pixels, int[] labels, int c, int h, int w) Part(string folder, string part)
        {
            var imageFile = Path.Combine(folder, $"{part}-images.npy");
            var labelFile = Path.Combine(folder, $"{part}-labels.npy");
            if (!File.Exists(imageFile))
                throw new DataFormatException(imageFile, $"file not found; an npy data set is a folder with {string.Join(", ", Files)}");
            var (pixels, n, c, h, w) = NpyFormat.ReadImages(imageFile);
            var labels = NpyFormat.ReadLabels(labelFile);
            if (labels.Length != n) throw new DataFormatException(labelFile, $"{labels.Length} labels for {n} images in {imageFile}");
            return (pixels, labels, c, h, w);
        }

        public static (ImageDataset train, ImageDataset test) ReadFolder(string folder)
        {
            var tr = Part(folder, "train");
            var te = Part(folder, "test");
            if ((tr.c, tr.h, tr.w) != (te.c, te.h, te.w))
                throw new DataFormatException(Path.Combine(folder, "test-images.npy"), $"test images are {te.c}×{te.h}×{te.w}, training images {tr.c}×{tr.h}×{tr.w}");
            int classes = Math.Max(tr.labels.Max(), te.labels.Max()) + 1;
            var (mean, std) = ChannelStatistics.Of(tr.pixels, tr.c, tr.h * tr.w);
            var name = Path.GetFileName(Path.TrimEndingDirectorySeparator(Path.GetFullPath(folder)));
            return (new ImageDataset($"npy:{name}/train", tr.pixels, tr.labels, tr.c, tr.h, tr.w, classes, mean, std),
                    new ImageDataset($"npy:{name}/test", te.pixels, te.labels, te.c, te.h, te.w, classes, mean, std));
        }

        /// <summary>Shape and number of classes, from the headers and the labels (the images are not converted).</summary>
        public static (int C, int H, int W, int Classes) Describe(string folder)
        {
            var (tr, te) = ReadFolder(folder);
            return (tr.Channels, tr.Height, tr.Width, tr.NumClasses);
        }
    }

    /// <summary>Per-channel mean and standard deviation of images (bytes N×C×H×W), in [0, 1] units.</summary>
    public static class ChannelStatistics
    {
        /// <summary>The statistics of images N×C×P (P pixels per channel plane).</summary>
        public static (float[] Mean, float[] Std) Of(byte[] pixels, int channels, int plane)
        {
            if (channels <= 0 || plane <= 0) throw new ArgumentException("channels and plane size must be positive");
            var sum = new double[channels];
            var sq = new double[channels];
            long samples = pixels.LongLength / ((long)channels * plane);
            for (long s = 0; s < samples; s++)
                for (int c = 0; c < channels; c++)
                {
                    long at = (s * channels + c) * plane;
                    for (int p = 0; p < plane; p++) { double x = pixels[at + p] / 255.0; sum[c] += x; sq[c] += x * x; }
                }
            long count = samples * plane;
            var mean = new float[channels];
            var std = new float[channels];
            for (int c = 0; c < channels; c++)
            {
                double m = sum[c] / count;
                mean[c] = (float)m;
                // A constant channel would divide by 0: its deviation is taken as 1.
                double v = Math.Max(0.0, sq[c] / count - m * m);
                std[c] = v > 1e-12 ? (float)Math.Sqrt(v) : 1f;
            }
            return (mean, std);
        }
    }
}
