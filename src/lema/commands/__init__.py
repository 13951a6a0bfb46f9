"""One module per `lema` command; see lema/cli.py for the contract each follows."""


def tristate(text: str):
    """argparse type of an auto|on|off flag: None (the planner decides), True or False."""
    import argparse

    values = {"auto": None, "on": True, "off": False}
    if text not in values:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of auto, on, off")
    return values[text]
