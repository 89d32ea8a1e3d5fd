// Table 1 of the 2026 paper: every strategy x top-1 at 25/50/75/100% of the backbone's MACs, with Fig. 2
// (accuracy against MACs) and Fig. 3 (exit ratios per threshold), on the data and scale this machine allows.
//
//   dotnet build -c Release && dotnet fsi experiments/table1.fsx [--scale smoke|cpu|paper] [--data cifar100|fashion-mnist]
//        [--data-root DIR] [--model resnet34|msdnet] [--out results/table1] [--device auto|cpu|cuda]
//        [--seeds N | --seeds 0,1,2 | --seed K]   (default 3 seeds, 2 at smoke scale; one run folder per seed, paired)
//        [--jobs N] [--threads T]   (runs at a time, torch threads each; default: one job per core, 1 thread)
//        [--deterministic]   (same code, seed and threads give the same bits; costs time, see the README)
//        [--equal-steps]   (every strategy gets the same total of optimiser steps)
//        [--stage-epochs N]   (epochs of every stage after the warm-up: a second protocol, reported beside the first)
//        [--numerics auto|default|onednn-avx|...]   (force the convolution kernels; default: the numerics check's choice)
//        [--strategies joint,disjoint,...]   (default: all seven)
//        [--lwf-teachers per-exit,previous-stage]   (LwF strategies once per teacher policy; default: per-exit, the paper's)
//
// Cells are mean ± half-width of the 95% CI over seeds; Δ vs separate is paired by seed, with a verdict; every row
// carries its cost (epochs, steps, training MACs, wall time). Ends by printing the table and claims-DATA-SCALE.md.
//
// Default scale: paper on a GPU, cpu otherwise. Default data: CIFAR-100 when its binary files are present, else
// Fashion-MNIST (apt-get install -y dataset-fashion-mnist). Finished runs are reused, interrupted ones resumed, and
// the warm-up is trained once for all the strategies that start with it. Writes results/table1/<model>-<data>-<scale>/.
#load "Load.fsx"

open EarlyExit.Experiments.Experiments

exit (ScriptArgs.runScript "table1" __SOURCE_DIRECTORY__ fsi.CommandLineArgs Table1.run)
