"""One module per `lema` command; see lema/cli.py for the contract each follows."""


def tristate(text: str):
    """argparse type of an auto|on|off flag: None (the planner decides), True or False."""
    import argparse

    values = {"auto": None, "on": True, "off": False}
    if text not in values:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of auto, on, off")
    return values[text]


def add_layer_placement_flags(parser) -> None:
    """--offload-activations and --resident-layers, as `lema plan` and `lema bench` take them (`lema train`
    makes its flags from TrainArgs)."""
    parser.add_argument("--offload-activations", type=tristate, default=None, metavar="auto|on|off",
                        help="GPU: recomputed layers' inputs in pinned host memory (default auto: only when the "
                             "budget is not met otherwise)")
    parser.add_argument("--resident-layers", type=int, default=0, metavar="N",
                        help="streaming: N decoder layers stay loaded, spread through the stack (default 0; the "
                             "plan says how many would fit --max-vram)")
