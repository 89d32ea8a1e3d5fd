/// Figures with ScottPlot: accuracy against MACs (Fig. 2) and exit ratios per threshold (Fig. 3).
module EarlyExit.Experiments.Evaluation.Plots

open EarlyExit.Experiments.Evaluation.Budget

/// One curve per method: (average MACs in millions, accuracy in %) over the threshold sweep.
/// Every figure carries its provenance (data, scale, device, seed, code version) under the title.
let private titled (plt: ScottPlot.Plot) (title: string) (provenance: string) =
    plt.Title(title + "\n" + provenance)
    plt.Axes.Title.Label.FontSize <- 13.0f

let accuracyVsMacs (path: string) (title: string) (provenance: string) (curves: (string * SweepPoint[]) list) =
    let plt = ScottPlot.Plot()
    for (name, points) in curves do
        let sorted = points |> Array.sortBy (fun p -> p.AverageMacs)
        let xs = sorted |> Array.map (fun p -> p.AverageMacs / 1e6)
        let ys = sorted |> Array.map (fun p -> 100.0 * p.Accuracy)
        let s = plt.Add.Scatter(xs, ys)
        s.LegendText <- name
        s.MarkerSize <- 3.0f
    titled plt title provenance
    plt.XLabel("average MACs per sample (millions; one multiply-add = 1)")
    plt.YLabel("top-1 accuracy (%)")
    plt.ShowLegend(ScottPlot.Alignment.LowerRight) |> ignore
    plt.SavePng(path, 1000, 650) |> ignore

/// Grouped bars: for each threshold, the share of samples leaving at each exit (exits left to right).
let exitRatios (path: string) (title: string) (provenance: string) (exitsCount: int) (groups: (string * float[]) list) =
    let plt = ScottPlot.Plot()
    let palette = ScottPlot.Palettes.Category10()
    let width = 0.8 / float exitsCount
    groups
    |> List.iteri (fun g (_, ratios) ->
        for e in 0 .. ratios.Length - 1 do
            let bar = ScottPlot.Bar()
            bar.Position <- float g + (float e - float (exitsCount - 1) / 2.0) * width
            bar.Value <- 100.0 * ratios[e]
            bar.Size <- width * 0.9
            bar.FillColor <- palette.GetColor e
            plt.Add.Bar(bar) |> ignore)
    for e in 0 .. exitsCount - 1 do
        let item = ScottPlot.LegendItem()
        item.LabelText <- $"exit {e + 1}"
        item.FillColor <- palette.GetColor e
        plt.Legend.ManualItems.Add item
    let ticks = groups |> List.mapi (fun g (label, _) -> ScottPlot.Tick(float g, label)) |> List.toArray
    plt.Axes.Bottom.TickGenerator <- ScottPlot.TickGenerators.NumericManual(ticks)
    titled plt title provenance
    plt.XLabel("confidence threshold")
    plt.YLabel("samples leaving at the exit (%)")
    plt.ShowLegend(ScottPlot.Alignment.UpperRight) |> ignore
    plt.SavePng(path, 1100, 600) |> ignore
