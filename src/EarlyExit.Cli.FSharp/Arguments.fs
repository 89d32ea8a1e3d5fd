/// The command line: Argu unions, one per subcommand.
module EarlyExit.Experiments.Cli.Arguments

open Argu

type ConventionArg =
    | Conv_Linear
    | Msdnet_Reference

type DescribeArgs =
    | [<MainCommand; ExactlyOnce>] Model of name: string
    | Classes of count: int
    | Input of shape: string
    | Width of channels: int
    | Blocks of list: string
    | Exits of list: string
    | Growth of rate: int
    | Step_Mode of mode: string
    | Base of layers: int
    | Step of layers: int
    | Gr_Factor of list: string
    | Bn_Factor of list: string
    | Convention of ConventionArg
    | Json

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Model _ -> "model name (see `earlyexit models`)"
            | Classes _ -> "number of classes (default: the family's, 100 for resnet34)"
            | Input _ -> "input shape C x H x W, e.g. 3x32x32 or 1x28x28"
            | Width _ -> "width of the first stage (resnet34: 64; later stages double it)"
            | Blocks _ -> "blocks per stage, e.g. 3,4,6,3"
            | Exits _ -> "1-based blocks after which the exits sit, e.g. 2,4,6,8,10,12,14,16"
            | Growth _ -> "MSDNet: growth rate (default 6)"
            | Step_Mode _ -> "MSDNet: even or lin_grow (default even)"
            | Base _ -> "MSDNet: layers of the first block (default 4)"
            | Step _ -> "MSDNet: layers of each later block (default 2)"
            | Gr_Factor _ -> "MSDNet: growth factor per scale, e.g. 1,2,4 (its length is the number of scales)"
            | Bn_Factor _ -> "MSDNet: bottleneck factor per scale, e.g. 1,2,4"
            | Convention _ -> "MAC counting convention (default conv-linear, the one the budgets use)"
            | Json -> "print one JSON object instead of the table"

type DataCheckArgs =
    | [<MainCommand; ExactlyOnce>] Name of data: string
    | Root of dir: string

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Name _ -> "cifar100, cifar10, fashion-mnist, or your own: image-folder (ROOT/train/CLASS/*.png, ROOT/test/CLASS/*) or npy (ROOT/train-images.npy, train-labels.npy, test-images.npy, test-labels.npy)"
            | Root _ -> "data root (default $EARLYEXIT_DATA or ~/.local/share/earlyexit/data); for image-folder and npy, the folder of the data"

type DataArgs =
    | [<CliPrefix(CliPrefix.None)>] Check of ParseResults<DataCheckArgs>
    | [<CliPrefix(CliPrefix.None)>] Download of ParseResults<DataCheckArgs>

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Check _ -> "read a data set and print its sizes, or say what is missing"
            | Download _ -> "download CIFAR-10/100 from the official address (checksum verified)"

