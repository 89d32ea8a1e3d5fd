/// Determinism, runs sharing a prefix in two processes, and the local executor killed mid-grid.
module EarlyExit.Tests.Properties.ExecutorTests

open System
open System.Diagnostics
open System.IO
open System.Security.Cryptography
open Expecto
open EarlyExit.Experiments.Recipes
open EarlyExit.Experiments.Recipes.Builders
open EarlyExit.Experiments.Runner
open EarlyExit.Tests.Support

let private sha (path: string) = Convert.ToHexString(SHA256.HashData(File.ReadAllBytes path))

/// SHA-256 of a run's final model (the last stage's state) and of its cached test logits.
let private fingerprint (runDir: string) =
    let last = Directory.GetFiles(Path.Combine(runDir, "stages"), "*.done.model") |> Array.sort |> Array.last
    sha last, sha (Path.Combine(runDir, "test-logits.tensors"))

/// `earlyexit ARGS` from this test's output folder; its exit code and output.
let private cli (args: string list) =
    let psi = ProcessStartInfo("dotnet", Path.Combine(AppContext.BaseDirectory, "earlyexit.dll") :: args)
    psi.RedirectStandardOutput <- true
    psi.RedirectStandardError <- true
    psi.Environment["CI"] <- "true"
    psi

let private finish (p: Process) =
    let out = p.StandardOutput.ReadToEndAsync()
    let err = p.StandardError.ReadToEnd()
    p.WaitForExit()
    p.ExitCode, out.Result + err

let private runCli args = finish (Process.Start(cli args))

let private smoke (strategy: string) = [ "train"; "--strategy"; strategy; "--scale"; "smoke"; "--deterministic" ]

let determinism =
    testList "deterministic mode" [
        test "two smoke runs of every strategy give identical SHA-256 of the final model and of the cached logits" {
            use dir = new TempDir()
            let quiet: Interpreter.RunOptions = { OutDir = ""; Resume = false; PrefixCache = None; Scale = "smoke"; Device = Some "cpu"; Log = ignore }
            try
                for strategy in allStrategies (Presets.forModel "resnet34") do
                    let r = { Scales.recipe Scales.Smoke strategy "resnet34" "fashion-mnist" 3 with Deterministic = true }
                    let name = strategyName strategy
                    Interpreter.run { quiet with OutDir = dir.File $"{name}-a" } r |> ignore
                    Interpreter.run { quiet with OutDir = dir.File $"{name}-b" } r |> ignore
                    Expect.equal (fingerprint (dir.File $"{name}-a")) (fingerprint (dir.File $"{name}-b")) $"{name}: same bits"
            finally EarlyExit.Native.LibTorchControls.DeterministicAlgorithms <- false
        }
        test "a deterministic run is not resumed under another thread count" {
            use dir = new TempDir()
            let out = dir.File "run"
            let code, output = runCli ([ "--threads"; "1" ] @ smoke "joint" @ [ "--out"; out ])
            Expect.equal code 0 output
            File.Delete(Path.Combine(out, "metrics.json"))
            let code2, output2 = runCli ([ "--threads"; "2" ] @ smoke "joint" @ [ "--out"; out; "--resume" ])
            Expect.equal code2 1 output2
            Expect.stringContains output2 "a deterministic run started with 1 thread(s)" "says why"
            Expect.stringContains output2 "--threads 1" "and how to resume it"
        }
    ]

