"""`lema merge`: a LoRA adapter folded into its base model, written layer by layer."""

from __future__ import annotations

HELP = "merge a LoRA adapter into the base weights (layer by layer) as a new Transformers folder"
EXAMPLE = "lema merge --model runs/smollm2 --adapter runs/reply/adapter --output runs/smollm2-reply"


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="base model folder")
    parser.add_argument("--adapter", required=True, help="PEFT adapter folder (e.g. OUT/adapter of lema train)")
    parser.add_argument("--output", required=True, help="folder to write (must not exist, or use --overwrite)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")


def run(args) -> int:
    from ..merge import merge

    out = merge(args.model, args.adapter, args.output, dtype=args.dtype, overwrite=args.overwrite)
    print(f"merged model written to {out}")
    return 0