type TrainArgs =
    | Recipe of file: string
    | Strategy of name: string
    | Model of name: string
    | Data of name: string
    | Scale of scale: string
    | Seed of seed: int
    | Seeds of seeds: string
    | Jobs of count: int
    | Deterministic
    | [<Hidden>] Parent_Pid of pid: int
    | Lambda of lambda: string
    | Rho of rho: string
    | Strength of spec: string
    | Fisher of estimator: string
    | Setting of spec: string
    | Lwf_Teachers of policy: string
    | Data_Root of dir: string
    | [<Mandatory>] Out of dir: string
    | Resume
    | Device of device: string
    | Prefix_Cache of dir: string
    | Save_Recipe of file: string
    | Set of path_value: string
    | Epochs of epochs: int
    | Lr of learning_rate: float
    | Batch_Size of size: int

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Set _ -> "override one value of the recipe, PATH=VALUE in its JSON shape: stages[2].maxEpochs=5, model.width=16, model.blocks=[1,1,1,1], data.trainLimit=2000; repeatable; the run's recipe name records it"
            | Epochs _ -> "every stage's maxEpochs (an override: the recipe name records it)"
            | Lr _ -> "every stage's learning rate (an override)"
            | Batch_Size _ -> "every stage's batch size (an override)"
            | Recipe _ -> "train from a JSON recipe (see `--save-recipe` for the format)"
            | Strategy _ -> "joint, disjoint, mixed, branchwise, separate, or sequential-R with registered regularisers R (sequential-ewc, sequential-lwf, sequential-mas, sequential-ewc-lwf; -nowarmup: without the warm-up)"
            | Model _ -> "model family (default resnet34)"
            | Data _ -> "cifar100, cifar10, fashion-mnist (default), or your own: image-folder or npy, read from --data-root"
            | Scale _ -> "smoke (seconds), cpu (minutes on a 2-core CPU) or paper (default: paper on a GPU, cpu otherwise); with --recipe, only the name recorded in the run's provenance"
            | Seed _ -> "random seed (default 0)"
            | Seeds _ -> "several seeds, one run folder each (OUT/seed-K): a list (0,1,2) or a count (3 means 0,1,2); run by the local executor"
            | Jobs _ -> "with --seeds: runs at a time (default: the number of cores, each on --threads threads, default 1)"
            | Deterministic -> "deterministic mode: the same code, seed and thread count give the same bits (a resume under other threads or kernels is refused)"
            | Parent_Pid _ -> "end when this process ends (the executor's runs)"
            | Lambda _ -> "EWC strength λ: a number (default: the paper's preset for the model) or a schedule over the stages μ = 2..M: linear:FIRST,LAST, geometric:FIRST,RATIO (λ_μ = FIRST·RATIO^(μ−2)), or one value per stage a,b,c"
            | Rho _ -> "LwF strength ρ, as --lambda (default: the paper's preset)"
            | Strength _ -> "NAME=STRENGTH for any regulariser (mas=1, mas=geometric:1,2); repeatable"
            | Fisher _ -> "EWC's Fisher estimator: empirical (the paper's, default), exact, sampled, squared-minibatch, empirical-naive"
            | Setting _ -> "NAME.KEY=VALUE, a regulariser setting (ewc.samples=2000, lwf.teachers=previous-stage, mas.samples=500); repeatable"
            | Lwf_Teachers _ -> "per-exit (the paper: one frozen copy per earlier exit, default) or previous-stage (classic LwF: one copy, one teacher forward per step)"
            | Data_Root _ -> "folder of the data sets (image-folder, npy: the folder of your data)"
            | Out _ -> "run folder (checkpoints, log, metrics.json)"
            | Resume -> "continue an unfinished run in --out from its last checkpoint"
            | Device _ -> "auto, cpu, cuda or cuda:N (default auto)"
            | Prefix_Cache _ -> "folder where finished stage prefixes (e.g. the warm-up) are cached and reused across runs"
            | Save_Recipe _ -> "write the resolved recipe to this JSON file and stop (compact: what the stages share under \"defaults\", a \"$schema\" for editors)"

type EvalArgs =
    | [<MainCommand; ExactlyOnce>] Run_Dir of dir: string
    | Json
    | Timing_Samples of count: int
    | Policy of policy: string

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Run_Dir _ -> "a finished run folder (with metrics.json and test-logits.tensors)"
            | Json -> "print one JSON object"
            | Timing_Samples _ -> "test images used to time real early-exit inference (default 256; 0 skips timing)"
            | Policy _ -> "exit policy: softmax (the papers', default), entropy, patience (PBEE)"

type AnalyzeArgs =
    | [<MainCommand; ExactlyOnce>] Run_Dir of dir: string
    | Vs of other: string
    | Metrics of list: string
    | Samples of count: int
    | Rank_Samples of count: int
    | Grid of points: int
    | Span of span: float
    | Groups of groups: string
    | Points of count: int
    | Bn_Samples of count: int
    | Seed of seed: int
    | Out of dir: string

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Run_Dir _ -> "a finished run folder"
            | Vs _ -> "connectivity: the other run (same architecture) at the other end of the linear path"
            | Metrics _ -> "gradients,rank,landscape,connectivity (default: all that apply)"
            | Samples _ -> "test images of the landscape and the path (default 1000)"
            | Rank_Samples _ -> "validation images of the rank (default 256)"
            | Grid _ -> "landscape: points per axis (default 11)"
            | Span _ -> "landscape: the plane covers [−span, span]² in units of the directions (default 1)"
            | Groups _ -> "landscape: the parameters moved: all (default), backbone or heads"
            | Points _ -> "connectivity: points on the path, ends included (default 11)"
            | Bn_Samples _ -> "connectivity: training images BatchNorm statistics are re-estimated on at each point (default 2000)"
            | Seed _ -> "seed of the samples and the directions (default 0)"
            | Out _ -> "output folder (default RUN_DIR/analysis)"

