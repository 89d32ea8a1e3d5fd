/// The ICML 2025 paper's analysis of why joint, disjoint and mixed training differ, with seeds: gradient dominance
/// during every stage, the rank of every segment's output after every stage, loss landscapes of the final networks,
/// and mode connectivity between the strategies' solutions of the same seed (its claim: disjoint and mixed lie in one
/// basin, joint in another). Paired comparisons over seeds with 95% CIs and verdicts; every analysis states its cost.
module EarlyExit.Experiments.Experiments.Dynamics

open System
open System.IO
open System.Text.Json
open EarlyExit.Analysis
open EarlyExit.Experiments.Recipes
open EarlyExit.Experiments.Recipes.Builders
open EarlyExit.Experiments.Runner
open EarlyExit.Experiments.Evaluation
open EarlyExit.Experiments.Reports
open EarlyExit.Experiments.Analysis

let strategies = [ Joint; Disjoint; Mixed ]

/// The knobs per scale: gradients every K steps, rank samples, landscape and path sizes.
let settingsFor (scale: Scales.Scale) =
    match scale with
    | Scales.Smoke -> 1, { Analyze.defaults with Samples = 100; RankSamples = 64; Grid = 5; Points = 5; BnSamples = 200 }
    | Scales.Cpu -> 25, { Analyze.defaults with Samples = 1000; RankSamples = 256; Grid = 11; Points = 11; BnSamples = 2000 }
    | Scales.Paper -> 100, { Analyze.defaults with Samples = 2000; RankSamples = 512; Grid = 21; Points = 21; BnSamples = 5000 }

/// Pairs of strategies joined by a linear path, the claim's pair first.
let pairs = [ "disjoint", "mixed"; "joint", "mixed"; "joint", "disjoint" ]

let private inv = Globalization.CultureInfo.InvariantCulture
let private json = Markdown.jsonOptions true

