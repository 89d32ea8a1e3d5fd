module EarlyExit.Tests.Properties.Main

[<EntryPoint>]
let main argv =
    match argv with
    | [| "gc-stress"; steps |] -> EarlyExit.Tests.Properties.GcStress.run (int steps)
    | _ -> EarlyExit.Tests.Support.run "properties" argv (Expecto.Tests.testList "all" [ EarlyExit.Tests.Properties.Tests.all; EarlyExit.Tests.Properties.TrainingTests.all; EarlyExit.Tests.Properties.RegulariserTests.all; EarlyExit.Tests.Properties.AnalysisTests.all; EarlyExit.Tests.Properties.RecipeTests.all; EarlyExit.Tests.Properties.ExecutorTests.all; EarlyExit.Tests.Properties.OwnDataTests.all; EarlyExit.Tests.Properties.ExchangeTests.all; EarlyExit.Tests.Properties.CustomModelTests.all ])