type SchemaArgs =
    | Out of file: string

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Out _ -> "write the schema to this file instead of standard output"

type SlurmArgs =
    | [<MainCommand; ExactlyOnce>] Root of dir: string
    | Backend of name: string
    | Jobs of count: int
    | Partition of name: string
    | Time of limit: string
    | Mem of size: string
    | Cpus_Per_Task of count: int
    | Gres of spec: string
    | Device of device: string
    | Max_Concurrent of count: int
    | No_Requeue
    | Sbatch of option: string
    | Reset

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Root _ -> "the experiment's results folder (it holds sweep/sweep.json)"
            | Backend _ -> "submit: local (the executor on this machine, default) or slurm (one job array)"
            | Jobs _ -> "local: runs at a time (default: one per core)"
            | Partition _ -> "slurm: partition"
            | Time _ -> "slurm: wall-clock limit of each task (e.g. 04:00:00)"
            | Mem _ -> "slurm: memory of each task (e.g. 8G)"
            | Cpus_Per_Task _ -> "slurm: CPUs of each task, its torch threads (default: the sweep's threads)"
            | Gres _ -> "slurm: generic resources of each task (e.g. gpu:1)"
            | Device _ -> "the device the runs train on (cuda on GPU nodes)"
            | Max_Concurrent _ -> "slurm: tasks at a time (the array's %N)"
            | No_Requeue -> "slurm: do not requeue a preempted or failed task (requeued by default; it resumes from its last epoch)"
            | Sbatch _ -> "slurm: one more sbatch option, e.g. --account=proj"
            | Reset -> "resubmit: also runs that used their three attempts (their count starts again)"

type SweepStatusArgs =
    | [<MainCommand; ExactlyOnce>] Root of dir: string
    | Json

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Root _ -> "the experiment's results folder"
            | Json -> "print one JSON object"

type SweepRootArgs =
    | [<MainCommand; ExactlyOnce>] Root of dir: string

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Root _ -> "the experiment's results folder"

type SweepTaskArgs =
    | [<MainCommand; ExactlyOnce>] Task of root: string * index: int
    | Device of device: string

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Task _ -> "the results folder and the task's index (what a Slurm array task runs)"
            | Device _ -> "the device (cuda on GPU nodes)"

type SweepArgs =
    | [<CliPrefix(CliPrefix.None)>] Plan of experiment: string
    | [<CliPrefix(CliPrefix.None)>] Submit of ParseResults<SlurmArgs>
    | [<CliPrefix(CliPrefix.None)>] Status of ParseResults<SweepStatusArgs>
    | [<CliPrefix(CliPrefix.None)>] Resubmit of ParseResults<SlurmArgs>
    | [<CliPrefix(CliPrefix.None)>] Collect of ParseResults<SweepRootArgs>
    | [<CliPrefix(CliPrefix.None)>] Task of ParseResults<SweepTaskArgs>

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Plan _ -> "table1|table2|regularisers [the script's options]: write the experiment's runs as a sweep, without running them"
            | Submit _ -> "run a planned sweep: --backend local (the executor) or slurm (a job array)"
            | Status _ -> "pending, running, finished, failed (with the log's tail) for every run"
            | Resubmit _ -> "submit again, to Slurm, only the runs that did not finish and are not queued"
            | Collect _ -> "the experiment's tables, figures and claims from whatever finished, saying what is missing"
            | Task _ -> "run one task of a sweep in this process (what a Slurm array task does)"

type ModelsArgs =
    | Json

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Json -> "print a JSON array of {name, summary, defaults}"

type ExportArgs =
    | [<MainCommand; ExactlyOnce>] Run_Dir of dir: string
    | Format of format: string
    | Out of file: string

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Run_Dir _ -> "a finished run folder"
            | Format _ -> "safetensors (default), pt (what torch.save writes; torch.load reads it) or tensors (ours)"
            | Out _ -> "the weights file (default RUN_DIR/export/model.EXT); FILE.json beside it describes the network, its input normalisation and names"

