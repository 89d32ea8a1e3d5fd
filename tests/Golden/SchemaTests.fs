/// The recipe schema: the committed file is what this build generates, every recipe the builders make is valid under
/// it (checked by an independent validator, JsonSchema.Net), and it refuses what the reader refuses by shape.
module EarlyExit.Tests.Golden.SchemaTests

open System
open System.IO
open Expecto
open Json.Schema
open EarlyExit.Experiments.Recipes
open EarlyExit.Experiments.Recipes.Builders
open EarlyExit.Experiments.Runner

/// The repository root, from this test's output folder (tests/Golden/bin/Release/net10.0/linux-x64).
let private repoRoot () =
    let rec up (d: DirectoryInfo) =
        if isNull d then failwith "the repository root (EarlyExit.sln) is not above the test's folder"
        elif File.Exists(Path.Combine(d.FullName, "EarlyExit.sln")) then d.FullName
        else up d.Parent
    up (DirectoryInfo AppContext.BaseDirectory)

let private committed () = File.ReadAllText(Path.Combine(repoRoot (), "schemas", "recipe.schema.json"))

let private errorsOf (schema: JsonSchema) (json: string) =
    use doc = System.Text.Json.JsonDocument.Parse json
    let result = schema.Evaluate(doc.RootElement, EvaluationOptions(OutputFormat = OutputFormat.List))
    if result.IsValid then []
    else [ for d in result.Details do if not (isNull d.Errors) then for KeyValue (k, v) in d.Errors -> $"{d.InstanceLocation}: {k}: {v}" ]

let all =
    testList "recipe schema" [
        test "schemas/recipe.schema.json is what `earlyexit schema` prints (regenerate it with: earlyexit schema --out schemas/recipe.schema.json)" {
            Expect.equal (committed ()) (RecipeSchema.text ()) "committed schema"
        }
        test "every built recipe, of every strategy and family at every scale, with schedules and settings, is valid under the schema" {
            let schema = JsonSchema.FromText(committed ())
            let strategies =
                allStrategies (Presets.forModel "resnet34")
                @ [ Sequential [ ewc 10.0; lwf 0.5 ]; Sequential [ mas 1.0 ]; SequentialNoWarmup [ lwf 0.2 ]
                    Sequential [ penalty "ewc" (Strength.Geometric(10.0, 10.0)) ]; Sequential [ penalty "lwf" (Strength.Linear(0.2, 0.8)) ] ]
            for scale in [ Scales.Smoke; Scales.Cpu; Scales.Paper ] do
                for model in [ "resnet34"; "msdnet" ] do
                    for s in strategies do
                        let r = Scales.recipe scale s model "fashion-mnist" 1 |> Settings.withFisher "exact" 100 |> Settings.withLwfTeachers PreviousStageTeacher |> Settings.complete
                        let m = Validation.exitCount r.Model
                        let perStage = { r with Stages = r.Stages |> List.map (fun st -> { st with Regularisers = st.Regularisers |> List.map (fun p -> { p with Strength = Strength.PerStage [ for k in 2..m -> float k ] }) }) }
                        for recipe in [ r; perStage ] do
                            Expect.equal (errorsOf schema (RecipeJson.toJson recipe)) [] $"{Scales.name scale} {model} {strategyName s}"
                            // The compact form --save-recipe writes ($schema, "defaults") too.
                            Expect.equal (errorsOf schema (RecipeJson.toCompactJson (Some "schemas/recipe.schema.json") recipe)) [] $"compact: {Scales.name scale} {model} {strategyName s}"
        }
        test "the schema refuses an unknown key, a wrong type, an unknown regulariser, setting or value, and a bad strength" {
            let schema = JsonSchema.FromText(committed ())
            let good = RecipeJson.toJson (Scales.recipe Scales.Smoke (Sequential [ ewc 100.0 ]) "resnet34" "fashion-mnist" 0)
            Expect.equal (errorsOf schema good) [] "the recipe itself is valid"
            for bad, why in
                [ good.Replace("\"batchSize\": 64,", "\"batchSize\": 64, \"lr\": 0.1,"), "an unknown key in a stage"
                  good.Replace("\"maxEpochs\": 1,", "\"maxEpochs\": \"one\","), "a string for an integer"
                  good.Replace("\"name\": \"ewc\"", "\"name\": \"si\""), "an unknown regulariser"
                  good.Replace("\"fisher\": \"empirical\"", "\"fisher\": \"exactly\""), "an unknown Fisher estimator"
                  good.Replace("\"samples\": 128", "\"sample\": 128"), "an unknown setting"
                  good.Replace("\"lambda\": 100", "\"lambda\": -1"), "a negative strength"
                  good.Replace("\"lambda\": 100", "\"rho\": 0.5"), "LwF's strength key on EWC" ] do
                Expect.notEqual bad good $"the test changed the recipe ({why})"
                Expect.isNonEmpty (errorsOf schema bad) why
        }
    ]
