// Table 2 of the 2026 paper: the ablation over the regulariser (EWC, LwF), its strength (λ in 10/100/1000,
// ρ in 0.2/0.5/0.7) and the warm-up of the backbone (on/off): twelve recipes, one grid.
//
//   dotnet build -c Release && dotnet fsi experiments/table2.fsx [--scale smoke|cpu|paper] [--data ...] [--model ...]
//
// Same options and behaviour as table1.fsx (--seeds, --jobs, --threads, --deterministic, --equal-steps, --numerics;
// resumable, warm-up shared, cells mean ± 95% CI over seeds); writes results/table2/<model>-<data>-<scale>/ and the
// λ and warm-up lines of claims-DATA-SCALE.md.
#load "Load.fsx"

open EarlyExit.Experiments.Experiments

exit (ScriptArgs.runScript "table2" __SOURCE_DIRECTORY__ fsi.CommandLineArgs Table2.run)
