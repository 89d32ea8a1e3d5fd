/// Recipes to and from JSON. Reading goes through Microsoft.Extensions.Configuration.Json and reports every
/// problem with its path (unknown key, wrong type) before validation reports the semantic ones.
module EarlyExit.Experiments.Recipes.RecipeJson

open System
open System.Globalization
open System.IO
open System.Text.Json
open Microsoft.Extensions.Configuration
open EarlyExit.Experiments.Recipes

/// The keys the reader knows in each object of a recipe (the schema, `earlyexit schema`, lists the same).
module Keys =
    let root = [ "$schema"; "name"; "seed"; "deterministic"; "dynamics"; "model"; "data"; "augment"; "regularisers"; "fisher"; "lwf"; "defaults"; "stages" ]
    /// What stages inherit from the recipe's "defaults" when they do not say it themselves.
    let defaults = [ "optimiser"; "batchSize"; "maxEpochs"; "patience"; "maxStepsPerEpoch" ]
    let dynamics = [ "gradientEvery"; "rankSamples" ]
    let model = [ "name"; "classes"; "input"; "width"; "blocks"; "exits"; "growth"; "stepMode"; "base"; "step"; "grFactor"; "bnFactor" ]
    let data = [ "name"; "root"; "validationFraction"; "trainLimit"; "testLimit" ]
    let augment = [ "cropPadding"; "flip"; "mix" ]
    let mix = [ "mixupAlpha"; "cutmixAlpha"; "switchProbability"; "labelSmoothing"; "probability" ]
    let stage = [ "name"; "lossExits"; "lossWeights"; "train"; "regularisers"; "regulariser"; "exit"; "protects"; "optimiser"; "batchSize"; "maxEpochs"; "patience"; "maxStepsPerEpoch" ]
    let optimiser = [ "lr"; "weightDecay"; "schedule" ]
    /// The older forms, still read.
    let legacyRegulariser = [ "kind"; "lambda"; "rho" ]
    let legacyFisher = [ "estimator"; "samples" ]
    let legacyLwf = [ "teachers" ]

