module EarlyExit.Experiments.Program
open TorchSharp
[<EntryPoint>]
let main argv =
    let r = EarlyExit.Native.TorchNativeLoader.EnsureLoaded()
    printfn "%s" (EarlyExit.Native.TorchNativeLoader.Describe r)
    use t = torch.ones(2L, 3L)
    printfn "%f" (t.sum().item<float32>())
    0
