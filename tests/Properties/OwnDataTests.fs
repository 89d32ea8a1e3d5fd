/// A user's own data: .npy folders and image folders read back what was written (against index loops written out
/// here, and against NumPy's own np.save where Debian's python3-numpy is installed), bad files are errors that name
/// the file, and both run through the interpreter, run folders, the prefix cache and eval like the built-in sets.
module EarlyExit.Tests.Properties.OwnDataTests

open System
open System.IO
open Expecto
open FsCheck
open SkiaSharp
open EarlyExit.Data
open EarlyExit.Tests.Support
open EarlyExit.Tests.Properties.Generators
open EarlyExit.Experiments.Recipes
open EarlyExit.Experiments.Runner

/// Bytes of a float32 array, little-endian.
let private f32Bytes (xs: float32[]) = xs |> Array.collect (fun x -> let b = BitConverter.GetBytes x in (if BitConverter.IsLittleEndian then b else Array.rev b))

let private int64Bytes (xs: int64[]) = xs |> Array.collect BitConverter.GetBytes

let private errorOf (f: unit -> 'a) =
    try f () |> ignore; "" with :? DataFormatException as e -> e.Message

/// The obvious reference: the element of sample s, channel c, row y, column x in the file's own layout.
type private Layout = NHW | NHWC | NCHW

let private fileIndex layout (c, h, w) (s, ch, y, x) =
    match layout with
    | NHW -> (s * h + y) * w + x
    | NHWC -> ((s * h + y) * w + x) * c + ch
    | NCHW -> ((s * c + ch) * h + y) * w + x

let private shapeOf layout n (c, h, w) =
    match layout with
    | NHW -> [| int64 n; int64 h; int64 w |]
    | NHWC -> [| int64 n; int64 h; int64 w; int64 c |]
    | NCHW -> [| int64 n; int64 c; int64 h; int64 w |]

/// The N×C×H×W bytes a file of that layout holds.
let private expectedPlanar layout n (c, h, w) (file: byte[]) =
    [| for s in 0 .. n - 1 do
         for ch in 0 .. c - 1 do
             for y in 0 .. h - 1 do
                 for x in 0 .. w - 1 -> file[fileIndex layout (c, h, w) (s, ch, y, x)] |]

let npy =
    testList ".npy" [
        testProp "images of every layout and dtype read back as N×C×H×W bytes; floats k/255 become k" (fun (seed: int) (useFloat: bool) ->
            let rng = Random seed
            let layout = [| NHW; NHWC; NCHW |][rng.Next 3]
            let c = if layout = NHW then 1 else [| 1; 3 |][rng.Next 2]
            // NCHW needs a last axis that is not 1 or 3 (else the file reads as N×H×W×C).
            let h, w = 1 + rng.Next 6, (if layout = NCHW then 4 + rng.Next 4 else 1 + rng.Next 6)
            let n = 1 + rng.Next 5
            let raw = Array.init (n * c * h * w) (fun _ -> byte (rng.Next 256))
            use dir = new TempDir()
            let file = dir.File "x.npy"
            if useFloat then NpyFormat.Write(file, "<f4", shapeOf layout n (c, h, w), ReadOnlySpan(f32Bytes (raw |> Array.map (fun b -> float32 b / 255.0f))))
            else NpyFormat.Write(file, "|u1", shapeOf layout n (c, h, w), ReadOnlySpan raw)
            let struct (pixels, n', c', h', w') = NpyFormat.ReadImages file
            (n', c', h', w') = (n, c, h, w) && pixels = expectedPlanar layout n (c, h, w) raw)

        testProp "labels of every integer type and byte order read back" (fun (seed: int) ->
            let rng = Random seed
            let n = 1 + rng.Next 30
            let labels = Array.init n (fun _ -> rng.Next 120)
            use dir = new TempDir()
            let file = dir.File "y.npy"
            let kind = rng.Next 5
            let descr, bytes =
                match kind with
                | 0 -> "|u1", labels |> Array.map byte
                | 1 -> "<i8", labels |> Array.map int64 |> int64Bytes
                | 2 -> "<i4", labels |> Array.collect BitConverter.GetBytes
                | 3 -> ">i4", labels |> Array.collect (BitConverter.GetBytes >> Array.rev)
                | _ -> "<u2", labels |> Array.collect (uint16 >> BitConverter.GetBytes)
            NpyFormat.Write(file, descr, [| int64 n |], ReadOnlySpan bytes)
            NpyFormat.ReadLabels file = labels)

        test "files NumPy writes (np.save, format 1.0) read as NumPy reads them" {
            let python = "/usr/bin/python3"
            let hasNumpy =
                File.Exists python
                && (try
                        use p = Diagnostics.Process.Start(Diagnostics.ProcessStartInfo(python, "-c \"import numpy\"", RedirectStandardError = true))
                        p.WaitForExit()
                        p.ExitCode = 0
                    with _ -> false)
            if not hasNumpy then skiptest "Debian's python3-numpy is not installed (.ci/run installs it with python3-torch)"
            use dir = new TempDir()
            let u8, f32, labels, planarFile = dir.File "u8.npy", dir.File "f32.npy", dir.File "labels.npy", dir.File "planar.txt"
            let script =
                String.concat "\n"
                    [ "import numpy as np"
                      "x = (np.arange(2*5*4*3) * 7 % 256).astype(np.uint8).reshape(2, 5, 4, 3)"
                      $"np.save(r'{u8}', x)"
                      $"np.save(r'{f32}', np.ascontiguousarray(x.transpose(0, 3, 1, 2)).astype(np.float32) / 255)"
                      $"np.save(r'{labels}', np.array([3, 0, 9], dtype=np.int64))"
                      $"open(r'{planarFile}', 'w').write(' '.join(str(v) for v in x.transpose(0, 3, 1, 2).ravel()))"
                      "" ]
            File.WriteAllText(dir.File "make.py", script)
            use p = Diagnostics.Process.Start(python, dir.File "make.py")
            p.WaitForExit()
            Expect.equal p.ExitCode 0 "numpy wrote the files"
            let planar = File.ReadAllText(dir.File "planar.txt").Split(' ') |> Array.map byte
            let struct (a, n, c, h, w) = NpyFormat.ReadImages(dir.File "u8.npy")
            Expect.equal (n, c, h, w) (2, 3, 5, 4) "N×H×W×C uint8 read as 2×3×5×4"
            Expect.equal a planar "pixels in NumPy's transpose(0, 3, 1, 2) order"
            let struct (b, _, c2, _, _) = NpyFormat.ReadImages(dir.File "f32.npy")
            Expect.equal c2 3 "N×C×H×W float32"
            Expect.equal b planar "float32 x/255 read back as the bytes x"
            Expect.equal (NpyFormat.ReadLabels(dir.File "labels.npy")) [| 3; 0; 9 |] "int64 labels"
        }

        test "bad files are errors that name the file and say what is wrong" {
            use dir = new TempDir()
            let write name descr (shape: int64[]) (bytes: byte[]) =
                let f = dir.File name
                NpyFormat.Write(f, descr, shape, ReadOnlySpan bytes)
                f
            let good = write "good.npy" "|u1" [| 2L; 3L; 3L |] (Array.zeroCreate 18)
            let truncated = dir.File "truncated.npy"
            File.WriteAllBytes(truncated, (File.ReadAllBytes good)[.. 80])
            let notNpy = dir.File "text.npy"
            File.WriteAllText(notNpy, "hello, this is not an array")
            let fortran = dir.File "fortran.npy"
            File.WriteAllBytes(fortran, (File.ReadAllBytes good) |> Array.map id |> fun b -> Text.Encoding.Latin1.GetBytes((Text.Encoding.Latin1.GetString b).Replace("'fortran_order': False", "'fortran_order': True ")))
            let outOfRange = write "range.npy" "<f4" [| 1L; 2L; 2L |] (f32Bytes [| 0.0f; 0.5f; 1.5f; 0.1f |])
            let badShape = write "shape.npy" "|u1" [| 2L; 5L |] (Array.zeroCreate 10)
            let floatLabels = write "flabels.npy" "<f4" [| 2L |] (f32Bytes [| 1.0f; 2.0f |])
            let negative = write "neg.npy" "<i8" [| 2L |] (int64Bytes [| 1L; -1L |])
            let cases =
                [ errorOf (fun () -> NpyFormat.ReadImages truncated), truncated, "truncated"
                  errorOf (fun () -> NpyFormat.ReadImages notNpy), notNpy, "not a NumPy .npy file"
                  errorOf (fun () -> NpyFormat.ReadImages fortran), fortran, "Fortran-order"
                  errorOf (fun () -> NpyFormat.ReadImages outOfRange), outOfRange, "element 2 is 1.5: float images must lie in [0, 1]"
                  errorOf (fun () -> NpyFormat.ReadImages badShape), badShape, "images of shape (2, 5)"
                  errorOf (fun () -> NpyFormat.ReadLabels floatLabels), floatLabels, "give integers"
                  errorOf (fun () -> NpyFormat.ReadLabels negative), negative, "label -1 of sample 1"
                  errorOf (fun () -> NpyFormat.ReadImages(dir.File "absent.npy")), dir.File "absent.npy", "file not found" ]
            for msg, file, what in cases do
                Expect.stringContains msg file $"names {Path.GetFileName file}"
                Expect.stringContains msg what $"{Path.GetFileName file}: says {what}"
            // A folder whose labels do not match its images.
            let folder = dir.File "set"
            Directory.CreateDirectory folder |> ignore
            for part in [ "train"; "test" ] do
                NpyFormat.Write(Path.Combine(folder, $"{part}-images.npy"), "|u1", [| 3L; 4L; 4L |], ReadOnlySpan(Array.zeroCreate<byte> 48))
                NpyFormat.Write(Path.Combine(folder, $"{part}-labels.npy"), "|u1", [| 2L |], ReadOnlySpan [| 0uy; 1uy |])
            let msg = errorOf (fun () -> NpyFolder.ReadFolder folder)
            Expect.stringContains msg "train-labels.npy: 2 labels for 3 images" "count mismatch names the label file"
        }
    ]

/// Writes a PNG (or JPEG) of grey (c = 1) or RGB (c = 3) pixels given N×C×H×W-style planes of one image.
let private writeImage (file: string) (c: int) (h: int) (w: int) (planes: byte[]) (format: SKEncodedImageFormat) =
    let info =
        if c = 1 then SKImageInfo(w, h, SKColorType.Gray8, SKAlphaType.Opaque)
        else SKImageInfo(w, h, SKColorType.Rgba8888, SKAlphaType.Unpremul)
    use bmp = new SKBitmap(info)
    let px = bmp.GetPixelSpan()
    let bytes = Array.zeroCreate<byte> px.Length
    for p in 0 .. h * w - 1 do
        if c = 1 then bytes[p] <- planes[p]
        else
            bytes[4 * p] <- planes[p]
            bytes[4 * p + 1] <- planes[h * w + p]
            bytes[4 * p + 2] <- planes[2 * h * w + p]
            bytes[4 * p + 3] <- 255uy
    Runtime.InteropServices.Marshal.Copy(bytes, 0, bmp.GetPixels(), bytes.Length)
    use data = bmp.Encode(format, 95)
    File.WriteAllBytes(file, data.ToArray())

/// An image folder of `classes` classes with `perClass` images each in train and test; returns the planes written,
/// by part, in the order the reader must give them (classes in ordinal order, files in ordinal order).
let private makeFolder (root: string) (classes: string list) (perClass: int) (c: int) (h: int) (w: int) (rng: Random) =
    [ for part in [ "train"; "test" ] ->
        part,
        [ for k, cls in List.indexed (List.sortWith (fun a b -> String.CompareOrdinal(a, b)) classes) do
            let dir = Path.Combine(root, part, cls)
            Directory.CreateDirectory dir |> ignore
            for i in 0 .. perClass - 1 do
                let planes = Array.init (c * h * w) (fun _ -> byte (rng.Next 256))
                writeImage (Path.Combine(dir, $"img{i:D3}.png")) c h w planes SKEncodedImageFormat.Png
                yield planes, k ] ]
    |> Map.ofList

let imageFolder =
    testList "image folder" [
        testProp "PNGs read back bit for bit, grey as 1 channel and colour as 3, classes in ordinal order" (fun (seed: int) (colour: bool) ->
            let rng = Random seed
            let c = if colour then 3 else 1
            let h, w = 2 + rng.Next 6, 2 + rng.Next 6
            use dir = new TempDir()
            // "B" sorts before "a" in ordinal order: labels must follow it.
            let written = makeFolder dir.Path [ "a"; "B"; "c3" ] (1 + rng.Next 3) c h w rng
            let struct (train, test) = ImageFolder.ReadFolder dir.Path
            let expect (ds: ImageDataset) part =
                let items = written[part]
                ds.Channels = c && ds.Height = h && ds.Width = w && ds.NumClasses = 3
                && ds.Labels = (items |> List.map snd |> Array.ofList)
                && ds.Pixels = (items |> List.map fst |> Array.concat)
            expect train "train" && expect test "test" && ImageFolder.ClassesOf dir.Path = [| "B"; "a"; "c3" |])

        test "a grey JPEG is one channel, decoded within JPEG's loss; channel statistics come from the training images" {
            use dir = new TempDir()
            let flat = Array.create 64 128uy
            for part in [ "train"; "test" ] do
                for cls, v in [ "x", 60uy; "y", 200uy ] do
                    let d = Path.Combine(dir.Path, part, cls)
                    Directory.CreateDirectory d |> ignore
                    writeImage (Path.Combine(d, "0.jpg")) 1 8 8 (Array.create 64 v) SKEncodedImageFormat.Jpeg
            let struct (train, _) = ImageFolder.ReadFolder dir.Path
            Expect.equal train.Channels 1 "grey"
            for i, v in [ 0, 60; 1, 200 ] do
                for p in 0 .. 63 do
                    Expect.isLessThanOrEqual (abs (int train.Pixels[i * 64 + p] - v)) 2 "a flat grey JPEG decodes to its grey"
            Expect.floatClose Accuracy.medium (float train.Mean[0]) (float (Array.averageBy float train.Pixels) / 255.0) "mean of the training pixels"
            ignore flat
        }

        test "bad folders are errors that name the file or folder" {
            use dir = new TempDir()
            let rng = Random 1
            makeFolder dir.Path [ "cat"; "dog" ] 2 3 4 4 rng |> ignore
            // a different size
            let odd = Path.Combine(dir.Path, "train", "dog", "odd.png")
            writeImage odd 3 5 4 (Array.zeroCreate 60) SKEncodedImageFormat.Png
            let msg = errorOf (fun () -> ImageFolder.ReadFolder dir.Path)
            Expect.stringContains msg odd "names the odd image"
            Expect.stringContains msg "4×5 pixels, the first image is 4×4" "says the sizes"
            File.Delete odd
            // not an image
            let junk = Path.Combine(dir.Path, "test", "cat", "junk.png")
            File.WriteAllText(junk, "not a png")
            let msg2 = errorOf (fun () -> ImageFolder.ReadFolder dir.Path)
            Expect.stringContains msg2 junk "names the file that does not decode"
            Expect.stringContains msg2 "not a decodable image" "says why"
            File.Delete junk
            // a test class without training images
            Directory.CreateDirectory(Path.Combine(dir.Path, "test", "emu")) |> ignore
            let msg3 = errorOf (fun () -> ImageFolder.ReadFolder dir.Path)
            Expect.stringContains msg3 "class 'emu' has no training folder; classes: cat, dog" "unknown test class"
            Directory.Delete(Path.Combine(dir.Path, "test", "emu"))
            Expect.equal (ImageFolder.ReadFolder dir.Path |> fun struct (t, _) -> t.Count) 4 "readable again"
            let msg4 = errorOf (fun () -> ImageFolder.ReadFolder(dir.File "nowhere"))
            Expect.stringContains msg4 (Path.Combine(dir.File "nowhere", "train")) "a missing folder is named"
        }
    ]

let private quiet: Interpreter.RunOptions =
    { OutDir = ""; Resume = false; PrefixCache = None; Scale = "smoke"; Device = Some "cpu"; Log = ignore }

/// A learnable npy set: 3 classes, each a colour channel lit (16×16 RGB).
let private colourNpy (folder: string) =
    Directory.CreateDirectory folder |> ignore
    let rng = Random 5
    for part, n in [ "train", 240; "test", 90 ] do
        let labels = Array.init n (fun i -> i % 3)
        let pixels =
            [| for i in 0 .. n - 1 do
                 for y in 0 .. 15 do
                     for x in 0 .. 15 do
                         for ch in 0 .. 2 -> byte ((if ch = labels[i] then 180 else 0) + rng.Next 60) |]
        NpyFormat.Write(Path.Combine(folder, $"{part}-images.npy"), "|u1", [| int64 n; 16L; 16L; 3L |], ReadOnlySpan pixels)
        NpyFormat.Write(Path.Combine(folder, $"{part}-labels.npy"), "<i8", [| int64 n |], ReadOnlySpan(int64Bytes (Array.map int64 labels)))

let endToEnd =
    testList "own data through the runner" [
        test "an npy folder: recipe fitted to the data, trained, finished run recognised, resumed, evaluated; a changed file changes the cache key" {
            use dir = new TempDir()
            let data = dir.File "colours"
            colourNpy data
            let r0 = Scales.recipe Scales.Smoke (Builders.Sequential [ Builders.ewc 100.0 ]) "resnet34" "npy" 0
            Expect.isNonEmpty (Validation.problems r0) "without a root the recipe is refused"
            Expect.exists (Validation.problems r0) (fun p -> p.StartsWith "data.root:") "and says data.root"
            let r = Scales.fitToData { r0 with Data = { r0.Data with Root = Some data } }
            Expect.equal r.Model.Input (Some [ 3L; 16L; 16L ]) "input from the files"
            Expect.equal r.Model.Classes (Some 3) "classes from the labels"
            Expect.equal (Validation.problems r) [] "valid"
            // The recipe round-trips through JSON, as a saved run's does.
            Expect.equal (RecipeJson.toJson (RecipeJson.parse (RecipeJson.toJson r) |> Result.defaultWith (failwithf "%A"))) (RecipeJson.toJson r) "JSON round trip"
            let out = dir.File "run"
            let first = Interpreter.run { quiet with OutDir = out; PrefixCache = Some(dir.File "cache") } r
            Expect.equal first.TestAccuracy.Length 4 "four exits"
            let second = Interpreter.run { quiet with OutDir = out } r
            Expect.isTrue second.AlreadyFinished "a finished run is recognised"
            File.Delete(Path.Combine(out, "metrics.json"))
            let resumed = Interpreter.run { quiet with OutDir = out; Resume = true } r
            Expect.equal resumed.TestAccuracy first.TestAccuracy "resumed: the same model"
            // eval, with its timing (it rebuilds the network from the run folder and reloads the data)
            let saved = Console.Out
            let sw = new StringWriter()
            Console.SetOut sw
            let code = try EarlyExit.Experiments.Evaluation.Eval.run out true 16 EarlyExit.Experiments.Evaluation.Budget.Softmax finally Console.SetOut saved
            Expect.equal code 0 "eval succeeds"
            use doc = Text.Json.JsonDocument.Parse(sw.ToString())
            Expect.equal (doc.RootElement.GetProperty("exitAccuracy").GetArrayLength()) 4 "eval gives every exit"
            Expect.equal (doc.RootElement.GetProperty("timing").GetArrayLength()) 2 "and times batch 1 and 64"
            for t in doc.RootElement.GetProperty("timing").EnumerateArray() do
                let streamed = t.GetProperty("StreamedMsPerSample").GetDouble()
                Expect.isTrue (streamed > 0.0 && Double.IsFinite streamed) "and streamed early exit beside batch by batch"
            let key = Interpreter.prefixKey r 0
            Threading.Thread.Sleep 20
            File.SetLastWriteTimeUtc(Path.Combine(data, "train-labels.npy"), DateTime.UtcNow.AddMinutes 1.0)
            Expect.notEqual (Interpreter.prefixKey r 0) key "a changed file, a different cache key"
            // A model whose input differs from the images is refused before training, saying what to set.
            let wrong = { r with Model = { r.Model with Input = Some [ 1L; 28L; 28L ] } }
            let msg = try Interpreter.run { quiet with OutDir = dir.File "wrong" } wrong |> ignore; "" with Interpreter.RunError m -> m
            Expect.stringContains msg "model.input is 1×28×28, but the images of npy" "the mismatch"
            Expect.stringContains msg "set model.input to 3×16×16" "and the fix"
        }
    ]

let all = testList "own data" [ npy; imageFolder; endToEnd ]
