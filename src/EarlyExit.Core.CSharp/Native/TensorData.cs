using System;
using System.IO;
using System.Runtime.InteropServices;
using TorchSharp;
using static TorchSharp.torch;

namespace EarlyExit.Native
{
    /// <summary>
    /// Moving a tensor's elements between native and managed memory in one block copy. TorchSharp's element accessor
    /// (<c>tensor.data&lt;T&gt;().ToArray()</c>, or enumerating it) costs about 60–110 µs for a 64×10 tensor here
    /// (the block copy: under 3 µs) and twice the block copy's time at a million elements; an exit decision made two
    /// such copies per batch, which was most of its cost.
    /// </summary>
    public static class TensorData
    {
        /// <summary>The elements of <paramref name="t"/> in row-major order, copied to a new array (from any device and
        /// layout: a non-contiguous or non-CPU tensor is made a contiguous CPU copy first). The element type must be
        /// the tensor's own: no conversion.</summary>
        public static T[] ToArray<T>(Tensor t) where T : unmanaged
        {
            ArgumentNullException.ThrowIfNull(t);
            var expected = ScalarTypeOf<T>();
            if (t.dtype != expected)
                throw new ArgumentException($"a {t.dtype} tensor cannot be read as {typeof(T).Name} ({expected}); convert it first", nameof(t));
            if (t.numel() == 0) return Array.Empty<T>();
            if (t.device_type == DeviceType.CPU && t.is_contiguous())
                return MemoryMarshal.Cast<byte, T>(t.bytes).ToArray();
            using var scope = NewDisposeScope();
            return MemoryMarshal.Cast<byte, T>(t.cpu().contiguous().bytes).ToArray();
        }

        /// <summary>Writes the raw little-endian elements of a contiguous CPU tensor (as <see cref="BinaryWriter"/>
        /// writes each value: the same bytes, one block).</summary>
        public static void Write(BinaryWriter w, Tensor contiguousCpu)
        {
            if (contiguousCpu.device_type != DeviceType.CPU || !contiguousCpu.is_contiguous())
                throw new ArgumentException("TensorData.Write takes a contiguous CPU tensor", nameof(contiguousCpu));
            if (contiguousCpu.numel() == 0) return;
            if (!BitConverter.IsLittleEndian) throw new PlatformNotSupportedException("tensor files are little-endian; this machine is not");
            w.Write(contiguousCpu.bytes);
        }

        /// <summary>Reads <paramref name="count"/> little-endian elements written by <see cref="Write"/>; a stream that
        /// ends first (or, seekable, is shorter than the count says) throws <see cref="EndOfStreamException"/>.</summary>
        public static T[] Read<T>(BinaryReader r, long count) where T : unmanaged
        {
            if (count < 0) throw new InvalidDataException($"a negative element count ({count})");
            if (!BitConverter.IsLittleEndian) throw new PlatformNotSupportedException("tensor files are little-endian; this machine is not");
            var stream = r.BaseStream;
            if (stream.CanSeek && count > (stream.Length - stream.Position) / System.Runtime.CompilerServices.Unsafe.SizeOf<T>())
                throw new EndOfStreamException();  // before allocating what a damaged count asks for
            var a = new T[count];
            var bytes = MemoryMarshal.AsBytes(a.AsSpan());
            while (bytes.Length > 0)
            {
                int got = r.Read(bytes);
                if (got == 0) throw new EndOfStreamException();
                bytes = bytes[got..];
            }
            return a;
        }

        /// <summary>The tensor element type of a managed one.</summary>
        public static ScalarType ScalarTypeOf<T>() where T : unmanaged =>
            typeof(T) == typeof(float) ? ScalarType.Float32
            : typeof(T) == typeof(double) ? ScalarType.Float64
            : typeof(T) == typeof(long) ? ScalarType.Int64
            : typeof(T) == typeof(int) ? ScalarType.Int32
            : typeof(T) == typeof(short) ? ScalarType.Int16
            : typeof(T) == typeof(byte) ? ScalarType.Byte
            : typeof(T) == typeof(sbyte) ? ScalarType.Int8
            : typeof(T) == typeof(bool) ? ScalarType.Bool
            : throw new NotSupportedException($"no tensor element type for {typeof(T).Name}");
    }
}
