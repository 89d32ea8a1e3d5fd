/// `earlyexit export` and `earlyexit import`: a finished run's weights out to PyTorch (safetensors or torch.save's
/// format) with a JSON description beside them, and a PyTorch state dict in, as an evaluated run folder that eval and
/// analyze read like any other.
module EarlyExit.Experiments.Cli.Weights

open System
open System.Diagnostics
open System.IO
open System.Security.Cryptography
open System.Text.Json
open TorchSharp
open EarlyExit.Flops
open EarlyExit.Interop
open EarlyExit.Models
open EarlyExit.Native
open EarlyExit.Training
open EarlyExit.Experiments.Recipes
open EarlyExit.Experiments.Reports
open EarlyExit.Experiments.Runner
open EarlyExit.Experiments.Evaluation

let private json = Markdown.jsonOptions false

let private recipeOf (dir: string) =
    let path = Path.Combine(dir, "recipe.json")
    if not (Directory.Exists dir) then failwithf "%s: no such run folder" dir
    match RecipeJson.load path with
    | Ok r -> r
    | Error e -> failwithf "%s: %s" path (String.Join("; ", e))

let private sha256 (file: string) =
    use f = File.OpenRead file
    Convert.ToHexString(SHA256.HashData f).ToLowerInvariant()

/// Writes RUN_DIR's final weights to `file` (default RUN_DIR/export/model.EXT) and FILE.json beside it: the network as
/// built, its recipe, the input normalisation, the names, the exits' MACs and test accuracies. Returns the file.
let export (runDir: string) (format: WeightFormat) (file: string option) =
    let info = RunFolder.readInfo runDir
    let recipe = recipeOf runDir
    use net = Eval.loadFinalNetwork runDir recipe
    let file = defaultArg file (Path.Combine(runDir, "export", "model" + WeightFiles.Extension format))
    WeightFiles.Save(net, file, format)
    // The normalisation the network was trained with: (x/255 − mean) / std per channel.
    let data = Interpreter.loadData recipe
    let parameters = net.parameters() |> Seq.sumBy (fun p -> p.numel())
    let tensors = net.state_dict().Count
    use recipeDoc = JsonDocument.Parse(RecipeJson.toJson recipe)
    let doc =
        {| format = (match format with
                     | WeightFormat.Safetensors -> "safetensors"
                     | WeightFormat.PyTorch -> "pytorch (torch.save of a state dict, zip format)"
                     | _ -> "earlyexit tensors")
           file = Path.GetFileName file
           sha256 = sha256 file
           names =
             "segments.{k}.… is backbone segment k+1 and heads.{k}.… exit k+1's classifier (0-based indices, the network's own module names); " +
             "BatchNorm buffers running_mean, running_var and num_batches_tracked are included"
           network = net.Describe()
           exits = net.ExitCount
           classes = data.Train.NumClasses
           input = [| data.Train.Channels; data.Train.Height; data.Train.Width |]
           normalisation = {| formula = "(pixel / 255 - mean[c]) / std[c]"; mean = data.Train.Mean; std = data.Train.Std |}
           exitMacs = info.ExitMacs
           testAccuracy = info.TestAccuracy
           parameters = parameters
           tensors = tensors
           sourceRun = Path.GetFullPath runDir
           trainedBy = info.CodeVersion
           exportedBy = Provenance.codeVersion ()
           recipe = recipeDoc.RootElement |}
    Markdown.writeAtomic (file + ".json") (JsonSerializer.Serialize(doc, json))
    printfn "wrote %s (%d tensors, %s parameters, %s) and %s" file tensors (parameters.ToString("N0")) doc.format (Path.GetFileName file + ".json")
    file