type private Reader(errors: ResizeArray<string>) =
    member _.Fail(path: string, msg: string) = errors.Add $"{path}: {msg}"

    /// Reports keys of a section that the format does not know.
    member this.Known(section: IConfiguration, path: string, keys: string list) =
        let known = set (keys |> List.map (fun k -> k.ToLowerInvariant()))
        for child in section.GetChildren() do
            if not (known.Contains(child.Key.ToLowerInvariant())) then
                let expected = String.Join(", ", keys)
                this.Fail((if path = "" then child.Key else $"{path}.{child.Key}"), $"unknown key (expected one of: {expected})")

    member this.Value(section: IConfiguration, path: string, key: string) : string option =
        let child = section.GetSection key
        if child.Exists() then
            if isNull child.Value && Seq.isEmpty (child.GetChildren()) then Some ""
            elif isNull child.Value then
                this.Fail($"{path}{key}", "expected a single value, found an object or array"); None
            else Some child.Value
        else None

    member this.String(section, path, key, fallback: string) = defaultArg (this.Value(section, path, key)) fallback

    member this.Int(section, path, key, fallback: int) =
        match this.Value(section, path, key) with
        | None -> fallback
        | Some v ->
            match Int32.TryParse(v, NumberStyles.Integer, CultureInfo.InvariantCulture) with
            | true, x -> x
            | _ -> this.Fail($"{path}{key}", $"expected an integer, found '{v}'"); fallback

    member this.Float(section, path, key, fallback: float) =
        match this.Value(section, path, key) with
        | None -> fallback
        | Some v ->
            // Finite only: NaN and infinities (what --set or --lr can give) are no recipe values, and JSON cannot hold them.
            match Double.TryParse(v, NumberStyles.Float, CultureInfo.InvariantCulture) with
            | true, x when Double.IsFinite x -> x
            | _ -> this.Fail($"{path}{key}", $"expected a finite number, found '{v}'"); fallback

    member this.Bool(section, path, key, fallback: bool) =
        match this.Value(section, path, key) with
        | None -> fallback
        | Some v ->
            match Boolean.TryParse v with
            | true, x -> x
            | _ -> this.Fail($"{path}{key}", $"expected true or false, found '{v}'"); fallback

    member this.Array(section: IConfiguration, path: string, key: string) : (string * IConfigurationSection) list option =
        let child = section.GetSection key
        if not (child.Exists()) then None
        else
            let items = child.GetChildren() |> Seq.toList
            let indexed = items |> List.choose (fun c -> match Int32.TryParse c.Key with
                                                         | true, i -> Some(i, c)
                                                         | _ -> None)
            if indexed.Length <> items.Length || (isNull child.Value |> not && items.IsEmpty && child.Value <> "") then
                this.Fail($"{path}{key}", "expected an array"); Some []
            else Some(indexed |> List.sortBy fst |> List.map (fun (i, c) -> $"{path}{key}[{i}]", c))

    member this.IntList(section, path, key) : int list option =
        this.Array(section, path, key)
        |> Option.map (List.choose (fun (p, c) ->
            match Int32.TryParse(c.Value, NumberStyles.Integer, CultureInfo.InvariantCulture) with
            | true, v -> Some v
            | _ -> this.Fail(p, $"expected an integer, found '{c.Value}'"); None))

    member this.FloatList(section, path, key) : float list option =
        this.Array(section, path, key)
        |> Option.map (List.choose (fun (p, c) ->
            match Double.TryParse(c.Value, NumberStyles.Float, CultureInfo.InvariantCulture) with
            | true, v when Double.IsFinite v -> Some v
            | _ -> this.Fail(p, $"expected a finite number, found '{c.Value}'"); None))

    member this.StringList(section, path, key) : string list option =
        this.Array(section, path, key) |> Option.map (List.map (fun (_, c) -> c.Value))

/// A strength: a number (constant), a text ("linear:10,1000", "geometric:10,2", "100") or an array (one value per stage).
let private readStrength (rd: Reader) (sec: IConfiguration) (path: string) (key: string) : Strength option =
    let child = sec.GetSection key
    if not (child.Exists()) then None
    elif not (isNull child.Value) then
        match Strength.parse child.Value with
        | Ok s -> Some s
        | Error e -> rd.Fail($"{path}{key}", e); None
    else rd.FloatList(sec, path, key) |> Option.map Strength.PerStage

/// The list form: "regularisers": [ { "name": "ewc", "lambda": 100 }, { "name": "lwf", "rho": "geometric:0.2,2" } ]
/// (the strength under the regulariser's own name for it, or "strength").
let private readPenalties (rd: Reader) (s: IConfiguration) (path: string) : Penalty list =
    match rd.Array(s, path, "regularisers") with
    | None -> []
    | Some items ->
        [ for (p, c) in items do
            let name = rd.String(c, p + ".", "name", "")
            match Penalties.kind name with
            | None when name = "" -> rd.Fail(p + ".name", "missing")
            | None -> rd.Fail(p + ".name", $"unknown regulariser '{name}'; known: {EarlyExit.Regularisers.RegulariserRegistry.KnownNames}")
            | Some k ->
                let strengthKey = k.StrengthName
                rd.Known(c, p, [ "name"; "strength"; strengthKey ] |> List.distinct)
                let strength =
                    match readStrength rd c (p + ".") strengthKey, readStrength rd c (p + ".") "strength" with
                    | Some v, None | None, Some v -> Some v
                    | Some _, Some _ when strengthKey <> "strength" -> rd.Fail(p, $"give {strengthKey} or strength, not both"); None
                    | Some v, Some _ -> Some v
                    | None, None -> rd.Fail($"{p}.{strengthKey}", "missing"); None
                match strength with
                | Some v -> yield { Name = name; Strength = v }
                | None -> () ]

