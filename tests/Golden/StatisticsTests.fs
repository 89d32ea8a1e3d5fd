/// Statistics over seeds, the seed syntax, the cost convention and --equal-steps, on examples worked by hand.
module EarlyExit.Tests.Golden.StatisticsTests

open System
open Expecto
open EarlyExit.Experiments.Reports
open EarlyExit.Experiments.Recipes
open EarlyExit.Experiments.Recipes.Builders
open EarlyExit.Experiments.Runner

let private close (tol: float) (actual: float) (expected: float) (what: string) =
    Expect.isLessThanOrEqual (abs (actual - expected)) tol $"{what}: {actual} against {expected}"

let statistics =
    testList "statistics over seeds (worked by hand)" [
        test "a timing ratio's interval by hand: ratios 2, 4, 8 -> logs ln2·(1, 2, 3), geometric mean 4, interval 4·2^(±4.3027/√3)" {
            match Statistics.ratioInterval [ 2.0; 4.0; 8.0 ] with
            | Some [| lo; hi |] ->
                let half = 4.3027 * 1.0 / sqrt 3.0   // in units of ln 2: the logs' sample standard deviation is 1
                close 1e-3 lo (4.0 * 2.0 ** -half) "low"
                close 1e-2 hi (4.0 * 2.0 ** half) "high"
                // The inverse ratios get the mirrored interval.
                match Statistics.ratioInterval [ 0.5; 0.25; 0.125 ] with
                | Some [| lo'; hi' |] ->
                    close 1e-9 lo' (1.0 / hi) "mirrored low"
                    close 1e-9 hi' (1.0 / lo) "mirrored high"
                | other -> failwithf "no interval: %A" other
            | other -> failwithf "no interval: %A" other
            Expect.isNone (Statistics.ratioInterval [ 1.1 ]) "one repeat: no interval"
            Expect.isNone (Statistics.ratioInterval [ 1.1; 0.0 ]) "a ratio that is not positive: no interval"
        }
        test "a target over repeats is met or missed only where the whole interval is on one side of it" {
            let atLeast1 v = v >= 1.0
            let verdict xs = Statistics.repeatedVerdict atLeast1 (List.average xs) (Statistics.ratioInterval xs)
            Expect.equal (verdict [ 1.20; 1.25; 1.30 ]) "met" "all above, tight"
            Expect.equal (verdict [ 0.80; 0.82; 0.84 ]) "not met" "all below, tight"
            Expect.equal (verdict [ 0.93; 0.96; 1.09; 1.00 ]) "inconclusive" "spans 1 (the four 1-thread training runs against PyTorch)"
            Expect.equal (Statistics.repeatedVerdict atLeast1 1.02 None) "met" "without an interval: the value's"
            Expect.equal (Statistics.repeatedVerdict atLeast1 0.98 None) "not met" "without an interval: the value's"
        }
        test "Student t quantiles t(0.975, df) as printed in tables: 12.706, 4.303, 2.776, 2.262, 2.042" {
            for df, expected in [ 1, 12.7062; 2, 4.3027; 4, 2.7764; 9, 2.2622; 30, 2.0423 ] do
                close 5e-4 (Statistics.tQuantile df 0.975) expected $"df {df}"
        }
        test "a paired CI by hand: differences .02, .01, .05 -> mean .02667, s .02082, half-width 4.3027·s/√3 = .05171" {
            let a = [ 0, 0.80; 1, 0.82; 2, 0.85; 7, 0.99 ]   // seed 7 has no partner: left out
            let b = [ 0, 0.78; 1, 0.81; 2, 0.80 ]
            let d = Statistics.paired a b
            Expect.equal d.N 3 "three pairs"
            close 1e-9 d.Mean (0.08 / 3.0) "mean"
            close 1e-6 d.Std 0.0208167 "sample standard deviation"
            close 1e-5 d.HalfWidth 0.0517116 "half-width"
            Expect.equal (Statistics.verdict d) Statistics.Indistinguishable "the interval contains 0"
            Expect.equal (Statistics.claimVerdict true d) "inconclusive" "so a claim is inconclusive"
            Expect.equal (Statistics.formatSigned 100.0 d) "+2.67 ± 5.17" "printed in points"
        }
        test "verdicts: an interval above 0 is better (a positive claim reproduced), below 0 worse (reversed); one seed decides nothing" {
            let up = Statistics.summarize [ 0.03; 0.04; 0.05 ]
            let down = Statistics.summarize [ -0.03; -0.04; -0.05 ]
            Expect.equal (Statistics.verdict up, Statistics.claimVerdict true up, Statistics.claimVerdict false up) (Statistics.Better, "reproduced", "reversed") "above 0"
            Expect.equal (Statistics.verdict down, Statistics.claimVerdict true down) (Statistics.Worse, "reversed") "below 0"
            let one = Statistics.summarize [ 0.5 ]
            Expect.equal (Statistics.verdict one, Statistics.format 100.0 one) (Statistics.TooFewSeeds, "50.00") "n = 1: a mean, no interval"
        }
    ]

