// How large the importances of the quadratic regularisers are against each other, to put their strengths on one
// scale: the sum over parameters of the empirical Fisher, the exact Fisher and MAS's importances of exits 1 and 3 of
// the cpu-scale ResNet (Fashion-MNIST) after one epoch of joint training, over 1000 training samples, on 1 thread.
// MAS/empirical is what λ_MAS must be divided by to weigh like λ_EWC (regularisers.fsx uses it to choose λ_MAS).
//
//   dotnet build -c Release && dotnet fsi experiments/importance-scale.fsx      (about a minute here)
#load "Load.fsx"

open TorchSharp
open EarlyExit.Models
open EarlyExit.Losses
open EarlyExit.Regularisers
open EarlyExit.Training
open EarlyExit.Experiments.Recipes
open EarlyExit.Experiments.Recipes.Builders
open EarlyExit.Experiments.Runner

torch.set_num_threads 1
let recipe =
    let r = Scales.recipe Scales.Cpu Joint "resnet34" "fashion-mnist" 0
    { r with Stages = r.Stages |> List.map (fun s -> { s with MaxEpochs = 1 }) }
let data = Interpreter.loadData recipe
torch.manual_seed 0L |> ignore
let net = ModelRegistry.Create(recipe.Model.Name, Validation.modelOptions recipe.Model)
StageTrainer.Run(net, Interpreter.plan recipe 0 None, data, new RegulariserSet(), torch.CPU) |> ignore
let total (d: System.Collections.Generic.Dictionary<string, torch.Tensor>) = d.Values |> Seq.sumBy (fun t -> float (t.sum().item<float32>()))
printfn "| exit | empirical Fisher | exact Fisher | MAS | exact / empirical | MAS / empirical |"
printfn "|---|---|---|---|---|---|"
for exit in [ 1; 3 ] do
    let f = total (FisherInformation.Compute(net, exit, data.Train, FisherEstimator.PerSampleEmpirical, 1000, 128, 0))
    let x = total (FisherInformation.Compute(net, exit, data.Train, FisherEstimator.Exact, 1000, 128, 0))
    let m = total (MasRegulariser.Compute(net, exit, data.Train, 1000, 128, 0))
    printfn "| %d | %.4g | %.4g | %.4g | %.3g | %.3g |" exit f x m (x / f) (m / f)
