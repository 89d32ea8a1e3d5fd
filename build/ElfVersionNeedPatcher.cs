// One source, two users: the MSBuild task below (compiled by RoslynCodeTaskFactory from
// Directory.Build.targets) and the runtime loader in EarlyExit.Core.CSharp (which compiles
// this file with EARLYEXIT_CORE defined, leaving the task out).
//
// Why: TorchSharp 0.107.0's libLibTorchSharp.so lists GLIBCXX_3.4.32 in .gnu.version_r for one
// marker symbol (std::ios_base_library_init()) that GCC 13 emits and nothing calls. Debian 12
// and Ubuntu 22.04 ship libstdc++ up to GLIBCXX_3.4.30, so the dynamic loader refuses the
// library. Marking that version-needs entry weak (VER_FLG_WEAK, 0x2) lets it load and work.
using System;
using System.IO;
using System.Text;

namespace EarlyExit.Native
{
    public enum ElfPatchOutcome
    {
        /// <summary>The entry was found and the weak flag set.</summary>
        Patched,
        /// <summary>The entry was already weak; nothing to write.</summary>
        AlreadyWeak,
        /// <summary>The library does not ask for that version at all.</summary>
        VersionNotNeeded,
    }

    public static class ElfVersionNeedPatcher
    {
        public const string Glibcxx33432 = "GLIBCXX_3.4.32";
        const uint ShtGnuVerneed = 0x6ffffffe;
        const ushort VerFlagWeak = 0x2;

        /// <summary>Sets the weak flag on every version-needs entry named <paramref name="version"/>, in place.</summary>
        public static ElfPatchOutcome MarkVersionNeedWeak(byte[] elf, string version, string fileNameForErrors = "<memory>")
        {
            if (elf.Length < 64 || elf[0] != 0x7f || elf[1] != (byte)'E' || elf[2] != (byte)'L' || elf[3] != (byte)'F')
                throw new InvalidDataException($"{fileNameForErrors}: not an ELF file (bad magic number)");
            if (elf[4] != 2) throw new InvalidDataException($"{fileNameForErrors}: not a 64-bit ELF file (EI_CLASS={elf[4]})");
            if (elf[5] != 1) throw new InvalidDataException($"{fileNameForErrors}: not a little-endian ELF file (EI_DATA={elf[5]})");

            ulong shoff = U64(elf, 0x28, fileNameForErrors);
            int shentsize = U16(elf, 0x3A, fileNameForErrors);
            int shnum = U16(elf, 0x3C, fileNameForErrors);
            if (shoff == 0 || shnum == 0) throw new InvalidDataException($"{fileNameForErrors}: ELF file has no section headers");
            if (shentsize < 64) throw new InvalidDataException($"{fileNameForErrors}: section header size {shentsize} is too small");

            bool found = false, patched = false;
            for (int i = 0; i < shnum; i++)
            {
                long sh = Checked((long)shoff + (long)i * shentsize, 64, elf, fileNameForErrors);
                if (U32(elf, sh + 4, fileNameForErrors) != ShtGnuVerneed) continue;

                long offset = (long)U64(elf, sh + 0x18, fileNameForErrors);
                int link = (int)U32(elf, sh + 0x28, fileNameForErrors);
                uint count = U32(elf, sh + 0x2C, fileNameForErrors);
                if (link >= shnum) throw new InvalidDataException($"{fileNameForErrors}: .gnu.version_r links to missing section {link}");
                long strtab = (long)U64(elf, Checked((long)shoff + (long)link * shentsize, 64, elf, fileNameForErrors) + 0x18, fileNameForErrors);

                long need = offset;
                for (uint n = 0; n < count; n++)
                {
                    int auxCount = U16(elf, need + 2, fileNameForErrors);
                    long aux = need + U32(elf, need + 8, fileNameForErrors);
                    for (int a = 0; a < auxCount; a++)
                    {
                        ushort flags = U16(elf, aux + 4, fileNameForErrors);
                        string name = CString(elf, strtab + U32(elf, aux + 8, fileNameForErrors), fileNameForErrors);
                        if (name == version)
                        {
                            found = true;
                            if ((flags & VerFlagWeak) == 0)
                            {
                                flags |= VerFlagWeak;
                                elf[aux + 4] = (byte)(flags & 0xff);
                                elf[aux + 5] = (byte)(flags >> 8);
                                patched = true;
                            }
                        }
                        uint nextAux = U32(elf, aux + 12, fileNameForErrors);
                        if (nextAux == 0) break;
                        aux += nextAux;
                    }
                    uint next = U32(elf, need + 12, fileNameForErrors);
                    if (next == 0) break;
                    need += next;
                }
            }
            return patched ? ElfPatchOutcome.Patched : found ? ElfPatchOutcome.AlreadyWeak : ElfPatchOutcome.VersionNotNeeded;
        }