let run (o: Table1.Options) =
    if o.Strategies.IsSome || o.Regularisers.IsSome || o.Parts.IsSome then
        invalidArg "strategies" "dynamics.fsx runs joint, disjoint and mixed; it takes no --strategies, --regularisers or --parts"
    let data, dataNote = Table1.chooseData o
    let dir = Table1.resultsFolder o data
    let every, settings = settingsFor o.Scale
    o.Log $"""dynamics on {dataNote}, scale {Scales.name o.Scale}, seeds {String.Join(",", o.Seeds)}: gradients every {every} steps, rank over {settings.RankSamples} validation images; results in {dir}"""
    let recipes =
        [ for s in strategies ->
            strategyName s, { Table1.recipeOf o s data with Dynamics = { GradientEvery = every; RankSamples = settings.RankSamples } } ]
    let rows = Table1.runAll o dir recipes
    let byName = rows |> List.map (fun r -> r.Strategy, r) |> Map.ofList
    let runDirOf name seed = Table1.runDir dir name seed
    let analysis = Path.Combine(dir, "analysis")
    Directory.CreateDirectory analysis |> ignore
    let prov = Table1.provenanceOf rows
    let m = rows.Head.Runs.Head.ExitAccuracy.Length

    // 1. Gradient dominance, mean over seeds, per strategy and stage.
    let gradientSection =
        let lines =
            [ for name, _ in recipes do
                let perSeed = [ for s in o.Seeds -> Analyze.gradientsOf (runDirOf name s) ]
                let stageNames = perSeed |> List.collect (List.map (fun g -> g.Stage)) |> List.distinct
                for stage in stageNames do
                    let samples = perSeed |> List.choose (List.tryFind (fun g -> g.Stage = stage))
                    if not samples.IsEmpty then
                        let exits = samples.Head.Exits
                        let mean (f: Analyze.StageGradients -> float) = samples |> List.map f |> List.filter (Double.IsNaN >> not) |> fun xs -> if xs.IsEmpty then nan else List.average xs
                        let shares = Array.init exits.Length (fun i -> Array.init m (fun seg -> mean (fun g -> g.Shares[i][seg])))
                        let cost = samples |> List.averageBy (fun g -> g.Seconds)
                        Plots.matrix (Path.Combine(analysis, $"gradients-{name}-{stage}.png")) $"Share of each segment's gradient by exit: {name}, stage {stage} (mean over {samples.Length} seeds)" prov
                            [| for e in exits -> $"exit {e}" |] [| for seg in 1..m -> $"segment {seg}" |] shares "share of the segment's gradient"
                        // Which exit drives each trained segment most.
                        for seg in 0 .. m - 1 do
                            if shares |> Array.exists (fun sh -> sh[seg] > 0.0) then
                                let top = Array.init exits.Length id |> Array.maxBy (fun i -> shares[i][seg])
                                let own = exits |> Array.tryFindIndex ((=) (seg + 1)) |> Option.map (fun i -> (shares[i][seg]).ToString("F2", inv)) |> Option.defaultValue "–"
                                let deepest = (shares[exits.Length - 1][seg]).ToString("F2", inv)
                                yield [ name; stage; $"segment {seg + 1}"; $"exit {exits[top]} ({shares[top][seg]:F2})"; own; deepest; $"{cost:F1}" ] ]
        "## Gradient dominance\n\n" +
        $"Every {every} optimiser step(s), the norm of each loss exit's weighted gradient w_e∇CE_e on each trained segment, as a share of the sum over exits; mean over the stage's samples and over seeds (figures analysis/gradients-STRATEGY-STAGE.png). " +
        "\"own exit\": the share of the exit that reads the segment's output directly; \"last exit\": the final classifier's share. Cost: the seconds the measurement added per run and stage (mean over seeds).\n\n" +
        Markdown.table [ "strategy"; "stage"; "segment"; "driven most by"; "own exit's share"; "last exit's share"; "cost (s)" ] lines

    // 2. Rank of every segment's output after every stage (mean over seeds of the effective rank).
    let effective (p: (string * (int * float) list) list) (k: int) (seg: int) = p |> List.item k |> snd |> List.item seg |> snd
    let rankSection =
        let table =
            [ for name, _ in recipes do
                let perSeed = [ for s in o.Seeds -> Analyze.ranksOf (runDirOf name s) ]
                match perSeed with
                | first :: _ when not first.IsEmpty ->
                    for k, (stage, _) in List.indexed first do
                        let values seg = perSeed |> List.choose (fun p -> if k < p.Length then Some(effective p k seg) else None)
                        yield [ name; stage ] @ [ for seg in 0 .. m - 1 -> Statistics.format 1.0 (Statistics.summarize (values seg)) ]
                | _ -> () ]
        for name, _ in recipes do
            let perSeed = [ for s in o.Seeds -> Analyze.ranksOf (runDirOf name s) ] |> List.filter (List.isEmpty >> not)
            if not perSeed.IsEmpty then
                let stages = perSeed.Head |> List.map fst |> Array.ofList
                Plots.lines (Path.Combine(analysis, $"rank-{name}.png")) $"Effective rank of each segment's output after each stage: {name} (mean over {perSeed.Length} seeds)" prov stages
                    [ for seg in 0 .. m - 1 -> $"segment {seg + 1}", Array.init stages.Length (fun k -> perSeed |> List.averageBy (fun p -> effective p k seg)) ] "effective rank"
        $"## Numerical rank of representations\n\nEffective rank (exp of the entropy of the normalised singular values) of every segment's output over {settings.RankSamples} validation images after each stage, mean ± 95%% CI over seeds (figures analysis/rank-STRATEGY.png).\n\n" +
        Markdown.table ([ "strategy"; "after stage" ] @ [ for seg in 1..m -> $"segment {seg}" ]) table

    // 3. Loss landscapes of the final networks of the first seed.
    let landscapeSection =
        let seed = o.Seeds.Head
        let results =
            [ for name, _ in recipes ->
                let _, net, d = Analyze.loadRun (runDirOf name seed)
                use net = net
                let r = LossLandscape.Compute(net, d.Test, settings.Samples, settings.Grid, settings.Span, settings.Groups, settings.Seed)
                File.WriteAllText(Path.Combine(analysis, $"landscape-{name}.json"), JsonSerializer.Serialize(r, json))
                for e in 0 .. m - 1 do
                    Plots.landscape (Path.Combine(analysis, $"landscape-{name}-exit{e + 1}.png")) $"Loss landscape of exit {e + 1}: {name}, seed {seed}" prov r.Alphas r.Betas r.Loss[e]
                name, r ]
        let centre = settings.Grid / 2
        $"## Loss landscapes\n\nSeed {seed}: the loss on a {settings.Grid}×{settings.Grid} plane θ* + α·d₁ + β·d₂ over [−{settings.Span}, {settings.Span}]² (filter-normalised random directions, the same seed for every strategy; biases and BatchNorm fixed), {settings.Samples} test images. " +
        "Columns: the loss at θ*, and the mean rise over the plane (mean − loss at θ*: larger is sharper).\n\n" +
        Markdown.table ([ "strategy"; "cost (s)" ] @ [ for e in 1..m -> $"exit {e}: at θ* / mean rise" ])
            [ for name, r in results ->
                [ name; $"{r.Seconds:F0}" ]
                @ [ for e in 0 .. m - 1 ->
                        let at = r.Loss[e][centre][centre]
                        let meanAll = r.Loss[e] |> Array.concat |> Array.average
                        $"{at:F3} / {meanAll - at:F3}" ] ]

    // 4. Mode connectivity between the strategies of the same seed.
    let barriers =
        [ for a, b in pairs ->
            (a, b),
            [ for s in o.Seeds ->
                let _, netA, d = Analyze.loadRun (runDirOf a s)
                let _, netB, _ = Analyze.loadRun (runDirOf b s)
                use netA = netA
                use netB = netB
                let r = ModeConnectivity.Compute(netA, netB, d.Train, d.Test, settings.Points, settings.BnSamples, settings.Samples, settings.Seed + s)
                File.WriteAllText(Path.Combine(analysis, $"connectivity-{a}-{b}-seed{s}.json"), JsonSerializer.Serialize(r, json))
                if s = o.Seeds.Head then
                    let ts = r.Path |> Array.map (fun p -> p.T)
                    Plots.connectivity (Path.Combine(analysis, $"connectivity-{a}-{b}.png")) $"Linear path from {a} to {b}, seed {s}" prov ts
                        [ for e in 0 .. m - 1 -> $"exit {e + 1}", r.Path |> Array.map (fun p -> p.Loss[e]) ]
                        [ for e in 0 .. m - 1 -> $"exit {e + 1}", r.Path |> Array.map (fun p -> p.Accuracy[e]) ]
                s, r ] ]
    let barrierOf (pair: string * string) (e: int) = barriers |> List.find (fst >> (=) pair) |> snd |> List.map (fun (s, r) -> s, r.LossBarrier[e])
    let connectivitySection =
        let cost = barriers |> List.collect (snd >> List.map (fun (_, r) -> r.Seconds)) |> List.sum
        let table =
            [ for (a, b), _ in barriers ->
                [ $"{a} – {b}" ] @ [ for e in 0 .. m - 1 -> Statistics.format 1.0 (barrierOf (a, b) e |> List.map snd |> Statistics.summarize) ] ]
        let claim =
            [ for e in [ 0; m - 1 ] ->
                let d = Statistics.paired (barrierOf ("joint", "mixed") e) (barrierOf ("disjoint", "mixed") e)
                [ $"exit {e + 1}"; Statistics.formatSigned 1.0 d; string d.N; Statistics.claimVerdict true d ] ]
        $"## Mode connectivity\n\nThe linear path between two strategies' final weights of the same seed, {settings.Points} points, BatchNorm statistics re-estimated at each point on {settings.BnSamples} training images, {settings.Samples} test images; loss barrier per exit (the most the path's cross-entropy rises above the straight line between its ends), mean ± 95%% CI over seeds ({cost:F0} s in all; figures analysis/connectivity-A-B.png of seed {o.Seeds.Head}).\n\n" +
        Markdown.table ([ "path" ] @ [ for e in 1..m -> $"exit {e}" ]) table +
        "\nThe ICML 2025 paper's claim, that disjoint and mixed solutions lie in one basin and joint in another, predicts a higher barrier from joint to mixed than from disjoint to mixed: the paired difference of the barriers (joint–mixed − disjoint–mixed), with its verdict.\n\n" +
        Markdown.table [ "exit"; "Δ barrier (paired, 95% CI)"; "n"; "verdict" ] claim
    let provenance = Table1.provenanceText o dataNote data rows "dynamics.fsx"
    let md =
        "# Training dynamics: joint, disjoint and mixed\n\n" +
        $"The ICML 2025 paper's metrics on the three strategies it compares, {o.Seeds.Length} seeds, at the scale below. Test accuracy per exit (%%, mean ± 95%% CI):\n\n" +
        Table1.exitTable rows + "\n" + gradientSection + "\n" + rankSection + "\n" + landscapeSection + "\n" + connectivitySection + "\n" + provenance + "\n"
    Markdown.writeAtomic (Path.Combine(dir, "dynamics.md")) md
    let written = Path.Combine(dir, "dynamics.md")
    o.Log $"wrote {written} and figures in {analysis}"
    md
