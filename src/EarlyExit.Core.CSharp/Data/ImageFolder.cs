using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using SkiaSharp;

namespace EarlyExit.Data
{
    /// <summary>
    /// A data set of image files: ROOT/train/CLASS/*.png|jpg|jpeg|bmp|gif|webp and ROOT/test/CLASS/*, one subfolder per
    /// class. Classes are the training subfolders in ordinal order of their names (label 0 is the first); a test
    /// subfolder that names no training class is an error. Every image must have the size of the first one (resize
    /// beforehand); the set has one channel when every file is stored grey, three (RGB, alpha dropped) otherwise.
    /// Decoded with SkiaSharp. Channel means and deviations come from the training images.
    /// </summary>
    public static class ImageFolder
    {
        public static readonly string[] Extensions = { ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp" };

        public static bool IsPresent(string folder) => Directory.Exists(Path.Combine(folder, "train")) && Directory.Exists(Path.Combine(folder, "test"));

        /// <summary>The class names: the subfolders of ROOT/train, in ordinal order.</summary>
        public static string[] ClassesOf(string folder)
        {
            var train = Path.Combine(folder, "train");
            if (!Directory.Exists(train))
                throw new DataFormatException(train, "folder not found; an image-folder data set has ROOT/train/CLASS/* and ROOT/test/CLASS/*");
            var classes = Directory.GetDirectories(train).Select(Path.GetFileName).Select(n => n!).OrderBy(n => n, StringComparer.Ordinal).ToArray();
            if (classes.Length < 2) throw new DataFormatException(train, $"{classes.Length} class subfolder(s); give one subfolder per class, at least two");
            return classes;
        }

        static (string file, int label)[] FilesOf(string folder, string part, string[] classes)
        {
            var dir = Path.Combine(folder, part);
            if (!Directory.Exists(dir))
                throw new DataFormatException(dir, "folder not found; an image-folder data set has ROOT/train/CLASS/* and ROOT/test/CLASS/*");
            var index = classes.Select((c, i) => (c, i)).ToDictionary(p => p.c, p => p.i, StringComparer.Ordinal);
            var files = new List<(string, int)>();
            foreach (var sub in Directory.GetDirectories(dir).OrderBy(d => d, StringComparer.Ordinal))
            {
                var name = Path.GetFileName(sub);
                if (!index.TryGetValue(name, out int label))
                    throw new DataFormatException(sub, $"class '{name}' has no training folder; classes: {string.Join(", ", classes)}");
                foreach (var f in Directory.GetFiles(sub).OrderBy(f => f, StringComparer.Ordinal))
                    if (Extensions.Contains(Path.GetExtension(f).ToLowerInvariant())) files.Add((f, label));
            }
            if (files.Count == 0) throw new DataFormatException(dir, $"no image files ({string.Join(", ", Extensions)}) in its class subfolders");
            return files.ToArray();
        }

        static SKCodec Open(string file)
        {
            var codec = SKCodec.Create(file, out var result);
            if (codec is null) throw new DataFormatException(file, $"not a decodable image ({result})");
            return codec;
        }

        /// <summary>Size and colour of one file, from its header.</summary>
        static (int W, int H, bool Grey) Peek(string file)
        {
            using var codec = Open(file);
            return (codec.Info.Width, codec.Info.Height, codec.Info.ColorType == SKColorType.Gray8);
        }

        static void Decode(string file, int w, int h, int channels, byte[] into, long at)
        {
            using var codec = Open(file);
            if (codec.Info.Width != w || codec.Info.Height != h)
                throw new DataFormatException(file, $"{codec.Info.Width}×{codec.Info.Height} pixels, the first image is {w}×{h}; resize the images to one size");
            int plane = w * h;
            if (channels == 1)
            {
                var info = new SKImageInfo(w, h, SKColorType.Gray8, SKAlphaType.Opaque);
                using var bmp = new SKBitmap(info);
                var r = codec.GetPixels(info, bmp.GetPixels());
                if (r is not (SKCodecResult.Success or SKCodecResult.IncompleteInput)) throw new DataFormatException(file, $"could not decode ({r})");
                if (r == SKCodecResult.IncompleteInput) throw new DataFormatException(file, "truncated image");
                bmp.GetPixelSpan().Slice(0, plane).CopyTo(into.AsSpan((int)at, plane));
            }
            else
            {
                var info = new SKImageInfo(w, h, SKColorType.Rgba8888, SKAlphaType.Unpremul);
                using var bmp = new SKBitmap(info);
                var r = codec.GetPixels(info, bmp.GetPixels());
                if (r == SKCodecResult.IncompleteInput) throw new DataFormatException(file, "truncated image");
                if (r != SKCodecResult.Success) throw new DataFormatException(file, $"could not decode ({r})");
                var px = bmp.GetPixelSpan();
                for (int p = 0; p < plane; p++)
                {
                    into[at + p] = px[4 * p];
                    into[at + plane + p] = px[4 * p + 1];
                    into[at + 2 * plane + p] = px[4 * p + 2];
                }
            }
        }

        /// <summary>Shape and classes from the files' headers (nothing is decoded).</summary>
        public static (int C, int H, int W, int Classes) Describe(string folder)
        {
            var classes = ClassesOf(folder);
            var files = FilesOf(folder, "train", classes).Concat(FilesOf(folder, "test", classes)).ToArray();
            var (w, h, _) = Peek(files[0].file);
            bool grey = true;
            foreach (var (f, _) in files)
            {
                var p = Peek(f);
                if (p.W != w || p.H != h) throw new DataFormatException(f, $"{p.W}×{p.H} pixels, the first image is {w}×{h}; resize the images to one size");
                grey &= p.Grey;
            }
            return (grey ? 1 : 3, h, w, classes.Length);
        }

        public static (ImageDataset train, ImageDataset test) ReadFolder(string folder)
        {
            var (c, h, w, _) = Describe(folder);
            var classes = ClassesOf(folder);
            ImageDataset Part(string part, float[]? mean, float[]? std)
            {
                var files = FilesOf(folder, part, classes);
                long size = (long)c * h * w;
                var pixels = new byte[files.Length * size];
                for (int i = 0; i < files.Length; i++) Decode(files[i].file, w, h, c, pixels, i * size);
                if (mean is null || std is null) (mean, std) = ChannelStatistics.Of(pixels, c, h * w);
                var name = Path.GetFileName(Path.TrimEndingDirectorySeparator(Path.GetFullPath(folder)));
                return new ImageDataset($"image-folder:{name}/{part}", pixels, files.Select(f => f.label).ToArray(), c, h, w, classes.Length, mean, std);
            }
            var train = Part("train", null, null);
            return (train, Part("test", train.Mean, train.Std));
        }
    }
}