/// The older single form: "regulariser": { "kind": "ewc|lwf|ewc+lwf|none", "lambda": L, "rho": R }.
let private readLegacyRegulariser (rd: Reader) (s: IConfiguration) (path: string) : Penalty list =
    let sec = s.GetSection "regulariser"
    if not (sec.Exists()) then []
    else
        let p = path + "regulariser."
        rd.Known(sec, path + "regulariser", Keys.legacyRegulariser)
        let ewc () = { Name = "ewc"; Strength = Strength.Constant(rd.Float(sec, p, "lambda", 0.0)) }
        let lwf () = { Name = "lwf"; Strength = Strength.Constant(rd.Float(sec, p, "rho", 0.0)) }
        match rd.String(sec, p, "kind", "none").ToLowerInvariant() with
        | "none" -> []
        | "ewc" -> [ ewc () ]
        | "lwf" -> [ lwf () ]
        | "ewc+lwf" | "both" -> [ ewc (); lwf () ]
        | other -> rd.Fail(p + "kind", $"unknown regulariser '{other}' (none, ewc, lwf, ewc+lwf)"); []

let private readStage (rd: Reader) (defaults: IConfiguration) (path: string) (s: IConfiguration) : Stage =
    rd.Known(s, path.TrimEnd('.'), Keys.stage)
    // A key the stage does not give comes from the recipe's "defaults" (and is reported under that path).
    let from (key: string) = if s.GetSection(key).Exists() || not (defaults.GetSection(key).Exists()) then s, path else defaults, "defaults."
    let stageOpt = s.GetSection "optimiser"
    let defaultOpt = defaults.GetSection "optimiser"
    let optFrom (key: string) =
        if stageOpt.GetSection(key).Exists() || not (defaultOpt.GetSection(key).Exists()) then stageOpt :> IConfiguration, path + "optimiser."
        else defaultOpt :> IConfiguration, "defaults.optimiser."
    let exits = rd.IntList(s, path, "lossExits") |> Option.defaultValue []
    let weights = rd.FloatList(s, path, "lossWeights") |> Option.defaultValue (exits |> List.map (fun _ -> 1.0 / float (max 1 exits.Length)))
    if weights.Length <> exits.Length then rd.Fail(path + "lossWeights", $"{weights.Length} weights for {exits.Length} loss exits")
    rd.Known(stageOpt, path + "optimiser", Keys.optimiser)
    let schedule =
        let sec, p = optFrom "schedule"
        match rd.String(sec, p, "schedule", "cosine").ToLowerInvariant() with
        | "cosine" -> Cosine
        | "constant" -> Constant
        | other -> rd.Fail(p + "schedule", $"unknown schedule '{other}' (cosine, constant)"); Cosine
    let intFrom (key: string) = let sec, p = from key in rd.Int(sec, p, key, 0)
    let floatOpt (key: string) = let sec, p = optFrom key in rd.Float(sec, p, key, 0.0)
    { Name = rd.String(s, path, "name", "")
      LossExits = List.zip exits (if weights.Length = exits.Length then weights else exits |> List.map (fun _ -> 1.0))
      Trainable = rd.StringList(s, path, "train") |> Option.defaultValue []
      Regularisers =
        if s.GetSection("regulariser").Exists() && s.GetSection("regularisers").Exists() then
            rd.Fail(path + "regulariser", "give regularisers (the list) or regulariser (the older single form), not both"); []
        else readPenalties rd s path @ readLegacyRegulariser rd s path
      Exit = rd.Int(s, path, "exit", 0)
      Protects = rd.IntList(s, path, "protects") |> Option.defaultValue []
      Optimiser =
        { LearningRate = floatOpt "lr"
          WeightDecay = floatOpt "weightDecay"
          Schedule = schedule }
      BatchSize = intFrom "batchSize"
      MaxEpochs = intFrom "maxEpochs"
      Patience = intFrom "patience"
      MaxStepsPerEpoch = intFrom "maxStepsPerEpoch" }

