/// The ICML 2025 paper's training-dynamics analysis of finished runs: gradient dominance (recorded during training,
/// when the recipe asked for it), the numerical rank of every segment's output, loss landscapes per head, and mode
/// connectivity to another run. `earlyexit analyze` and experiments/dynamics.fsx both go through here.
module EarlyExit.Experiments.Analysis.Analyze

open System
open System.IO
open System.Text.Json
open TorchSharp
open EarlyExit.Analysis
open EarlyExit.Models
open EarlyExit.Training
open EarlyExit.Experiments.Recipes
open EarlyExit.Experiments.Runner
open EarlyExit.Experiments.Evaluation
open EarlyExit.Experiments.Reports

/// Knobs of the analysis (each metric's cost grows with its own).
type Settings =
    { /// Test images the landscape and the path are evaluated on.
      Samples: int
      /// Validation images of the rank.
      RankSamples: int
      /// Points per axis of the landscape's grid, and its half-width in units of the filter-normalised directions.
      Grid: int
      Span: float
      Groups: PerturbedGroups
      /// Points of the linear path (its two ends included), and training images BatchNorm is re-estimated on.
      Points: int
      BnSamples: int
      Seed: int }

let defaults = { Samples = 1000; RankSamples = 256; Grid = 11; Span = 1.0; Groups = PerturbedGroups.All; Points = 11; BnSamples = 2000; Seed = 0 }

let metricNames = [ "gradients"; "rank"; "landscape"; "connectivity" ]

let private json = Markdown.jsonOptions true
let private inv = Globalization.CultureInfo.InvariantCulture
let private f3 (v: float) = if Double.IsNaN v then "–" else v.ToString("F3", inv)

/// A finished run: its recipe, the network as its last stage left it (on the CPU), and its data.
let loadRun (runDir: string) =
    let dir = Path.GetFullPath runDir
    if not (File.Exists(Path.Combine(dir, "metrics.json"))) then
        failwithf "%s is not a finished run (no metrics.json): train it first, or pass --resume to finish it" dir
    let recipe =
        match RecipeJson.load (Path.Combine(dir, "recipe.json")) with
        | Ok r -> r
        | Error es -> failwithf "%s: %s" dir (String.Join("; ", es))
    let last = Directory.GetFiles(Path.Combine(dir, "stages"), "*.done.model") |> Array.sort |> Array.last
    let net = ModelRegistry.Create(recipe.Model.Name, Validation.modelOptions recipe.Model)
    let state = TensorStore.Load last
    try TensorStore.LoadInto(net, state)
    finally for t in state.Values do t.Dispose()
    recipe, net, Interpreter.loadData recipe

/// Per stage recorded during training: the mean over its samples of each loss exit's share of each segment's
/// gradient, and of the cosine between the exits' gradients ([exit][segment], [segment][exit][exit]).
type StageGradients = { Stage: string; Samples: int; Exits: int[]; Shares: float[][]; Cosines: float[][][]; Seconds: float }

let gradientsOf (runDir: string) : StageGradients list =
    use doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(runDir, "metrics.json")))
    match doc.RootElement.TryGetProperty "dynamics" with
    | true, d when d.ValueKind = JsonValueKind.Array ->
        [ for st in d.EnumerateArray() do
            match st.TryGetProperty "gradients" with
            | true, g when g.ValueKind = JsonValueKind.Object ->
                let samples = g.GetProperty("samples").EnumerateArray() |> Seq.toList
                if not samples.IsEmpty then
                    let num (e: JsonElement) = if e.ValueKind = JsonValueKind.String then nan else e.GetDouble()
                    let mat (e: JsonElement) = e.EnumerateArray() |> Seq.map (fun r -> r.EnumerateArray() |> Seq.map num |> Seq.toArray) |> Seq.toArray
                    let shares = samples |> List.map (fun s -> mat (s.GetProperty "Shares"))
                    let cos = samples |> List.map (fun s -> s.GetProperty("Cosines").EnumerateArray() |> Seq.map mat |> Seq.toArray)
                    let exits = samples.Head.GetProperty("Exits").EnumerateArray() |> Seq.map (fun e -> e.GetInt32()) |> Seq.toArray
                    let meanOf (xs: float list) = let ok = xs |> List.filter (Double.IsNaN >> not) in if ok.IsEmpty then nan else List.average ok
                    yield
                        { Stage = st.GetProperty("stage").GetString()
                          Samples = samples.Length
                          Exits = exits
                          Shares = Array.init exits.Length (fun i -> Array.init shares.Head[i].Length (fun s -> shares |> List.map (fun m -> m[i][s]) |> meanOf))
                          Cosines = Array.init cos.Head.Length (fun s -> Array.init exits.Length (fun i -> Array.init exits.Length (fun j -> cos |> List.map (fun c -> c[s][i][j]) |> meanOf)))
                          Seconds = g.GetProperty("seconds").GetDouble() }
            | _ -> () ]
    | _ -> []

