module EarlyExit.Tests.Properties.Tests
open Expecto
let all = testList "properties" []
