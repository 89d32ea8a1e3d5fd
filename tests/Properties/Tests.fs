module EarlyExit.Tests.Properties.Tests

open System
open System.IO
open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open EarlyExit.Models
open EarlyExit.Flops
open EarlyExit.Inference
open EarlyExit.Data
open EarlyExit.Tests.Support
open EarlyExit.Tests.Properties.Generators

type Tensor = torch.Tensor

/// Bit-for-bit equality of two tensors (same shape, every element equal).
let same (a: Tensor) (b: Tensor) = a.shape = b.shape && a.eq(b).all().item<bool>()

let build (c: SmallResNet) =
    torch.manual_seed (int64 c.Seed) |> ignore
    let widths = Array.init c.Blocks.Length (fun i -> c.BaseWidth <<< i)
    new MultiExitResNet(ResNetConfig(Blocks = c.Blocks, Widths = widths, ExitAfterBlocks = c.Exits, NumClasses = c.Classes, InputShape = c.Input))

/// Slow, obvious oracle: ResNet MACs from closed-form layer sizes (conv + linear, one multiply-add = 1).
let analyticMacs (c: SmallResNet) =
    let out (side: int64) (stride: int64) = (side - 1L) / stride + 1L
    let mutable h, w = c.Input[1], c.Input[2]
    let mutable ch = int64 c.BaseWidth
    let stem = c.Input[0] * ch * 9L * h * w
    let blockMacs = ResizeArray<int64>()
    let blockChannels = ResizeArray<int64>()
    for s in 0 .. c.Blocks.Length - 1 do
        let cout = int64 (c.BaseWidth <<< s)
        for b in 0 .. c.Blocks[s] - 1 do
            let stride = if s > 0 && b = 0 then 2L else 1L
            let h2, w2 = out h stride, out w stride
            let shortcut = if stride <> 1L || ch <> cout then ch * cout * h2 * w2 else 0L
            blockMacs.Add(ch * cout * 9L * h2 * w2 + cout * cout * 9L * h2 * w2 + shortcut)
            blockChannels.Add cout
            ch <- cout; h <- h2; w <- w2
    let mutable start = 0
    [ for e in 0 .. c.Exits.Length - 1 do
        let seg = (if e = 0 then stem else 0L) + (blockMacs |> Seq.skip start |> Seq.take (c.Exits[e] - start) |> Seq.sum)
        let cAt = blockChannels[c.Exits[e] - 1]
        let head = if e = c.Exits.Length - 1 then cAt * int64 c.Classes else cAt * 16L * int64 c.Classes
        start <- c.Exits[e]
        yield seg, head ]

