/// One generators module and one shared FsCheck configuration for every property.
module EarlyExit.Tests.Properties.Generators

open System
open FsCheck
open FsCheck.FSharp
open Expecto

/// Shared configuration: few, small cases (torch work is not free), a fixed replay seed so that a failure
/// reproduces; set EARLYEXIT_FSCHECK_SEED=random to explore new cases.
let config =
    let replay =
        match Environment.GetEnvironmentVariable "EARLYEXIT_FSCHECK_SEED" with
        | "random" -> None
        | null | "" -> Some(20261124UL, 1UL, None)
        | s -> Some(UInt64.Parse s, 1UL, None)
    { FsCheckConfig.defaultConfig with maxTest = 20; replay = replay; endSize = 20 }

let testProp name property = testPropertyWithConfig config name property
let testPropN n name property = testPropertyWithConfig { config with maxTest = n } name property

/// A small ResNet configuration of the resnet34 family.
type SmallResNet = { Blocks: int[]; BaseWidth: int; Exits: int[]; Classes: int; Input: int64[]; Seed: int }

let smallResNet =
    gen {
        let! stages = Gen.choose (1, 4)
        let! blocks = Gen.arrayOfLength stages (Gen.choose (1, 2))
        let total = Array.sum blocks
        let! baseWidth = Gen.elements [ 2; 4; 6 ]
        let! chosen = Gen.subListOf [ 1 .. total - 1 ]
        let exits = Array.append (chosen |> Seq.sort |> Seq.toArray) [| total |]
        let! classes = Gen.choose (2, 7)
        let! channels = Gen.elements [ 1L; 3L ]
        let minSide = 1 <<< (stages - 1)
        let! side = Gen.choose (max minSide 4, 12)
        let! seed = Gen.choose (0, 10000)
        return { Blocks = blocks; BaseWidth = baseWidth; Exits = exits; Classes = classes; Input = [| channels; int64 side; int64 side |]; Seed = seed }
    }

type Arbs =
    static member SmallResNet() = Arb.fromGen smallResNet

let configWithArbs = { config with arbitrary = [ typeof<Arbs> ] }
let testPropArbs name property = testPropertyWithConfig configWithArbs name property
