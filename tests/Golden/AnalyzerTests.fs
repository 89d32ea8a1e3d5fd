/// The analyzer that keeps TorchSharp Scalars nothing holds alive out of the C# core (EE0001, EE0002), on C# whose
/// answers are known; the core itself builds with both as errors.
module EarlyExit.Tests.Golden.AnalyzerTests

open System
open System.Collections.Immutable
open System.IO
open Expecto
open Microsoft.CodeAnalysis
open Microsoft.CodeAnalysis.CSharp
open Microsoft.CodeAnalysis.Diagnostics
open EarlyExit.Analyzers

/// Diagnostics of the analyzer on one C# file compiled against this folder's TorchSharp: (id, line) pairs.
let private diagnose (source: string) =
    let platform = (AppContext.GetData "TRUSTED_PLATFORM_ASSEMBLIES" :?> string).Split(Path.PathSeparator)
    let references =
        [ for p in platform do
            let name = Path.GetFileName p
            if name.StartsWith "System." || name = "netstandard.dll" || name = "mscorlib.dll" then yield p
          yield Path.Combine(AppContext.BaseDirectory, "TorchSharp.dll") ]
        |> List.map (fun p -> MetadataReference.CreateFromFile p :> MetadataReference)
    let compilation =
        CSharpCompilation.Create("snippet", [ CSharpSyntaxTree.ParseText source ], references,
                                 CSharpCompilationOptions(OutputKind.DynamicallyLinkedLibrary))
    let errors = compilation.GetDiagnostics() |> Seq.filter (fun d -> d.Severity = DiagnosticSeverity.Error) |> Seq.toList
    if not errors.IsEmpty then failtestf "the snippet does not compile: %A" errors
    let analyzers = ImmutableArray.Create<DiagnosticAnalyzer>(ImplicitScalarAnalyzer())
    compilation.WithAnalyzers(analyzers).GetAnalyzerDiagnosticsAsync().Result
    |> Seq.map (fun d -> d.Id, d.Location.GetLineSpan().StartLinePosition.Line + 1)
    |> Seq.sortBy snd
    |> Seq.toList

let all =
    testList "implicit-scalar analyzer (EE0001, EE0002)" [
        test "flags implicit Scalars and Tensor operators with a number; a held Scalar and tensor-tensor operators pass" {
            let source = """using TorchSharp;
using static TorchSharp.torch;
class C
{
    Tensor Convert(Tensor t) => t.div_(255f);
    Tensor Full(long n, double v) => full(new long[] { n }, v);
    Tensor Times(Tensor t) => t * 0.5;
    Tensor Minus(Tensor t) => 1 - t;
    void Compound(ref Tensor t) { t += 2; }
    Tensor Held(Tensor t) { using var s = 255f.ToScalar(); return t.div_(s); }
    Tensor Tensors(Tensor a, Tensor b) => a * b + a;
    double Numbers(double a) => a * 0.5;
}
"""
            Expect.equal (diagnose source)
                [ ImplicitScalarAnalyzer.ConversionId, 5
                  ImplicitScalarAnalyzer.ConversionId, 6
                  ImplicitScalarAnalyzer.OperatorId, 7
                  ImplicitScalarAnalyzer.OperatorId, 8
                  ImplicitScalarAnalyzer.OperatorId, 9 ] "one diagnostic per line 5-9, none after"
        }
        test "the C# core is compiled with the analyzer, as an error" {
            let csproj = File.ReadAllText(Path.Combine(__SOURCE_DIRECTORY__, "..", "..", "src", "EarlyExit.Core.CSharp", "EarlyExit.Core.CSharp.csproj"))
            Expect.stringContains csproj "EarlyExit.Analyzers.csproj\" OutputItemType=\"Analyzer\"" "referenced as an analyzer"
            Expect.equal (ImplicitScalarAnalyzer().SupportedDiagnostics |> Seq.map (fun d -> d.DefaultSeverity) |> Seq.distinct |> List.ofSeq) [ DiagnosticSeverity.Error ] "errors by default"
        }
    ]
