using System;
using TorchSharp;
using static TorchSharp.torch;

namespace EarlyExit.Native
{
    /// <summary>
    /// Device choice: EARLYEXIT_DEVICE (cpu, cuda, cuda:N) when set, otherwise CUDA when the CUDA package is in use
    /// and a GPU answers, otherwise CPU.
    /// </summary>
    public static class Devices
    {
        public const string Variable = "EARLYEXIT_DEVICE";

        public static Device Choose(string? requested = null)
        {
            TorchNativeLoader.EnsureLoaded();
            requested ??= Environment.GetEnvironmentVariable(Variable);
            if (!string.IsNullOrWhiteSpace(requested) && !requested.Equals("auto", StringComparison.OrdinalIgnoreCase))
            {
                var r = requested.Trim().ToLowerInvariant();
                if (r.StartsWith("cuda") && !CudaAvailable())
                    throw new ArgumentException($"device '{requested}' was asked for, but CUDA is not available here (TorchSharp-cpu build or no GPU); use cpu or auto");
                if (r != "cpu" && !r.StartsWith("cuda"))
                    throw new ArgumentException($"unknown device '{requested}'; use auto, cpu, cuda or cuda:N");
                return torch.device(r);
            }
            return CudaAvailable() ? CUDA : CPU;
        }

        public static bool CudaAvailable()
        {
            try { return torch.cuda.is_available(); }
            catch (Exception) { return false; }
        }

        /// <summary>One line for reports: the device and the threads in use.</summary>
        public static string Describe(Device d) =>
            d.type == DeviceType.CUDA ? $"cuda:{d.index}" : $"cpu ({torch.get_num_threads()} thread{(torch.get_num_threads() == 1 ? "" : "s")}, {Environment.ProcessorCount} cores)";
    }
}