let models =
    testList "multi-exit models" [
        testPropArbs "MAC counter (forward hooks on real modules) equals the closed-form count" (fun (c: SmallResNet) ->
            use net = build c
            let cost = MacCounter.Count net
            let expected = analyticMacs c
            let actual = cost.Exits |> Seq.map (fun e -> e.SegmentMacs, e.HeadMacs) |> Seq.toList
            actual = expected)

        testPropArbs "ForwardUpTo(mu) gives exactly the first mu logits of a full forward pass" (fun (c: SmallResNet) ->
            use net = build c
            net.eval() |> ignore
            use scope = torch.NewDisposeScope()
            let x = torch.randn([| 2L; c.Input[0]; c.Input[1]; c.Input[2] |])
            let all = net.forward x
            [ 1 .. net.ExitCount ]
            |> List.forall (fun mu ->
                let part = net.ForwardUpTo(x, mu)
                part.Length = mu && Seq.forall2 same part (Seq.take mu all)))

        testProp "an SDN head's training path (H,W,C features, reordered weight) gives the logits and gradients of the plain definition" (fun (seed: NonNegativeInt) ->
            // float64, so that the only difference allowed is the order of the linear's sums (and the pools' layout).
            let rng = Random seed.Get
            let channels, side, batch, classes = int64 (rng.Next(1, 10)), int64 (rng.Next(4, 13)), int64 (rng.Next(1, 6)), int64 (rng.Next(2, 8))
            torch.manual_seed (int64 seed.Get) |> ignore
            use head = new SdnHead("h", channels, classes)
            head.``to``(torch.float64) |> ignore
            use scope = torch.NewDisposeScope()
            let x = torch.randn([| batch; channels; side; side |], dtype = torch.float64).requires_grad_(true)
            let g = torch.randn([| batch; classes |], dtype = torch.float64)
            let p = dict (head.named_parameters() |> Seq.map (fun struct (n, t) -> n, t))
            let alpha, weight, bias = p["alpha"], p["linear.weight"], p["linear.bias"]
            let gradsOf (logits: torch.Tensor) =
                let gs = torch.autograd.grad([| logits |], [| x; alpha; weight; bias |], [| g |])
                logits.detach(), Array.ofSeq gs
            let ours, ourGrads = gradsOf (head.call [| x |])
            let pooled = alpha * torch.nn.functional.adaptive_max_pool2d(x, [| 4L; 4L |]) + (1.0 - alpha) * torch.nn.functional.adaptive_avg_pool2d(x, [| 4L; 4L |])
            let plain, plainGrads = gradsOf (torch.nn.functional.linear(pooled.flatten(1), weight, bias))
            let inference = (use _ = torch.no_grad() in head.call [| x |])
            let near (a: torch.Tensor) (b: torch.Tensor) = a.shape = b.shape && (a - b).abs().max().item<float>() <= 1e-12 * (1.0 + b.abs().max().item<float>())
            near ours plain && near inference plain && Array.forall2 near ourGrads plainGrads)

        testProp "a strided BasicBlock (its shortcut a 1×1 convolution of every stride-th pixel) is the textbook block with a strided 1×1 shortcut: output and every gradient (float64)" (fun (seed: NonNegativeInt) ->
            let rng = Random seed.Get
            let cin, cout, side, batch, stride = int64 (rng.Next(1, 6)), int64 (rng.Next(1, 8)), int64 (rng.Next(3, 12)), int64 (rng.Next(2, 5)), int64 (rng.Next(2, 4))
            torch.manual_seed (int64 seed.Get) |> ignore
            use block = new BasicBlock("b", cin, cout, stride)
            block.``to``(torch.float64).train() |> ignore
            use scope = torch.NewDisposeScope()
            let x = torch.randn([| batch; cin; side; side |], dtype = torch.float64).requires_grad_(true)
            let p = dict (block.named_parameters() |> Seq.map (fun struct (n, t) -> n, t))
            let names = p.Keys |> Seq.sort |> Array.ofSeq
            let bn (t: torch.Tensor) (name: string) =
                torch.nn.functional.batch_norm(t, torch.zeros(cout, dtype = torch.float64), torch.ones(cout, dtype = torch.float64), p[name + ".weight"], p[name + ".bias"], true)
            let conv (t: torch.Tensor) (name: string) (s: int64) (pad: int64) = torch.nn.functional.conv2d(t, p[name + ".weight"], strides = [| s; s |], padding = [| pad; pad |])
            let main = bn (conv (torch.nn.functional.relu (bn (conv x "conv1" stride 1L) "bn1")) "conv2" 1L 1L) "bn2"
            let textbook = torch.nn.functional.relu (main + bn (conv x "shortcutConv" stride 0L) "shortcutBn")
            let ours = block.call x
            let g = torch.randn_like textbook
            let gradsOf (y: torch.Tensor) = torch.autograd.grad([| y |], Array.append [| x |] (names |> Array.map (fun n -> p[n])), [| g |], retain_graph = true) |> Array.ofSeq
            let near (a: torch.Tensor) (b: torch.Tensor) = a.shape = b.shape && (a - b).abs().max().item<float>() <= 1e-12 * (1.0 + b.abs().max().item<float>())
            names |> Array.contains "shortcutConv.weight"
            && near ours textbook && Array.forall2 near (gradsOf ours) (gradsOf textbook))

        testPropArbs "a forward leaves only its logits in the caller's dispose scope: feature maps are released when it returns" (fun (c: SmallResNet) ->
            use net = build c
            net.eval() |> ignore
            use outer = torch.NewDisposeScope()
            let x = torch.randn([| 3L; c.Input[0]; c.Input[1]; c.Input[2] |])
            use _ = torch.no_grad()
            let before = outer.DisposablesCount
            let all = net.ForwardUpTo(x, net.ExitCount)
            let afterAll = outer.DisposablesCount
            let one = net.ForwardExit(x, net.ExitCount)
            afterAll - before = net.ExitCount && outer.DisposablesCount - afterAll = 1
            && all |> Array.forall (fun t -> not t.IsInvalid) && not one.IsInvalid
            && Seq.forall2 same [ one ] [ all[net.ExitCount - 1] ])

        testPropArbs "every parameter and buffer belongs to exactly one group; groups cover the network" (fun (c: SmallResNet) ->
            use net = build c
            let groups = net.Groups() |> Seq.toList
            let pCount = groups |> List.sumBy (fun g -> net.GroupParameters g |> Seq.length)
            let bCount = groups |> List.sumBy (fun g -> net.GroupBuffers g |> Seq.length)
            groups.Length = 2 * net.ExitCount
            && pCount = Seq.length (net.named_parameters())
            && bCount = Seq.length (net.named_buffers()))

        testPropArbs "real early-exit inference predicts exactly what the evaluation from cached logits says" (fun (c: SmallResNet) ->
            use net = build c
            net.``to``(torch.float64) |> ignore
            net.eval() |> ignore
            use scope = torch.NewDisposeScope()
            let x = torch.randn([| 12L; c.Input[0]; c.Input[1]; c.Input[2] |], dtype = torch.float64)
            let logits =
                use _ = torch.no_grad()
                net.forward x |> Array.map (fun l -> let a = l.to_type(torch.float32).data<float32>().ToArray() in Array.init 12 (fun i -> Array.sub a (i * c.Classes) c.Classes))
            let labels = Array.init 12 (fun i -> i % c.Classes)
            let macs = Array.init net.ExitCount (fun e -> int64 (e + 1))
            let cached = EarlyExit.Experiments.Evaluation.Budget.fromLogits logits labels macs (int64 net.ExitCount)
            // Thresholds from 0 (all leave at exit 1) through 1/classes and up to 1 (none leave early).
            [ 0.0; 1.0 / float c.Classes; 0.3; 0.5; 0.7; 0.8; 0.9; 0.95; 0.99; 1.0 ]
            |> List.forall (fun t ->
                let real = EarlyExitInference.Run(net, x, t)
                let exits = EarlyExit.Experiments.Evaluation.Budget.exitsAt cached t
                let preds = exits |> Array.mapi (fun i e -> int64 (cached.Prediction[e][i]))
                real.Exits = (exits |> Array.map ((+) 1)) && real.Predictions = preds))

        testPropArbs "entropy and patience policies: real early-exit inference predicts what the evaluation from cached logits says" (fun (c: SmallResNet) ->
            use net = build c
            net.``to``(torch.float64) |> ignore
            net.eval() |> ignore
            use scope = torch.NewDisposeScope()
            let x = torch.randn([| 12L; c.Input[0]; c.Input[1]; c.Input[2] |], dtype = torch.float64)
            let logits =
                use _ = torch.no_grad()
                net.forward x |> Array.map (fun l -> let a = l.to_type(torch.float32).data<float32>().ToArray() in Array.init 12 (fun i -> Array.sub a (i * c.Classes) c.Classes))
            let labels = Array.init 12 (fun i -> i % c.Classes)
            let macs = Array.init net.ExitCount (fun e -> int64 (e + 1))
            let cached = EarlyExit.Experiments.Evaluation.Budget.fromLogits logits labels macs (int64 net.ExitCount)
            let agree policy inferencePolicy (ts: float list) =
                ts |> List.forall (fun t ->
                    let real = EarlyExitInference.Run(net, x, inferencePolicy, t)
                    let exits = EarlyExit.Experiments.Evaluation.Budget.exitsWith cached policy t
                    let preds = exits |> Array.mapi (fun i e -> int64 (cached.Prediction[e][i]))
                    real.Exits = (exits |> Array.map ((+) 1)) && real.Predictions = preds)
            let lnC = log (float c.Classes)
            agree EarlyExit.Experiments.Evaluation.Budget.Entropy ExitPolicy.Entropy [ 0.0; 0.1 * lnC; 0.5 * lnC; 0.9 * lnC; 0.999 * lnC; lnC + 1.0 ]
            && agree EarlyExit.Experiments.Evaluation.Budget.Patience ExitPolicy.Patience [ for k in 0 .. c.Exits.Length -> float k ])

        testPropN 5 "early-exit inference with batch 1 gives the same per-sample answers" (fun (seed: int) ->
            let c = { Blocks = [| 1; 1 |]; BaseWidth = 4; Exits = [| 1; 2 |]; Classes = 3; Input = [| 1L; 8L; 8L |]; Seed = abs seed % 1000 }
            use net = build c
            net.``to``(torch.float64) |> ignore
            net.eval() |> ignore
            use scope = torch.NewDisposeScope()
            let x = torch.randn([| 6L; 1L; 8L; 8L |], dtype = torch.float64)
            let batched = EarlyExitInference.Run(net, x, 0.5)
            [ 0 .. 5 ] |> List.forall (fun i ->
                let one = EarlyExitInference.Run(net, x.narrow(0, int64 i, 1L), 0.5)
                one.Predictions[0] = batched.Predictions[i] && one.Exits[0] = batched.Exits[i]))

        testPropArbs "streamed early exit (a queue per segment, full batches) gives Run's exits, predictions and confidences, in the input's order, for every policy, copying the stayers or filling holes" (fun (c: SmallResNet) ->
            use net = build c
            net.``to``(torch.float64) |> ignore
            net.eval() |> ignore
            use scope = torch.NewDisposeScope()
            let rng = Random c.Seed
            let n = rng.Next(1, 30)
            let x = torch.randn([| int64 n; c.Input[0]; c.Input[1]; c.Input[2] |], dtype = torch.float64)
            let before = torch.Tensor.TotalCount
            let lnC = log (float c.Classes)
            let cases =
                [ for t in [ 0.0; 1.0 / float c.Classes; 0.3; 0.5; 0.9; 1.0 ] -> ExitPolicy.Softmax, t
                  for t in [ 0.1 * lnC; 0.5 * lnC; 0.9 * lnC ] -> ExitPolicy.Entropy, t
                  for k in 0 .. c.Exits.Length -> ExitPolicy.Patience, float k ]
            let agree =
                cases |> List.forall (fun (policy, t) ->
                    let whole = EarlyExitInference.Run(net, x, policy, t)
                    // Copying every batch's stayers (share 0), the default, and queueing every batch whole, its holes filled later (1).
                    [ for batch in [ 1; 1 + rng.Next 7; n; n + 3 ] do for share in [ 0.0; EarlyExitInference.DefaultMaxHoleShare; 1.0 ] -> batch, share ]
                    |> List.forall (fun (batch, share) ->
                        let streamed = EarlyExitInference.RunStreamed(net, x, policy, t, batch, share)
                        streamed.Exits = whole.Exits && streamed.Predictions = whole.Predictions && streamed.Confidences = whole.Confidences))
            // Every queued feature map is released: only Run's and RunStreamed's results (arrays) outlive the calls.
            agree && torch.Tensor.TotalCount = before)

        test "streamed early exit refuses a batch size below 1 and a share of holes outside [0, 1]" {
            use net = build { Blocks = [| 1 |]; BaseWidth = 2; Exits = [| 1 |]; Classes = 2; Input = [| 1L; 8L; 8L |]; Seed = 0 }
            use x = torch.zeros(2L, 1L, 8L, 8L)
            Expect.throwsT<ArgumentOutOfRangeException> (fun () -> EarlyExitInference.RunStreamed(net, x, ExitPolicy.Softmax, 0.5, 0) |> ignore) "batch 0"
            for share in [ -0.1; 1.5; nan ] do
                Expect.throwsT<ArgumentOutOfRangeException> (fun () -> EarlyExitInference.RunStreamed(net, x, ExitPolicy.Softmax, 0.5, 2, share) |> ignore) $"share of holes {share}"
        }

        test "streamed early exit on MSDNet (several maps per sample) and on a segment that returns its input gives Run's results and leaves the input as it was" {
            torch.manual_seed 3L |> ignore
            use msd = ModelRegistry.Create("msdnet", ModelOptions(NumClasses = 4, InputShape = [| 1L; 20L; 20L |], BaseWidth = 4, Blocks = [| 3 |], GrowthRate = 2))
            // Segment 1 is the identity: its output is the caller's input itself, which must not be written to.
            let identity =
                new ComposedNetwork(
                    "identity-first",
                    Func<_>(fun () ->
                        [| torch.nn.Identity() :> torch.nn.Module<torch.Tensor, torch.Tensor>
                           torch.nn.Sequential(torch.nn.Conv2d(1L, 3L, 3L, padding = 1L), torch.nn.ReLU())
                           torch.nn.Sequential(torch.nn.Conv2d(3L, 3L, 3L, padding = 1L), torch.nn.ReLU()) |] :> Collections.Generic.IReadOnlyList<_>),
                    Func<_, _>(fun (h: HeadContext) -> Heads.Sdn(2L).Invoke h), 4, [| 1L; 20L; 20L |])
            for name, (net: MultiExitNetwork) in [ "MSDNet", msd; "identity segment", identity ] do
                net.eval() |> ignore
                use scope = torch.NewDisposeScope()
                let x = torch.randn(37L, 1L, 20L, 20L)
                let copy = x.clone()
                // Thresholds where some samples leave at every exit: quantiles of exit 1's confidence.
                let first = (net.forward x)[0]
                let conf = EarlyExit.Native.TensorData.ToArray<float32>(first.softmax(1L).amax([| 1L |])) |> Array.sort
                for q in [ 0.2; 0.5; 0.8 ] do
                    let t = float conf[int (q * 36.0)]
                    let whole = EarlyExitInference.Run(net, x, ExitPolicy.Softmax, t)
                    Expect.isTrue (whole.Exits |> Array.distinct |> Array.length > 1) $"{name}: samples leave at more than one exit at {t}"
                    for batch in [ 4; 8; 16 ] do
                        for share in [ 0.0; EarlyExitInference.DefaultMaxHoleShare; 1.0 ] do
                            let streamed = EarlyExitInference.RunStreamed(net, x, ExitPolicy.Softmax, t, batch, share)
                            Expect.equal streamed.Exits whole.Exits $"{name} exits, batch {batch}, share {share}"
                            Expect.equal streamed.Predictions whole.Predictions $"{name} predictions, batch {batch}, share {share}"
                            Expect.equal streamed.Confidences whole.Confidences $"{name} confidences, batch {batch}, share {share}"
                Expect.equal (EarlyExit.Native.TensorData.ToArray<float32> x) (EarlyExit.Native.TensorData.ToArray<float32> copy) $"{name}: the input is unchanged"
            identity.Dispose()
        }

        test "a wrong input shape is refused before it reaches libtorch" {
            use net = build { Blocks = [| 1 |]; BaseWidth = 2; Exits = [| 1 |]; Classes = 2; Input = [| 1L; 8L; 8L |]; Seed = 0 }
            use x = torch.zeros(2L, 3L, 8L, 8L)
            Expect.throwsT<ArgumentException> (fun () -> net.forward x |> ignore) "3 channels into a 1-channel network"
            Expect.throwsT<ArgumentOutOfRangeException> (fun () -> net.ForwardUpTo(torch.zeros(1L, 1L, 8L, 8L), 2) |> ignore) "exit 2 of 1"
        }
    ]

