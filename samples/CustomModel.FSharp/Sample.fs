/// A network of your own, on images of your own, through the recipes, the runner and eval (the F# side of the
/// library). Registers "tinycnn-fs" (three conv blocks, SDN heads), writes an image folder from Fashion-MNIST unless
/// one is given, trains it with sequential EWC (warm-up, then exits 1..3, λ = 100) and evaluates it. Shared by the
/// console app (Program.fs, built against the packages in CI) and the script (../custom-model.fsx).
module Sample

open System
open System.IO
open TorchSharp
open EarlyExit.Data
open EarlyExit.Models
open EarlyExit.Experiments.Recipes
open EarlyExit.Experiments.Runner

/// Three classes of Fashion-MNIST (T-shirt, trouser, sneaker) as grey PNGs, 200 training and 60 test images each.
let writeImageFolder (root: string) =
    let struct (train, test) = FashionMnist.ReadFolder(DataCatalog.FolderOf("fashion-mnist", null))
    let names = [ 0, "tshirt"; 1, "trouser"; 7, "sneaker" ]
    for part, ds, perClass in [ "train", train, 200; "test", test, 60 ] do
        for label, name in names do
            let dir = Path.Combine(root, part, name)
            Directory.CreateDirectory dir |> ignore
            let picks = [| 0 .. ds.Count - 1 |] |> Array.filter (fun i -> ds.Labels[i] = label) |> Array.truncate perClass
            for i in picks do
                use bmp = new SkiaSharp.SKBitmap(SkiaSharp.SKImageInfo(28, 28, SkiaSharp.SKColorType.Gray8, SkiaSharp.SKAlphaType.Opaque))
                Runtime.InteropServices.Marshal.Copy(ds.Pixels, i * 784, bmp.GetPixels(), 784)
                use png = bmp.Encode(SkiaSharp.SKEncodedImageFormat.Png, 100)
                File.WriteAllBytes(Path.Combine(dir, $"{i:D5}.png"), png.ToArray())
    printfn "wrote %s (3 classes of Fashion-MNIST as PNG)" root

// The network: segments are ordinary TorchSharp modules; the heads come from a factory that sees each segment's
// output shape. Registered by name, it is a model family like resnet34 and msdnet.
let private block (cin: int64) (cout: int64) (pool: bool) : torch.nn.Module<torch.Tensor, torch.Tensor> =
    torch.nn.Sequential(
        struct ("conv", torch.nn.Conv2d(cin, cout, 3L, padding = 1L, bias = false) :> torch.nn.Module<torch.Tensor, torch.Tensor>),
        struct ("bn", torch.nn.BatchNorm2d(cout) :> torch.nn.Module<torch.Tensor, torch.Tensor>),
        struct ("relu", torch.nn.ReLU() :> torch.nn.Module<torch.Tensor, torch.Tensor>),
        struct ("pool", (if pool then torch.nn.MaxPool2d(2L) :> torch.nn.Module<torch.Tensor, torch.Tensor> else torch.nn.Identity() :> torch.nn.Module<torch.Tensor, torch.Tensor>)))
    :> torch.nn.Module<torch.Tensor, torch.Tensor>

/// Registers the family (again: the registry keeps the latest registration of a name).
let register () =
    CustomModels.Register(
        "tinycnn-fs", "the F# sample's 3-exit CNN",
        (fun (o: ModelOptions) ->
            let c = (defaultArg (Option.ofObj o.InputShape) [| 1L; 28L; 28L |])[0]
            [| block c 16L true; block 16L 32L true; block 32L 64L false |] :> Collections.Generic.IReadOnlyList<_>),
        Heads.SdnThenPoolLinear(), 10, [| 1L; 28L; 28L |]) |> ignore

/// Writes the images unless `images` is given, trains, prints the accuracy per exit and evaluates the run; the exit code.
let run (images: string option) (out: string) (scale: Scales.Scale) =
    let images =
        match images with
        | Some d -> Path.GetFullPath d
        | None ->
            let d = Path.Combine(out, "images")
            if not (ImageFolder.IsPresent d) then writeImageFolder d
            d
    register ()
    // The 2026 paper's recipe on it: Sequential [ EWC λ = 100 ], at the scale's schedule; the data set is the folder.
    let recipe =
        let r = Scales.recipe scale (Builders.Sequential [ Builders.ewc 100.0 ]) "tinycnn-fs" "image-folder" 0
        Scales.fitToData { r with Data = { r.Data with Root = Some images } }
    match Validation.validate recipe with
    | Error e -> failwithf "%A" e
    | Ok _ -> ()
    let runDir = Path.Combine(out, "run")
    let result =
        Interpreter.run { OutDir = runDir; Resume = true; PrefixCache = None; Scale = Scales.name scale; Device = Some "cpu"; Log = printfn "%s" } recipe
    printfn "test accuracy per exit: %s" (String.Join(", ", result.TestAccuracy |> Array.map (fun a -> (100.0 * a).ToString("F2"))))
    EarlyExit.Experiments.Evaluation.Eval.run runDir false 64 EarlyExit.Experiments.Evaluation.Budget.Softmax