/// Reads a recipe from an IConfiguration root; all problems (format, then meaning) with their paths.
let fromConfiguration (root: IConfiguration) : Result<Recipe, string list> =
    let errors = ResizeArray<string>()
    let rd = Reader errors
    rd.Known(root, "", Keys.root)
    let m = root.GetSection "model"
    rd.Known(m, "model", Keys.model)
    let input =
        rd.Value(m, "model.", "input")
        |> Option.bind (fun v ->
            match EarlyExit.Experiments.Recipes.Parse.shape v with
            | Ok s -> Some(List.ofArray s)
            | Error e -> rd.Fail("model.input", e); None)
    let optInt (sec: IConfiguration) path key = if sec.GetSection(key).Exists() then Some(rd.Int(sec, path, key, 0)) else None
    let model =
        { Name = rd.String(m, "model.", "name", "")
          Classes = optInt m "model." "classes"
          Input = input
          Width = optInt m "model." "width"
          Blocks = rd.IntList(m, "model.", "blocks")
          Exits = rd.IntList(m, "model.", "exits")
          Growth = optInt m "model." "growth"
          StepMode = rd.Value(m, "model.", "stepMode")
          Base = optInt m "model." "base"
          Step = optInt m "model." "step"
          GrowthFactors = rd.IntList(m, "model.", "grFactor")
          BottleneckFactors = rd.IntList(m, "model.", "bnFactor") }
    let d = root.GetSection "data"
    rd.Known(d, "data", Keys.data)
    let data =
        { Name = rd.String(d, "data.", "name", "")
          Root = rd.Value(d, "data.", "root") |> Option.filter (fun v -> v <> "")
          ValidationFraction = rd.Float(d, "data.", "validationFraction", 0.1)
          TrainLimit = rd.Int(d, "data.", "trainLimit", 0)
          TestLimit = rd.Int(d, "data.", "testLimit", 0) }
    let a = root.GetSection "augment"
    rd.Known(a, "augment", Keys.augment)
    let mixSection = a.GetSection "mix"
    let mix =
        if not (mixSection.Exists()) then None
        elif mixSection.Value = "" || mixSection.Value = "none" then None
        else
            rd.Known(mixSection, "augment.mix", Keys.mix)
            let dm = Defaults.mix
            Some
                { MixupAlpha = rd.Float(mixSection, "augment.mix.", "mixupAlpha", dm.MixupAlpha)
                  CutmixAlpha = rd.Float(mixSection, "augment.mix.", "cutmixAlpha", dm.CutmixAlpha)
                  SwitchProbability = rd.Float(mixSection, "augment.mix.", "switchProbability", dm.SwitchProbability)
                  LabelSmoothing = rd.Float(mixSection, "augment.mix.", "labelSmoothing", dm.LabelSmoothing)
                  Probability = rd.Float(mixSection, "augment.mix.", "probability", dm.Probability) }
    let augment =
        { CropPadding = rd.Int(a, "augment.", "cropPadding", Defaults.augment.CropPadding)
          Flip = rd.Bool(a, "augment.", "flip", Defaults.augment.Flip)
          Mix = mix }
    // Settings of the regularisers: "regularisers": { "ewc": { "fisher": "exact", "samples": 2000 }, "lwf": { ... } }.
    // The older sections "fisher" { estimator, samples } and "lwf" { teachers } are read as EWC's and LwF's settings.
    let mutable settings: Map<string, Map<string, string>> = Map.empty
    let regs = root.GetSection "regularisers"
    if regs.Exists() then
        if not (isNull regs.Value) && regs.Value <> "" then rd.Fail("regularisers", "expected an object of settings per regulariser")
        for r in regs.GetChildren() do
            for kv in r.GetChildren() do
                match rd.Value(r, $"regularisers.{r.Key}.", kv.Key) with
                | Some v -> settings <- settings |> Penalties.withSetting r.Key kv.Key v
                | None -> ()
    let f = root.GetSection "fisher"
    if f.Exists() then
        rd.Known(f, "fisher", Keys.legacyFisher)
        match rd.Value(f, "fisher.", "estimator") with
        | Some e ->
            let name =
                match e.ToLowerInvariant() with
                | "per-sample" -> "empirical"
                | "per-sample-naive" -> "empirical-naive"
                | other -> other
            settings <- settings |> Penalties.withSetting "ewc" "fisher" name
        | None -> ()
        match rd.Value(f, "fisher.", "samples") with
        | Some v -> settings <- settings |> Penalties.withSetting "ewc" "samples" v
        | None -> ()
    let l = root.GetSection "lwf"
    if l.Exists() then
        rd.Known(l, "lwf", Keys.legacyLwf)
        match rd.Value(l, "lwf.", "teachers") with
        | Some t -> settings <- settings |> Penalties.withSetting "lwf" "teachers" t
        | None -> ()
    let dyn = root.GetSection "dynamics"
    rd.Known(dyn, "dynamics", Keys.dynamics)
    let dynamics =
        { GradientEvery = rd.Int(dyn, "dynamics.", "gradientEvery", 0)
          RankSamples = rd.Int(dyn, "dynamics.", "rankSamples", 0) }
    let defaults = root.GetSection "defaults"
    rd.Known(defaults, "defaults", Keys.defaults)
    rd.Known(defaults.GetSection "optimiser", "defaults.optimiser", Keys.optimiser)
    let stages =
        match rd.Array(root, "", "stages") with
        | None -> []
        | Some items -> items |> List.map (fun (p, c) -> readStage rd defaults (p + ".") c)
    let recipe =
        { Name = rd.String(root, "", "name", "")
          Seed = rd.Int(root, "", "seed", 0)
          Model = model
          Data = data
          Augment = augment
          RegulariserSettings = settings
          Dynamics = dynamics
          Deterministic = rd.Bool(root, "", "deterministic", false)
          Stages = stages }
    if errors.Count > 0 then Error(List.ofSeq errors)
    else Validation.validate recipe

