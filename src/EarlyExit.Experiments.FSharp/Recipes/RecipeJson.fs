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
    let root = [ "name"; "seed"; "deterministic"; "dynamics"; "model"; "data"; "augment"; "regularisers"; "fisher"; "lwf"; "stages" ]
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
            match Double.TryParse(v, NumberStyles.Float, CultureInfo.InvariantCulture) with
            | true, x -> x
            | _ -> this.Fail($"{path}{key}", $"expected a number, found '{v}'"); fallback

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
            | true, v -> Some v
            | _ -> this.Fail(p, $"expected a number, found '{c.Value}'"); None))

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

let private readStage (rd: Reader) (path: string) (s: IConfiguration) : Stage =
    rd.Known(s, path.TrimEnd('.'), Keys.stage)
    let exits = rd.IntList(s, path, "lossExits") |> Option.defaultValue []
    let weights = rd.FloatList(s, path, "lossWeights") |> Option.defaultValue (exits |> List.map (fun _ -> 1.0 / float (max 1 exits.Length)))
    if weights.Length <> exits.Length then rd.Fail(path + "lossWeights", $"{weights.Length} weights for {exits.Length} loss exits")
    let opt = s.GetSection "optimiser"
    rd.Known(opt, path + "optimiser", Keys.optimiser)
    let schedule =
        match rd.String(opt, path + "optimiser.", "schedule", "cosine").ToLowerInvariant() with
        | "cosine" -> Cosine
        | "constant" -> Constant
        | other -> rd.Fail(path + "optimiser.schedule", $"unknown schedule '{other}' (cosine, constant)"); Cosine
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
        { LearningRate = rd.Float(opt, path + "optimiser.", "lr", 0.0)
          WeightDecay = rd.Float(opt, path + "optimiser.", "weightDecay", 0.0)
          Schedule = schedule }
      BatchSize = rd.Int(s, path, "batchSize", 0)
      MaxEpochs = rd.Int(s, path, "maxEpochs", 0)
      Patience = rd.Int(s, path, "patience", 0)
      MaxStepsPerEpoch = rd.Int(s, path, "maxStepsPerEpoch", 0) }

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
            match EarlyExit.Experiments.Cli.Parse.shape v with
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
    let stages =
        match rd.Array(root, "", "stages") with
        | None -> []
        | Some items -> items |> List.map (fun (p, c) -> readStage rd (p + ".") c)
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

/// Reads a recipe from JSON text (tests and round trips).
let parse (json: string) : Result<Recipe, string list> =
    try
        use stream = new MemoryStream(Text.Encoding.UTF8.GetBytes json)
        fromConfiguration (ConfigurationBuilder().AddJsonStream(stream).Build())
    with :? FormatException as e -> Error [ $"not valid JSON: {e.Message}" ]

let save (path: string) (r: Recipe) =
    let full = Path.GetFullPath path
    Directory.CreateDirectory(Path.GetDirectoryName full) |> ignore
    let tmp = full + ".tmp"
    File.WriteAllText(tmp, toJson r)
    File.Move(tmp, full, true)
