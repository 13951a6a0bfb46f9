"""`lema generate`: text from the streamed model, with or without a LoRA adapter."""

from __future__ import annotations

import sys

HELP = "generate text from a model (optionally with a LoRA adapter), streaming its weights"
EXAMPLE = 'lema generate --model runs/smollm2 --adapter runs/reply/adapter --chat --prompt "What is LEMA?"'


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model folder (from `lema convert`)")
    parser.add_argument("--adapter", default=None, help="PEFT adapter folder (e.g. OUT/adapter from `lema train`)")
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--system", default=None, help="system message for --chat (\"\" for an empty one, in place of the "
                                                           "template's default, where it has one)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when temperature > 0")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the sampling when temperature > 0: the same seed gives the same text")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--strategy", default="streaming", choices=["streaming", "resident"])


def run(args) -> int:
    from ..config import check_seed
    from ..generation import check_settings, generate_text, load_for_generation

    check_settings(args.max_new_tokens, args.temperature, args.top_p, args.chat, args.system)  # before the model loads
    if args.seed is not None:
        check_seed(args.seed)
    unused = [flag for flag, given in (("--top-p", args.top_p != 1.0), ("--seed", args.seed is not None)) if given]
    if args.temperature == 0 and unused:  # greedy decoding draws nothing: say so rather than ignore them
        one = len(unused) == 1
        print(f"note: {' and '.join(unused)} {'applies' if one else 'apply'} to sampling (--temperature > 0); at "
              f"--temperature 0 decoding is greedy and {'it changes' if one else 'they change'} nothing",
              file=sys.stderr)
    model, tokenizer = load_for_generation(args.model, args.adapter, args.device, args.dtype, args.strategy)
    generate_text(model, tokenizer, args.prompt, chat=args.chat, system=args.system,
                  max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  stream=True, seed=args.seed)
    model.close()
    return 0
