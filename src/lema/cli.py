"""`lema COMMAND …`: one entry point, a table from command to the module that implements it.

Each module in `lema/commands/` exposes `HELP` (one line), `EXAMPLE` (shown in `--help`),
`add_arguments(parser)` and `run(args) -> int`. Modules import torch and Transformers inside
`run`, so `lema --help` stays fast. A usage error exits with status 2 and a one-line reason;
an error in the user's input (`ValueError`, `FileNotFoundError`) exits with status 1 and its
message, without a traceback (set LEMA_DEBUG=1 to see it), as does running out of memory.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from typing import Optional

from .cli_errors import UsageError

COMMANDS = {
    "convert": "lema.commands.convert",
    "plan": "lema.commands.plan",
    "train": "lema.commands.train",
    "generate": "lema.commands.generate",
    "merge": "lema.commands.merge",
    "bench": "lema.commands.bench",
}

EPILOG = """examples:
  lema convert --default runs/smollm2            # the embedded SmolLM2-135M, as a layer-packed folder
  lema train --model runs/smollm2 --data data/lema_reply/train.jsonl --output runs/reply --steps 100
  lema generate --model runs/smollm2 --adapter runs/reply/adapter --chat --prompt "What is LEMA?"
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lema", description="LoRA fine-tuning of models larger than the GPU.",
                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a command not built yet in this checkout
            continue
        p = sub.add_parser(name, help=module.HELP, description=module.HELP,
                           epilog="example:\n  " + module.EXAMPLE,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _flag(argv: list[str], name: str) -> Optional[str]:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _model_folder(argv: list[str]) -> Optional[str]:
    """The model folder of a command line (--model, else `model` in `lema train --config`'s YAML), read
    before anything imports torch; None when there is none or the YAML cannot be read (the command says why)."""
    folder = _flag(argv, "--model")
    config = _flag(argv, "--config")
    if folder is None and config:
        try:
            import yaml
        except ImportError:
            return None
        try:
            with open(config) as f:
                loaded = yaml.safe_load(f)
        except (OSError, ValueError, yaml.YAMLError):
            return None
        folder = loaded.get("model") if isinstance(loaded, dict) else None
    return folder if isinstance(folder, str) else None


NEGATIVE = re.compile(r"^-\.?\d")


def _attach_negative_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`--max-vram -1GB` as `--max-vram=-1GB`: argparse takes a value that starts with '-' and is not a plain
    number for an option of its own and says only "expected one argument"; attached, the value reaches the
    option's own check, which names it and the fix."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    command = sub.choices.get(argv[0]) if sub is not None and argv else None
    if command is None:
        return argv
    out = list(argv)
    i = 1
    while i < len(out) - 1:
        action = command._option_string_actions.get(out[i])
        if action is not None and action.nargs != 0 and NEGATIVE.match(out[i + 1]):
            out[i:i + 2] = [f"{out[i]}={out[i + 1]}"]
        i += 1
    return out


def _out_of_memory_advice(args) -> str:
    """What to change after running out of memory, in the command's own flags."""
    if hasattr(args, "batch_size") and hasattr(args, "seq_len"):  # train, plan, bench
        return "lower --batch-size or --seq-len" + (
            "" if getattr(args, "max_vram", None) else ", or give --max-vram so the plan keeps the run within it")
    return "free memory (other programs), or run it where there is more"


def main(argv=None) -> int:
    from .host_memory import use_huge_pages_for_tensors
    from .store import weights_bytes

    folder = _model_folder(sys.argv[1:] if argv is None else list(argv))
    # before torch's first CPU allocation; not for weights bigger than the memory (host_memory.py)
    use_huge_pages_for_tensors(weights_bytes(folder) if folder else None)
    parser = build_parser()
    args = parser.parse_args(_attach_negative_values(parser, sys.argv[1:] if argv is None else list(argv)))
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UsageError as e:
        print(f"lema {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # 130 after Ctrl-C; a second SIGTERM stopping `lema train` at once: 143
        print("lema: interrupted", file=sys.stderr)
        return 128 + int(getattr(e, "signum", 2))
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError, the CPU allocators': named, not a traceback
        text = str(e)
        if os.environ.get("LEMA_DEBUG") or not (isinstance(e, MemoryError) or "out of memory" in text
                                                 or "can't allocate memory" in text):
            raise
        print(f"lema {args.command}: error: out of memory ({text.splitlines()[0] if text else 'MemoryError'}); "
              f"{_out_of_memory_advice(args)}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, OSError) as e:
        if os.environ.get("LEMA_DEBUG"):
            raise
        print(f"lema {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
