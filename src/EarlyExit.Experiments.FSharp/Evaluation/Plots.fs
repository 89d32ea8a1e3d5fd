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

/// A distinct look per series even past ten of them: a colour of Category20 and, cycling apart from it, a line
/// pattern and a marker shape.
let private styleOf (i: int) =
    let palette = ScottPlot.Palettes.Category20()
    let patterns = [| ScottPlot.LinePattern.Solid; ScottPlot.LinePattern.Dashed; ScottPlot.LinePattern.Dotted; ScottPlot.LinePattern.DenselyDashed |]
    let markers = [| ScottPlot.MarkerShape.FilledCircle; ScottPlot.MarkerShape.FilledSquare; ScottPlot.MarkerShape.FilledTriangleUp; ScottPlot.MarkerShape.FilledDiamond; ScottPlot.MarkerShape.OpenCircle |]
    palette.GetColor i, patterns[(i / 2) % patterns.Length], markers[i % markers.Length]

/// One curve per method over seeds: the mean (average MACs, accuracy) at each threshold of the sweep, and a band of
/// ± the half-width of the 95% confidence interval of the accuracy (none where n < 2). With `backboneMacs` > 0,
/// vertical lines mark the 25/50/75/100% budgets. The accuracy axis spans at least 10 points, so that sub-point
/// differences do not look like gulfs.
let accuracyVsMacsBands (path: string) (title: string) (provenance: string) (curves: (string * float[] * float[] * float[]) list) (backboneMacs: float) =
    let plt = ScottPlot.Plot()
    let mutable lo, hi = infinity, -infinity
    curves
    |> List.iteri (fun i (name, macs, acc, halfWidth) ->
        let order = Array.init macs.Length id |> Array.sortBy (fun k -> macs[k])
        let xs = order |> Array.map (fun k -> macs[k] / 1e6)
        let ys = order |> Array.map (fun k -> 100.0 * acc[k])
        let color, pattern, marker = styleOf i
        if halfWidth |> Array.forall (fun h -> not (System.Double.IsNaN h)) then
            let bandLo = order |> Array.map (fun k -> 100.0 * (acc[k] - halfWidth[k]))
            let bandHi = order |> Array.map (fun k -> 100.0 * (acc[k] + halfWidth[k]))
            let band = plt.Add.FillY(xs, bandLo, bandHi)
            band.FillColor <- color.WithAlpha(0.12)
            band.LineWidth <- 0.0f
        let s = plt.Add.Scatter(xs, ys)
        s.Color <- color
        s.LinePattern <- pattern
        s.MarkerShape <- marker
        s.LegendText <- name
        s.MarkerSize <- 4.0f
        for y in ys do
            lo <- min lo y
            hi <- max hi y)
    if backboneMacs > 0.0 then
        for f in Budget.standardBudgets do
            let v = plt.Add.VerticalLine(f * backboneMacs / 1e6, 1.0f, System.Nullable(ScottPlot.Colors.Gray), ScottPlot.LinePattern.Dotted)
            v.Text <- $"{int (100.0 * f)}%%"
            v.LabelOppositeAxis <- true
    titled plt title provenance
    plt.XLabel("average MACs per sample (millions; one multiply-add = 1); dotted: 25/50/75/100% of the backbone")
    plt.YLabel("top-1 accuracy (%), mean over seeds with 95% CI")
    if not (System.Double.IsInfinity lo) then
        let mid = (lo + hi) / 2.0
        let half = max 5.0 ((hi - lo) / 2.0 + 1.0)
        plt.Axes.SetLimitsY(max 0.0 (mid - half), min 100.0 (mid + half))
    plt.ShowLegend(ScottPlot.Alignment.LowerRight) |> ignore
    plt.SavePng(path, 1100, 700) |> ignore

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

