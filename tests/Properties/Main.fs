module EarlyExit.Tests.Properties.Main

[<EntryPoint>]
let main argv = EarlyExit.Tests.Support.run "properties" argv EarlyExit.Tests.Properties.Tests.all
