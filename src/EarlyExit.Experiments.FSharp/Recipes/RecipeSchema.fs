/// The JSON Schema (draft 2020-12) of recipe files, made from the keys the reader knows (RecipeJson.Keys) and from the
/// regulariser registry (names, strength keys, settings), so that it says what this build reads: `earlyexit schema`.
/// The committed copy is schemas/recipe.schema.json; a golden test keeps it equal to this output. Validation of meaning
/// (an exit out of range, a group no loss reaches) stays with Validation: the schema checks shape and types.
module EarlyExit.Experiments.Recipes.RecipeSchema

open System
open System.IO
open System.Text.Json
open EarlyExit.Regularisers

let private positiveInt = "{ \"type\": \"integer\", \"minimum\": 1 }"
let private nonNegativeInt = "{ \"type\": \"integer\", \"minimum\": 0 }"
let private intList = "{ \"type\": \"array\", \"items\": { \"type\": \"integer\", \"minimum\": 1 } }"

/// The schema of one property: raw JSON text with a description.
type private Property = { Key: string; Schema: string; Description: string }

let private prop key schema description = { Key = key; Schema = schema; Description = description }

let private str (s: string) = JsonSerializer.Serialize s
let private enumOf (values: string seq) = "{ \"enum\": [" + String.Join(", ", values |> Seq.map str) + "] }"

/// An object of the given properties (in the order of `keys`, which must all be described) and no others.
let private objectOf (keys: string list) (props: Property list) (required: string list) =
    let byKey = props |> List.map (fun p -> p.Key, p) |> Map.ofList
    let missing = keys |> List.filter (fun k -> not (byKey.ContainsKey k))
    if not missing.IsEmpty then failwithf "the schema describes no property %A" missing
    let extra = props |> List.filter (fun p -> not (List.contains p.Key keys))
    if not extra.IsEmpty then failwithf "the schema describes properties the reader does not know: %A" (extra |> List.map (fun p -> p.Key))
    let body =
        keys
        |> List.map (fun k ->
            let p = byKey[k]
            use doc = JsonDocument.Parse p.Schema
            let withDescription =
                let d = Collections.Generic.Dictionary<string, JsonElement>()
                for e in doc.RootElement.EnumerateObject() do d[e.Name] <- e.Value.Clone()
                d["description"] <- JsonDocument.Parse(str p.Description).RootElement.Clone()
                JsonSerializer.Serialize d
            $"{str k}: {withDescription}")
    let req = if required.IsEmpty then "" else ", \"required\": [" + String.Join(", ", required |> List.map str) + "]"
    "{ \"type\": \"object\", \"properties\": { " + String.Join(", ", body) + " }, \"additionalProperties\": false" + req + " }"

let private strength =
    "{ \"oneOf\": [ { \"type\": \"number\", \"exclusiveMinimum\": 0, \"description\": \"a constant\" }, " +
    "{ \"type\": \"string\", \"pattern\": \"^(linear|geometric):[^,]+,[^,]+$|^[0-9.eE+-]+(,[0-9.eE+-]+)*$\", \"description\": \"linear:FIRST,LAST (from exit 2 to the last), geometric:FIRST,RATIO (FIRST·RATIO^(μ−2)), or a number\" }, " +
    "{ \"type\": \"array\", \"items\": { \"type\": \"number\", \"exclusiveMinimum\": 0 }, \"description\": \"one value per stage μ = 2..M\" } ] }"

/// One regulariser of a stage: its name and its strength under the kind's own key (or "strength").
let private penalty (k: IRegulariserKind) =
    let strengthProps =
        [ str k.StrengthName + ": { \"$ref\": \"#/$defs/strength\" }"
          if k.StrengthName <> "strength" then "\"strength\": { \"$ref\": \"#/$defs/strength\" }" ]
    "{ \"type\": \"object\", \"description\": " + str $"{k.Name}: {k.Description}" + ", \"properties\": { \"name\": { \"const\": " + str k.Name + " }, " +
    String.Join(", ", strengthProps) + " }, \"required\": [\"name\"], \"additionalProperties\": false }"

/// The settings object of one regulariser.
let private settingsOf (k: IRegulariserKind) =
    let keys = [ for s in k.Settings -> s.Name ]
    objectOf keys
        [ for s in k.Settings ->
            let schema =
                match s.Values with
                | null -> if s.Integer then nonNegativeInt else "{ \"type\": [\"string\", \"number\"] }"
                | values -> enumOf values
            prop s.Name schema $"{s.Description} (default {s.Default})" ]
        []