let seeds =
    testList "--seeds" [
        test "a count or a list" {
            Expect.equal (EarlyExit.Experiments.Recipes.Parse.seeds "3") (Ok [ 0; 1; 2 ]) "3 seeds"
            Expect.equal (EarlyExit.Experiments.Recipes.Parse.seeds "0,2,5") (Ok [ 0; 2; 5 ]) "a list"
            Expect.equal (EarlyExit.Experiments.Recipes.Parse.seeds "0,") (Ok [ 0 ]) "seed 0 alone, as the error for --seeds 0 suggests"
        }
        test "empty, zero, negative, duplicated or not numbers: a clear error" {
            for bad, says in [ "", "give a list of seeds"; "0", "give at least one (for seed 0 alone: --seed 0, or --seeds 0,)"; "-2", "must not be negative"; "-1,2", "must not be negative"; "0,1,0", "seed 0 appears twice"; "x", "neither a number" ] do
                match EarlyExit.Experiments.Recipes.Parse.seeds bad with
                | Ok v -> failtestf "'%s' accepted as %A" bad v
                | Error e -> Expect.stringContains e says $"'{bad}'"
        }
    ]

let cost =
    testList "training cost" [
        test "stage MACs: 3x forward up to the deepest exit, teachers' forwards, validation passes, the Fisher (worked by hand)" {
            // Exits cost 10, 30, 60. Stage: loss at exit 2, protects exit 1 with LwF (per-exit teacher).
            let s = { (joint 3 (Scales.settings Scales.Smoke "resnet34" "fashion-mnist").Stages).Head with
                        LossExits = [ 2, 1.0 ]; Protects = [ 1 ]; Regularisers = [ lwf 0.5 ]; Exit = 2 }
            let recipe = { Scales.recipe Scales.Smoke Joint "resnet34" "fashion-mnist" 0 with
                             RegulariserSettings = Map.empty |> Penalties.withSetting "ewc" "samples" "5" }
            // 100 images × (3·30 + 10) + 10 validation images × 2 passes × 30 + 5 Fisher samples × 3 × 30
            Expect.equal (Cost.stageMacs [| 10L; 30L; 60L |] recipe [ "ewc" ] s 100L 10L 2 1000 10) (10000.0 + 600.0 + 450.0) "MACs"
            Expect.equal (Cost.stageMacs [| 10L; 30L; 60L |] recipe [] { s with Regularisers = [ ewc 1.0 ] } 100L 0L 0 1000 10) 9000.0 "EWC: no teacher"
            // One previous-stage teacher runs up to the deepest protected exit only.
            let prev = Settings.withLwfTeachers PreviousStageTeacher recipe
            let s3 = { s with LossExits = [ 3, 1.0 ]; Protects = [ 1; 2 ]; Exit = 3 }
            Expect.equal (Cost.stageMacs [| 10L; 30L; 60L |] recipe [] s3 1L 0L 0 1000 10) (180.0 + 10.0 + 30.0) "per-exit teachers: 10 + 30"
            Expect.equal (Cost.stageMacs [| 10L; 30L; 60L |] prev [] s3 1L 0L 0 1000 10) (180.0 + 30.0) "previous-stage teacher: 30"
            // The exact Fisher: one forward and C backward passes per sample (1 + 2·10 = 21×); the sampled one adds a forward (4×).
            let exact = Settings.withFisher "exact" 5 recipe
            let sampled = Settings.withFisher "sampled" 5 recipe
            Expect.equal (Cost.stageMacs [| 10L; 30L; 60L |] exact [ "ewc" ] { s with Regularisers = [ ewc 1.0 ] } 0L 0L 0 1000 10) (5.0 * 21.0 * 30.0) "exact Fisher"
            Expect.equal (Cost.stageMacs [| 10L; 30L; 60L |] sampled [ "ewc" ] { s with Regularisers = [ ewc 1.0 ] } 0L 0L 0 1000 10) (5.0 * 4.0 * 30.0) "sampled Fisher"
            // MAS: one forward and one backward per sample; "samples" 0 means the whole training split.
            Expect.equal (Cost.stageMacs [| 10L; 30L; 60L |] recipe [ "mas" ] { s with Regularisers = [ mas 1.0 ] } 0L 0L 0 1000 10) (1000.0 * 3.0 * 30.0) "MAS"
        }
        test "--equal-steps: every strategy gets the largest total of epochs, split in proportion to its stages' caps" {
            let recipes = [ for st in allStrategies (Presets.forModel "resnet34") -> Scales.recipe Scales.Cpu st "resnet34" "fashion-mnist" 0 ]
            let total (r: Recipe) = r.Stages |> List.sumBy (fun s -> s.MaxEpochs)
            let target = recipes |> List.map total |> List.max
            let equal = Cost.equalSteps recipes
            for r, e in List.zip recipes equal do
                Expect.equal (total e) target $"{r.Name}: {target} epochs in all"
                Expect.isTrue (e.Stages |> List.forall (fun s -> s.MaxEpochs >= 1)) "every stage at least one epoch"
                Expect.equal (e.Stages |> List.map (fun s -> s.Name)) (r.Stages |> List.map (fun s -> s.Name)) "same stages"
            let seqEwc = equal |> List.find (fun r -> r.Name.StartsWith "sequential-ewc")
            Expect.equal seqEwc.Stages (recipes |> List.find (fun r -> r.Name.StartsWith "sequential-ewc")).Stages "the longest is unchanged"
            let j = equal |> List.find (fun r -> r.Name.StartsWith "joint")
            Expect.equal j.Stages.Head.MaxEpochs target "joint's one stage takes it all"
        }
    ]

