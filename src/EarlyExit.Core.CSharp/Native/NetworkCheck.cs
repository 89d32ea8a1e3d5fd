using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.Linq;
using EarlyExit.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace EarlyExit.Native
{
    /// <summary>What the check of one network gave: the relative error of the whole gradient of the joint loss in float32
    /// against float64 (eval mode, an NCHW and a channels-last input), the parameter worst off, whether every value was
    /// finite, and whether two identical passes gave the same bits.</summary>
    public sealed record NetworkCheckResult(string Network, string Backend, double NchwError, double ChannelsLastError, string WorstParameter,
                                            double WorstParameterError, bool Finite, bool RepeatIdentical, double Seconds)
    {
        public bool Passed => Finite && RepeatIdentical && NchwError <= NetworkCheck.Tolerance && ChannelsLastError <= NetworkCheck.Tolerance;

        /// <summary>"passed (gradient within 3.1e-07 of float64)" or what is wrong: "gradient off by 0.057 (worst: segments.0...
        /// weight, 0.31), NaN or infinity, two identical passes differ".</summary>
        public string Summary()
        {
            if (Passed) return $"passed (gradient within {Math.Max(NchwError, ChannelsLastError):G2} of float64, {Seconds:F1} s)";
            var symptoms = new List<string>();
            if (!Finite) symptoms.Add("NaN or infinity");
            if (NchwError > NetworkCheck.Tolerance && double.IsFinite(NchwError)) symptoms.Add($"gradient off by {NchwError:G2} on an NCHW input");
            if (ChannelsLastError > NetworkCheck.Tolerance && double.IsFinite(ChannelsLastError)) symptoms.Add($"gradient off by {ChannelsLastError:G2} on a channels-last input");
            if (!RepeatIdentical) symptoms.Add("two identical passes differ");
            var worst = WorstParameter.Length > 0 ? $" (worst: {WorstParameter}, {WorstParameterError:G2})" : "";
            return $"failed: {string.Join(", ", symptoms)}{worst}";
        }
    }

    /// <summary>
    /// The numerics check of the network itself, beside <see cref="ConvolutionCheck"/>'s fixed cases: float32 gradients
    /// of the joint loss (mean of the exits' cross-entropies) against float64 (which oneDNN does not compute), on copies of
    /// the network in eval mode, on an NCHW and on a channels-last input, and two identical float32 passes bit for bit.
    /// It covers every convolution shape the network has, which a fixed set of cases may miss: on an AMD EPYC family 26
    /// model 2 (2026-12-07) oneDNN capped at AVX passed the 12 cases of that day while computing MSDNet's 3×3
    /// convolutions from 12, 20, 92 and 140 channels 0.2–0.4 off (the network's gradient 0.057 off, and NaN in train
    /// mode), and a plugin's network may have any channel counts. Eval mode, so that batch statistics do not cancel large
    /// terms: correct kernels agree to 1e-7 typically and 4.4e-5 at worst over the model zoo; the bound is 1e-3.
    /// Runs on the CPU only (another device's kernels are not the ones that failed), and once per network description
    /// and backend in a process.
    /// </summary>
    public static class NetworkCheck
    {
        /// <summary>Largest relative error of the whole gradient accepted.</summary>
        public const double Tolerance = 1e-3;

        /// <summary>Set to "onednn" to make the check fail while oneDNN is on, or "always" (tests of what follows a
        /// failure, on machines whose kernels are correct): the float32 gradients are scaled by 1.3, as a broken kernel
        /// upstream of them all would.</summary>
        public const string SimulateVariable = "EARLYEXIT_NETWORK_CHECK_SIMULATE_FAULT";

        static readonly object Gate = new();
        static readonly Dictionary<string, NetworkCheckResult> Done = new();

        /// <summary>Checks a network under the kernels this process uses, on copies (the network itself is not touched).</summary>
        public static NetworkCheckResult Run(MultiExitNetwork net, bool simulateFault = false, int batch = 4)
        {
            var clock = Stopwatch.StartNew();
            var backend = NumericsGuard.Current?.Backend ?? "not decided";
            // The copies draw fresh parameters from the global generator: its state is put back, so that a run seeded
            // before the check draws what it would have drawn without it.
            using var rng = torch.random.get_rng_state();
            try { return RunOnCopies(net, simulateFault, batch, backend, clock); }
            finally { torch.random.set_rng_state(rng); }
        }

        static NetworkCheckResult RunOnCopies(MultiExitNetwork net, bool simulateFault, int batch, string backend, Stopwatch clock)
        {
            using var noScope = NewDisposeScope();
            using var f32 = net.CreateSibling();
            using var f64 = net.CreateSibling();
            f64.to(float64);
            using (no_grad())
            {
                var source = net.state_dict();
                foreach (var (name, t) in f32.state_dict()) t.copy_(source[name].to(CPU));
                foreach (var (name, t) in f64.state_dict()) t.copy_(source[name].to(CPU));
            }
            f32.eval();
            f64.eval();
            using var generator = new Generator(20261207);
            var x64 = randn(new[] { (long)batch }.Concat(net.InputShape).ToArray(), float64, generator: generator);
            var y = randint(net.NumClasses, new long[] { batch }, generator: generator);
            var names = f32.named_parameters().Select(p => p.name).ToArray();

            Tensor[] Gradients(MultiExitNetwork n, Tensor x)
            {
                n.zero_grad();
                using (var scope = NewDisposeScope())
                {
                    var logits = n.forward(x);
                    var loss = logits.Select(l => nn.functional.cross_entropy(l, y)).Aggregate((a, b) => a + b);
                    loss.backward();
                }
                return n.parameters().Select(p => p.grad is null ? zeros_like(p, dtype: float64) : p.grad.detach().to_type(float64).clone()).ToArray();
            }

            var reference = Gradients(f64, x64);
            var x32 = x64.to_type(float32);
            var nchw = Gradients(f32, x32);
            var again = Gradients(f32, x32);
            var channelsLast = Gradients(f32, ConvolutionLayout.ToChannelsLast(x32));
            bool identical = nchw.Zip(again).All(p => p.First.eq(p.Second).all().item<bool>());
            if (simulateFault)
            {
                using var fault = 1.3.ToScalar();
                nchw = nchw.Select(g => g.mul(fault)).ToArray();
                channelsLast = channelsLast.Select(g => g.mul(fault)).ToArray();
            }
            bool finite = nchw.Concat(channelsLast).Concat(again).All(g => g.isfinite().all().item<bool>());
            // The whole gradient as one vector, against the whole float64 one.
            static Tensor Whole(Tensor[] g) => cat(g.Select(t => t.flatten()).ToArray());
            var wholeReference = Whole(reference);
            double Error(Tensor[] g) => ConvolutionCheck.RelativeError(Whole(g), wholeReference);
            var (worst, worstError) = ("", 0.0);
            for (int i = 0; i < names.Length; i++)
            {
                double e = Math.Max(ConvolutionCheck.RelativeError(nchw[i], reference[i]), ConvolutionCheck.RelativeError(channelsLast[i], reference[i]));
                if (reference[i].abs().max().item<double>() > 0 && e > worstError) (worst, worstError) = (names[i], e);
            }
            return new NetworkCheckResult(net.Describe(), backend, Error(nchw), Error(channelsLast), worst, worstError, finite, identical,
                clock.Elapsed.TotalSeconds);
        }

        static bool Simulated() => Environment.GetEnvironmentVariable(SimulateVariable) switch
        {
            "always" => true,
            "onednn" => LibTorchControls.OneDnnEnabled,
            _ => false,
        };

        /// <summary>
        /// Makes sure this process computes the network's gradients correctly before it trains or evaluates: runs the
        /// check (once per network description and backend); where it fails with oneDNN on, switches oneDNN off in this
        /// process (<see cref="NumericsGuard.SwitchOffOneDnn"/>: one line on standard error, and the verdict every run
        /// records says why) and checks again; where it still fails, throws <see cref="NumericsException"/>. A network
        /// off the CPU is not checked (null).
        /// </summary>
        public static NetworkCheckResult? Ensure(MultiExitNetwork net)
        {
            if (net.parameters().FirstOrDefault() is { } p && p.device_type != DeviceType.CPU) return null;
            lock (Gate)
            {
                var key = $"{net.Describe()}|{LibTorchControls.OneDnnEnabled}";
                if (Done.TryGetValue(key, out var known) && known.Passed) return known;
                var result = Run(net, Simulated());
                if (result.Passed) { Done[key] = result; return result; }
                if (LibTorchControls.OneDnnEnabled)
                {
                    NumericsGuard.SwitchOffOneDnn($"the network check of {result.Network} {result.Summary()} under {result.Backend}");
                    var again = Run(net, Simulated());
                    if (again.Passed)
                    {
                        Done[$"{net.Describe()}|{LibTorchControls.OneDnnEnabled}"] = again;
                        return again;
                    }
                    result = again;
                }
                throw new NumericsException(
                    $"the network {result.Network} does not compute correct gradients on this machine under {result.Backend}: {result.Summary()}.\n" +
                    $"Training or evaluating it here would give wrong results. `earlyexit doctor --recheck --all` checks the convolution backends; " +
                    $"to run anyway (for diagnosis), force one with {NumericsGuard.Variable}=NAME or --numerics NAME and set {SkipVariable}=1.");
            }
        }

        /// <summary>Set to 1 to skip the network check (diagnosis only: a failed check is then not noticed).</summary>
        public const string SkipVariable = "EARLYEXIT_SKIP_NETWORK_CHECK";

        /// <summary><see cref="Ensure"/> unless <see cref="SkipVariable"/> is set.</summary>
        public static NetworkCheckResult? EnsureUnlessSkipped(MultiExitNetwork net) =>
            Environment.GetEnvironmentVariable(SkipVariable) == "1" ? null : Ensure(net);
    }
}
