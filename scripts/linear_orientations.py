"""Side by side, on this machine: each frozen-linear product in torch's orientation and transposed
(engine/cpu_linear.py), for the Llama-2-7B and SmolLM2-135M layer shapes at several token counts.

    .venv/bin/python scripts/linear_orientations.py [--threads 2] [--repeats 7]

Prints, per shape, the median of interleaved runs of each orientation and their ratio (transposed / torch's:
below 1, the transposed product is faster), for the forward (x @ W^T) and the input's gradient (dy @ W).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lema.engine.cpu_linear import PRODUCTS

SHAPES = {"llama-2-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
          "smollm2-135m": [(576, 576), (1536, 576), (576, 1536), (192, 576)]}


def median_times(products, a, w, repeats: int) -> list[float]:
    for product in products:  # untimed: first touches
        product(a, w)
    times: list[list[float]] = [[], []]
    for _ in range(repeats):
        for i, product in enumerate(products):
            t = time.perf_counter()
            product(a, w)
            times[i].append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 256, 512, 1024])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, float32; median of {args.repeats} interleaved runs")
    print(f"{'shape':<14} {'out x in':>12} {'tokens':>6}  {'fwd torch':>9} {'fwd tr/torch':>12}  "
          f"{'bwd torch':>9} {'bwd tr/torch':>12}")
    for name, shapes in SHAPES.items():
        for out_f, in_f in shapes:
            for n in args.tokens:
                w, x, g = torch.randn(out_f, in_f), torch.randn(n, in_f), torch.randn(n, out_f)
                f = median_times(PRODUCTS["forward"], x, w, args.repeats)
                b = median_times(PRODUCTS["backward"], g, w, args.repeats)
                print(f"{name:<14} {f'{out_f}x{in_f}':>12} {n:>6}  {f[0] * 1e3:>7.1f}ms {f[1] / f[0]:>12.2f}  "
                      f"{b[0] * 1e3:>7.1f}ms {b[1] / b[0]:>12.2f}", flush=True)


if __name__ == "__main__":
    main()
