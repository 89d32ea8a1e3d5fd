// A network of your own, on images of your own, through the recipes, the runner and eval (the F# side of the
// library). Registers "tinycnn-fs" (three conv blocks, SDN heads), writes an image folder from Fashion-MNIST unless
// one is given, trains it with sequential EWC (warm-up, then exits 1..3, λ = 100) and evaluates it.
//
//   dotnet build -c Release && dotnet fsi samples/custom-model.fsx [--images DIR] [--out DIR] [--scale smoke|cpu]
//
// The folder it writes (DIR/images: train/CLASS/*.png, test/CLASS/*.png, three classes) is what the C# sample
// (samples/CustomModel.CSharp) and the command line (`earlyexit train --data image-folder --data-root DIR/images`) read.
#load "../experiments/Load.fsx"

open System
open System.IO
open TorchSharp
open EarlyExit.Data
open EarlyExit.Models
open EarlyExit.Experiments.Recipes
open EarlyExit.Experiments.Runner

let args = fsi.CommandLineArgs |> Array.skip 1 |> List.ofArray
let rec opt name = function
    | k :: v :: _ when k = name -> Some v
    | _ :: rest -> opt name rest
    | [] -> None
let out = opt "--out" args |> Option.defaultValue "custom-model-out" |> Path.GetFullPath
let scale = match opt "--scale" args with
            | Some s -> (match Scales.parse s with Ok v -> v | Error e -> failwith e)
            | None -> Scales.Smoke

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

let images =
    match opt "--images" args with
    | Some d -> Path.GetFullPath d
    | None ->
        let d = Path.Combine(out, "images")
        if not (ImageFolder.IsPresent d) then writeImageFolder d
        d

// The network: segments are ordinary TorchSharp modules; the heads come from a factory that sees each segment's
// output shape. Registered by name, it is a model family like resnet34 and msdnet.
let block (cin: int64) (cout: int64) (pool: bool) : torch.nn.Module<torch.Tensor, torch.Tensor> =
    torch.nn.Sequential(
        struct ("conv", torch.nn.Conv2d(cin, cout, 3L, padding = 1L, bias = false) :> torch.nn.Module<torch.Tensor, torch.Tensor>),
        struct ("bn", torch.nn.BatchNorm2d(cout) :> torch.nn.Module<torch.Tensor, torch.Tensor>),
        struct ("relu", torch.nn.ReLU() :> torch.nn.Module<torch.Tensor, torch.Tensor>),
        struct ("pool", (if pool then torch.nn.MaxPool2d(2L) :> torch.nn.Module<torch.Tensor, torch.Tensor> else torch.nn.Identity() :> torch.nn.Module<torch.Tensor, torch.Tensor>)))
    :> torch.nn.Module<torch.Tensor, torch.Tensor>

CustomModels.Register(
    "tinycnn-fs", "the F# sample's 3-exit CNN",
    (fun (o: ModelOptions) ->
        let c = (defaultArg (Option.ofObj o.InputShape) [| 1L; 28L; 28L |])[0]
        [| block c 16L true; block 16L 32L true; block 32L 64L false |] :> Collections.Generic.IReadOnlyList<_>),
    Heads.SdnThenPoolLinear(), 10, [| 1L; 28L; 28L |]) |> ignore

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
EarlyExit.Experiments.Cli.Eval.run runDir false 64 EarlyExit.Experiments.Evaluation.Budget.Softmax |> ignore
