using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.Linq;
using TorchSharp;
using static TorchSharp.torch;

namespace EarlyExit.Native
{
    /// <summary>One convolution the check runs: batch, channels, kernel, stride, side of the square input, and the
    /// memory layout of the input and of the output gradient (channels-last or NCHW).</summary>
    public sealed record ConvCase(int Batch, int In, int Out, int Kernel, int Stride, int Side, bool InputChannelsLast, bool GradChannelsLast, bool Bias)
    {
        public string Describe() =>
            $"{Kernel}x{Kernel}/{Stride} {In}->{Out} ch, {Side}x{Side}, batch {Batch}, input {(InputChannelsLast ? "channels-last" : "NCHW")}, " +
            $"output gradient {(GradChannelsLast ? "channels-last" : "NCHW")}{(Bias ? ", bias" : "")}";
    }

    /// <summary>What one case gave: relative errors (‖float32 − float64‖ / ‖float64‖) of the output and of the input,
    /// weight and bias gradients, whether every value is finite, and whether three identical passes agree bit for bit.</summary>
    public sealed record ConvCaseResult(string Case, double Output, double InputGrad, double WeightGrad, double BiasGrad, bool Finite, bool RepeatIdentical)
    {
        public double WorstError => new[] { Output, InputGrad, WeightGrad, BiasGrad }.Max();

        public bool Passed => Finite && RepeatIdentical && WorstError <= ConvolutionCheck.Tolerance;

        /// <summary>Every symptom of a failed case: "weight gradient off by 0.43, two identical passes differ, in CASE".</summary>
        public string Fault()
        {
            var symptoms = new List<string>();
            if (!Finite) symptoms.Add("NaN or infinity");
            foreach (var (what, value) in new[] { ("output", Output), ("input gradient", InputGrad), ("weight gradient", WeightGrad), ("bias gradient", BiasGrad) })
                if (value > ConvolutionCheck.Tolerance && double.IsFinite(value)) symptoms.Add($"{what} off by {value:G2}");
            if (!RepeatIdentical) symptoms.Add("two identical passes differ");
            return $"{string.Join(", ", symptoms)}, in {Case}";
        }
    }

    /// <summary>The check of one backend: every case's result, and the seconds it took.</summary>
    public sealed record ConvCheckResult(string Backend, bool Simulated, IReadOnlyList<ConvCaseResult> Cases, double Seconds)
    {
        public bool Passed => Cases.All(c => c.Passed);

        /// <summary>"passed (worst relative error 3.1e-07)" or the first fault found.</summary>
        public string Summary()
        {
            var failed = Cases.Where(c => !c.Passed).ToList();
            var simulated = Simulated ? " (simulated fault)" : "";
            if (failed.Count == 0) return $"passed (worst relative error {Cases.Max(c => c.WorstError):G2} over {Cases.Count} cases)";
            return $"failed{simulated}: {failed[0].Fault()}" + (failed.Count > 1 ? $" (and {failed.Count - 1} more of {Cases.Count} cases)" : "");
        }
    }

    /// <summary>
    /// Checks the convolution kernels of this process against float64 (which ATen computes itself: oneDNN has no
    /// float64 convolution), forward and backward, on cases that cover what the model zoo does: 1, 2, 3 and 4 input
    /// channels beside real widths and counts that are not a multiple of 8 (MSDNet's), strides 1 and 2, 1×1 and 3×3 kernels, NCHW, channels-last and their mix (an SDN
    /// head sends a channels-last gradient back into an NCHW backbone), batch 1 and more, with and without bias; and
    /// that identical passes give the same bits. Convolution alone is smooth and tie-free, so float32
    /// must agree with float64 to rounding (measured here on correct kernels: 5e-7 at worst); the faults it exists for
    /// give errors of 0.2–0.7, NaNs, passes that differ, or a corrupted heap.
    /// </summary>
    public static class ConvolutionCheck
    {
        /// <summary>Largest relative error accepted (200× the worst measured on correct kernels).</summary>
        public const double Tolerance = 1e-4;

