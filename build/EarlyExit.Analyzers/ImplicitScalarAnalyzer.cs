using System.Collections.Immutable;
using System.Linq;
using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.Diagnostics;
using Microsoft.CodeAnalysis.Operations;

namespace EarlyExit.Analyzers
{
    /// <summary>
    /// Finds TorchSharp Scalars that nothing keeps alive for the duration of a native call: a Scalar made by an
    /// implicit conversion (<c>t.div_(255f)</c>, <c>torch.full(shape, 0.1)</c>) or inside a Tensor operator with a
    /// number (<c>t * 0.5</c>) is unreachable once its handle is read, and the garbage collector may free it while
    /// native code still reads it (the process then aborts). Hold the scalar in a <c>using var</c> for the call, or keep
    /// it in a field. A Roslyn analyzer rather than a scan of the source text: it sees which conversion and which
    /// operator overload the compiler chose, which the text does not say (<c>a * b</c> is a Tensor operator with a
    /// number only when the types say so).
    /// </summary>
    [DiagnosticAnalyzer(LanguageNames.CSharp)]
    public sealed class ImplicitScalarAnalyzer : DiagnosticAnalyzer
    {
        public const string ConversionId = "EE0001";
        public const string OperatorId = "EE0002";

        static readonly DiagnosticDescriptor Conversion = new(
            ConversionId, "Implicit TorchSharp Scalar",
            "Implicit conversion from '{0}' to TorchSharp.Scalar: nothing keeps the Scalar alive during the native call; hold it in a 'using var' (or a field) instead",
            "Reliability", DiagnosticSeverity.Error, isEnabledByDefault: true,
            description: "A Scalar made by an implicit conversion can be finalized while native code still reads it.");

        static readonly DiagnosticDescriptor Operator = new(
            OperatorId, "Tensor operator with a number",
            "Tensor operator '{0}' with a '{1}' operand makes a Scalar that nothing keeps alive during the native call; call the method with a Scalar held in a 'using var' (or a field) instead",
            "Reliability", DiagnosticSeverity.Error, isEnabledByDefault: true,
            description: "TorchSharp's operators with a number convert it to a Scalar that can be finalized while native code reads it.");

        public override ImmutableArray<DiagnosticDescriptor> SupportedDiagnostics => ImmutableArray.Create(Conversion, Operator);

        public override void Initialize(AnalysisContext context)
        {
            context.ConfigureGeneratedCodeAnalysis(GeneratedCodeAnalysisFlags.None);
            context.EnableConcurrentExecution();
            context.RegisterCompilationStartAction(start =>
            {
                var scalar = start.Compilation.GetTypeByMetadataName("TorchSharp.Scalar");
                var tensor = start.Compilation.GetTypeByMetadataName("TorchSharp.torch+Tensor");
                if (scalar is null || tensor is null) return;

                start.RegisterOperationAction(op =>
                {
                    var c = (IConversionOperation)op.Operation;
                    if (c.IsImplicit && c.OperatorMethod is { } m && SymbolEqualityComparer.Default.Equals(m.ContainingType, scalar)
                        && SymbolEqualityComparer.Default.Equals(c.Type, scalar))
                        op.ReportDiagnostic(Diagnostic.Create(Conversion, c.Syntax.GetLocation(), c.Operand.Type?.ToDisplayString() ?? "?"));
                }, OperationKind.Conversion);

                void CheckOperator(OperationAnalysisContext op, IMethodSymbol? method, string name)
                {
                    if (method is null || !SymbolEqualityComparer.Default.Equals(method.ContainingType, tensor)) return;
                    var number = method.Parameters.FirstOrDefault(p => IsNumber(p.Type));
                    if (number is not null)
                        op.ReportDiagnostic(Diagnostic.Create(Operator, op.Operation.Syntax.GetLocation(), name, number.Type.ToDisplayString()));
                }
                start.RegisterOperationAction(op =>
                {
                    var b = (IBinaryOperation)op.Operation;
                    CheckOperator(op, b.OperatorMethod, b.OperatorKind.ToString());
                }, OperationKind.Binary);
                start.RegisterOperationAction(op =>
                {
                    var b = (ICompoundAssignmentOperation)op.Operation;
                    CheckOperator(op, b.OperatorMethod, b.OperatorKind + "=");
                }, OperationKind.CompoundAssignment);
            });
        }

        static bool IsNumber(ITypeSymbol t) => t.SpecialType is SpecialType.System_Byte or SpecialType.System_SByte or SpecialType.System_Int16
            or SpecialType.System_Int32 or SpecialType.System_Int64 or SpecialType.System_Single or SpecialType.System_Double or SpecialType.System_Boolean;
    }
}