/// Loads a state dict into the network of a recipe (from --like RUN_DIR's recipe.json or --recipe FILE) and writes
/// OUT as a finished run: the recipe, the weights as its final stage's state, the validation and test logits and
/// metrics.json (no training: zero steps, zero training MACs, scale "imported"), so eval and analyze read it.
let import (weights: string) (recipe: Recipe) (out: string) (device: string option) =
    if Directory.Exists out && not (Seq.isEmpty (Directory.EnumerateFileSystemEntries out)) then
        failwithf "%s already exists and is not empty; give a new folder (nothing was written)" out
    match Validation.validate recipe with
    | Error e -> failwithf "the recipe: %s" (String.Join("; ", e))
    | Ok _ -> ()
    let clock = Stopwatch.StartNew()
    TorchNativeLoader.EnsureLoaded() |> ignore
    let dev = Devices.Choose(Option.toObj device)
    torch.manual_seed (int64 recipe.Seed) |> ignore
    use net = ModelRegistry.Create(recipe.Model.Name, Validation.modelOptions recipe.Model)
    let state = WeightFiles.Load weights
    try WeightFiles.LoadInto(net, state, weights)
    finally for t in state.Values do t.Dispose()
    net.eval() |> ignore
    let data = Interpreter.loadData recipe
    let cost = MacCounter.Count net
    net.``to``(dev) |> ignore
    Directory.CreateDirectory out |> ignore
    let imported = { recipe with Name = recipe.Name + "-imported" }
    RecipeJson.save (Path.Combine(out, "recipe.json")) imported
    let last = imported.Stages.Length - 1
    let stagesDir = Path.Combine(out, "stages")
    Directory.CreateDirectory stagesDir |> ignore
    TensorStore.Save(Path.Combine(stagesDir, $"%02d{last}-{imported.Stages[last].Name}.done.model"), TensorStore.StateOf net)
    let save (name: string) (ds: EarlyExit.Data.ImageDataset) =
        use logits = Evaluator.CollectLogits(net, ds, 256, dev)
        use labels = torch.tensor(ds.Labels |> Array.map int64)
        TensorStore.Save(Path.Combine(out, name), dict [ "logits", logits; "labels", labels ] |> Collections.Generic.Dictionary)
        [| for e in 0 .. net.ExitCount - 1 ->
               use pred = logits[e].argmax(1L)
               use eq = pred.eq(labels)
               use s = eq.sum()
               float (s.item<int64>()) / float ds.Count |]
    save "validation-logits.tensors" data.Validation |> ignore
    let acc = save "test-logits.tensors" data.Test
    let numerics = Provenance.numericsRecord ()
    let source = {| file = Path.GetFullPath weights; sha256 = sha256 weights; format = string (WeightFiles.FormatOf weights) |}
    let common =
        {| recipe = imported.Name
           model = net.Describe()
           data = data.Test.Name
           dataSource = data.Source
           scale = "imported"
           device = Devices.Describe dev
           threads = torch.get_num_threads ()
           deterministic = false
           seed = recipe.Seed
           codeVersion = Provenance.codeVersion ()
           numerics = numerics |}
    Markdown.writeAtomic (Path.Combine(out, "run.json")) (JsonSerializer.Serialize({| common with imported = source; started = DateTime.UtcNow.ToString("o") |}, json))
    let metrics =
        {| common with
            testImages = data.Test.Count
            testAccuracy = acc
            exitMacs = cost.Exits |> Seq.map (fun e -> e.CumulativeMacs) |> Seq.toArray
            backboneMacs = cost.BackboneMacs
            macConvention = "conv-linear (one multiply-add = 1)"
            cost = {| convention = "imported weights: no training here"; epochs = 0; steps = 0; images = 0L; trainingMacs = 0.0; stages = [||] |}
            imported = source
            wallSeconds = clock.Elapsed.TotalSeconds
            finished = DateTime.UtcNow.ToString("o") |}
    Markdown.writeAtomic (Path.Combine(out, "metrics.json")) (JsonSerializer.Serialize(metrics, json))
    let accText = acc |> Array.mapi (fun i a -> $"exit {i + 1} {100.0 * a:F2}") |> String.concat ", "
    printfn "imported %s into %s: test accuracy %s (%d test images); eval and analyze read it" weights out accText data.Test.Count
    acc