/// Reads and validates a recipe file.
let load (path: string) : Result<Recipe, string list> =
    if not (File.Exists path) then Error [ $"{path}: recipe file not found" ]
    else
        try
            let config = ConfigurationBuilder().AddJsonFile(Path.GetFullPath path, optional = false, reloadOnChange = false).Build()
            fromConfiguration config |> Result.mapError (List.map (fun e -> $"{path}: {e}"))
        with
        | :? FormatException as e -> Error [ $"{path}: not valid JSON: {e.Message}" ]
        | :? InvalidDataException as e -> Error [ $"{path}: not valid JSON: {e.Message}" ]

/// A strength as JSON: a number (constant), an array (one value per stage) or a text (linear, geometric).
let private writeStrength (w: Utf8JsonWriter) (key: string) =
    function
    | Strength.Constant v -> w.WriteNumber(key, v)
    | Strength.PerStage vs ->
        w.WriteStartArray key
        for v in vs do w.WriteNumberValue v
        w.WriteEndArray()
    | other -> w.WriteString(key, Strength.format other)

/// The settings of every regulariser the stages use, complete (defaults filled in), so that a recipe says what ran.
let private writeSettings (w: Utf8JsonWriter) (r: Recipe) =
    match Penalties.usedBy r.Stages with
    | [] -> ()
    | used ->
        w.WriteStartObject "regularisers"
        for name in used do
            let settings, _ = Penalties.resolve r.RegulariserSettings name
            w.WriteStartObject name
            for KeyValue (k, v) in settings |> Seq.sortBy (fun kv -> kv.Key) do
                match Int64.TryParse(v, NumberStyles.Integer, CultureInfo.InvariantCulture) with
                | true, n when string n = v -> w.WriteNumber(k, n)
                | _ -> w.WriteString(k, v)
            w.WriteEndObject()
        w.WriteEndObject()

