/// TensorBoard event files, written here rather than by TorchSharp's SummaryWriter, which stores each event's wall time
/// as .NET ticks (about 6.4e17 instead of Unix seconds: TensorBoard's time axis breaks) and reopens the file for every
/// event. Format: TFRecord framing (length, masked CRC-32C of the length, the bytes, masked CRC-32C of the bytes) of
/// `Event` protocol buffers (tensorflow/core/util/event.proto): scalars as simple values, text as the text plugin's
/// string tensors. `read` decodes what `write` writes (the tests use it).
module EarlyExit.Experiments.Reports.TensorBoard

open System
open System.IO
open System.Numerics
open System.Text

/// CRC-32C (Castagnoli), as TFRecord frames its records.
let crc32c (bytes: ReadOnlySpan<byte>) =
    let mutable crc = 0xFFFFFFFFu
    for b in bytes do crc <- BitOperations.Crc32C(crc, b)
    ~~~crc

/// TFRecord's mask of a CRC.
let private maskedCrc (bytes: ReadOnlySpan<byte>) =
    let crc = crc32c bytes
    ((crc >>> 15) ||| (crc <<< 17)) + 0xa282ead8u

let private varint (w: BinaryWriter) (v: uint64) =
    let mutable v = v
    while v >= 0x80UL do
        w.Write(byte (v ||| 0x80UL))
        v <- v >>> 7
    w.Write(byte v)

let private tag (w: BinaryWriter) (field: int) (wire: int) = varint w (uint64 ((field <<< 3) ||| wire))

let private bytesField (w: BinaryWriter) (field: int) (payload: byte[]) =
    tag w field 2
    varint w (uint64 payload.Length)
    w.Write payload

let private message (build: BinaryWriter -> unit) =
    use ms = new MemoryStream()
    (use w = new BinaryWriter(ms, Encoding.UTF8, true)
     build w)
    ms.ToArray()

/// The seconds since the Unix epoch, as TensorBoard reads an event's wall time.
let unixNow () = float (DateTimeOffset.UtcNow.ToUnixTimeMilliseconds()) / 1000.0

/// An `Event`: wall_time (1, double), step (2, int64), then file_version (3) or summary (5).
let private event (wallTime: float) (step: int64) (rest: BinaryWriter -> unit) =
    message (fun w ->
        tag w 1 1
        w.Write wallTime
        if step <> 0L then
            tag w 2 0
            varint w (uint64 step)
        rest w)

/// A writer of one event file in a folder; each event is flushed as it is written, so a killed run keeps what it logged.
type EventWriter(folder: string) =
    do Directory.CreateDirectory folder |> ignore
    let path = Path.Combine(folder, $"events.out.tfevents.{DateTimeOffset.UtcNow.ToUnixTimeSeconds()}.{Environment.MachineName}.{Environment.ProcessId}")
    let stream = new FileStream(path, FileMode.Append, FileAccess.Write, FileShare.Read)
    let gate = obj ()
    let record (data: byte[]) =
        lock gate (fun () ->
            let length = BitConverter.GetBytes(uint64 data.Length)
            stream.Write(length, 0, length.Length)
            let c1 = BitConverter.GetBytes(maskedCrc (ReadOnlySpan length))
            stream.Write(c1, 0, c1.Length)
            stream.Write(data, 0, data.Length)
            let c2 = BitConverter.GetBytes(maskedCrc (ReadOnlySpan data))
            stream.Write(c2, 0, c2.Length)
            stream.Flush())
    do record (event (unixNow ()) 0L (fun w -> bytesField w 3 (Encoding.UTF8.GetBytes "brain.Event:2")))

    member _.Path = path

    /// A scalar: Summary { value { tag, simple_value } }.
    member _.Scalar(name: string, value: float, step: int64) =
        let v = message (fun w ->
            bytesField w 1 (Encoding.UTF8.GetBytes name)
            tag w 2 5
            w.Write(float32 value))
        record (event (unixNow ()) step (fun w -> bytesField w 5 (message (fun s -> bytesField s 1 v))))

    /// Text for TensorBoard's text plugin: a string tensor with the plugin named in the value's metadata.
    member _.Text(name: string, text: string, step: int64) =
        let tensor = message (fun t ->
            tag t 1 0
            varint t 7UL // DT_STRING
            bytesField t 2 [||] // a scalar: no dimensions
            bytesField t 8 (Encoding.UTF8.GetBytes text))
        let metadata = message (fun m -> bytesField m 1 (message (fun p -> bytesField p 1 (Encoding.UTF8.GetBytes "text"))))
        let v = message (fun w ->
            bytesField w 1 (Encoding.UTF8.GetBytes name)
            bytesField w 9 metadata
            bytesField w 8 tensor)
        record (event (unixNow ()) step (fun w -> bytesField w 5 (message (fun s -> bytesField s 1 v))))

    interface IDisposable with
        member _.Dispose() = lock gate (fun () -> stream.Dispose())