let executor =
    testList "processes sharing runs" [
        test "two processes started together on one prefix both finish, train it once, and equal runs made one after the other" {
            use dir = new TempDir()
            let cache = dir.File "cache"
            let start strategy = Process.Start(cli ([ "--threads"; "1" ] @ smoke strategy @ [ "--out"; dir.File strategy; "--prefix-cache"; cache ]))
            let a, b = start "mixed", start "sequential-ewc"
            let (ca, oa), (cb, ob) = finish a, finish b
            Expect.equal (ca, cb) (0, 0) $"both finish:\n{oa}\n{ob}"
            let logs = [ "mixed"; "sequential-ewc" ] |> List.map (fun s -> File.ReadAllText(Path.Combine(dir.File s, "log.txt")))
            let trained = logs |> List.filter (fun l -> l.Contains "stage 1/" && l.Contains "'warmup': up to") |> List.length
            let reused = logs |> List.filter (fun l -> l.Contains "reused from the prefix cache") |> List.length
            Expect.equal (trained, reused) (1, 1) $"the warm-up trained once and reused once:\n{logs[0]}\n{logs[1]}"
            for s in [ "mixed"; "sequential-ewc" ] do
                let c, o = runCli ([ "--threads"; "1" ] @ smoke s @ [ "--out"; dir.File $"{s}-alone" ])
                Expect.equal c 0 o
                Expect.equal (fingerprint (dir.File s)) (fingerprint (dir.File $"{s}-alone")) $"{s}: same bits as a run of its own"
        }
        test "the executor killed mid-grid (kill -9): a rerun finishes every run, reuses the finished ones, and equals an uninterrupted grid" {
            use dir = new TempDir()
            let grid out = [ "--threads"; "1" ] @ smoke "sequential-ewc" @ [ "--seeds"; "2"; "--jobs"; "2"; "--out"; out ]
            let executor = Process.Start(cli (grid (dir.File "killed")))
            let progress k = Path.Combine(dir.File "killed", $"seed-{k}", "progress.json")
            let deadline = DateTime.UtcNow.AddSeconds 60.0
            while not (File.Exists(progress 0) && File.Exists(progress 1)) && DateTime.UtcNow < deadline && not executor.HasExited do
                Threading.Thread.Sleep 100
            Expect.isFalse executor.HasExited "both runs were in flight"
            executor.Kill false
            executor.WaitForExit()
            let code, output = runCli (grid (dir.File "killed"))
            Expect.equal code 0 output
            Expect.stringContains output "seed 0: test accuracy" "seed 0 finished"
            Expect.stringContains output "seed 1: test accuracy" "seed 1 finished"
            let code2, output2 = runCli (grid (dir.File "killed"))
            Expect.equal code2 0 output2
            Expect.stringContains output2 "2 of 2 runs already finished (reused)" "nothing trained twice"
            let code3, output3 = runCli (grid (dir.File "whole"))
            Expect.equal code3 0 output3
            for k in [ 0; 1 ] do
                Expect.equal (fingerprint (Path.Combine(dir.File "killed", $"seed-{k}"))) (fingerprint (Path.Combine(dir.File "whole", $"seed-{k}"))) $"seed {k}: same bits"
        }
        test "bad executor input: --jobs 0, --threads 0, empty or duplicated --seeds, --seed with --seeds" {
            for args, says in [ [ "--jobs"; "0" ], "--jobs 0"; [ "--seeds"; "0,0" ], "appears twice"; [ "--seeds"; "" ], "give a list of seeds"; [ "--seed"; "1" ], "--seed or --seeds" ] do
                let extra = if List.contains "--seeds" args then args else args @ [ "--seeds"; "2" ]
                let code, output = runCli (smoke "joint" @ [ "--out"; "/nonexistent/x" ] @ extra)
                Expect.equal code 2 output
                Expect.stringContains output says (String.Join(" ", args))
            let code, output = runCli ([ "--threads"; "0" ] @ smoke "joint" @ [ "--out"; "/nonexistent/x" ])
            Expect.equal code 2 output
            Expect.stringContains output "--threads 0" "threads"
        }
    ]

