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


def config_int(name: str):
    """argparse type of an integer flag that a LemaConfig field checks (`name`): refused by argparse with the
    flag and LemaConfig's reason ("argument --num-buffers: must be an integer >= 2: ..."), not by the planner
    with the Python name."""
    import argparse

    def parse(text: str) -> int:
        from ..config import _CHECKS  # at parse time: building the parser imports no torch

        accepts, why = _CHECKS[name]
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"{value} {why}")
        return value

    parse.__name__ = name  # argparse names a type by it
    return parse


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1 (--batch-size, --seq-len)."""
    import argparse

    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def add_layer_placement_flags(parser) -> None:
    """--offload-activations, --resident-layers and --zero-copy, as `lema plan` and `lema bench` take them
    (`lema train` makes its flags from TrainArgs, whose zero_copy docstring says the same)."""
    parser.add_argument("--zero-copy", type=tristate, default=None, metavar="auto|on|off",
                        help="streaming: the layers served as the file holds them: on the CPU views of the mmap, "
                             "on a GPU each layer copied straight from its file pages, registered with CUDA and "
                             "locked in RAM. auto (and on, on the CPU): where the file holds every layer tensor in "
                             "the compute dtype as one tensor (not per-expert ones stacked on load), and on a GPU "
                             "the layers fit in RAM and no --page-cache size is given; on (GPU): refused where it "
                             "cannot apply; off: read into slots (on a GPU, staged through pinned host memory)")
    parser.add_argument("--offload-activations", type=tristate, default=None, metavar="auto|on|off",
                        help="GPU: recomputed layers' inputs in pinned host memory (default auto: only when the "
                             "budget is not met otherwise)")
    parser.add_argument("--resident-layers", type=count_or_auto, default=None, metavar="auto|N",
                        help="streaming: N decoder layers stay loaded, spread through the stack (default auto: on "
                             "a GPU the plan shares the room --max-vram leaves between resident layers and kept "
                             "activations by the step time each saves; on the CPU 0)")
