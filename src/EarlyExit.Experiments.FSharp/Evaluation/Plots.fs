/// Figures with ScottPlot: accuracy against MACs (Fig. 2) and exit ratios per threshold (Fig. 3).
module EarlyExit.Experiments.Evaluation.Plots

open EarlyExit.Experiments.Evaluation.Budget

/// One curve per method: (average MACs in millions, accuracy in %) over the threshold sweep.
/// Every figure carries its provenance (data, scale, device, seed, code version) under the title.
let private titled (plt: ScottPlot.Plot) (title: string) (provenance: string) =
    // The provenance wrapped at its commas into lines that fit the figure's width.
    let lines =
        provenance.Split(", ")
        |> Array.fold (fun (acc: string list) part ->
            match acc with
            | last :: rest when last.Length + part.Length + 2 <= 110 -> (last + ", " + part) :: rest
            | _ -> part :: acc) []
        |> List.rev
    plt.Title(title + "\n" + String.concat "\n" lines)
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

/// One curve per method over seeds: the mean (average MACs, accuracy) at each threshold of the sweep, and a band of
/// ± the half-width of the 95% confidence interval of the accuracy (none where n < 2).
let accuracyVsMacsBands (path: string) (title: string) (provenance: string) (curves: (string * float[] * float[] * float[]) list) =
    let plt = ScottPlot.Plot()
    let palette = ScottPlot.Palettes.Category10()
    curves
    |> List.iteri (fun i (name, macs, acc, halfWidth) ->
        let order = Array.init macs.Length id |> Array.sortBy (fun k -> macs[k])
        let xs = order |> Array.map (fun k -> macs[k] / 1e6)
        let ys = order |> Array.map (fun k -> 100.0 * acc[k])
        let color = palette.GetColor i
        if halfWidth |> Array.forall (fun h -> not (System.Double.IsNaN h)) then
            let lo = order |> Array.map (fun k -> 100.0 * (acc[k] - halfWidth[k]))
            let hi = order |> Array.map (fun k -> 100.0 * (acc[k] + halfWidth[k]))
            let band = plt.Add.FillY(xs, lo, hi)
            band.FillColor <- color.WithAlpha(0.2)
            band.LineWidth <- 0.0f
        let s = plt.Add.Scatter(xs, ys)
        s.Color <- color
        s.LegendText <- name
        s.MarkerSize <- 3.0f)
    titled plt title provenance
    plt.XLabel("average MACs per sample (millions; one multiply-add = 1)")
    plt.YLabel("top-1 accuracy (%), mean over seeds with 95% CI")
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
