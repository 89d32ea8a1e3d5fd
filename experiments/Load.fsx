// Shared prelude of every experiment script: references the built assemblies (their folder holds the linux-x64
// natives, patched by the build) and loads TorchSharp through our runtime loader before anything else touches it.
// Never `#r "nuget: TorchSharp-cpu"` in a script: TorchSharp would copy ~500 MB of natives into the NuGet cache.
//
// Build first:  dotnet build -c Release
#r "../src/EarlyExit.Cli.FSharp/bin/Release/net10.0/linux-x64/TorchSharp.dll"
#r "../src/EarlyExit.Cli.FSharp/bin/Release/net10.0/linux-x64/EarlyExit.Core.dll"
#r "../src/EarlyExit.Cli.FSharp/bin/Release/net10.0/linux-x64/SkiaSharp.dll"
#r "../src/EarlyExit.Cli.FSharp/bin/Release/net10.0/linux-x64/Argu.dll"
#r "../src/EarlyExit.Cli.FSharp/bin/Release/net10.0/linux-x64/Spectre.Console.dll"
#r "../src/EarlyExit.Cli.FSharp/bin/Release/net10.0/linux-x64/Microsoft.Extensions.Configuration.dll"
#r "../src/EarlyExit.Cli.FSharp/bin/Release/net10.0/linux-x64/Microsoft.Extensions.Configuration.Abstractions.dll"
#r "../src/EarlyExit.Cli.FSharp/bin/Release/net10.0/linux-x64/Microsoft.Extensions.Configuration.Json.dll"
#r "../src/EarlyExit.Cli.FSharp/bin/Release/net10.0/linux-x64/Microsoft.Extensions.Configuration.FileExtensions.dll"
#r "../src/EarlyExit.Cli.FSharp/bin/Release/net10.0/linux-x64/Microsoft.Extensions.FileProviders.Abstractions.dll"
#r "../src/EarlyExit.Cli.FSharp/bin/Release/net10.0/linux-x64/Microsoft.Extensions.FileProviders.Physical.dll"
#r "../src/EarlyExit.Cli.FSharp/bin/Release/net10.0/linux-x64/Microsoft.Extensions.Primitives.dll"
#r "../src/EarlyExit.Cli.FSharp/bin/Release/net10.0/linux-x64/EarlyExit.Experiments.dll"

// --numerics NAME (every script takes it) must reach the numerics guard before the first use of torch.
match fsi.CommandLineArgs |> Array.tryFindIndex ((=) "--numerics") with
| Some i when i + 1 < fsi.CommandLineArgs.Length -> EarlyExit.Native.NumericsGuard.Requested <- fsi.CommandLineArgs[i + 1]
| _ -> ()
let torchLoad =
    try EarlyExit.Native.TorchNativeLoader.EnsureLoaded()
    with
    | :? EarlyExit.Native.TorchUnavailableException
    | :? EarlyExit.Native.NumericsException
    | :? System.ArgumentException as e ->
        eprintfn "error: %s" e.Message
        exit 1
// --plugin DLL (models or regularisers of your own): loaded here, and passed on to the runs the executor starts.
(match fsi.CommandLineArgs |> Array.tryFindIndex ((=) "--plugin") with
 | Some i when i + 1 < fsi.CommandLineArgs.Length -> EarlyExit.Extensions.Plugins.Export [ fsi.CommandLineArgs[i + 1] ]
 | _ -> ())
try EarlyExit.Extensions.Plugins.LoadFromEnvironment()
with :? EarlyExit.Extensions.PluginException as e ->
    eprintfn "error: %s" e.Message
    exit 1
// Spectre assumes 80 columns when output is redirected; tables of numbers need more.
if System.Console.IsOutputRedirected then Spectre.Console.AnsiConsole.Profile.Width <- 140