/// A loss landscape: the loss on the (α, β) plane as a heatmap (log scale) with contour lines; the trained weights
/// sit at (0, 0).
let landscape (path: string) (title: string) (provenance: string) (alphas: float[]) (betas: float[]) (loss: float[][]) =
    let plt = ScottPlot.Plot()
    let n, m = alphas.Length, betas.Length
    // Rows of a heatmap run top to bottom: the largest β first.
    let intensities = Array2D.init m n (fun r c -> log10 (max 1e-12 (loss[c][m - 1 - r])))
    let hm = plt.Add.Heatmap(intensities)
    // Cells centred on the grid's points: the image spans half a step beyond the first and last.
    let da, db = (alphas[n - 1] - alphas[0]) / float (n - 1), (betas[m - 1] - betas[0]) / float (m - 1)
    hm.Rectangle <- ScottPlot.CoordinateRect(alphas[0] - da / 2.0, alphas[n - 1] + da / 2.0, betas[0] - db / 2.0, betas[m - 1] + db / 2.0)
    hm.Colormap <- ScottPlot.Colormaps.Viridis()
    let bar = plt.Add.ColorBar(hm)
    bar.Label <- "log10 loss"
    // Contour lines of the log loss by marching squares (linear interpolation along each cell's edges) on the grid
    // bilinearly refined four times: ScottPlot's ContourLines steps along the grid's vertices, which on an 11×11
    // measurement comes out as staircases.
    let z a b = log10 (max 1e-12 (loss[a][b]))
    let fine = 4
    let fn, fm = fine * (n - 1) + 1, fine * (m - 1) + 1
    let at (u: float) (v: float) =
        let a0, b0 = min (int u) (n - 2), min (int v) (m - 2)
        let fu, fv = u - float a0, v - float b0
        (1.0 - fu) * (1.0 - fv) * z a0 b0 + fu * (1.0 - fv) * z (a0 + 1) b0 + (1.0 - fu) * fv * z a0 (b0 + 1) + fu * fv * z (a0 + 1) (b0 + 1)
    let grid = Array2D.init fn fm (fun i j -> at (float i / float fine) (float j / float fine))
    let xOf i = alphas[0] + float i / float fine * da
    let yOf j = betas[0] + float j / float fine * db
    let lo, hi = Seq.min (Seq.cast<float> grid), Seq.max (Seq.cast<float> grid)
    let levels = 10
    for k in 1 .. levels do
        let level = lo + float k * (hi - lo) / float (levels + 1)
        for i in 0 .. fn - 2 do
            for j in 0 .. fm - 2 do
                // Corners counter-clockwise from (i, j); an edge is crossed where its ends lie on either side.
                let corners = [| (i, j); (i + 1, j); (i + 1, j + 1); (i, j + 1) |]
                let crossings =
                    [ for c in 0 .. 3 do
                        let (i0, j0), (i1, j1) = corners[c], corners[(c + 1) % 4]
                        let v0, v1 = grid[i0, j0], grid[i1, j1]
                        if (v0 < level) <> (v1 < level) then
                            let t = (level - v0) / (v1 - v0)
                            yield (xOf i0 + t * (xOf i1 - xOf i0), yOf j0 + t * (yOf j1 - yOf j0)) ]
                // Two crossings: one segment; four (a saddle): the centre's side decides which pair of opposite corners the
                // lines cut off.
                let segments =
                    match crossings with
                    | [ p; q ] -> [ p, q ]
                    | [ p0; p1; p2; p3 ] ->
                        let centre = (grid[i, j] + grid[i + 1, j] + grid[i + 1, j + 1] + grid[i, j + 1]) / 4.0
                        if (centre < level) = (grid[i, j] < level) then [ p0, p1; p2, p3 ] else [ p3, p0; p1, p2 ]
                    | _ -> []
                for (x0, y0), (x1, y1) in segments do
                    let line = plt.Add.Line(x0, y0, x1, y1)
                    line.LineColor <- ScottPlot.Colors.White.WithAlpha(0.7)
                    line.LineWidth <- 1.0f
    let origin = plt.Add.Marker(0.0, 0.0)
    origin.Color <- ScottPlot.Colors.Red
    titled plt title provenance
    plt.XLabel("α (direction 1, filter-normalised)")
    plt.YLabel("β (direction 2, filter-normalised)")
    plt.SavePng(path, 800, 700) |> ignore

/// Loss (left axis) and accuracy (right axis) of every exit along a path t ∈ [0, 1].
let connectivity (path: string) (title: string) (provenance: string) (ts: float[]) (losses: (string * float[]) list) (accuracies: (string * float[]) list) =
    let plt = ScottPlot.Plot()
    let palette = ScottPlot.Palettes.Category10()
    losses |> List.iteri (fun i (name, ys) ->
        let s = plt.Add.Scatter(ts, ys)
        s.LegendText <- $"{name} loss"
        s.Color <- palette.GetColor i)
    accuracies |> List.iteri (fun i (name, ys) ->
        let s = plt.Add.Scatter(ts, ys |> Array.map (fun a -> 100.0 * a))
        s.LegendText <- $"{name} accuracy (%%, right)"
        s.Color <- palette.GetColor i
        s.LinePattern <- ScottPlot.LinePattern.Dashed
        s.Axes.YAxis <- plt.Axes.Right)
    titled plt title provenance
    plt.XLabel("t: (1 − t)·θ_A + t·θ_B, BatchNorm statistics re-estimated at every point")
    plt.YLabel("test cross-entropy")
    plt.Axes.Right.Label.Text <- "test accuracy (%)"
    plt.ShowLegend(ScottPlot.Alignment.UpperRight) |> ignore
    plt.SavePng(path, 1000, 650) |> ignore

