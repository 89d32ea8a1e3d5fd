module EarlyExit.Tests.Golden.Main

[<EntryPoint>]
let main argv = EarlyExit.Tests.Support.run "golden" argv EarlyExit.Tests.Golden.Tests.all
