// Table 1 of the 2026 paper: every strategy x top-1 at 25/50/75/100% of the backbone's MACs, with Fig. 2
// (accuracy against MACs) and Fig. 3 (exit ratios per threshold), on the data and scale this machine allows.
//
//   dotnet build -c Release && dotnet fsi experiments/table1.fsx [--scale smoke|cpu|paper] [--data cifar100|fashion-mnist]
//        [--data-root DIR] [--model resnet34|msdnet] [--seed N] [--out results/table1] [--device auto|cpu|cuda]
//        [--strategies joint,disjoint,...]   (default: all seven)
//        [--lwf-teachers per-exit,previous-stage]   (LwF strategies once per teacher policy; default: per-exit, the paper's)
//
// Default scale: paper on a GPU, cpu otherwise. Default data: CIFAR-100 when its binary files are present, else
// Fashion-MNIST (apt-get install -y dataset-fashion-mnist). Finished runs are reused, interrupted ones resumed, and
// the warm-up is trained once for all the strategies that start with it. Writes results/table1/<model>-<data>-<scale>/.
#load "Load.fsx"

open EarlyExit.Experiments.Experiments

exit (ScriptArgs.runScript "table1" __SOURCE_DIRECTORY__ fsi.CommandLineArgs Table1.run)