/// Ordinary mistakes on the command line: each must end with a clear message and a non-zero exit code, never a stack
/// trace or an abort.
let mistakes =
    testList "a command line that never crashes" [
        test "ordinary mistakes give one clear message, a non-zero exit code and no stack trace; nothing is created" {
            use dir = new TempDir()
            File.WriteAllText(dir.File "bad.json", "{ not json")
            Directory.CreateDirectory(dir.File "unfinished") |> ignore
            File.WriteAllText(Path.Combine(dir.File "unfinished", "recipe.json"), "{}")
            let missing = dir.File "no-such-run"
            let cases =
                [ [ "eval"; missing ], "no such run folder"
                  [ "eval"; dir.File "unfinished" ], "not a finished run"
                  [ "analyze"; missing ], "not a finished run"
                  [ "analyze"; dir.File "unfinished"; "--metrics"; "bogus" ], "unknown metric 'bogus'"
                  [ "train"; "--strategy"; "nosuch"; "--out"; dir.File "x" ], "unknown strategy 'nosuch'"
                  [ "train"; "--strategy"; "joint"; "--lambda"; "5"; "--out"; dir.File "x" ], "would have no effect"
                  [ "train"; "--recipe"; dir.File "missing.json"; "--out"; dir.File "x" ], "recipe file not found"
                  [ "train"; "--recipe"; dir.File "bad.json"; "--out"; dir.File "x" ], "not valid JSON"
                  [ "train"; "--strategy"; "joint" ], "missing argument '--out'"
                  [ "describe"; "nosuchmodel" ], "unknown model 'nosuchmodel'"
                  [ "--threads"; "0"; "models" ], "--threads 0"
                  [ "data"; "check"; "nosuch" ], "unknown data set 'nosuch'"
                  [ "train"; "--strategy"; "joint"; "--data"; "npy"; "--out"; dir.File "x" ], "set data.root (--data-root"
                  [ "train"; "--strategy"; "joint"; "--data"; "npy"; "--data-root"; missing; "--out"; dir.File "x" ], "train-images.npy: file not found"
                  [ "train"; "--strategy"; "joint"; "--data"; "image-folder"; "--data-root"; dir.Path; "--out"; dir.File "x" ], "an image-folder data set has ROOT/train/CLASS/*"
                  [ "train"; "--strategy"; "joint"; "--scale"; "smoke"; "--set"; "stages[3].maxEpochs=2"; "--out"; dir.File "x" ], "stages has 1 items"
                  [ "train"; "--strategy"; "joint"; "--scale"; "smoke"; "--set"; "model.widht=2"; "--out"; dir.File "x" ], "model.widht: unknown key"
                  [ "train"; "--strategy"; "joint"; "--scale"; "smoke"; "--epochs"; "0"; "--out"; dir.File "x" ], "maxEpochs: must be at least 1"
                  [ "export"; missing ], "no such run folder"
                  [ "export"; dir.File "unfinished" ], "not a finished run"
                  [ "import"; dir.File "w.pt"; "--out"; dir.File "x" ], "give --like RUN_DIR or --recipe FILE"
                  [ "import"; dir.File "w.pt"; "--like"; missing; "--out"; dir.File "x" ], "no such run folder"
                  [ "sweep"; "status"; missing ], "holds no sweep"
                  [ "sweep"; "task"; missing; "0" ], "holds no sweep"
                  [ "sweep"; "collect"; missing ], "holds no sweep"
                  [ "sweep"; "plan"; "table9" ], "unknown experiment 'table9'"
                  [ "bogus" ], "unrecognized argument: 'bogus'" ]
            for args, says in cases do
                let code, output = runCli args
                let line = String.Join(" ", args)
                Expect.isTrue (code <> 0 && code <> 134) $"{line}: exit code {code}"
                Expect.isFalse (output.Contains "   at ") $"{line}: a stack trace in\n{output}"
                Expect.stringContains output says $"{line}: says what is wrong"
            Expect.isFalse (Directory.Exists missing) "no folder was created for the missing run"
            Expect.isFalse (Directory.Exists(dir.File "x")) "no run folder was created for a refused command"
        }
    ]

/// Which earlyexit.dll the executor (and the Slurm backend) starts: the library no longer is the command line.
let cliLookup =
    testList "the command line the executor starts" [
        testCase "earlyexit.dll beside the library; EARLYEXIT_CLI first; a clear error without either" <| fun () ->
            let library = typeof<Executor.Options>.Assembly.Location
            Expect.equal (Executor.resolveCli null library) (Path.Combine(Path.GetDirectoryName library, "earlyexit.dll")) "beside the library (the tests' folder has both)"
            Expect.equal (Executor.cliAssembly ()) (Executor.resolveCli null library) "this process: the same (EARLYEXIT_CLI unset)"
            use tmp = new TempDir()
            let dir = tmp.Path
            let failure f = try f () |> ignore; failwith "no error" with :? InvalidOperationException as e -> e.Message
            let other = tmp.File "elsewhere.dll"
            File.WriteAllText(other, "")
            Expect.equal (Executor.resolveCli other library) other "the variable's file wins"
            Expect.stringContains (failure (fun () -> Executor.resolveCli (tmp.File "nope.dll") library)) "EARLYEXIT_CLI" "a missing file names the variable"
            let alone = failure (fun () -> Executor.resolveCli "" (tmp.File "EarlyExit.Experiments.dll"))
            Expect.stringContains alone "set EARLYEXIT_CLI to an earlyexit.dll" "says what to do"
            Expect.stringContains alone dir "says where it looked"
    ]

let all = testList "runs, seeds and the executor" [ determinism; executor; mistakes; cliLookup ]
