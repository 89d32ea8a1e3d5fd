using System;
using System.IO;
using System.Runtime.InteropServices;
using System.Text.RegularExpressions;

namespace EarlyExit.Native
{
    /// <summary>What libtorch says about itself (<c>at::show_config()</c>): its version, its oneDNN and the CPU
    /// capability ATen dispatches to. Every number a run reports names the kernels that produced it.</summary>
    public sealed record LibTorchInfo(string TorchVersion, string OneDnnVersion, string CpuCapability, string TorchSharpVersion)
    {
        public static readonly LibTorchInfo Unknown = new("unknown", "unknown", "unknown", "unknown");

        /// <summary>One line: "libtorch 2.10.0 (oneDNN v3.7.1, ATen CPU capability AVX2), TorchSharp 0.107.0".</summary>
        public string Describe() => $"libtorch {TorchVersion} (oneDNN {OneDnnVersion}, ATen CPU capability {CpuCapability}), TorchSharp {TorchSharpVersion}";

        /// <summary>Parses the text of <c>at::show_config()</c>.</summary>
        public static LibTorchInfo Parse(string config, string torchSharpVersion)
        {
            string Find(string pattern) => Regex.Match(config, pattern) is { Success: true } m ? m.Groups[1].Value.Trim() : "unknown";
            var onednn = Find(@"MKL-DNN (v[0-9.]+)");
            var hash = Find(@"MKL-DNN v[0-9.]+ \(Git Hash ([0-9a-f]{7})");
            return new LibTorchInfo(Find(@"TORCH_VERSION=([^,\s]+)"), hash == "unknown" ? onednn : $"{onednn} ({hash})",
                Find(@"CPU capability usage: ([A-Za-z0-9_]+)"), torchSharpVersion);
        }
    }

    /// <summary>
    /// The few native switches TorchSharp does not bind: the process environment as native code sees it (libc
    /// <c>setenv</c>; .NET's Environment.SetEnvironmentVariable changes only the managed copy on Linux), ATen's
    /// oneDNN switch (<c>at::Context::setUserEnabledMkldnn</c>) and its build configuration. Functions of libtorch are
    /// taken from the copy the loader loaded by absolute path, never resolved by name (a system libtorch, such as
    /// Debian's 1.13, could answer instead).
    /// </summary>
    public static unsafe class LibTorchControls
    {
        [DllImport("libc", EntryPoint = "setenv", CharSet = CharSet.Ansi)]
        static extern int LibcSetEnv(string name, string value, int overwrite);

        [DllImport("libc", EntryPoint = "getenv", CharSet = CharSet.Ansi)]
        static extern IntPtr LibcGetEnv(string name);

        /// <summary>Sets a variable in the native environment only: .NET's copy, which child processes inherit, is left
        /// alone (a probe of the default kernels must not inherit this process's choice).</summary>
        public static void SetNativeEnvironment(string name, string value)
        {
            if (!(OperatingSystem.IsLinux() || OperatingSystem.IsMacOS())) Environment.SetEnvironmentVariable(name, value);
            else
                if (LibcSetEnv(name, value, 1) != 0) throw new InvalidOperationException($"setenv({name}) failed");
        }

        /// <summary>A variable as native code sees it (null when unset).</summary>
        public static string? GetNativeEnvironment(string name) =>
            OperatingSystem.IsLinux() || OperatingSystem.IsMacOS() ? Marshal.PtrToStringAnsi(LibcGetEnv(name)) : Environment.GetEnvironmentVariable(name);

        static IntPtr Export(string symbol)
        {
            var handle = TorchNativeLoader.LibTorchCpuHandle;
            if (handle == IntPtr.Zero)
                throw new InvalidOperationException("libtorch_cpu was not loaded by absolute path; call TorchNativeLoader.EnsureLoaded() first");
            return NativeLibrary.GetExport(handle, symbol);
        }

        static IntPtr GlobalContext() => ((delegate* unmanaged<IntPtr>)Export("_ZN2at13globalContextEv"))();