let randomImages (rng: Random) n c h w = Array.init (n * c * h * w) (fun _ -> byte (rng.Next 256))

let data =
    testList "data" [
        testProp "CIFAR-100 binary: what is written reads back (images and fine labels)" (fun (seed: int) (PositiveInt n0) ->
            let n = 1 + n0 % 12
            let rng = Random seed
            let pixels = randomImages rng n 3 32 32
            let labels = Array.init n (fun _ -> rng.Next 100)
            use dir = new TempDir()
            let file = dir.File "train.bin"
            CifarBinary.Write(CifarBinary.Cifar100, file, pixels, labels)
            let d = CifarBinary.Read(CifarBinary.Cifar100, [ file ], "t")
            d.Pixels = pixels && d.Labels = labels && d.NumClasses = 100)

        testProp "CIFAR-10 binary across several batch files reads back in order" (fun (seed: int) ->
            let rng = Random seed
            use dir = new TempDir()
            let parts =
                [ for i in 1 .. 3 ->
                    let n = 1 + rng.Next 5
                    let px = randomImages rng n 3 32 32
                    let l = Array.init n (fun _ -> rng.Next 10)
                    let f = dir.File $"data_batch_{i}.bin"
                    CifarBinary.Write(CifarBinary.Cifar10, f, px, l)
                    f, px, l ]
            let d = CifarBinary.Read(CifarBinary.Cifar10, parts |> List.map (fun (f, _, _) -> f), "t")
            d.Pixels = Array.concat (parts |> List.map (fun (_, p, _) -> p)) && d.Labels = Array.concat (parts |> List.map (fun (_, _, l) -> l)))

        testProp "IDX (Fashion-MNIST), gzipped or not: what is written reads back" (fun (seed: int) (gzip: bool) ->
            let rng = Random seed
            let n = 1 + rng.Next 20
            let px = randomImages rng n 1 28 28
            let labels = Array.init n (fun _ -> rng.Next 10)
            use dir = new TempDir()
            let suffix = if gzip then ".gz" else ""
            IdxFormat.WriteImages(dir.File("train-images-idx3-ubyte" + suffix), px, n, 28, 28, gzip)
            IdxFormat.WriteLabels(dir.File("train-labels-idx1-ubyte" + suffix), labels, gzip)
            IdxFormat.WriteImages(dir.File("t10k-images-idx3-ubyte" + suffix), px, n, 28, 28, gzip)
            IdxFormat.WriteLabels(dir.File("t10k-labels-idx1-ubyte" + suffix), labels, gzip)
            let struct (train, test) = FashionMnist.ReadFolder dir.Path
            train.Pixels = px && train.Labels = labels && test.Count = n && train.Shape = [| 1L; 28L; 28L |])

        test "a truncated CIFAR file is an error naming the file and the record size" {
            use dir = new TempDir()
            let file = dir.File "test.bin"
            File.WriteAllBytes(file, Array.zeroCreate 3000)
            let e = Expect.throwsT<DataFormatException> (fun () -> CifarBinary.Read(CifarBinary.Cifar100, [ file ], "t") |> ignore)
            let msg = try CifarBinary.Read(CifarBinary.Cifar100, [ file ], "t") |> ignore; "" with :? DataFormatException as x -> x.Message
            Expect.stringContains msg file "names the file"
            Expect.stringContains msg "3074-byte" "says the record size"
        }
        test "a CIFAR-100 fine label of 100 is out of range" {
            use dir = new TempDir()
            let file = dir.File "train.bin"
            let bytes = Array.zeroCreate<byte> 3074
            bytes[1] <- 100uy
            File.WriteAllBytes(file, bytes)
            let msg = try CifarBinary.Read(CifarBinary.Cifar100, [ file ], "t") |> ignore; "" with :? DataFormatException as x -> x.Message
            Expect.stringContains msg "label 100 is out of range 0..99 (fine label)" "label check"
        }
        test "Fashion-MNIST missing under a given root: the error names both places looked in" {
            use dir = new TempDir()
            let msg = try EarlyExit.Data.DataCatalog.Load("fashion-mnist", dir.Path) |> ignore; "" with :? DataFormatException as x -> x.Message
            let sub = Path.Combine(dir.Path, "fashion-mnist")
            Expect.stringContains msg $"in {dir.Path} and in {sub}" "the root and its fashion-mnist folder"
            Expect.stringContains msg "apt-get install -y dataset-fashion-mnist" "how to get it"
        }
        test "an IDX file with a wrong magic number, or truncated, is an error naming the file" {
            use dir = new TempDir()
            let images = dir.File "imgs"
            IdxFormat.WriteLabels(images, [| 1; 2 |], false)
            let msg = try IdxFormat.ReadImages images |> ignore; "" with :? DataFormatException as x -> x.Message
            Expect.stringContains msg "wrong magic number 0x00000801" "magic"
            Expect.stringContains msg images "file named"
            let labels = dir.File "labels"
            IdxFormat.WriteLabels(labels, [| 1; 2; 3 |], false)
            File.WriteAllBytes(labels, (File.ReadAllBytes labels)[.. 9])
            let msg2 = try IdxFormat.ReadLabels(labels, 10) |> ignore; "" with :? DataFormatException as x -> x.Message
            Expect.stringContains msg2 "header says 3 labels, file holds 2" "truncation"
        }
        test "a missing data set says where it looked and how to get it" {
            use dir = new TempDir()
            let msg = try FashionMnist.ReadFolder dir.Path |> ignore; "" with :? DataFormatException as x -> x.Message
            Expect.stringContains msg "apt-get install -y dataset-fashion-mnist" "how to get it"
            Expect.stringContains msg dir.Path "where it looked"
            let msg2 = try CifarBinary.ReadFolder(CifarBinary.Cifar100, dir.Path) |> ignore; "" with :? DataFormatException as x -> x.Message
            Expect.stringContains msg2 "earlyexit data download cifar100" "how to get CIFAR"
        }

        testProp "stratified split: disjoint, complete, per-class sizes round(f*n), same seed same split" (fun (seed: int) ->
            let rng = Random seed
            let classes = 2 + rng.Next 5
            let labels = Array.init (20 + rng.Next 200) (fun _ -> rng.Next classes)
            let struct (a, b) = Splits.Stratified(labels, classes, 0.1, seed)
            let struct (a2, _) = Splits.Stratified(labels, classes, 0.1, seed)
            let perClassOk =
                [ 0 .. classes - 1 ] |> List.forall (fun c ->
                    let n = labels |> Array.filter ((=) c) |> Array.length
                    let got = a |> Array.filter (fun i -> labels[i] = c) |> Array.length
                    let expected = int (Math.Round(0.1 * float n))
                    let expected = if expected = 0 && n >= 2 then 1 elif expected = n && n >= 2 then n - 1 else expected
                    got = expected)
            Set.intersect (set a) (set b) = Set.empty && Array.length a + Array.length b = labels.Length && a = a2 && perClassOk)

        testProp "Mixup/CutMix targets are distributions (non-negative, rows sum to 1)" (fun (seed: int) ->
            use scope = torch.NewDisposeScope()
            let classes = 5
            let mix = MixupCutmix(MixSettings(), classes, seed)
            torch.manual_seed (int64 seed) |> ignore
            let x = torch.rand(8L, 3L, 8L, 8L)
            let y = torch.randint(0L, int64 classes, [| 8L |])
            let struct (_, t, _) = mix.Apply(x, y)
            let sums = t.sum(1L)
            t.min().item<float32>() >= 0.0f && (sums - torch.ones_like(sums)).abs().max().item<float32>() < 1e-5f)

        testPropN 40 "CutMix: the reversed sample's label weight equals the pasted area; pixels come from the right image" (fun (seed: int) ->
            use scope = torch.NewDisposeScope()
            let mix = MixupCutmix(MixSettings(MixupAlpha = 0.0, CutmixAlpha = 1.0, LabelSmoothing = 0.0), 4, seed)
            let x = torch.arange(0L, 504L, 1L).to_type(torch.float32).reshape(4L, 2L, 9L, 7L)
            let y = torch.tensor([| 0L; 1L; 2L; 3L |])
            let struct (mixed, t, info) = mix.Apply(x, y)
            let area = float ((info.Bottom - info.Top) * (info.Right - info.Left)) / float (9 * 7)
            let weightOfReversed = float (t[0L, 3L].item<float32>())
            let mask = torch.zeros([| 9L; 7L |], dtype = torch.ScalarType.Bool)
            if area > 0.0 then
                mask[torch.TensorIndex.Slice(int64 info.Top, int64 info.Bottom), torch.TensorIndex.Slice(int64 info.Left, int64 info.Right)] <- torch.ones([| 1L |], dtype = torch.ScalarType.Bool).squeeze()
            let expected = torch.where(mask, x.flip(0L), x)
            info.Cutmix && abs (weightOfReversed - area) < 1e-6 && abs (info.Lambda - (1.0 - area)) < 1e-12 && same mixed expected)

        testProp "random crop with padding and flip equals a per-sample reference" (fun (seed: int) ->
            use scope = torch.NewDisposeScope()
            let x = torch.rand(5L, 2L, 6L, 5L)
            let out = CropFlip(2, true, int64 seed).Apply x
            // Reference: every output sample is some crop of the padded input, possibly flipped.
            let padded = torch.nn.functional.pad(x, [| 2L; 2L; 2L; 2L |])
            [ 0L .. 4L ] |> List.forall (fun n ->
                let o = out[n]
                [ for dy in 0L .. 4L do for dx in 0L .. 4L -> dy, dx ]
                |> List.exists (fun (dy, dx) ->
                    let crop = padded[n].narrow(1L, dy, 6L).narrow(2L, dx, 5L)
                    same crop o || same (crop.flip(2L)) o)))
    ]

