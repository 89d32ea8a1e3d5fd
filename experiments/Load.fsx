// Shared prelude of every experiment script: references the built assemblies (their folder holds the linux-x64
// natives, patched by the build) and loads TorchSharp through our runtime loader before anything else touches it.
// Never `#r "nuget: TorchSharp-cpu"` in a script: TorchSharp would copy ~500 MB of natives into the NuGet cache.
//
// Build first:  dotnet build -c Release
#r "../src/EarlyExit.Experiments.FSharp/bin/Release/net10.0/linux-x64/TorchSharp.dll"
#r "../src/EarlyExit.Experiments.FSharp/bin/Release/net10.0/linux-x64/EarlyExit.Core.dll"
#r "../src/EarlyExit.Experiments.FSharp/bin/Release/net10.0/linux-x64/Argu.dll"
#r "../src/EarlyExit.Experiments.FSharp/bin/Release/net10.0/linux-x64/Spectre.Console.dll"
#r "../src/EarlyExit.Experiments.FSharp/bin/Release/net10.0/linux-x64/Microsoft.Extensions.Configuration.dll"
#r "../src/EarlyExit.Experiments.FSharp/bin/Release/net10.0/linux-x64/Microsoft.Extensions.Configuration.Abstractions.dll"
#r "../src/EarlyExit.Experiments.FSharp/bin/Release/net10.0/linux-x64/Microsoft.Extensions.Configuration.Json.dll"
#r "../src/EarlyExit.Experiments.FSharp/bin/Release/net10.0/linux-x64/Microsoft.Extensions.Configuration.FileExtensions.dll"
#r "../src/EarlyExit.Experiments.FSharp/bin/Release/net10.0/linux-x64/Microsoft.Extensions.FileProviders.Abstractions.dll"
#r "../src/EarlyExit.Experiments.FSharp/bin/Release/net10.0/linux-x64/Microsoft.Extensions.FileProviders.Physical.dll"
#r "../src/EarlyExit.Experiments.FSharp/bin/Release/net10.0/linux-x64/Microsoft.Extensions.Primitives.dll"
#r "../src/EarlyExit.Experiments.FSharp/bin/Release/net10.0/linux-x64/earlyexit.dll"

let torchLoad = EarlyExit.Native.TorchNativeLoader.EnsureLoaded()
// Spectre assumes 80 columns when output is redirected; tables of numbers need more.
if System.Console.IsOutputRedirected then Spectre.Console.AnsiConsole.Profile.Width <- 140