/// The recipe as JSON text (the format `load` reads).
let toJson (r: Recipe) =
    use stream = new MemoryStream()
    (use w = new Utf8JsonWriter(stream, JsonWriterOptions(Indented = true))
     let ints (name: string) (xs: int seq) =
         w.WriteStartArray name
         for x in xs do w.WriteNumberValue x
         w.WriteEndArray()
     w.WriteStartObject()
     w.WriteString("name", r.Name)
     w.WriteNumber("seed", r.Seed)
     // Written only when set, so that recipes (and cache keys) from before the option stay the same.
     if r.Deterministic then w.WriteBoolean("deterministic", true)
     // Written only when set: measurements do not change what is trained.
     if r.Dynamics <> Defaults.dynamics then
         w.WriteStartObject "dynamics"
         w.WriteNumber("gradientEvery", r.Dynamics.GradientEvery)
         w.WriteNumber("rankSamples", r.Dynamics.RankSamples)
         w.WriteEndObject()
     w.WriteStartObject "model"
     w.WriteString("name", r.Model.Name)
     r.Model.Classes |> Option.iter (fun c -> w.WriteNumber("classes", c))
     r.Model.Input |> Option.iter (fun s -> w.WriteString("input", String.Join("x", s)))
     r.Model.Width |> Option.iter (fun v -> w.WriteNumber("width", v))
     r.Model.Blocks |> Option.iter (ints "blocks")
     r.Model.Exits |> Option.iter (ints "exits")
     r.Model.Growth |> Option.iter (fun v -> w.WriteNumber("growth", v))
     r.Model.StepMode |> Option.iter (fun v -> w.WriteString("stepMode", v))
     r.Model.Base |> Option.iter (fun v -> w.WriteNumber("base", v))
     r.Model.Step |> Option.iter (fun v -> w.WriteNumber("step", v))
     r.Model.GrowthFactors |> Option.iter (ints "grFactor")
     r.Model.BottleneckFactors |> Option.iter (ints "bnFactor")
     w.WriteEndObject()
     w.WriteStartObject "data"
     w.WriteString("name", r.Data.Name)
     r.Data.Root |> Option.iter (fun v -> w.WriteString("root", v))
     w.WriteNumber("validationFraction", r.Data.ValidationFraction)
     w.WriteNumber("trainLimit", r.Data.TrainLimit)
     w.WriteNumber("testLimit", r.Data.TestLimit)
     w.WriteEndObject()
     w.WriteStartObject "augment"
     w.WriteNumber("cropPadding", r.Augment.CropPadding)
     w.WriteBoolean("flip", r.Augment.Flip)
     match r.Augment.Mix with
     | None -> w.WriteString("mix", "none")
     | Some m ->
         w.WriteStartObject "mix"
         w.WriteNumber("mixupAlpha", m.MixupAlpha)
         w.WriteNumber("cutmixAlpha", m.CutmixAlpha)
         w.WriteNumber("switchProbability", m.SwitchProbability)
         w.WriteNumber("labelSmoothing", m.LabelSmoothing)
         w.WriteNumber("probability", m.Probability)
         w.WriteEndObject()
     w.WriteEndObject()
     writeSettings w r
     w.WriteStartArray "stages"
     for s in r.Stages do
         w.WriteStartObject()
         w.WriteString("name", s.Name)
         ints "lossExits" (s.LossExits |> List.map fst)
         w.WriteStartArray "lossWeights"
         for (_, wt) in s.LossExits do w.WriteNumberValue wt
         w.WriteEndArray()
         w.WriteStartArray "train"
         for g in s.Trainable do w.WriteStringValue g
         w.WriteEndArray()
         w.WriteStartArray "regularisers"
         for p in s.Regularisers do
             w.WriteStartObject()
             w.WriteString("name", p.Name)
             writeStrength w (Penalties.kind p.Name |> Option.map (fun k -> k.StrengthName) |> Option.defaultValue "strength") p.Strength
             w.WriteEndObject()
         w.WriteEndArray()
         w.WriteNumber("exit", s.Exit)
         ints "protects" s.Protects
         w.WriteStartObject "optimiser"
         w.WriteNumber("lr", s.Optimiser.LearningRate)
         w.WriteNumber("weightDecay", s.Optimiser.WeightDecay)
         w.WriteString("schedule", (match s.Optimiser.Schedule with
                                    | Cosine -> "cosine"
                                    | Constant -> "constant"))
         w.WriteEndObject()
         w.WriteNumber("batchSize", s.BatchSize)
         w.WriteNumber("maxEpochs", s.MaxEpochs)
         w.WriteNumber("patience", s.Patience)
         w.WriteNumber("maxStepsPerEpoch", s.MaxStepsPerEpoch)
         w.WriteEndObject()
     w.WriteEndArray()
     w.WriteEndObject())
    Text.Encoding.UTF8.GetString(stream.ToArray())