        /// <summary>Whether ATen may route convolutions (and a few other operators) to oneDNN.</summary>
        public static bool OneDnnEnabled
        {
            get => ((delegate* unmanaged<IntPtr, byte>)Export("_ZNK2at7Context17userEnabledMkldnnEv"))(GlobalContext()) != 0;
            set => ((delegate* unmanaged<IntPtr, byte, void>)Export("_ZN2at7Context20setUserEnabledMkldnnEb"))(GlobalContext(), value ? (byte)1 : (byte)0);
        }

        /// <summary>Whether ATen may route a convolution to NNPACK (<c>at::Context::setUserEnabledNNPACK</c>); ATen asks
        /// this before it asks whether NNPACK is available.</summary>
        public static bool NnpackEnabled
        {
            get => ((delegate* unmanaged<IntPtr, byte>)Export("_ZNK2at7Context17userEnabledNNPACKEv"))(GlobalContext()) != 0;
            set => ((delegate* unmanaged<IntPtr, byte, void>)Export("_ZN2at7Context20setUserEnabledNNPACKEb"))(GlobalContext(), value ? (byte)1 : (byte)0);
        }

        /// <summary>Whether NNPACK initialised on this CPU (<c>at::native::_nnpack_available()</c>: it initialises NNPACK
        /// once and keeps the answer, but logs a warning at every call where it failed, so this call runs with libc10's
        /// log level raised to errors).</summary>
        public static bool NnpackAvailable()
        {
            var level = TorchNativeLoader.LibC10Handle != IntPtr.Zero && NativeLibrary.TryGetExport(TorchNativeLoader.LibC10Handle, "FLAGS_caffe2_log_level", out var flag)
                ? (int*)flag : null;
            int before = level is null ? 0 : *level;
            if (level is not null) *level = 2;  // c10's ERROR
            try { return ((delegate* unmanaged<byte>)Export("_ZN2at6native17_nnpack_availableEv"))() != 0; }
            finally { if (level is not null) *level = before; }
        }

        /// <summary>ATen's deterministic-algorithms switch (TorchSharp 0.107's torch.use_deterministic_algorithms throws
        /// "not implemented"): on, an operator without a deterministic implementation raises an error instead of
        /// running.</summary>
        public static bool DeterministicAlgorithms
        {
            get => ((delegate* unmanaged<IntPtr, byte>)Export("_ZNK2at7Context23deterministicAlgorithmsEv"))(GlobalContext()) != 0;
            set => ((delegate* unmanaged<IntPtr, byte, byte, void>)Export("_ZN2at7Context26setDeterministicAlgorithmsEbb"))(GlobalContext(), value ? (byte)1 : (byte)0, 0);
        }

        /// <summary>The text of <c>at::show_config()</c> (it returns a std::string by value: an sret pointer).</summary>
        public static string ShowConfig()
        {
            // libstdc++'s std::string (C++11 ABI): pointer, length, 16-byte local buffer. Its heap buffer (a few KB,
            // once per process) is not freed: freeing it would need libstdc++'s operator delete.
            var buffer = Marshal.AllocHGlobal(64);
            try
            {
                ((delegate* unmanaged<IntPtr, void>)Export("_ZN2at11show_configB5cxx11Ev"))(buffer);
                var text = Marshal.ReadIntPtr(buffer);
                var length = Marshal.ReadInt64(buffer, 8);
                return length is > 0 and < 1 << 20 ? Marshal.PtrToStringUTF8(text, (int)length) : "";
            }
            finally { Marshal.FreeHGlobal(buffer); }
        }

        static LibTorchInfo? _info;

        /// <summary>libtorch's version, its oneDNN and ATen's CPU capability (read once).</summary>
        public static LibTorchInfo Info()
        {
            if (_info is not null) return _info;
            var torchSharp = typeof(TorchSharp.torch).Assembly.GetName().Version?.ToString(3) ?? "unknown";
            try { _info = LibTorchInfo.Parse(ShowConfig(), torchSharp); }
            catch (Exception e) when (e is EntryPointNotFoundException or InvalidOperationException or IOException)
            {
                _info = LibTorchInfo.Unknown with { TorchSharpVersion = torchSharp };
            }
            return _info;
        }
    }
}
