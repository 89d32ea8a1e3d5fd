/// Reading a finished run folder: its metrics and cached test logits.
module EarlyExit.Experiments.Evaluation.RunFolder

open System.IO
open System.Text.Json
open EarlyExit.Training
open EarlyExit.Experiments.Evaluation.Budget

type RunInfo =
    { Dir: string
      Recipe: string
      /// The network as built: family, blocks, widths, exits, classes, input.
      Model: string
      Scale: string
      Device: string
      Data: string
      Seed: int
      CodeVersion: string
      /// CPU, libtorch and oneDNN, and the convolution kernels the numerics check chose ("not recorded" for older runs).
      Numerics: string
      /// The CPU model and the kernels, short enough for a figure's subtitle.
      NumericsShort: string
      TestAccuracy: float[]
      ExitMacs: int64[]
      BackboneMacs: int64
      WallSeconds: float
      /// torch threads of the run (0: not recorded).
      Threads: int
      Deterministic: bool
      /// Epochs, optimiser steps and training MACs of every stage, reused ones included (None: not recorded).
      Cost: RunCost option }

and RunCost = { Epochs: int; Steps: int; TrainingMacs: float }

let readInfo (dir: string) =
    let path = Path.Combine(dir, "metrics.json")
    if not (File.Exists path) then
        if not (Directory.Exists dir) then failwithf "%s: no such run folder" dir
        else failwithf "%s: no metrics.json, so not a finished run (train it with earlyexit train, or finish it with --resume)" dir
    use doc = JsonDocument.Parse(File.ReadAllText path)
    let r = doc.RootElement
    let str (k: string) = r.GetProperty(k).GetString()
    { Dir = dir
      Recipe = str "recipe"
      Model = (match r.TryGetProperty "model" with
               | true, v when v.ValueKind = JsonValueKind.String -> v.GetString()
               | _ -> "")
      Scale = str "scale"
      Device = str "device"
      Data = str "data"
      Seed = r.GetProperty("seed").GetInt32()
      CodeVersion = str "codeVersion"
      Numerics =
        match r.TryGetProperty "numerics" with
        | true, n -> n.GetProperty("summary").GetString()
        | _ -> "not recorded (the run predates the numerics check; its CPU and kernels are unknown)"
      NumericsShort =
        match r.TryGetProperty "numerics" with
        | true, n -> n.GetProperty("short").GetString()
        | _ -> "CPU and kernels not recorded"
      TestAccuracy = r.GetProperty("testAccuracy").EnumerateArray() |> Seq.map (fun e -> e.GetDouble()) |> Seq.toArray
      ExitMacs = r.GetProperty("exitMacs").EnumerateArray() |> Seq.map (fun e -> e.GetInt64()) |> Seq.toArray
      BackboneMacs = r.GetProperty("backboneMacs").GetInt64()
      WallSeconds = r.GetProperty("wallSeconds").GetDouble()
      Threads = (match r.TryGetProperty "threads" with
                 | true, v -> v.GetInt32()
                 | _ -> 0)
      Deterministic = (match r.TryGetProperty "deterministic" with
                       | true, v -> v.GetBoolean()
                       | _ -> false)
      Cost =
        match r.TryGetProperty "cost" with
        | true, c ->
            Some { Epochs = c.GetProperty("epochs").GetInt32(); Steps = c.GetProperty("steps").GetInt32(); TrainingMacs = c.GetProperty("trainingMacs").GetDouble() }
        | _ -> None }

/// Exit outputs from a logits tensor of shape exits × samples × classes (as Evaluator.CollectLogits returns).
let outputsOfLogits (logits: TorchSharp.torch.Tensor) (labels: int[]) (exitMacs: int64[]) (backboneMacs: int64) : ExitOutputs =
    let m, n, c = int logits.shape[0], int logits.shape[1], int logits.shape[2]
    let flat = EarlyExit.Native.TensorData.ToArray<float32> logits
    let nested = Array.init m (fun e -> Array.init n (fun i -> Array.sub flat ((e * n + i) * c) c))
    fromLogits nested labels exitMacs backboneMacs

/// The cached test outputs of a finished run (exit confidences and predictions).
let readOutputs (dir: string) (info: RunInfo) : ExitOutputs =
    let tensors = TensorStore.Load(Path.Combine(dir, "test-logits.tensors"))
    try
        let labels = EarlyExit.Native.TensorData.ToArray<int64> tensors["labels"] |> Array.map int
        outputsOfLogits tensors["logits"] labels info.ExitMacs info.BackboneMacs
    finally
        for t in tensors.Values do t.Dispose()

/// The cached validation outputs of a finished run (None for runs made before they were cached): what thresholds are
/// fitted on in the honest budget protocol.
let readValidationOutputs (dir: string) (info: RunInfo) : ExitOutputs option =
    let path = Path.Combine(dir, "validation-logits.tensors")
    if not (File.Exists path) then None
    else
        let tensors = TensorStore.Load path
        try
            let labels = EarlyExit.Native.TensorData.ToArray<int64> tensors["labels"] |> Array.map int
            Some(outputsOfLogits tensors["logits"] labels info.ExitMacs info.BackboneMacs)
        finally
            for t in tensors.Values do t.Dispose()