let scriptOptions =
    let parse args = EarlyExit.Experiments.Experiments.ScriptArgs.parse "table2" "/tmp" args
    let refused args =
        try parse args |> ignore; failtestf "%A accepted" args
        with EarlyExit.Experiments.Experiments.ScriptArgs.ScriptArgError msg -> msg
    testList "experiment script options" [
        test "Table 2's --regularisers picks a half of the grid: six runs each, λ or ρ with and without the warm-up" {
            let o = parse [ "--regularisers"; "ewc"; "--seeds"; "3"; "--stage-epochs"; "4" ]
            Expect.equal o.Regularisers (Some [ "ewc" ]) "parsed"
            Expect.equal (o.Seeds, o.StageEpochs) ([ 0; 1; 2 ], Some 4) "with the other options"
            let names regs = EarlyExit.Experiments.Experiments.Table2.gridOf regs |> List.map snd
            Expect.equal (names (Some [ "ewc" ]))
                [ "ewc-lambda10-warmup"; "ewc-lambda100-warmup"; "ewc-lambda1000-warmup"
                  "ewc-lambda10-nowarmup"; "ewc-lambda100-nowarmup"; "ewc-lambda1000-nowarmup" ] "EWC half"
            Expect.equal (names (Some [ "lwf" ]) |> List.length) 6 "LwF half"
            Expect.equal (names (Some [ "lwf"; "ewc" ])) (names None) "both: the whole grid, in its order"
            Expect.equal (names None |> List.length) 12 "twelve"
        }
        test "an unknown regulariser, an empty list, --stage-epochs 0 and an unknown option are clear errors" {
            Expect.stringContains (refused [ "--regularisers"; "si" ]) "unknown regulariser 'si' (ewc or lwf)" "unknown"
            Expect.stringContains (refused [ "--regularisers"; "," ]) "give ewc, lwf" "empty"
            Expect.stringContains (refused [ "--stage-epochs"; "0" ]) "--stage-epochs 0: give a positive integer" "zero epochs"
            Expect.stringContains (refused [ "--lambdas"; "1" ]) "unexpected argument '--lambdas'" "unknown option"
        }
        test "every option of the scripts has its line in the scripts' help text" {
            let described = EarlyExit.Experiments.Experiments.ScriptArgs.help |> List.map fst |> Set.ofList
            for o in EarlyExit.Experiments.Experiments.ScriptArgs.known @ EarlyExit.Experiments.Experiments.ScriptArgs.flags do
                Expect.isTrue (described.Contains o) $"--{o} is described"
            let text = EarlyExit.Experiments.Experiments.ScriptArgs.usage "table1"
            Expect.stringContains text "usage: dotnet fsi experiments/table1.fsx [options]" "the usage line"
            Expect.stringContains text "--stage-epochs VALUE" "an option with a value"
            Expect.isFalse (text.Contains "--deterministic VALUE") "a flag takes no value"
        }
        test "each table refuses the other's choice of runs, saying which option to use" {
            let o = parse [ "--regularisers"; "lwf" ]
            let msg = try EarlyExit.Experiments.Experiments.Table1.run o |> ignore; "" with :? ArgumentException as e -> e.Message
            Expect.stringContains msg "Table 1 takes --strategies" "Table 1"
            let o2 = { parse [ "--strategies"; "joint" ] with Regularisers = None }
            let msg2 = try EarlyExit.Experiments.Experiments.Table2.run o2 |> ignore; "" with :? ArgumentException as e -> e.Message
            Expect.stringContains msg2 "--regularisers ewc or lwf" "Table 2"
        }
    ]

