"""`lema train`: fine-tune a LoRA adapter (the recipe is lema/training.py)."""

from __future__ import annotations

import dataclasses
import typing

from ..cli_errors import UsageError, reason

AUTO = ("keep_activations", "resident_layers", "page_cache")  # settings where `auto` (the default) means None

HELP = "fine-tune a LoRA adapter on a JSONL dataset, streaming the base weights"
EXAMPLE = ("lema train --model runs/smollm2 --data data/lema_reply/train.jsonl --output runs/reply "
           "--steps 100 --lr 1e-3")


def add_arguments(parser) -> None:
    from ..config import field_docs
    from ..training import TrainArgs

    docs = field_docs(TrainArgs)
    hints = typing.get_type_hints(TrainArgs)
    for f in dataclasses.fields(TrainArgs):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=None, help=docs[f.name])
            continue
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        base = inner[0] if inner else kind
        if typing.get_origin(base) is list:
            parser.add_argument(flag, nargs="+", default=None, help=docs[f.name])
        elif base is bool:  # Optional[bool]: auto (None) | on | off
            from . import tristate

            parser.add_argument(flag, type=_auto_given(tristate), default=None, metavar="auto|on|off",
                                help=f"{docs[f.name]} (default: auto)")
        elif f.name in AUTO:  # auto|N or auto|off|SIZE, as `lema plan` and `lema bench` take them
            from . import count_or_auto

            parser.add_argument(flag, type=_auto_given(count_or_auto if base is int else _auto_or_text), default=None,
                                metavar="auto|N" if base is int else "auto|off|SIZE", help=f"{docs[f.name]}")
        else:
            parser.add_argument(flag, type=base, default=None, metavar=f.name.upper(),
                                help=f"{docs[f.name]} (default: {f.default})")
    parser.add_argument("--config", default=None, metavar="RUN.yaml",
                        help="read settings from a YAML file (keys as the flags, with underscores); "
                             "flags given on the command line win")


def _auto_or_text(text: str):
    return None if text == "auto" else text


AUTO_GIVEN = "auto (given)"  # `auto` typed on the command line: it overrides the --config file's value


def _auto_given(kind):
    """An argparse type that reads `auto` as AUTO_GIVEN (not None, which is a flag left out) and anything else
    as `kind` does."""
    def read(text: str):
        return AUTO_GIVEN if text == "auto" else kind(text)

    read.__name__ = getattr(kind, "__name__", "value")  # argparse names the type in its error message
    return read


def _setting(path: str, name: str, value, kind):
    """A YAML value as the type of TrainArgs' field (YAML 1.1 reads `1e-4` as a string); a clear error if not."""
    if name in AUTO and value == "auto":
        return None
    inner = [a for a in typing.get_args(kind) if a is not type(None)]
    if value is None:
        if inner and len(inner) < len(typing.get_args(kind)):
            return None
        raise ValueError(f"--config {path!r}: {name} is empty; give a value or leave the key out")
    base = inner[0] if inner else kind
    if typing.get_origin(base) is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise ValueError(f"--config {path!r}: {name}={value!r} must be a name or a list of names")
    if base is bool:
        if isinstance(value, bool):
            return value
        words = {"true": True, "false": False, "on": True, "off": False, **({} if kind is bool else {"auto": None})}
        if str(value).lower() not in words:
            raise ValueError(f"--config {path!r}: {name}={value!r} must be one of {', '.join(words)}")
        return words[str(value).lower()]
    if base is str and isinstance(value, bool):  # YAML 1.1 reads a bare off / on as a boolean
        return "on" if value else "off"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"--config {path!r}: {name}={value!r} must be {KIND.get(base, base.__name__)}")
    try:
        converted = base(value)
    except (ValueError, OverflowError):  # int(nan), int(inf): YAML's .nan and .inf
        raise ValueError(f"--config {path!r}: {name}={value!r} is not {KIND.get(base, base.__name__)}") from None
    if base is int and isinstance(value, float) and converted != value:
        raise ValueError(f"--config {path!r}: {name}={value!r} must be a whole number")
    return converted


KIND = {int: "a whole number", float: "a number", str: "a string"}  # a YAML value's expected type, in words


def args_from_namespace(ns):
    from ..training import TrainArgs

    values = {}
    if ns.config:
        import yaml

        try:
            with open(ns.config, encoding="utf-8") as f:
                loaded = yaml.safe_load(f) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ValueError(f"--config {ns.config!r} is not valid YAML ({reason(e)})") from None
        except OSError as e:
            raise ValueError(f"--config {ns.config!r} cannot be read ({reason(e)})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {ns.config!r} must hold a mapping of settings")
        known = {f.name for f in dataclasses.fields(TrainArgs)}
        unknown = sorted(map(str, set(loaded) - known))  # YAML keys may be numbers
        if unknown:
            raise ValueError(f"--config {ns.config!r}: unknown setting(s) {unknown}; known: {sorted(known)}")
        hints = typing.get_type_hints(TrainArgs)
        values.update({k: _setting(ns.config, k, v, hints[k]) for k, v in loaded.items()})
    for f in dataclasses.fields(TrainArgs):
        v = getattr(ns, f.name, None)
        if v is AUTO_GIVEN:
            values[f.name] = None
        elif v is not None:
            values[f.name] = v
    given = {k for k in ("steps", "epochs") if getattr(ns, k, None) is not None}
    if len(given) == 1:  # --steps on the command line replaces the file's epochs, and the other way round
        values.pop(({"steps", "epochs"} - given).pop(), None)
    missing = [f"--{k}" for k in ("model", "data", "output") if not values.get(k)]
    if missing:  # not argparse-required, since --config may give them
        raise UsageError(f"the following arguments are required: {', '.join(missing)}")
    return TrainArgs(**values)


def run(args) -> int:
    from ..training import train

    train_args = args_from_namespace(args)
    args.max_vram = train_args.max_vram  # the run's budget, --config's included, for the out-of-memory advice
    summary = train(train_args)
    return 128 + (summary["signal"] or 2) if summary["interrupted"] else 0  # 130 after Ctrl-C, 143 after SIGTERM
