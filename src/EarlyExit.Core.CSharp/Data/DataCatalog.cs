using System;
using System.Formats.Tar;
using System.IO;
using System.IO.Compression;
using System.Linq;
using System.Net.Http;
using System.Security.Cryptography;
using System.Threading;
using System.Threading.Tasks;

namespace EarlyExit.Data
{
    /// <summary>
    /// Where data sets live and how to load them by name: the built-in cifar100, cifar10 and fashion-mnist, and a
    /// user's own images, "image-folder" (ImageFolder) or "npy" (NpyFolder), read from the folder given as the root.
    /// </summary>
    public static class DataCatalog
    {
        public const string RootVariable = "EARLYEXIT_DATA";
        public static readonly string[] BuiltIn = { "cifar100", "cifar10", "fashion-mnist" };
        /// <summary>A user's own data: the root is the folder that holds it.</summary>
        public static readonly string[] OwnFormats = { "image-folder", "npy" };
        public static readonly string[] Names = BuiltIn.Concat(OwnFormats).ToArray();

        /// <summary>True for image-folder and npy, whose root is the data's own folder (and must be given).</summary>
        public static bool IsOwnFormat(string name) => OwnFormats.Contains(Normalise(name));

        /// <summary>
        /// For a user's own data: SHA-256 (20 hex digits) over every file under its folder, by relative path, size and
        /// last write time, so that a changed file changes what caches key on. Empty for the built-in sets.
        /// </summary>
        public static string Fingerprint(string name, string? root)
        {
            if (!IsOwnFormat(name)) return "";
            var folder = FolderOf(name, root);
            if (!Directory.Exists(folder)) return "missing";
            var sb = new System.Text.StringBuilder();
            foreach (var f in Directory.GetFiles(folder, "*", SearchOption.AllDirectories).OrderBy(f => f, StringComparer.Ordinal))
            {
                var info = new FileInfo(f);
                sb.Append(Path.GetRelativePath(folder, f)).Append('|').Append(info.Length).Append('|').Append(info.LastWriteTimeUtc.Ticks).Append('\n');
            }
            return Convert.ToHexString(SHA256.HashData(System.Text.Encoding.UTF8.GetBytes(sb.ToString()))).Substring(0, 20).ToLowerInvariant();
        }

        /// <summary>Channels, height, width and number of classes of a data set, as read from its files.</summary>
        public static (int C, int H, int W, int Classes) Describe(string name, string? root)
        {
            var n = Normalise(name);
            var folder = FolderOf(n, root);
            return n switch
            {
                "image-folder" => ImageFolder.Describe(folder),
                "npy" => NpyFolder.Describe(folder),
                "fashion-mnist" => (1, 28, 28, 10),
                "cifar10" => (3, 32, 32, 10),
                _ => (3, 32, 32, 100),
            };
        }

        /// <summary>Default data root: $EARLYEXIT_DATA, else ~/.local/share/earlyexit/data.</summary>
        public static string DefaultRoot()
        {
            var env = Environment.GetEnvironmentVariable(RootVariable);
            if (!string.IsNullOrWhiteSpace(env)) return env;
            return Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".local", "share", "earlyexit", "data");
        }

        public static CifarBinary.Variant? CifarVariant(string name) => Normalise(name) switch
        {
            "cifar100" => CifarBinary.Cifar100,
            "cifar10" => CifarBinary.Cifar10,
            _ => null,
        };

        public static string Normalise(string name) => name.Trim().ToLowerInvariant().Replace("_", "-") switch
        {
            "cifar-100" or "cifar100" => "cifar100",
            "cifar-10" or "cifar10" => "cifar10",
            "fashion-mnist" or "fashionmnist" or "fmnist" => "fashion-mnist",
            "image-folder" or "imagefolder" or "images" => "image-folder",
            "npy" or "numpy" => "npy",
            var other => other,
        };

        /// <summary>The folder a data set is read from, given a root (or an explicit folder holding the files).</summary>
        public static string FolderOf(string name, string? root)
        {
            var n = Normalise(name);
            if (OwnFormats.Contains(n))
            {
                if (string.IsNullOrWhiteSpace(root))
                    throw new ArgumentException($"data set '{n}' is read from the folder given as its root: set data.root in the recipe, or --data-root on the command line");
                return Path.GetFullPath(root);
            }
            bool given = root is not null;
            root ??= DefaultRoot();
            if (CifarVariant(n) is { } v)
            {
                // Accept the root itself when it already is the extracted folder.
                return File.Exists(Path.Combine(root, v.TestFiles[0])) ? root : Path.Combine(root, v.Folder);
            }
            if (n == "fashion-mnist")
            {
                // A root the user gave is where the data must be (no fall-back elsewhere: a typo must not train on
                // other files); without one, Debian's package folder is the last place looked in.
                var candidates = given ? new[] { root, Path.Combine(root, "fashion-mnist") } : new[] { root, Path.Combine(root, "fashion-mnist"), FashionMnist.DebianFolder };
                foreach (var candidate in candidates)
                    if (File.Exists(Path.Combine(candidate, "t10k-labels-idx1-ubyte.gz")) || File.Exists(Path.Combine(candidate, "t10k-labels-idx1-ubyte")))
                        return candidate;
                return given ? Path.Combine(root, "fashion-mnist") : FashionMnist.DebianFolder;
            }
            throw new ArgumentException($"unknown data set '{name}'; known: {string.Join(", ", Names)}");
        }

