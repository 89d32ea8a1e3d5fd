// What the regulariser plugins make possible, with seeds and verdicts (sequential training with the warm-up):
//   schedules  EWC λ as a geometric schedule over the stages (up 10→10000, down 1000→1) against the constants 10, 100, 1000
//   fisher     the exact Fisher against the paper's empirical one at λ = 10, 100, 1000, and λ sensitivity under each
//   mas        MAS (memory aware synapses) at λ = 0.1, 1, 10 beside EWC λ = 100 and LwF ρ = 0.7
//
//   dotnet build -c Release && dotnet fsi experiments/regularisers.fsx [--parts schedules,fisher,mas] [--seeds N | --seeds 0,1,2]
//        [--scale smoke|cpu|paper] [--model resnet34|msdnet] [--data ...] [--jobs N] [--threads T] [--out results/table2]
//        [--deterministic] [--numerics NAME] [--device auto|cpu|cuda]
//
// The grid extends Table 2's, in its folder: the constants (EWC λ = 10, 100, 1000 and LwF ρ = 0.7, with the warm-up) are
// Table 2's own runs, trained once for both; finished runs are reused and interrupted ones resumed, and the warm-up and
// the first sequential stage are trained once per seed for every row. Writes results/table2/<model>-<data>-<scale>/
// regularisers.md, regularisers.csv (per-seed values) and fig2-regularisers.png, and prints the tables.
#load "Load.fsx"

open EarlyExit.Experiments.Experiments

exit (ScriptArgs.runScript "regularisers" __SOURCE_DIRECTORY__ fsi.CommandLineArgs Regularisers.run)