/// One decoded event: wall time, step, and its scalar (tag, value) or text (tag, text), if any.
type DecodedEvent = { WallTime: float; Step: int64; Tag: string; Scalar: float option; Text: string option; FileVersion: string option }

/// Decodes an event file, checking every record's CRCs; fails on a corrupt one.
let read (path: string) : DecodedEvent list =
    let bytes = File.ReadAllBytes path
    let mutable pos = 0
    let readVarint (b: byte[]) (p: int ref) =
        let mutable result = 0UL
        let mutable shift = 0
        let mutable go = true
        while go do
            let x = b[p.Value]
            p.Value <- p.Value + 1
            result <- result ||| (uint64 (x &&& 0x7Fuy) <<< shift)
            shift <- shift + 7
            go <- x &&& 0x80uy <> 0uy
        result
    /// The fields of a message: (field number, a varint, a fixed-width number or length-delimited bytes).
    let fields (b: byte[]) =
        let p = ref 0
        [ while p.Value < b.Length do
            let key = readVarint b p
            let field, wire = int (key >>> 3), int (key &&& 7UL)
            match wire with
            | 0 -> yield field, Choice1Of3(readVarint b p)
            | 1 ->
                yield field, Choice2Of3(BitConverter.ToDouble(b, p.Value))
                p.Value <- p.Value + 8
            | 5 ->
                yield field, Choice2Of3(float (BitConverter.ToSingle(b, p.Value)))
                p.Value <- p.Value + 4
            | 2 ->
                let n = int (readVarint b p)
                yield field, Choice3Of3(b[p.Value .. p.Value + n - 1])
                p.Value <- p.Value + n
            | other -> failwithf "wire type %d is not written by this writer" other ]
    let bytesOf f (fs: (int * Choice<uint64, float, byte[]>) list) = fs |> List.tryPick (fun (k, v) -> match v with Choice3Of3 x when k = f -> Some x | _ -> None)
    let numberOf f (fs: (int * Choice<uint64, float, byte[]>) list) = fs |> List.tryPick (fun (k, v) -> match v with Choice2Of3 x when k = f -> Some x | _ -> None)
    let varintOf f (fs: (int * Choice<uint64, float, byte[]>) list) = fs |> List.tryPick (fun (k, v) -> match v with Choice1Of3 x when k = f -> Some x | _ -> None)
    [ while pos < bytes.Length do
        let length = BitConverter.ToUInt64(bytes, pos)
        if BitConverter.ToUInt32(bytes, pos + 8) <> maskedCrc (ReadOnlySpan(bytes, pos, 8)) then failwithf "%s: corrupt length at byte %d" path pos
        let data = bytes[pos + 12 .. pos + 12 + int length - 1]
        if BitConverter.ToUInt32(bytes, pos + 12 + int length) <> maskedCrc (ReadOnlySpan data) then failwithf "%s: corrupt record at byte %d" path pos
        pos <- pos + 16 + int length
        let e = fields data
        let value = bytesOf 5 e |> Option.bind (fun summary -> bytesOf 1 (fields summary)) |> Option.map fields
        let text =
            value |> Option.bind (bytesOf 8) |> Option.bind (fun tensor -> bytesOf 8 (fields tensor)) |> Option.map Encoding.UTF8.GetString
        yield
            { WallTime = defaultArg (numberOf 1 e) nan
              Step = int64 (defaultArg (varintOf 2 e) 0UL)
              Tag = value |> Option.bind (bytesOf 1) |> Option.map Encoding.UTF8.GetString |> Option.defaultValue ""
              Scalar = value |> Option.bind (numberOf 2)
              Text = text
              FileVersion = bytesOf 3 e |> Option.map Encoding.UTF8.GetString } ]