        /// <summary>
        /// Reads <paramref name="source"/>, marks the version weak and, if anything changed or the destination
        /// differs from the source, writes <paramref name="destination"/> through a temporary file renamed over it.
        /// The rename replaces a hard link instead of writing through it (so a NuGet cache entry is never touched).
        /// </summary>
        public static ElfPatchOutcome PatchFile(string source, string destination, string version)
        {
            byte[] bytes = File.ReadAllBytes(source);
            var outcome = MarkVersionNeedWeak(bytes, version, source);
            bool samePath = string.Equals(Path.GetFullPath(source), Path.GetFullPath(destination), StringComparison.Ordinal);
            if (outcome != ElfPatchOutcome.Patched && samePath) return outcome;

            string dir = Path.GetDirectoryName(Path.GetFullPath(destination))!;
            Directory.CreateDirectory(dir);
            string tmp = Path.Combine(dir, "." + Path.GetFileName(destination) + "." + System.Diagnostics.Process.GetCurrentProcess().Id + "." + Guid.NewGuid().ToString("N") + ".tmp");
            try
            {
                File.WriteAllBytes(tmp, bytes);
                // Written against netstandard2.0 as well (the MSBuild task factory compiles it so): Replace is a rename on Unix.
                if (File.Exists(destination)) File.Replace(tmp, destination, null);
                else File.Move(tmp, destination);
            }
            finally
            {
                if (File.Exists(tmp)) File.Delete(tmp);
            }
            return outcome;
        }

        /// <summary>True when a shared library file (for example libstdc++.so.6) defines the given version string.</summary>
        public static bool FileMentionsVersion(string path, string version)
        {
            if (!File.Exists(path)) return false;
            byte[] needle = Encoding.ASCII.GetBytes(version + "\0");
            byte[] hay = File.ReadAllBytes(path);
            for (int i = 0; i + needle.Length <= hay.Length; i++)
            {
                int j = 0;
                while (j < needle.Length && hay[i + j] == needle[j]) j++;
                if (j == needle.Length) return true;
            }
            return false;
        }

        /// <summary>The system libstdc++ candidates, in the order the dynamic loader would usually find them.</summary>
        public static readonly string[] SystemLibstdcxxCandidates =
        {
            "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
            "/lib/x86_64-linux-gnu/libstdc++.so.6",
            "/usr/lib64/libstdc++.so.6",
            "/usr/lib/aarch64-linux-gnu/libstdc++.so.6",
            "/usr/lib/libstdc++.so.6",
        };

        /// <summary>True when the first libstdc++ found on this machine already provides <paramref name="version"/>.</summary>
        public static bool SystemLibstdcxxProvides(string version)
        {
            foreach (var candidate in SystemLibstdcxxCandidates)
                if (File.Exists(candidate)) return FileMentionsVersion(candidate, version);
            return false;
        }

        static long Checked(long at, int size, byte[] b, string file)
        {
            if (at < 0 || at + size > b.LongLength) throw new InvalidDataException($"{file}: truncated ELF file (needs {size} bytes at offset {at}, has {b.LongLength})");
            return at;
        }
        static ushort U16(byte[] b, long at, string file) { Checked(at, 2, b, file); return (ushort)(b[at] | b[at + 1] << 8); }
        static uint U32(byte[] b, long at, string file) { Checked(at, 4, b, file); return (uint)(b[at] | b[at + 1] << 8 | b[at + 2] << 16 | b[at + 3] << 24); }
        static ulong U64(byte[] b, long at, string file) => U32(b, at, file) | (ulong)U32(b, at + 4, file) << 32;
        static string CString(byte[] b, long at, string file)
        {
            Checked(at, 1, b, file);
            long end = at;
            while (end < b.LongLength && b[end] != 0) end++;
            if (end == b.LongLength) throw new InvalidDataException($"{file}: unterminated string at offset {at}");
            return Encoding.ASCII.GetString(b, (int)at, (int)(end - at));
        }
    }

#if !EARLYEXIT_CORE
    /// <summary>
    /// MSBuild task: patches libLibTorchSharp.so copies in an output folder. Mode: auto (only where the
    /// build machine's libstdc++ lacks the version), always, never.
    /// </summary>
    public sealed class PatchGlibcxxVersionNeed : Microsoft.Build.Utilities.Task
    {
        [Microsoft.Build.Framework.Required]
        public Microsoft.Build.Framework.ITaskItem[] Files { get; set; } = Array.Empty<Microsoft.Build.Framework.ITaskItem>();
        public string Mode { get; set; } = "auto";
        public string Version { get; set; } = ElfVersionNeedPatcher.Glibcxx33432;

        public override bool Execute()
        {
            var mode = (Mode ?? "auto").Trim().ToLowerInvariant();
            if (mode == "never") return true;
            if (mode != "auto" && mode != "always")
            {
                Log.LogError($"EarlyExitPatchLibTorchSharp must be auto, always or never, not '{Mode}'");
                return false;
            }
            if (mode == "auto" && ElfVersionNeedPatcher.SystemLibstdcxxProvides(Version))
            {
                Log.LogMessage(Microsoft.Build.Framework.MessageImportance.Low, $"System libstdc++ provides {Version}; libLibTorchSharp.so left as shipped.");
                return true;
            }
            foreach (var item in Files)
            {
                var path = item.ItemSpec;
                if (!File.Exists(path)) continue;
                try
                {
                    var outcome = ElfVersionNeedPatcher.PatchFile(path, path, Version);
                    if (outcome == ElfPatchOutcome.Patched)
                        Log.LogMessage(Microsoft.Build.Framework.MessageImportance.Normal, $"Marked {Version} weak in {path}");
                }
                catch (Exception e)
                {
                    Log.LogError($"Could not patch {path}: {e.Message}");
                    return false;
                }
            }
            return !Log.HasLoggedErrors;
        }
    }
#endif
}