/// What TensorStore wrote before it wrote tensors in one block (value by value with BinaryWriter): the file format.
let valueByValue (name: string) (t: Tensor) =
    use ms = new MemoryStream()
    use w = new BinaryWriter(ms)
    w.Write "EETS1"
    w.Write 1
    w.Write name
    w.Write(int t.dtype)
    w.Write(int (t.dim()))
    for s in t.shape do w.Write s
    match t.dtype with
    | torch.ScalarType.Float32 -> for v in t.data<float32>() do w.Write v
    | torch.ScalarType.Float64 -> for v in t.data<float>() do w.Write v
    | torch.ScalarType.Int64 -> for v in t.data<int64>() do w.Write v
    | torch.ScalarType.Int32 -> for v in t.data<int>() do w.Write v
    | _ -> for v in t.data<bool>() do w.Write v
    w.Flush()
    ms.ToArray()

let tensorFiles =
    testList "tensor files and native copies" [
        testProp "TensorStore: every supported type and shape reads back bit for bit, in the format written value by value before" (fun (seed: int) (NonNegativeInt d0) (NonNegativeInt k0) ->
            use scope = torch.NewDisposeScope()
            let rng = Random seed
            // 0 to 3 dimensions of 0 to 4 (an empty tensor and a scalar included).
            let shape = Array.init (d0 % 4) (fun _ -> int64 (rng.Next 5))
            let t =
                match k0 % 5 with
                | 0 -> torch.randn(shape, dtype = torch.float32) * 1e30
                | 1 -> torch.randn(shape, dtype = torch.float64)
                | 2 -> torch.randint(-1000000000000L, 1000000000000L, shape, dtype = torch.int64)
                | 3 -> torch.randint(-100000L, 100000L, shape, dtype = torch.int32)
                | _ -> torch.rand(shape).gt(torch.tensor 0.5)
            use dir = new TempDir()
            let file = dir.File "t.tensors"
            EarlyExit.Training.TensorStore.Save(file, readOnlyDict [ "x", t ])
            let back = EarlyExit.Training.TensorStore.Load file
            let b = back["x"]
            let ok = b.dtype = t.dtype && b.shape = t.shape && (t.numel() = 0L || same b t) && File.ReadAllBytes file = valueByValue "x" t
            b.Dispose()
            ok)

        test "TensorStore: a truncated file, or one whose shape claims more data than it holds, is an error naming the file" {
            use dir = new TempDir()
            let file = dir.File "t.tensors"
            use t = torch.arange(0.0f, 1000.0f, 1.0f)
            EarlyExit.Training.TensorStore.Save(file, readOnlyDict [ "x", t ])
            let bytes = File.ReadAllBytes file
            File.WriteAllBytes(file, bytes[.. bytes.Length - 5])
            Expect.throwsT<InvalidDataException> (fun () -> EarlyExit.Training.TensorStore.Load file |> ignore) "truncated"
            // A shape of 2^40 elements in a short file: refused before allocating (the count is checked against the file).
            use ms = new MemoryStream()
            use w = new BinaryWriter(ms)
            w.Write "EETS1"; w.Write 1; w.Write "x"; w.Write(int torch.ScalarType.Float32); w.Write 1; w.Write (1L <<< 40); w.Write 1.0f
            w.Flush()
            File.WriteAllBytes(file, ms.ToArray())
            let err = try EarlyExit.Training.TensorStore.Load file |> ignore; "" with :? InvalidDataException as e -> e.Message
            Expect.stringContains err "truncated" "a huge claimed shape"
            Expect.stringContains err file "names the file"
            // A negative dimension: a damaged shape, named with the file.
            use ms2 = new MemoryStream()
            use w2 = new BinaryWriter(ms2)
            w2.Write "EETS1"; w2.Write 1; w2.Write "x"; w2.Write(int torch.ScalarType.Float32); w2.Write 1; w2.Write -4L
            w2.Flush()
            File.WriteAllBytes(file, ms2.ToArray())
            let err2 = try EarlyExit.Training.TensorStore.Load file |> ignore; "" with :? InvalidDataException as e -> e.Message
            Expect.stringContains err2 "damaged shape" "a negative dimension"
            Expect.stringContains err2 file "names the file"
        }

        testProp "TensorData.ToArray equals TorchSharp's element accessor for contiguous, sliced and transposed tensors" (fun (seed: int) (PositiveInt r0) (PositiveInt c0) ->
            use scope = torch.NewDisposeScope()
            torch.manual_seed (int64 seed) |> ignore
            let r, c = 1L + int64 (r0 % 7), 1L + int64 (c0 % 7)
            let x = torch.randn(r, c)
            let views = [ x; x.t(); x.narrow(0L, r / 2L, r - r / 2L); x.narrow(1L, c / 2L, c - c / 2L); x[torch.TensorIndex.Ellipsis, torch.TensorIndex.Slice(step = 2L)] ]
            views |> List.forall (fun v -> EarlyExit.Native.TensorData.ToArray<float32> v = v.data<float32>().ToArray())
            && EarlyExit.Native.TensorData.ToArray<int64>(torch.arange(r)) = Array.init (int r) int64)

        test "TensorData.ToArray refuses a tensor of another element type" {
            use t = torch.zeros(3L, dtype = torch.float64)
            Expect.throwsT<ArgumentException> (fun () -> EarlyExit.Native.TensorData.ToArray<float32> t |> ignore) "float64 read as float32"
            use e = torch.zeros(0L)
            Expect.equal (EarlyExit.Native.TensorData.ToArray<float32> e) [||] "empty"
        }
    ]

let all = testList "properties" [ models; data; tensorFiles ]
