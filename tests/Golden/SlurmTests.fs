/// The Slurm backend without a cluster: the generated sbatch script (CPU and GPU options) pinned, the array syntax,
/// squeue's job ids, and the errors that need no controller.
module EarlyExit.Tests.Golden.SlurmTests

open System
open System.IO
open Expecto
open EarlyExit.Experiments.Runner

let private sweep: Sweep.Sweep =
    { Experiment = "table2"; Arguments = [ "--seeds"; "5" ]; Root = "/shared/results/table2/resnet34-cifar100-paper"; Scale = "paper"
      PrefixCache = "/shared/results/table2/resnet34-cifar100-paper/prefix-cache"; Threads = 4; Numerics = null; Device = null
      Created = "2026-12-01T00:00:00Z"
      Runs = [ for i in 0..59 -> { Task = i; Name = $"run{i % 12}"; Seed = i / 12; Recipe = $"/r/{i}.json"; RunDir = $"/runs/{i}" } ] }

let all =
    testList "slurm backend (no cluster)" [
        test "the sbatch script of a GPU sweep: array with a concurrency cap, resources, requeue, one task per run" {
            let o = { Slurm.defaults with Partition = Some "gpu"; Time = Some "2-00:00:00"; Mem = Some "32G"; CpusPerTask = 8; Gres = Some "gpu:1"
                                          Device = Some "cuda"; MaxConcurrent = Some 16; Extra = [ "--account=proj42" ] }
            let expected =
                String.Join("\n",
                    [ "#!/bin/bash"
                      "#SBATCH --job-name=earlyexit-table2"
                      "#SBATCH --array=0-59%16"
                      "#SBATCH --cpus-per-task=8"
                      "#SBATCH --output=/shared/results/table2/resnet34-cifar100-paper/sweep/slurm/logs/%A_%a.out"
                      "#SBATCH --open-mode=append"
                      "#SBATCH --partition=gpu"
                      "#SBATCH --time=2-00:00:00"
                      "#SBATCH --mem=32G"
                      "#SBATCH --gres=gpu:1"
                      "#SBATCH --requeue"
                      "#SBATCH --account=proj42"
                      ""
                      "# 60 runs of table2 (paper scale) in /shared/results/table2/resnet34-cifar100-paper; task i runs run i of /shared/results/table2/resnet34-cifar100-paper/sweep/sweep.json."
                      "# Each task resumes its run from its last epoch, so a requeue loses at most the epoch in flight."
                      "set -uo pipefail"
                      "export OMP_NUM_THREADS=\"$SLURM_CPUS_PER_TASK\" CI=true DOTNET_CLI_TELEMETRY_OPTOUT=1"
                      "exec \"/opt/dotnet/dotnet\" \"/shared/earlyexit/earlyexit.dll\" --threads \"$SLURM_CPUS_PER_TASK\" sweep task \"/shared/results/table2/resnet34-cifar100-paper\" \"$SLURM_ARRAY_TASK_ID\" --device cuda"
                      "" ])
            Expect.equal (Slurm.script sweep o [ 0..59 ] "/opt/dotnet/dotnet" "/shared/earlyexit/earlyexit.dll") expected "script"
        }
        test "a CPU resubmission: only the tasks given, the kernels forced, no requeue when asked" {
            let s = { sweep with Numerics = "onednn-avx" }
            let text = Slurm.script s { Slurm.defaults with Requeue = false } [ 3; 1; 7; 8; 9; 20 ] "dotnet" "e.dll"
            Expect.stringContains text "#SBATCH --array=1,3,7-9,20\n" "the tasks, ranges compressed"
            Expect.stringContains text "#SBATCH --cpus-per-task=1\n" "one CPU by default"
            Expect.isFalse (text.Contains "--requeue") "no requeue"
            Expect.isFalse (text.Contains "--gres") "no GPU"
            Expect.stringContains text "--threads \"$SLURM_CPUS_PER_TASK\" --numerics onednn-avx sweep task" "kernels forced"
        }
        test "squeue's job ids of arrays expand to (job, task)" {
            Expect.equal (Slurm.expandJobIds "12_3") [ "12", 3 ] "one task"
            Expect.equal (Slurm.expandJobIds "12_[0-2,5%2]") [ "12", 0; "12", 1; "12", 2; "12", 5 ] "pending ranges with a cap"
            Expect.equal (Slurm.expandJobIds "12") [] "not an array"
        }
        test "a sweep file that is missing or not a sweep, and a task out of range, are clear errors" {
            let dir = Path.Combine(Path.GetTempPath(), $"earlyexit-sweep-{Guid.NewGuid():N}")
            try
                let e = Expect.throwsC (fun () -> Sweep.load dir |> ignore) id
                Expect.stringContains (string e) "holds no sweep" "missing"
                Directory.CreateDirectory(Sweep.folder dir) |> ignore
                File.WriteAllText(Sweep.file dir, "[1, 2]")
                let e = Expect.throwsC (fun () -> Sweep.load dir |> ignore) id
                Expect.stringContains (string e) "is not a sweep file" "not a sweep"
                let s = { sweep with Root = dir }
                Sweep.save s
                let e = Expect.throwsC (fun () -> Sweep.runTask (Sweep.load dir) 60 None ignore |> ignore) id
                Expect.stringContains (string e) "has tasks 0..59" "out of range"
            finally
                try Directory.Delete(dir, true) with _ -> ()
        }
    ]