        /// <summary>True when the files of the data set are present.</summary>
        public static bool IsPresent(string name, string? root)
        {
            var folder = FolderOf(name, root);
            if (Normalise(name) == "image-folder") return ImageFolder.IsPresent(folder);
            if (Normalise(name) == "npy") return NpyFolder.IsPresent(folder);
            if (CifarVariant(name) is { } v) return v.TrainFiles.Concat(v.TestFiles).All(f => File.Exists(Path.Combine(folder, f)));
            return File.Exists(Path.Combine(folder, "t10k-labels-idx1-ubyte.gz")) || File.Exists(Path.Combine(folder, "t10k-labels-idx1-ubyte"));
        }

        /// <summary>Loads train and test, then carves the stratified validation split from train.</summary>
        public static DataSplits Load(string name, string? root = null, double validationFraction = 0.1, int seed = 0)
        {
            var n = Normalise(name);
            var folder = FolderOf(n, root);
            // Fashion-MNIST under a root the user gave is looked for in the root and in ROOT/fashion-mnist: say both.
            if (n == "fashion-mnist" && !string.IsNullOrEmpty(root) && !IsPresent(n, root))
                throw FashionMnist.NotFound("t10k-labels-idx1-ubyte", $"{root} and in {Path.Combine(root, "fashion-mnist")}");
            var (train, test) = n switch
            {
                "image-folder" => ImageFolder.ReadFolder(folder),
                "npy" => NpyFolder.ReadFolder(folder),
                _ when CifarVariant(n) is { } v => CifarBinary.ReadFolder(v, folder),
                _ => FashionMnist.ReadFolder(folder),
            };
            var (tr, val) = Splits.TrainValidation(train, validationFraction, seed);
            return new DataSplits(tr, val, test, folder);
        }

        public sealed record Archive(string Url, string Md5, string FileName);

        public static Archive ArchiveOf(CifarBinary.Variant v) => v.Name switch
        {
            "cifar100" => new("https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz", "03b5dce01913d631647c71ecec9e9cb8", "cifar-100-binary.tar.gz"),
            _ => new("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530", "cifar-10-binary.tar.gz"),
        };

        /// <summary>
        /// Downloads a CIFAR archive from the official address, checks its MD5 and extracts it under <paramref name="root"/>.
        /// Only ever called when the user asks for it. <paramref name="progress"/> gets (bytes so far, total or -1).
        /// </summary>
        public static string DownloadCifar(string name, string? root, Action<long, long>? progress = null, CancellationToken cancel = default)
        {
            var v = CifarVariant(name) ?? throw new ArgumentException($"only cifar10 and cifar100 can be downloaded, not '{name}'");
            root ??= DefaultRoot();
            Directory.CreateDirectory(root);
            var archive = ArchiveOf(v);
            var target = Path.Combine(root, archive.FileName);
            var partial = target + ".part";
            try
            {
                using var http = new HttpClient { Timeout = TimeSpan.FromMinutes(30) };
                using var response = http.GetAsync(archive.Url, HttpCompletionOption.ResponseHeadersRead, cancel).GetAwaiter().GetResult();
                response.EnsureSuccessStatusCode();
                long total = response.Content.Headers.ContentLength ?? -1;
                using (var input = response.Content.ReadAsStream(cancel))
                using (var output = File.Create(partial))
                {
                    var buffer = new byte[1 << 16];
                    long done = 0;
                    int read;
                    while ((read = input.Read(buffer, 0, buffer.Length)) > 0)
                    {
                        output.Write(buffer, 0, read);
                        done += read;
                        progress?.Invoke(done, total);
                    }
                }
            }
            catch (Exception e) when (e is HttpRequestException or TaskCanceledException or IOException)
            {
                if (File.Exists(partial)) File.Delete(partial);
                throw new DataFormatException(null,
                    $"could not download {v.Name} from {archive.Url}: {e.Message}. This machine may be offline; " +
                    $"copy the extracted '{v.Folder}' folder into {root} instead.");
            }
            string md5;
            using (var f = File.OpenRead(partial)) md5 = Convert.ToHexString(MD5.HashData(f)).ToLowerInvariant();
            if (md5 != archive.Md5)
            {
                File.Delete(partial);
                throw new DataFormatException(archive.Url, $"checksum mismatch: MD5 {md5}, expected {archive.Md5}; the download was discarded");
            }
            File.Move(partial, target, overwrite: true);
            using (var gz = new GZipStream(File.OpenRead(target), CompressionMode.Decompress))
                TarFile.ExtractToDirectory(gz, root, overwriteFiles: true);
            return Path.Combine(root, v.Folder);
        }
    }
}
