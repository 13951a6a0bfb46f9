"""`lema plan`: print the memory plan of a training run without training (lema/planner.py)."""

from __future__ import annotations

from . import add_layer_placement_flags, config_int, count_or_auto, positive_int, tristate

HELP = "print the memory plan of a training run (what goes where, the predicted peak) without training"
EXAMPLE = "lema plan --shape llama-2-7b --max-vram 16GB --batch-size 8 --seq-len 512 --dtype bfloat16"


def add_arguments(parser) -> None:
    from ..shapes import SHAPES

    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="FOLDER",
                     help="a Transformers checkpoint folder (its config.json; its safetensors weights, if any, "
                          "are checked as `lema train` checks them)")
    src.add_argument("--shape", choices=[s for s in SHAPES], help="a known model shape (config only, no weights)")
    parser.add_argument("--max-vram", default=None, metavar="SIZE",
                        help="device memory budget, e.g. 16GB or 12GiB; a plan over it is refused")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="sequences per step (default: 8)")
    parser.add_argument("--seq-len", type=positive_int, default=512, help="tokens per sequence (default: 512)")
    parser.add_argument("--lora-rank", type=config_int("lora_rank"), default=16, help="LoRA rank r (default: 16)")
    parser.add_argument("--lora-target-modules", nargs="+", default=None, metavar="NAME",
                        help="modules to adapt (default: every linear layer inside the decoder layers)")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype of the frozen weights (default: bfloat16)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="where the step would run (default: cuda; no GPU is needed to plan)")
    parser.add_argument("--num-buffers", type=config_int("num_buffers"), default=3, help="ring depth (default: 3)")
    parser.add_argument("--strategy", default="streaming", choices=["streaming", "resident"],
                        help="streaming (default) or resident")
    parser.add_argument("--optimizer", default="adamw", help="adamw (default), adam, sgd or sgd-momentum")
    parser.add_argument("--keep-activations", type=count_or_auto, default=None, metavar="auto|N",
                        help="layers keeping their activations instead of recomputing (default: as many as "
                             "--max-vram allows; without a budget, decided at run time)")
    parser.add_argument("--chunked-loss", type=tristate, default=None, metavar="auto|on|off",
                        help="head + loss in chunks (default auto: when the float32 logits pass 64 MiB)")
    parser.add_argument("--page-cache", default=None, metavar="auto|off|SIZE",
                        help="streaming (but CUDA zero-copy): the pager's page-cache window (default auto: the "
                             "memory available now less 2 GiB, when the layers' file bytes exceed it)")
    parser.add_argument("--padded", action="store_true",
                        help="plan for batches right-padded to their longest row, as `lema train` pads rows of "
                             "different lengths: attention then takes a mask, and each layer keeps more")
    add_layer_placement_flags(parser)


def page_cache(text):
    """--page-cache: None (auto), 'off', or bytes."""
    from ..config import parse_bytes

    return None if text in (None, "auto") else "off" if text == "off" else parse_bytes(text, "--page-cache")


def run(args) -> int:
    from ..config import parse_bytes
    from ..planner import plan

    if args.shape:
        from ..shapes import shape_config

        model = shape_config(args.shape)
    else:
        model = args.model
    p = plan(model, dtype=args.dtype, lora_rank=args.lora_rank, targets=args.lora_target_modules,
             optimizer=args.optimizer, batch_size=args.batch_size, seq_len=args.seq_len,
             max_vram_bytes=parse_bytes(args.max_vram), device_type=args.device,
             num_buffers=args.num_buffers, strategy=args.strategy, keep_activations=args.keep_activations,
             chunked_loss=args.chunked_loss, page_cache=page_cache(args.page_cache),
             resident_layers=args.resident_layers, offload_activations=args.offload_activations,
             zero_copy=args.zero_copy, padded=args.padded)
    print(p.table())
    return 0
