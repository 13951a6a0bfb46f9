"""One module per `lema` command; see lema/cli.py for the contract each follows."""


def tristate(text: str):
    """argparse type of an auto|on|off flag: None (the planner decides), True or False."""
    import argparse

    values = {"auto": None, "on": True, "off": False}
    if text not in values:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of auto, on, off")
    return values[text]


def count_or_auto(text: str):
    """argparse type of an auto|N flag: None (the planner decides) or a non-negative integer."""
    import argparse

    if text == "auto":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is neither auto nor a non-negative integer")
    return int(text)


def add_layer_placement_flags(parser) -> None:
    """--offload-activations and --resident-layers, as `lema plan` and `lema bench` take them (`lema train`
    makes its flags from TrainArgs)."""
    parser.add_argument("--offload-activations", type=tristate, default=None, metavar="auto|on|off",
                        help="GPU: recomputed layers' inputs in pinned host memory (default auto: only when the "
                             "budget is not met otherwise)")
    parser.add_argument("--resident-layers", type=count_or_auto, default=None, metavar="auto|N",
                        help="streaming: N decoder layers stay loaded, spread through the stack (default auto: on "
                             "a GPU the plan shares the room --max-vram leaves between resident layers and kept "
                             "activations by the step time each saves; on the CPU 0)")
