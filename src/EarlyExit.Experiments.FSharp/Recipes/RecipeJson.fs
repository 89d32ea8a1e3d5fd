/// Recipes to and from JSON. Reading goes through Microsoft.Extensions.Configuration.Json and reports every
/// problem with its path (unknown key, wrong type) before validation reports the semantic ones.
module EarlyExit.Experiments.Recipes.RecipeJson

open System
open System.Globalization
open System.IO
open System.Text.Json
open Microsoft.Extensions.Configuration
open EarlyExit.Experiments.Recipes

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

let private readRegulariser (rd: Reader) (s: IConfiguration) (path: string) =
    let sec = s.GetSection "regulariser"
    if not (sec.Exists()) then NoRegulariser
    else
        let p = path + "regulariser."
        rd.Known(sec, path + "regulariser", [ "kind"; "lambda"; "rho" ])
        match rd.String(sec, p, "kind", "none").ToLowerInvariant() with
        | "none" -> NoRegulariser
        | "ewc" -> Ewc(rd.Float(sec, p, "lambda", 0.0))
        | "lwf" -> Lwf(rd.Float(sec, p, "rho", 0.0))
        | "ewc+lwf" | "both" -> EwcAndLwf(rd.Float(sec, p, "lambda", 0.0), rd.Float(sec, p, "rho", 0.0))
        | other -> rd.Fail(p + "kind", $"unknown regulariser '{other}' (none, ewc, lwf, ewc+lwf)"); NoRegulariser

let private readStage (rd: Reader) (path: string) (s: IConfiguration) : Stage =
    rd.Known(s, path.TrimEnd('.'), [ "name"; "lossExits"; "lossWeights"; "train"; "regulariser"; "exit"; "protects"; "optimiser"; "batchSize"; "maxEpochs"; "patience"; "maxStepsPerEpoch" ])
    let exits = rd.IntList(s, path, "lossExits") |> Option.defaultValue []
    let weights = rd.FloatList(s, path, "lossWeights") |> Option.defaultValue (exits |> List.map (fun _ -> 1.0 / float (max 1 exits.Length)))
    if weights.Length <> exits.Length then rd.Fail(path + "lossWeights", $"{weights.Length} weights for {exits.Length} loss exits")
    let opt = s.GetSection "optimiser"
    rd.Known(opt, path + "optimiser", [ "lr"; "weightDecay"; "schedule" ])
    let schedule =
        match rd.String(opt, path + "optimiser.", "schedule", "cosine").ToLowerInvariant() with
        | "cosine" -> Cosine
        | "constant" -> Constant
        | other -> rd.Fail(path + "optimiser.schedule", $"unknown schedule '{other}' (cosine, constant)"); Cosine
    { Name = rd.String(s, path, "name", "")
      LossExits = List.zip exits (if weights.Length = exits.Length then weights else exits |> List.map (fun _ -> 1.0))
      Trainable = rd.StringList(s, path, "train") |> Option.defaultValue []
      Regulariser = readRegulariser rd s path
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
    rd.Known(root, "", [ "name"; "seed"; "deterministic"; "model"; "data"; "augment"; "fisher"; "lwf"; "stages" ])
    let m = root.GetSection "model"
    rd.Known(m, "model", [ "name"; "classes"; "input"; "width"; "blocks"; "exits"; "growth"; "stepMode"; "base"; "step"; "grFactor"; "bnFactor" ])
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
    rd.Known(d, "data", [ "name"; "root"; "validationFraction"; "trainLimit"; "testLimit" ])
    let data =
        { Name = rd.String(d, "data.", "name", "")
          Root = rd.Value(d, "data.", "root") |> Option.filter (fun v -> v <> "")
          ValidationFraction = rd.Float(d, "data.", "validationFraction", 0.1)
          TrainLimit = rd.Int(d, "data.", "trainLimit", 0)
          TestLimit = rd.Int(d, "data.", "testLimit", 0) }
    let a = root.GetSection "augment"
    rd.Known(a, "augment", [ "cropPadding"; "flip"; "mix" ])
    let mixSection = a.GetSection "mix"
    let mix =
        if not (mixSection.Exists()) then None
        elif mixSection.Value = "" || mixSection.Value = "none" then None
        else
            rd.Known(mixSection, "augment.mix", [ "mixupAlpha"; "cutmixAlpha"; "switchProbability"; "labelSmoothing"; "probability" ])
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
    let f = root.GetSection "fisher"
    rd.Known(f, "fisher", [ "estimator"; "samples" ])
    let estimator =
        match rd.String(f, "fisher.", "estimator", "per-sample").ToLowerInvariant() with
        | "per-sample" -> PerSample
        | "per-sample-naive" -> PerSampleNaive
        | "squared-minibatch" -> SquaredMinibatch
        | other -> rd.Fail("fisher.estimator", $"unknown estimator '{other}' (per-sample, per-sample-naive, squared-minibatch)"); PerSample
    let l = root.GetSection "lwf"
    rd.Known(l, "lwf", [ "teachers" ])
    let teachers =
        match Names.parseLwfTeachers (rd.String(l, "lwf.", "teachers", "per-exit")) with
        | Ok t -> t
        | Error e -> rd.Fail("lwf.teachers", e); PerExitTeachers
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
          Fisher = { Estimator = estimator; Samples = rd.Int(f, "fisher.", "samples", 0) }
          LwfTeachers = teachers
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

let private regulariserJson (w: Utf8JsonWriter) =
    function
    | NoRegulariser -> w.WriteString("kind", "none")
    | Ewc l -> w.WriteString("kind", "ewc"); w.WriteNumber("lambda", l)
    | Lwf r -> w.WriteString("kind", "lwf"); w.WriteNumber("rho", r)
    | EwcAndLwf (l, r) -> w.WriteString("kind", "ewc+lwf"); w.WriteNumber("lambda", l); w.WriteNumber("rho", r)

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
     w.WriteStartObject "fisher"
     w.WriteString("estimator", (match r.Fisher.Estimator with
                                 | PerSample -> "per-sample"
                                 | PerSampleNaive -> "per-sample-naive"
                                 | SquaredMinibatch -> "squared-minibatch"))
     w.WriteNumber("samples", r.Fisher.Samples)
     w.WriteEndObject()
     // Written only when it differs from the default, so that recipes (and the cache keys of their stages) from
     // before the option existed stay the same.
     if r.LwfTeachers <> PerExitTeachers then
         w.WriteStartObject "lwf"
         w.WriteString("teachers", Names.lwfTeachers r.LwfTeachers)
         w.WriteEndObject()
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
         w.WriteStartObject "regulariser"
         regulariserJson w s.Regulariser
         w.WriteEndObject()
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