let private optimiserSchema () =
    objectOf RecipeJson.Keys.optimiser
        [ prop "lr" "{ \"type\": \"number\", \"exclusiveMinimum\": 0 }" "AdamW learning rate"
          prop "weightDecay" "{ \"type\": \"number\", \"minimum\": 0 }" "AdamW weight decay (0: none)"
          prop "schedule" (enumOf [ "cosine"; "constant" ]) "learning-rate schedule over the stage's epochs" ] []

/// What stages inherit when they do not say it themselves.
let private defaultsSchema () =
    objectOf RecipeJson.Keys.defaults
        [ prop "optimiser" (optimiserSchema ()) "AdamW settings every stage inherits"
          prop "batchSize" positiveInt "training batch size every stage inherits"
          prop "maxEpochs" positiveInt "epoch cap every stage inherits"
          prop "patience" nonNegativeInt "early-stopping patience every stage inherits"
          prop "maxStepsPerEpoch" nonNegativeInt "cap on optimiser steps per epoch every stage inherits" ]
        []

let private stageSchema () =
    objectOf RecipeJson.Keys.stage
        [ prop "name" "{ \"type\": \"string\", \"minLength\": 1 }" "unique name of the stage (its checkpoint folder)"
          prop "lossExits" intList "1-based exits whose cross-entropy enters the loss"
          prop "lossWeights" "{ \"type\": \"array\", \"items\": { \"type\": \"number\", \"exclusiveMinimum\": 0 } }" "one weight per loss exit (default: equal, summing to 1)"
          prop "train" "{ \"type\": \"array\", \"items\": { \"type\": \"string\", \"pattern\": \"^(segment|head)[1-9][0-9]*$\" } }" "groups that train (segmentK, headK); every other group is frozen"
          prop "regularisers" "{ \"type\": \"array\", \"items\": { \"$ref\": \"#/$defs/penalty\" } }" "regularisers whose penalties the stage adds to its loss, in this order"
          prop "regulariser" "{ \"type\": \"object\", \"properties\": { \"kind\": { \"enum\": [\"none\", \"ewc\", \"lwf\", \"ewc+lwf\", \"both\"] }, \"lambda\": { \"type\": \"number\" }, \"rho\": { \"type\": \"number\" } }, \"additionalProperties\": false }" "the older single form (read as the list)"
          prop "exit" nonNegativeInt "μ of a sequential stage (the exit it adds), 0 otherwise"
          prop "protects" intList "earlier exits ν < μ the regularisers protect"
          prop "optimiser" (optimiserSchema ()) "AdamW settings (default: the recipe's defaults)"
          prop "batchSize" positiveInt "training batch size"
          prop "maxEpochs" positiveInt "epoch cap"
          prop "patience" nonNegativeInt "early-stopping patience in epochs on the validation split (0: none)"
          prop "maxStepsPerEpoch" nonNegativeInt "cap on optimiser steps per epoch (0: full epochs)" ]
        [ "name"; "lossExits"; "train" ]