/// A matrix as a heatmap with its values written in the cells (rows top to bottom), e.g. each exit's share of each
/// segment's gradient.
let matrix (path: string) (title: string) (provenance: string) (rowLabels: string[]) (columnLabels: string[]) (values: float[][]) (unit: string) =
    let plt = ScottPlot.Plot()
    let rows, cols = rowLabels.Length, columnLabels.Length
    let intensities = Array2D.init rows cols (fun r c -> if System.Double.IsNaN(values[r][c]) then 0.0 else values[r][c])
    let hm = plt.Add.Heatmap(intensities)
    hm.Rectangle <- ScottPlot.CoordinateRect(-0.5, float cols - 0.5, -0.5, float rows - 0.5)
    hm.Colormap <- ScottPlot.Colormaps.Viridis()
    let bar = plt.Add.ColorBar(hm)
    bar.Label <- unit
    for r in 0 .. rows - 1 do
        for c in 0 .. cols - 1 do
            let v = values[r][c]
            let text = if System.Double.IsNaN v then "–" else v.ToString("F2", System.Globalization.CultureInfo.InvariantCulture)
            let t = plt.Add.Text(text, float c, float (rows - 1 - r))
            t.LabelFontColor <- ScottPlot.Colors.White
            t.LabelAlignment <- ScottPlot.Alignment.MiddleCenter
    plt.Axes.Bottom.TickGenerator <- ScottPlot.TickGenerators.NumericManual(columnLabels |> Array.mapi (fun c l -> ScottPlot.Tick(float c, l)))
    plt.Axes.Left.TickGenerator <- ScottPlot.TickGenerators.NumericManual(rowLabels |> Array.mapi (fun r l -> ScottPlot.Tick(float (rows - 1 - r), l)))
    titled plt title provenance
    plt.SavePng(path, 900, 120 + 70 * max 3 rows) |> ignore

/// Lines over stages, one per series (the rank of each segment's output after each stage).
let lines (path: string) (title: string) (provenance: string) (xLabels: string[]) (series: (string * float[]) list) (yLabel: string) =
    let plt = ScottPlot.Plot()
    let xs = Array.init xLabels.Length float
    for (name, ys) in series do
        let s = plt.Add.Scatter(xs, ys)
        s.LegendText <- name
    plt.Axes.Bottom.TickGenerator <- ScottPlot.TickGenerators.NumericManual(xLabels |> Array.mapi (fun i l -> ScottPlot.Tick(float i, l)))
    titled plt title provenance
    plt.YLabel(yLabel)
    plt.ShowLegend(ScottPlot.Alignment.UpperRight) |> ignore
    plt.SavePng(path, 1000, 600) |> ignore

/// Reliability diagrams: per exit, the accuracy of each confidence bin against its mean confidence (the diagonal is
/// perfect calibration), with the exit's expected calibration error in the legend.
let reliability (path: string) (title: string) (provenance: string) (exits: (string * float * (int * float * float)[]) list) =
    let plt = ScottPlot.Plot()
    let palette = ScottPlot.Palettes.Category10()
    let diagonal = plt.Add.Line(0.0, 0.0, 1.0, 1.0)
    diagonal.Color <- ScottPlot.Colors.Gray
    diagonal.LinePattern <- ScottPlot.LinePattern.Dotted
    exits |> List.iteri (fun i (name, ece, bins) ->
        let filled = bins |> Array.filter (fun (n, _, _) -> n > 0)
        let s = plt.Add.Scatter(filled |> Array.map (fun (_, _, c) -> c), filled |> Array.map (fun (_, a, _) -> a))
        s.LegendText <- $"""{name} (ECE {ece.ToString("F3", System.Globalization.CultureInfo.InvariantCulture)})"""
        s.Color <- palette.GetColor i)
    titled plt title provenance
    plt.XLabel("mean confidence of the bin (maximum softmax probability; 15 equal-width bins)")
    plt.YLabel("accuracy of the bin")
    plt.Axes.SetLimits(0.0, 1.0, 0.0, 1.0)
    plt.ShowLegend(ScottPlot.Alignment.UpperLeft) |> ignore
    plt.SavePng(path, 850, 750) |> ignore
