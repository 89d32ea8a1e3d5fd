// The ICML 2025 paper's training-dynamics analysis of joint, disjoint and mixed training, with seeds: gradient
// dominance during every stage (which exit drives each segment), the effective rank of every segment's output after
// every stage, loss landscapes of the final networks (first seed), and mode connectivity between the strategies of
// each seed (its claim: disjoint and mixed in one basin, joint in another), with paired CIs and a verdict.
//
//   dotnet build -c Release && dotnet fsi experiments/dynamics.fsx [--seeds N | --seeds 0,1,2] [--scale smoke|cpu|paper]
//        [--model resnet34|msdnet] [--data ...] [--jobs N] [--threads T] [--out results/dynamics] [--deterministic]
//        [--numerics NAME] [--device auto|cpu|cuda] [--backend local|slurm ...]
//
// Trains (or reuses) the three strategies with the measurements switched on (they do not change a bit of training);
// writes results/dynamics/<model>-<data>-<scale>/dynamics.md and analysis/*.png|json. About 25 minutes at cpu scale here.
#load "Load.fsx"

open EarlyExit.Experiments.Experiments

exit (ScriptArgs.runScript "dynamics" __SOURCE_DIRECTORY__ fsi.CommandLineArgs Dynamics.run)