/// Ranks after every stage, recorded during training: (stage, [segment → (rank, effective rank)]).
let ranksOf (runDir: string) =
    use doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(runDir, "metrics.json")))
    match doc.RootElement.TryGetProperty "dynamics" with
    | true, d when d.ValueKind = JsonValueKind.Array ->
        [ for st in d.EnumerateArray() do
            match st.TryGetProperty "rank" with
            | true, r when r.ValueKind = JsonValueKind.Object ->
                yield st.GetProperty("stage").GetString(),
                      [ for s in r.GetProperty("segments").EnumerateArray() -> s.GetProperty("Rank").GetInt32(), s.GetProperty("EffectiveRank").GetDouble() ]
            | _ -> () ]
    | _ -> []

let private provenance (runDir: string) =
    let info = RunFolder.readInfo runDir
    $"{info.Data}, scale {info.Scale}, {info.Device}, {info.NumericsShort}, seed {info.Seed}, code {info.CodeVersion}"

let private write (path: string) (value: obj) = Markdown.writeAtomic path (JsonSerializer.Serialize(value, json))

/// Analyses a finished run (and, for connectivity, another run of the same architecture); writes OUT (default
/// RUN/analysis/): JSON and PNGs per metric. Returns the Markdown summary.
let run (runDir: string) (vs: string option) (metrics: string list) (s: Settings) (outDir: string option) (log: string -> unit) =
    let runDir = Path.GetFullPath runDir
    // The run is read first: a mistyped folder must not be created as an output folder.
    let recipe, net, data = loadRun runDir
    let out = outDir |> Option.defaultValue (Path.Combine(runDir, "analysis"))
    Directory.CreateDirectory out |> ignore
    use net = net
    let prov = provenance runDir
    let name = Path.GetFileName(Path.GetDirectoryName runDir) + "/" + Path.GetFileName runDir
    let sections = Collections.Generic.List<string>()
    if List.contains "gradients" metrics then
        let stages = gradientsOf runDir
        if stages.IsEmpty then sections.Add "## Gradient dominance\n\nNot recorded: the run was trained without `dynamics.gradientEvery` (it is measured during training).\n"
        else
            let body =
                [ for st in stages do
                    for seg in 0 .. st.Shares[0].Length - 1 do
                        if st.Shares |> Array.exists (fun sh -> sh[seg] > 0.0) then
                            let shares = [ for i in 0 .. st.Exits.Length - 1 -> $"exit {st.Exits[i]}: {f3 (st.Shares[i][seg])}" ]
                            yield [ st.Stage; $"segment {seg + 1}"; String.Join(", ", shares) ] ]
            for st in stages do
                let rows = [| for i in 0 .. st.Exits.Length - 1 -> $"exit {st.Exits[i]}" |]
                let cols = [| for seg in 1 .. st.Shares[0].Length -> $"segment {seg}" |]
                Plots.matrix (Path.Combine(out, $"gradients-{st.Stage}.png")) $"Share of each segment's gradient by exit: {name}, stage {st.Stage} ({st.Samples} samples)" prov rows cols st.Shares "share of the segment's gradient"
            write (Path.Combine(out, "gradients.json")) stages
            sections.Add("## Gradient dominance\n\nEach loss exit's share of each trained segment's gradient (the norm of w_e ∇CE_e over the sum over exits), mean over the samples taken during the stage; figures gradients-STAGE.png.\n\n" +
                         Markdown.table [ "stage"; "segment"; "shares" ] body)
    if List.contains "rank" metrics then
        let clock = Diagnostics.Stopwatch.StartNew()
        let ranks = RepresentationRank.Compute(net, data.Validation, s.RankSamples, s.Seed, torch.CPU) |> List.ofSeq
        let perStage = ranksOf runDir
        write (Path.Combine(out, "rank.json")) {| final = ranks; perStage = perStage; seconds = clock.Elapsed.TotalSeconds |}
        if not perStage.IsEmpty then
            let stagesLabels = perStage |> List.map fst |> Array.ofList
            let segments = (snd perStage.Head).Length
            Plots.lines (Path.Combine(out, "rank.png")) $"Effective rank of each segment's output after each stage: {name}" prov stagesLabels
                [ for seg in 0 .. segments - 1 -> $"segment {seg + 1}", perStage |> List.map (fun (_, r) -> snd r[seg]) |> Array.ofList ] "effective rank"
        sections.Add($"## Numerical rank of representations\n\nOver {ranks.Head.Samples} validation images; rank: singular values above σ_max·max(N, D)·ε(float32); effective rank: exp of the entropy of the normalised spectrum ({clock.Elapsed.TotalSeconds:F1} s).\n\n" +
                     Markdown.table [ "segment"; "features D"; "rank"; "effective rank" ] [ for r in ranks -> [ string r.Segment; string r.Features; string r.Rank; f3 r.EffectiveRank ] ])
    if List.contains "landscape" metrics then
        let r = LossLandscape.Compute(net, data.Test, s.Samples, s.Grid, s.Span, s.Groups, s.Seed)
        write (Path.Combine(out, "landscape.json")) r
        let centre = Array.IndexOf(r.Alphas, 0.0)
        for e in 0 .. net.ExitCount - 1 do
            Plots.landscape (Path.Combine(out, $"landscape-exit{e + 1}.png")) $"Loss landscape of exit {e + 1}: {name} ({r.Groups} moved)" prov r.Alphas r.Betas r.Loss[e]
        sections.Add($"## Loss landscape\n\nLoss of every exit on the plane θ* + α·d₁ + β·d₂ (filter-normalised random directions, biases and BatchNorm fixed, {r.Groups} moved), {s.Grid}×{s.Grid} points over [−{s.Span}, {s.Span}]², {r.Samples} test images ({r.Seconds:F0} s); figures landscape-exitK.png.\n\n" +
                     Markdown.table [ "exit"; "loss at θ*"; "lowest on the plane"; "highest on the plane"; "accuracy at θ*" ]
                         [ for e in 0 .. net.ExitCount - 1 ->
                             let all = r.Loss[e] |> Array.concat
                             [ string (e + 1); (if centre >= 0 then f3 (r.Loss[e][centre][centre]) else "–"); f3 (Array.min all); f3 (Array.max all)
                               (if centre >= 0 then f3 (r.Accuracy[e][centre][centre]) else "–") ] ])
    if List.contains "connectivity" metrics then
        match vs with
        | None -> sections.Add "## Mode connectivity\n\nNeeds a second run: `--vs OTHER_RUN`.\n"
        | Some other ->
            let other = Path.GetFullPath other
            let _, netB, _ = loadRun other
            use netB = netB
            let r = ModeConnectivity.Compute(net, netB, data.Train, data.Test, s.Points, s.BnSamples, s.Samples, s.Seed)
            let otherName = Path.GetFileName(Path.GetDirectoryName other) + "-" + Path.GetFileName other
            write (Path.Combine(out, $"connectivity-{otherName}.json")) r
            let ts = r.Path |> Array.map (fun p -> p.T)
            Plots.connectivity (Path.Combine(out, $"connectivity-{otherName}.png")) $"Linear path from {name} to {otherName}" prov ts
                [ for e in 0 .. net.ExitCount - 1 -> $"exit {e + 1}", r.Path |> Array.map (fun p -> p.Loss[e]) ]
                [ for e in 0 .. net.ExitCount - 1 -> $"exit {e + 1}", r.Path |> Array.map (fun p -> p.Accuracy[e]) ]
            sections.Add($"## Mode connectivity to {other}\n\n{s.Points} points, BatchNorm statistics re-estimated at each on {r.BatchNormSamples} training images; {r.EvaluationSamples} test images ({r.Seconds:F0} s). Barrier: the most the path rises above the straight line between its ends.\n\n" +
                         Markdown.table [ "exit"; "loss A (own statistics)"; "loss B (own statistics)"; "highest loss on the path"; "loss barrier"; "accuracy barrier (points)" ]
                             [ for e in 0 .. net.ExitCount - 1 ->
                                 [ string (e + 1); f3 (r.OwnStatisticsA.Loss[e]); f3 (r.OwnStatisticsB.Loss[e]); f3 (r.Path |> Array.map (fun p -> p.Loss[e]) |> Array.max)
                                   f3 (r.LossBarrier[e]); (100.0 * r.AccuracyBarrier[e]).ToString("F2", inv) ] ])
    let md = $"# Analysis of {runDir}\n\n{prov}\n\n" + String.Join("\n", sections) + "\n"
    Markdown.writeAtomic (Path.Combine(out, "analysis.md")) md
    log $"wrote {out}"
    md
