using System;
using System.Collections.Generic;
using System.IO;
using System.IO.MemoryMappedFiles;
using System.Linq;
using System.Text;

namespace EarlyExit.Native
{
    /// <summary>One symbol of an ELF file's full symbol table: its value (an address relative to the load base, for a
    /// shared library), its size, and whether it is a function or an object.</summary>
    public sealed record ElfSymbol(string Name, ulong Value, ulong Size, bool IsFunction, bool IsObject);

    /// <summary>
    /// Looks names up in the full symbol table (<c>.symtab</c>) of a 64-bit little-endian ELF file, which also lists
    /// the symbols a library does not export (libtorch ships with it). The string table is mapped, not read: only the
    /// pages a search touches are read. A file without <c>.symtab</c> (a stripped library) answers with no symbols.
    /// </summary>
    public static class ElfSymbols
    {
        const uint ShtSymtab = 2;
        const int SymbolSize = 24;

        /// <summary>The symbols of <paramref name="path"/> named exactly as one of <paramref name="names"/>; a name
        /// defined more than once (local symbols of several files) appears once per definition.</summary>
        public static IReadOnlyList<ElfSymbol> Find(string path, IReadOnlyCollection<string> names)
        {
            using var file = MemoryMappedFile.CreateFromFile(path, FileMode.Open, null, 0, MemoryMappedFileAccess.Read);
            using var view = file.CreateViewAccessor(0, 0, MemoryMappedFileAccess.Read);
            long length = view.Capacity;
            unsafe
            {
                byte* pointer = null;
                view.SafeMemoryMappedViewHandle.AcquirePointer(ref pointer);
                try
                {
                    pointer += view.PointerOffset;
                    return Find(new ReadOnlySpanOver(pointer, length), names, path);
                }
                finally { view.SafeMemoryMappedViewHandle.ReleasePointer(); }
            }
        }

        /// <summary>The same lookup over the bytes of an ELF image (tests build small ones).</summary>
        public static IReadOnlyList<ElfSymbol> Find(byte[] elf, IReadOnlyCollection<string> names)
        {
            unsafe
            {
                fixed (byte* pointer = elf) return Find(new ReadOnlySpanOver(pointer, elf.Length), names, "<memory>");
            }
        }

        /// <summary>A byte range that may be longer than a span can hold (libtorch_cpu is 461 MB, its string table 79 MB:
        /// each section fits a span, the file need not).</summary>
        readonly unsafe struct ReadOnlySpanOver
        {
            readonly byte* start;
            public readonly long Length;
            public ReadOnlySpanOver(byte* start, long length) { this.start = start; Length = length; }
            public ReadOnlySpan<byte> Slice(long offset, long count, string file)
            {
                if (offset < 0 || count < 0 || offset + count > Length || count > int.MaxValue)
                    throw new InvalidDataException($"{file}: ELF offset {offset} + {count} outside the file ({Length} bytes)");
                return new ReadOnlySpan<byte>(start + offset, (int)count);
            }
        }

        static IReadOnlyList<ElfSymbol> Find(ReadOnlySpanOver elf, IReadOnlyCollection<string> names, string file)
        {
            var header = elf.Slice(0, 64, file);
            if (header[0] != 0x7f || header[1] != (byte)'E' || header[2] != (byte)'L' || header[3] != (byte)'F')
                throw new InvalidDataException($"{file}: not an ELF file (bad magic number)");
            if (header[4] != 2 || header[5] != 1) throw new InvalidDataException($"{file}: not a 64-bit little-endian ELF file");
            long shoff = (long)BitConverter.ToUInt64(header[0x28..]);
            int shentsize = BitConverter.ToUInt16(header[0x3A..]);
            int shnum = BitConverter.ToUInt16(header[0x3C..]);
            if (shoff == 0 || shnum == 0 || shentsize < 64) return Array.Empty<ElfSymbol>();

            var found = new List<ElfSymbol>();
            for (int i = 0; i < shnum; i++)
            {
                var sh = elf.Slice(shoff + (long)i * shentsize, 64, file);
                if (BitConverter.ToUInt32(sh[4..]) != ShtSymtab) continue;
                long symOffset = (long)BitConverter.ToUInt64(sh[0x18..]);
                long symSize = (long)BitConverter.ToUInt64(sh[0x20..]);
                int link = (int)BitConverter.ToUInt32(sh[0x28..]);
                if (link >= shnum) throw new InvalidDataException($"{file}: .symtab links to missing section {link}");
                var strHeader = elf.Slice(shoff + (long)link * shentsize, 64, file);
                var strings = elf.Slice((long)BitConverter.ToUInt64(strHeader[0x18..]), (long)BitConverter.ToUInt64(strHeader[0x20..]), file);
                var symbols = elf.Slice(symOffset, symSize - symSize % SymbolSize, file);

                // Every place the string table holds a name, NUL-terminated (the linker may share a string's tail with
                // a longer name, so a hit's start is a candidate index), then one pass over the symbols for those indices.
                var starts = new Dictionary<uint, string>();
                foreach (var name in names.Distinct())
                {
                    var pattern = Encoding.ASCII.GetBytes(name + "\0");
                    int from = 0;
                    while (from < strings.Length)
                    {
                        int hit = strings[from..].IndexOf(pattern);
                        if (hit < 0) break;
                        starts[(uint)(from + hit)] = name;
                        from += hit + 1;
                    }
                }
                if (starts.Count == 0) continue;
                for (int s = 0; s < symbols.Length; s += SymbolSize)
                {
                    var entry = symbols.Slice(s, SymbolSize);
                    if (!starts.TryGetValue(BitConverter.ToUInt32(entry), out var name)) continue;
                    int type = entry[4] & 0xf;
                    if (BitConverter.ToUInt16(entry[6..]) == 0) continue;  // undefined here
                    found.Add(new ElfSymbol(name, BitConverter.ToUInt64(entry[8..]), BitConverter.ToUInt64(entry[16..]), type == 2, type == 1));
                }
            }
            return found;
        }
    }
}