/// The recipe as JSON for a person to edit: what every stage shares moves to "defaults" (stages inherit it), keys at
/// their default values are left out (no regularisers, no protected exits, exit 0, equal loss weights), and
/// "$schema" names the schema when given. Reads back as the same recipe; run folders keep the full form (`toJson`).
let toCompactJson (schema: string option) (r: Recipe) =
    let root = Nodes.JsonNode.Parse(toJson r).AsObject()
    let stages = root["stages"].AsArray() |> Seq.map (fun n -> n.AsObject()) |> List.ofSeq
    let defaults = Nodes.JsonObject()
    let shared (get: Nodes.JsonObject -> Nodes.JsonNode) =
        match stages with
        | first :: rest when not rest.IsEmpty && rest |> List.forall (fun s -> Nodes.JsonNode.DeepEquals(get s, get first)) -> Some(get first)
        | _ -> None
    for key in [ "batchSize"; "maxEpochs"; "patience"; "maxStepsPerEpoch" ] do
        match shared (fun s -> s[key]) with
        | Some v ->
            defaults[key] <- v.DeepClone()
            for s in stages do s.Remove key |> ignore
        | None -> ()
    let optimiser = Nodes.JsonObject()
    for key in [ "lr"; "weightDecay"; "schedule" ] do
        match shared (fun s -> s["optimiser"][key]) with
        | Some v ->
            optimiser[key] <- v.DeepClone()
            for s in stages do s["optimiser"].AsObject().Remove key |> ignore
        | None -> ()
    if optimiser.Count > 0 then defaults["optimiser"] <- optimiser
    for s in stages do
        if s["optimiser"].AsObject().Count = 0 then s.Remove "optimiser" |> ignore
        if s["regularisers"].AsArray().Count = 0 then s.Remove "regularisers" |> ignore
        if s["protects"].AsArray().Count = 0 then s.Remove "protects" |> ignore
        if s["exit"].GetValue<int>() = 0 then s.Remove "exit" |> ignore
        let weights = s["lossWeights"].AsArray() |> Seq.map (fun n -> n.GetValue<float>()) |> List.ofSeq
        if weights |> List.forall (fun w -> abs (w - 1.0 / float weights.Length) < 1e-12) then s.Remove "lossWeights" |> ignore
    let result = Nodes.JsonObject()
    schema |> Option.iter (fun p -> result["$schema"] <- Nodes.JsonValue.Create p)
    for KeyValue (k, v) in List.ofSeq root do
        if k = "stages" && defaults.Count > 0 then result["defaults"] <- defaults
        result[k] <- v.DeepClone()
    result.ToJsonString(EarlyExit.Experiments.Reports.Markdown.jsonOptions false)

/// Reads a recipe from JSON text (tests and round trips).
let parse (json: string) : Result<Recipe, string list> =
    try
        use stream = new MemoryStream(Text.Encoding.UTF8.GetBytes json)
        fromConfiguration (ConfigurationBuilder().AddJsonStream(stream).Build())
    with :? FormatException as e -> Error [ $"not valid JSON: {e.Message}" ]