        /// <summary>Version of the cases and the tolerance: part of the guard's cache key (3: the channel counts that are
        /// not a multiple of 8 or 16, which version 2 passed on a Zen 5 whose AVX-capped kernels got them wrong).</summary>
        public const int Version = 3;

        public static readonly IReadOnlyList<ConvCase> Cases = new[]
        {
            new ConvCase(5, 2, 4, 3, 2, 10, false, true, false),   // the SDN-head trigger on AVX-512 EPYCs
            new ConvCase(5, 2, 4, 3, 2, 10, true, false, true),
            new ConvCase(1, 1, 4, 3, 1, 8, false, false, false),   // a one-channel stem, batch 1
            new ConvCase(3, 4, 8, 1, 2, 8, true, false, false),    // a downsample shortcut with a channels-last input (AVX2 EPYC)
            new ConvCase(3, 4, 8, 1, 2, 8, false, true, true),
            new ConvCase(1, 8, 16, 1, 1, 6, true, true, false),
            new ConvCase(4, 8, 8, 3, 1, 9, true, true, true),
            new ConvCase(5, 3, 16, 3, 1, 12, false, false, true),  // a CIFAR stem
            new ConvCase(5, 16, 32, 3, 2, 10, false, true, false),
            new ConvCase(2, 16, 32, 1, 2, 8, true, false, false),
            new ConvCase(2, 64, 64, 3, 1, 8, false, false, false),
            new ConvCase(1, 32, 64, 3, 2, 8, true, true, true),
            // Channel counts that are not a multiple of the kernels' block of 8 (or 16) channels, as MSDNet's dense
            // layers have (12, 20, 92 and 140 input channels at the cpu scale). On an AMD EPYC family 26 model 2 (2026-12-07)
            // every 3x3 convolution from 9-15, 17, 20, 28, 36, 44, 92 or 140 channels computed a forward output 0.2-0.4 off
            // (or infinite) under oneDNN capped at AVX, which passed the cases above; the default kernels also got 5-7 and
            // 24 wrong. 1x1 convolutions of the same counts were right.
            new ConvCase(5, 12, 6, 3, 1, 14, false, false, false),
            new ConvCase(5, 20, 12, 3, 2, 14, false, false, true),
            new ConvCase(3, 6, 6, 3, 1, 14, false, true, false),
            new ConvCase(4, 24, 12, 3, 1, 7, true, false, false),
            new ConvCase(2, 92, 48, 3, 2, 7, false, false, false),
            new ConvCase(5, 22, 6, 1, 1, 14, false, false, false),
        };

        /// <summary>The cases a backend must pass: every case, or for a backend that feeds convolutions NCHW inputs
        /// (<see cref="ConvolutionLayout"/>) every case with its input NCHW (output gradients keep their layout), each once.</summary>
        public static IReadOnlyList<ConvCase> CasesFor(NumericsBackend backend) =>
            backend.NchwInputs ? Cases.Select(c => c with { InputChannelsLast = false }).Distinct().ToList() : Cases;

        /// <summary>Runs every case under whatever backend this process uses. <paramref name="simulateFault"/> scales
        /// one float32 weight gradient by 1.3, as a broken kernel would, so that tests can exercise what follows a
        /// fault on a machine whose kernels are correct.</summary>
        public static ConvCheckResult Run(string backend, bool simulateFault = false)
        {
            var clock = Stopwatch.StartNew();
            var results = new List<ConvCaseResult>();
            using var generator = new Generator(20261125);
            var cases = CasesFor(NumericsBackend.Parse(backend));
            for (int i = 0; i < cases.Count; i++)
                results.Add(RunCase(cases[i], generator, simulateFault && i == 0));
            return new ConvCheckResult(backend, simulateFault, results, clock.Elapsed.TotalSeconds);
        }