let claims =
    testList "claims from a checkout's tables" [
        test "a folder with table1.csv but no runs: per-seed values read back (quoted fields with commas), paired, verdict" {
            let root = IO.Path.Combine(IO.Path.GetTempPath(), $"ee-claims-{Guid.NewGuid():N}")
            let folder = IO.Path.Combine(root, "table1", "resnet34-fashion-mnist-cpu")
            IO.Directory.CreateDirectory folder |> ignore
            let row name (q: string) (values: string) = $"{name},{q},3,0.5,0.1,0.1,{values},fashion-mnist/test,cpu,\"cpu (1 thread, 2 cores)\",1,abc,\"CPU X (a, b)\""
            let lines =
                [ "row,quantity,n,mean,std,ci95 half-width,per-seed values (seed:value),data,scale,device,threads,code version,cpu and kernels"
                  row "separate" "accuracy at 25% budget" "0:0.80;1:0.82;2:0.85"
                  row "separate" "accuracy of exit 1" "0:0.70;1:0.71;2:0.72"
                  row "separate" "accuracy of exit 2" "0:0.90;1:0.91;2:0.92"
                  row "sequential-ewc" "accuracy at 25% budget" "0:0.82;1:0.83;2:0.90"
                  row "sequential-ewc" "accuracy of exit 1" "0:0.75;1:0.75;2:0.75"
                  row "sequential-ewc" "accuracy of exit 2" "0:0.91;1:0.91;2:0.91" ]
            IO.File.WriteAllLines(IO.Path.Combine(folder, "table1.csv"), lines)
            try
                let rows = EarlyExit.Experiments.Experiments.Claims.rowsOfCsv (IO.Path.Combine(folder, "table1.csv"))
                let ewc = rows["sequential-ewc"]
                Expect.equal (ewc |> List.map (fun r -> r.Seed)) [ 0; 1; 2 ] "three seeds"
                Expect.equal ewc.Head.ExitAccuracy [| 0.75; 0.91 |] "exits in order"
                Expect.equal ewc.Head.Budgets[0] (Some 0.82) "25% budget"
                Expect.equal ewc.Head.Budgets[1] None "50% not in the table"
                let md = EarlyExit.Experiments.Experiments.Claims.write root "fashion-mnist" "cpu"
                // differences .02, .01, .05 (the worked example above): +2.67 ± 5.17, n = 3, inconclusive
                let line = md.Split('\n') |> Array.find (fun l -> l.Contains "sequential EWC beats separate")
                Expect.stringContains line "+2.67 ± 5.17 (n = 3)" "the paired difference from the CSV"
                Expect.stringContains line "inconclusive" "verdict"
                let lwf = md.Split('\n') |> Array.find (fun l -> l.Contains "sequential LwF beats separate")
                Expect.stringContains lwf "not run" "a row the table lacks"
                // The same table under an --out of another name (table1.fsx --out ROOT/mine): read from there, not
                // from ROOT/table1, and the claims file beside it.
                let mine = IO.Path.Combine(root, "mine")
                IO.Directory.Move(IO.Path.Combine(root, "table1"), mine)
                IO.File.Delete(IO.Path.Combine(root, "claims-fashion-mnist-cpu.md"))
                let md = EarlyExit.Experiments.Experiments.Claims.writeAfter "table1" mine "fashion-mnist" "cpu"
                let line = md.Split('\n') |> Array.find (fun l -> l.Contains "sequential EWC beats separate")
                Expect.stringContains line "+2.67 ± 5.17 (n = 3)" "read from the --out folder"
                Expect.stringContains line "mine/resnet34-fashion-mnist-cpu" "and named"
                Expect.isTrue (IO.File.Exists(IO.Path.Combine(root, "claims-fashion-mnist-cpu.md"))) "claims file in the --out folder's parent"
                let plain = EarlyExit.Experiments.Experiments.Claims.write root "fashion-mnist" "cpu"
                Expect.stringContains (plain.Split('\n') |> Array.find (fun l -> l.Contains "sequential EWC beats separate")) "not run" "the default layout looks in ROOT/table1"
            finally
                IO.Directory.Delete(root, true)
        }
    ]

let all = testList "comparisons over seeds" [ statistics; seeds; cost; scriptOptions; claims ]