/// Recipe overrides, as the command line gives them: PATH=VALUE with PATH in the recipe's JSON shape
/// (`stages[2].maxEpochs`, `model.width`, `stages[0].optimiser.lr`, `model.blocks`), VALUE a JSON value (`5`,
/// `[1,1,1,1]`, `{"name":"ewc","lambda":10}`) or else a text. The recipe's JSON gets them and is read again, so every
/// override is checked as the file's own keys are (unknown key, wrong type, meaning); an index past an array's end
/// is refused. The recipe's name records them: NAME+PATH=VALUE,...
let withOverrides (overrides: (string * string) list) (r: Recipe) : Result<Recipe, string list> =
    if overrides.IsEmpty then Ok r
    else
        let root = Nodes.JsonNode.Parse(toJson r)
        let steps (path: string) =
            // "stages[2].optimiser.lr" -> [ Key "stages"; Index 2; Key "optimiser"; Key "lr" ]
            [ for part in path.Trim().Split('.') do
                let m = Text.RegularExpressions.Regex.Match(part, @"^([^\[\]]*)((\[\d+\])*)$")
                if not m.Success || (m.Groups[1].Value = "" && m.Groups[2].Value = "") then yield Error part
                else
                    if m.Groups[1].Value <> "" then yield Ok(Choice1Of2 m.Groups[1].Value)
                    for i in Text.RegularExpressions.Regex.Matches(m.Groups[2].Value, @"\d+") do yield Ok(Choice2Of2(int i.Value)) ]
        let valueOf (text: string) =
            try Nodes.JsonNode.Parse text with :? JsonException -> Nodes.JsonValue.Create text :> Nodes.JsonNode
        let apply (path: string, value: string) : string option =
            let parts = steps path
            if parts.IsEmpty || parts |> List.exists Result.isError then Some $"'{path}': give a path like stages[2].maxEpochs or model.width"
            else
                let parts = parts |> List.map (function Ok p -> p | Error _ -> failwith "unreachable")
                let rec go (node: Nodes.JsonNode) (rest: Choice<string, int> list) (at: string) =
                    match rest with
                    | [] -> None
                    | [ Choice1Of2 key ] ->
                        match node with
                        | :? Nodes.JsonObject as o -> o[key] <- valueOf value; None
                        | _ -> Some $"{path}: {at} is not an object"
                    | [ Choice2Of2 i ] ->
                        match node with
                        | :? Nodes.JsonArray as a when i < a.Count -> a[i] <- valueOf value; None
                        | :? Nodes.JsonArray as a -> Some $"{path}: {at} has {a.Count} items ([0] to [{a.Count - 1}])"
                        | _ -> Some $"{path}: {at} is not an array"
                    | Choice1Of2 key :: tail ->
                        match node with
                        | :? Nodes.JsonObject as o ->
                            if isNull o[key] then o[key] <- Nodes.JsonObject()
                            go o[key] tail (if at = "" then key else $"{at}.{key}")
                        | _ -> Some $"{path}: {at} is not an object"
                    | Choice2Of2 i :: tail ->
                        match node with
                        | :? Nodes.JsonArray as a when i < a.Count -> go a[i] tail $"{at}[{i}]"
                        | :? Nodes.JsonArray as a -> Some $"{path}: {at} has {a.Count} items ([0] to [{a.Count - 1}])"
                        | _ -> Some $"{path}: {at} is not an array"
                go root parts ""
        match overrides |> List.choose apply with
        | [] ->
            parse (root.ToJsonString())
            |> Result.map (fun changed ->
                let said = overrides |> List.map (fun (p, v) -> $"{p.Trim()}={v.Trim()}") |> String.concat ","
                { changed with Name = $"{r.Name}+{said}" })
            |> Result.mapError (List.map (fun e -> $"override: {e}"))
        | errors -> Error errors

let save (path: string) (r: Recipe) =
    let full = Path.GetFullPath path
    Directory.CreateDirectory(Path.GetDirectoryName full) |> ignore
    let tmp = full + ".tmp"
    File.WriteAllText(tmp, toJson r)
    File.Move(tmp, full, true)