        static ConvCaseResult RunCase(ConvCase c, Generator g, bool corrupt)
        {
            using var scope = NewDisposeScope();
            var x64 = randn(new long[] { c.Batch, c.In, c.Side, c.Side }, float64, generator: g);
            using var fanIn = (1.0 / Math.Sqrt(c.In * c.Kernel * c.Kernel)).ToScalar();
            var w64 = randn(new long[] { c.Out, c.In, c.Kernel, c.Kernel }, float64, generator: g).mul(fanIn);
            var b64 = c.Bias ? randn(new long[] { c.Out }, float64, generator: g) : null;
            long pad = c.Kernel / 2;
            long outSide = (c.Side + 2 * pad - c.Kernel) / c.Stride + 1;
            var gy64 = randn(new long[] { c.Batch, c.Out, outSide, outSide }, float64, generator: g);

            (Tensor y, Tensor dx, Tensor dw, Tensor? db) Pass(Tensor x, Tensor w, Tensor? b, Tensor gy)
            {
                var xi = x.detach().requires_grad_(true);
                var wi = w.detach().requires_grad_(true);
                var bi = b?.detach().requires_grad_(true);
                var y = nn.functional.conv2d(xi, wi, bi, strides: new long[] { c.Stride, c.Stride }, padding: new[] { pad, pad });
                var inputs = bi is null ? new[] { xi, wi } : new[] { xi, wi, bi };
                var grads = autograd.grad(new[] { y }, inputs, new[] { gy });
                return (y.detach(), grads[0], grads[1], bi is null ? null : grads[2]);
            }

            var reference = Pass(x64, w64, b64, gy64);
            var x32 = x64.to_type(float32);
            if (c.InputChannelsLast) x32 = ConvolutionLayout.ToChannelsLast(x32);
            var gy32 = gy64.to_type(float32);
            if (c.GradChannelsLast) gy32 = ConvolutionLayout.ToChannelsLast(gy32);
            var w32 = w64.to_type(float32);
            var b32 = b64?.to_type(float32);
            // Three identical passes: a racy kernel (seen here) does not differ every time.
            var first = Pass(x32, w32, b32, gy32);
            var again = new[] { Pass(x32, w32, b32, gy32), Pass(x32, w32, b32, gy32) };
            using var fault = 1.3f.ToScalar();
            var dw = corrupt ? first.dw.mul(fault) : first.dw;

            var all = new[] { first.y, first.dx, first.dw }.Concat(first.db is null ? Array.Empty<Tensor>() : new[] { first.db })
                .Concat(again.SelectMany(p => new[] { p.dx, p.dw }));
            bool finite = all.All(t => t.isfinite().all().item<bool>());
            bool identical = again.All(p => SameBits(first.dx, p.dx) && SameBits(first.dw, p.dw) && SameBits(first.y, p.y)
                                            && (first.db is null || SameBits(first.db, p.db!)));
            return new ConvCaseResult(c.Describe(), RelativeError(first.y, reference.y), RelativeError(first.dx, reference.dx),
                RelativeError(dw, reference.dw), first.db is null ? 0 : RelativeError(first.db, reference.db!), finite, identical);
        }

        /// <summary>‖a − b‖ / ‖b‖ in float64 (infinity when a is not finite).</summary>
        public static double RelativeError(Tensor a, Tensor b)
        {
            using var scope = NewDisposeScope();
            var a64 = a.to_type(float64);
            var b64 = b.to_type(float64);
            double diff = (a64 - b64).norm().item<double>();
            double norm = b64.norm().item<double>();
            if (!double.IsFinite(diff)) return double.PositiveInfinity;
            return norm > 0 ? diff / norm : diff;
        }

        /// <summary>Whether two float tensors hold the same bits (NaN patterns and signed zeros included).</summary>
        public static bool SameBits(Tensor a, Tensor b)
        {
            if (!a.shape.SequenceEqual(b.shape)) return false;
            var x = TensorData.ToArray<float>(a);
            var y = TensorData.ToArray<float>(b);
            return System.Runtime.InteropServices.MemoryMarshal.Cast<float, int>(x).SequenceEqual(System.Runtime.InteropServices.MemoryMarshal.Cast<float, int>(y));
        }
    }
}