type ImportArgs =
    | [<MainCommand; ExactlyOnce>] Weights of file: string
    | Like of run_dir: string
    | Recipe of file: string
    | [<Mandatory>] Out of dir: string
    | Device of device: string

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Weights _ -> "a state dict: .safetensors, .pt/.pth/.bin (torch.save, zip format) or .tensors"
            | Like _ -> "take the network, data and seed of this run folder's recipe"
            | Recipe _ -> "or of this recipe file"
            | Out _ -> "a new run folder: the weights, evaluated (validation and test logits, metrics.json), for eval and analyze"
            | Device _ -> "auto (default), cpu or cuda"

type DoctorArgs =
    | Recheck
    | All

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Recheck -> "check the convolution kernels again (each backend in a fresh process), ignoring the cached verdict"
            | All -> "with --recheck: check every backend, not only up to the first that passes"

type CliArgs =
    | Version
    | [<Inherit>] Numerics of backend: string
    | [<Inherit>] Threads of threads: string
    | [<Inherit>] Plugin of assembly: string
    | [<CliPrefix(CliPrefix.None)>] Models of ParseResults<ModelsArgs>
    | [<CliPrefix(CliPrefix.None)>] Describe of ParseResults<DescribeArgs>
    | [<CliPrefix(CliPrefix.None)>] Data of ParseResults<DataArgs>
    | [<CliPrefix(CliPrefix.None)>] Doctor of ParseResults<DoctorArgs>
    | [<CliPrefix(CliPrefix.None)>] Train of ParseResults<TrainArgs>
    | [<CliPrefix(CliPrefix.None)>] Eval of ParseResults<EvalArgs>
    | [<CliPrefix(CliPrefix.None)>] Schema of ParseResults<SchemaArgs>
    | [<CliPrefix(CliPrefix.None)>] Analyze of ParseResults<AnalyzeArgs>
    | [<CliPrefix(CliPrefix.None)>] Sweep of ParseResults<SweepArgs>
    | [<CliPrefix(CliPrefix.None)>] Export of ParseResults<ExportArgs>
    | [<CliPrefix(CliPrefix.None)>] Import of ParseResults<ImportArgs>

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Version -> "print the version (with the git commit the build comes from) and stop"
            | Numerics _ -> "force the convolution kernels: auto (default: the first that passes the numerics check), default, default-nchw (default kernels, NCHW inputs), onednn-avx512_core, onednn-avx2, onednn-avx, onednn-sse41 or no-onednn (also EARLYEXIT_NUMERICS)"
            | Plugin _ -> "load models or regularisers of your own from this assembly (a class implementing EarlyExit.Extensions.IEarlyExitPlugin; also $EARLYEXIT_PLUGINS, paths separated by ':'); passed on to the runs it starts"
            | Threads _ -> "torch threads of this process: a number, or auto (default: the cores minus the processes already running; also EARLYEXIT_THREADS); a ResNet trains channels-last on 1 thread, and on more from 16 channels (EARLYEXIT_TRAINING_LAYOUT=auto|nchw|channels-last)"
            | Models _ -> "list the model families (the built-in ones and those of loaded plugins)"
            | Describe _ -> "parameters and cumulative MACs of every exit of a model"
            | Data _ -> "check or download data sets"
            | Doctor _ -> "show how TorchSharp was loaded, the CPU and the convolution kernels the numerics check chose, threads, load and device"
            | Train _ -> "train a model with a strategy or a recipe; writes a resumable run folder"
            | Eval _ -> "per-exit accuracy, budget table, accuracy-MACs curve and timing of a finished run"
            | Analyze _ -> "training-dynamics analysis of a finished run: gradient dominance, rank, loss landscape, mode connectivity (--vs)"
            | Sweep _ -> "sweeps of runs beyond one machine: plan, submit (local or slurm), status, resubmit, collect"
            | Export _ -> "a finished run's weights as a PyTorch state dict (safetensors or torch.save's format), with a JSON description"
            | Import _ -> "a PyTorch state dict into a registered network, evaluated as a run folder that eval and analyze read"
            | Schema _ -> "the JSON Schema of recipe files (the keys this build reads, and the registered regularisers and their settings)"