/// The schema as indented JSON text.
let text () =
    let kinds = RegulariserRegistry.Kinds |> List.ofSeq
    let families = EarlyExit.Models.ModelRegistry.Families |> Seq.map (fun f -> f.Name)
    let model =
        objectOf RecipeJson.Keys.model
            [ prop "name" (enumOf families) "model family (earlyexit models)"
              prop "classes" "{ \"type\": \"integer\", \"minimum\": 2 }" "classes of every exit"
              prop "input" "{ \"type\": \"string\", \"pattern\": \"^[0-9]+x[0-9]+x[0-9]+$\" }" "input shape CxHxW, e.g. 3x32x32"
              prop "width" positiveInt "ResNet: width of the first stage; MSDNet: channels of the first layer"
              prop "blocks" intList "ResNet: blocks per stage; MSDNet: [number of blocks]"
              prop "exits" intList "ResNet: 1-based blocks after which the exits sit"
              prop "growth" positiveInt "MSDNet: growth rate"
              prop "stepMode" (enumOf [ "even"; "lin_grow" ]) "MSDNet: step mode"
              prop "base" positiveInt "MSDNet: layers of the first block"
              prop "step" positiveInt "MSDNet: layers of each later block"
              prop "grFactor" intList "MSDNet: growth factor per scale"
              prop "bnFactor" intList "MSDNet: bottleneck factor per scale" ]
            [ "name" ]
    let data =
        objectOf RecipeJson.Keys.data
            [ prop "name" (enumOf (List.ofArray EarlyExit.Data.DataCatalog.Names)) "data set (image-folder and npy: a user's own, read from data.root)"
              prop "root" "{ \"type\": \"string\" }" "data root (default: $EARLYEXIT_DATA, ~/.local/share/earlyexit/data, /usr/share/datasets)"
              prop "validationFraction" "{ \"type\": \"number\", \"exclusiveMinimum\": 0, \"exclusiveMaximum\": 0.5 }" "stratified validation split of the training set"
              prop "trainLimit" nonNegativeInt "training samples used (stratified; 0: all)"
              prop "testLimit" nonNegativeInt "test samples used (stratified; 0: all)" ]
            [ "name" ]
    let mix =
        objectOf RecipeJson.Keys.mix
            [ prop "mixupAlpha" "{ \"type\": \"number\", \"minimum\": 0 }" "Mixup's Beta(α, α)"
              prop "cutmixAlpha" "{ \"type\": \"number\", \"minimum\": 0 }" "CutMix's Beta(α, α)"
              prop "switchProbability" "{ \"type\": \"number\", \"minimum\": 0, \"maximum\": 1 }" "probability of CutMix instead of Mixup for a batch"
              prop "labelSmoothing" "{ \"type\": \"number\", \"minimum\": 0, \"exclusiveMaximum\": 1 }" "label smoothing when mixing"
              prop "probability" "{ \"type\": \"number\", \"minimum\": 0, \"maximum\": 1 }" "probability of mixing a batch" ]
            []
    let augment =
        objectOf RecipeJson.Keys.augment
            [ prop "cropPadding" nonNegativeInt "random crop after zero padding by this many pixels (0: none)"
              prop "flip" "{ \"type\": \"boolean\" }" "random horizontal flip"
              prop "mix" ("{ \"oneOf\": [ { \"const\": \"none\" }, " + mix + " ] }") "Mixup/CutMix (timm-style), or \"none\"" ]
            []
    let settings =
        "{ \"type\": \"object\", \"properties\": { " +
        String.Join(", ", kinds |> List.map (fun k -> $"{str k.Name}: {settingsOf k}")) +
        " }, \"additionalProperties\": false }"
    let root =
        objectOf RecipeJson.Keys.root
            [ prop "$schema" "{ \"type\": \"string\" }" "the schema this file follows (for editors; earlyexit ignores it)"
              prop "name" "{ \"type\": \"string\", \"minLength\": 1 }" "recipe name"
              prop "seed" nonNegativeInt "seed of initial weights, split, data order, augmentation and the Fisher's samples"
              prop "deterministic" "{ \"type\": \"boolean\" }" "deterministic mode: the same code, seed, threads and kernels give the same bits"
              prop "dynamics" (objectOf RecipeJson.Keys.dynamics
                                   [ prop "gradientEvery" nonNegativeInt "gradient dominance every K optimiser steps (0: off)"
                                     prop "rankSamples" nonNegativeInt "numerical rank of every segment's output over N validation images after every stage (0: off)" ] [])
                  "training-dynamics measurements the run records (they do not change what is trained)"
              prop "model" model "the model"
              prop "data" data "the data"
              prop "augment" augment "augmentation of training batches"
              prop "regularisers" settings "settings of the regularisers, by name; a setting not given takes its default"
              prop "fisher" "{ \"type\": \"object\", \"properties\": { \"estimator\": { \"enum\": [\"per-sample\", \"per-sample-naive\", \"squared-minibatch\", \"empirical\", \"exact\", \"sampled\", \"empirical-naive\"] }, \"samples\": { \"type\": \"integer\", \"minimum\": 0 } }, \"additionalProperties\": false }" "the older form of EWC's settings"
              prop "lwf" "{ \"type\": \"object\", \"properties\": { \"teachers\": { \"enum\": [\"per-exit\", \"previous-stage\"] } }, \"additionalProperties\": false }" "the older form of LwF's settings"
              prop "defaults" (defaultsSchema ()) "what every stage inherits unless it says otherwise (optimiser, batchSize, maxEpochs, patience, maxStepsPerEpoch)"
              prop "stages" "{ \"type\": \"array\", \"minItems\": 1, \"items\": { \"$ref\": \"#/$defs/stage\" } }" "the stages, in order" ]
            [ "name"; "model"; "data"; "stages" ]
    let penalties = "{ \"oneOf\": [ " + String.Join(", ", kinds |> List.map penalty) + " ] }"
    let full =
        root.TrimEnd('}').TrimEnd() +
        ", \"$schema\": \"https://json-schema.org/draft/2020-12/schema\", \"title\": \"EarlyExit training recipe\", " +
        "\"$defs\": { \"stage\": " + stageSchema () + ", \"penalty\": " + penalties + ", \"strength\": " + strength + " } }"
    use doc = JsonDocument.Parse full
    JsonSerializer.Serialize(doc.RootElement, EarlyExit.Experiments.Reports.Markdown.jsonOptions false) + "\n"
