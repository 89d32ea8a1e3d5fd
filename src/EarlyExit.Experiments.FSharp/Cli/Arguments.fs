/// The command line: Argu unions, one per subcommand.
module EarlyExit.Experiments.Cli.Arguments

open Argu

type ConventionArg =
    | Conv_Linear
    | Msdnet_Reference

type DescribeArgs =
    | [<MainCommand; ExactlyOnce>] Model of name: string
    | Classes of count: int
    | Input of shape: string
    | Width of channels: int
    | Blocks of list: string
    | Exits of list: string
    | Convention of ConventionArg
    | Json

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Model _ -> "model name (see `earlyexit models`)"
            | Classes _ -> "number of classes (default: the family's, 100 for resnet34)"
            | Input _ -> "input shape C x H x W, e.g. 3x32x32 or 1x28x28"
            | Width _ -> "width of the first stage (resnet34: 64; later stages double it)"
            | Blocks _ -> "blocks per stage, e.g. 3,4,6,3"
            | Exits _ -> "1-based blocks after which the exits sit, e.g. 2,4,6,8,10,12,14,16"
            | Convention _ -> "MAC counting convention (default conv-linear, the one the budgets use)"
            | Json -> "print one JSON object instead of the table"

type DataCheckArgs =
    | [<MainCommand; ExactlyOnce>] Name of data: string
    | Root of dir: string

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Name _ -> "cifar100, cifar10 or fashion-mnist"
            | Root _ -> "data root (default $EARLYEXIT_DATA or ~/.local/share/earlyexit/data)"

type DataArgs =
    | [<CliPrefix(CliPrefix.None)>] Check of ParseResults<DataCheckArgs>
    | [<CliPrefix(CliPrefix.None)>] Download of ParseResults<DataCheckArgs>

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Check _ -> "read a data set and print its sizes, or say what is missing"
            | Download _ -> "download CIFAR-10/100 from the official address (checksum verified)"

type CliArgs =
    | [<CliPrefix(CliPrefix.None)>] Models
    | [<CliPrefix(CliPrefix.None)>] Describe of ParseResults<DescribeArgs>
    | [<CliPrefix(CliPrefix.None)>] Data of ParseResults<DataArgs>
    | [<CliPrefix(CliPrefix.None)>] Doctor

    interface IArgParserTemplate with
        member a.Usage =
            match a with
            | Models -> "list the model families"
            | Describe _ -> "parameters and cumulative MACs of every exit of a model"
            | Data _ -> "check or download data sets"
            | Doctor -> "show how TorchSharp was loaded and which device would be used"
