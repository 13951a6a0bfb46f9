"""Frozen linear layers on the CPU: each product in the orientation the BLAS runs faster for its shape.

A frozen linear's forward is y = x @ W^T (x: (N, in), W: (out, in)), its backward dx = dy @ W. Torch computes
both with the output in row-major order. The same numbers come out of the transposed product, y = (W @ x^T)^T
(and dx = (W^T @ dy^T)^T), made contiguous again (one copy of the output, (N, out) floats). MKL's sgemm runs the
two orientations at different speeds, and which is faster depends on the shape. On this project's 2-core Zen 4
VM, fp32, transposed / torch's (median of 7 interleaved runs, `scripts/linear_orientations.py`, BENCHMARKS.md
session 14):

    Llama-2-7B shapes, 128 tokens     forward 0.78-0.88   input gradient 0.72-0.77
                       256 tokens     forward 0.91-1.01   input gradient 0.79-0.82
                       1024 tokens    forward 0.97-1.02   input gradient 0.91-1.02
    SmolLM2-135M shapes, 128-1024     forward 1.02-1.23   input gradient 1.03-1.45

So no one orientation is right, and no rule of thumb covers both: `Orientations` times the two at the first
product of each shape, on the product's own operands, and keeps the faster for the rest of the run. Target 2 of
issue 6 (the 7B shape at b1 x 128, `lema bench ... --floor`, one run each way): the median step 37.84 s with
torch's products, 31.30 s with the timed choice (every 7B shape, the head's included, went transposed; a layer's
forward 0.644 -> 0.505 s, its backward 0.511 -> 0.440 s). On SmolLM2 (b4 x 256) the layers' shapes keep torch's,
and so does the chunked head's forward; its backward's two are within 2% and go either way.

Only products of at least MIN_FLOPS are timed: below that a product takes under a few milliseconds and the
choice saves nothing, so F.linear runs them as before (the test suite's tiny models run exactly as without this
module, and a result never depends on a timing). The two orientations sum in different
orders, so a timed shape may give results that differ from F.linear's in the last bits, and from one run to
the next where the two are about as fast (the choice can then go either way); $LEMA_CPU_LINEAR=standard runs
F.linear everywhere. The GPU runs torch's own (cuBLAS picks its kernels itself).
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional

import torch
from torch import nn

ENV = "LEMA_CPU_LINEAR"  # "auto" (default): timed per shape; "standard": torch's own; "transposed": always
MODES = ("auto", "standard", "transposed")
MIN_FLOPS = 2**30  # 2 N in out of a product worth timing (~10 ms on two cores)
REPEATS = 3  # timed runs of each orientation, interleaved; the fastest run of each counts


def _forward(x, w):  # (N, in) x (out, in) -> (N, out)
    return torch.mm(x, w.t())


def _forward_transposed(x, w):
    return torch.mm(w, x.t()).t().contiguous()  # (out, N) -> (N, out)


def _backward(g, w):  # (N, out) x (out, in) -> (N, in)
    return torch.mm(g, w)


def _backward_transposed(g, w):
    return torch.mm(w.t(), g.t()).t().contiguous()  # (in, N) -> (N, in)


PRODUCTS = {"forward": (_forward, _forward_transposed), "backward": (_backward, _backward_transposed)}


def mode_from_env() -> str:
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"${ENV}={mode!r}: expected one of {', '.join(MODES)}")
    return mode


class Orientations:
    """Which orientation (0: torch's, 1: transposed) each product shape runs in, for one model.

    `picked` maps (pass, N, out, in, dtype) to the orientation; `timings` keeps, for each timed shape, the fastest
    run of each orientation in seconds (lema bench reports them). `clock` is the timer (tests pass their own)."""

    def __init__(self, mode: Optional[str] = None, min_flops: int = MIN_FLOPS, repeats: int = REPEATS,
                 clock: Callable[[], float] = time.perf_counter):
        self.mode = mode_from_env() if mode is None else mode
        if self.mode not in MODES:
            raise ValueError(f"orientation mode {self.mode!r}: expected one of {', '.join(MODES)}")
        self.min_flops, self.repeats, self.clock = min_flops, repeats, clock
        self.picked: dict[tuple, int] = {}
        self.timings: dict[tuple, tuple[float, float]] = {}

    def applies(self, rows: int, w: torch.Tensor) -> bool:
        """Whether a product of `rows` rows with `w` goes through `run`; if not, F.linear's own (and autograd's)
        product runs, exactly as without this module: $LEMA_CPU_LINEAR=standard, or a product under MIN_FLOPS."""
        return self.mode == "transposed" or (self.mode == "auto" and 2 * rows * w.numel() >= self.min_flops)

    def run(self, which: str, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The product `which` ("forward": a @ w^T, "backward": a @ w) of a 2-D `a` and the weight `w`."""
        products = PRODUCTS[which]
        key = (which, a.shape[0], w.shape[0], w.shape[1], a.dtype)
        pick = self.picked.get(key)
        if pick is None:
            if self.mode != "auto" or 2 * a.shape[0] * w.numel() < self.min_flops:
                pick = self.picked[key] = int(self.mode == "transposed")
            else:
                return self._time(key, products, a, w)
        return products[pick](a, w)

    def _time(self, key: tuple, products, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        best = [float("inf")] * 2
        for _ in range(self.repeats):
            for i, product in enumerate(products):
                t = self.clock()
                out = product(a, w)
                best[i] = min(best[i], self.clock() - t)
                del out  # one output alive at a time: the step's peak memory is the plan's, timing or not
        pick = self.picked[key] = int(best[1] < best[0])
        self.timings[key] = (best[0], best[1])
        return products[pick](a, w)


class _FrozenLinear(torch.autograd.Function):
    """x @ W^T + b for a frozen W (and b): the gradient reaches x only."""

    @staticmethod
    def forward(ctx, x, weight, bias, orientations: Orientations):
        ctx.save_for_backward(weight)  # the bound weight itself: a streamed layer's pack hook knows it (WeightRef)
        ctx.orientations = orientations
        y = orientations.run("forward", x.reshape(-1, x.shape[-1]), weight)  # (N, out)
        if bias is not None:
            y += bias
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (weight,) = ctx.saved_tensors
        dx = ctx.orientations.run("backward", grad.reshape(-1, grad.shape[-1]), weight)  # (N, in)
        return dx.view(*grad.shape[:-1], weight.shape[1]), None, None, None


def _frozen_forward(module: nn.Linear, orientations: Orientations):
    def forward(x: torch.Tensor) -> torch.Tensor:
        w, b = module.weight, module.bias
        if (w.requires_grad or (b is not None and b.requires_grad) or x.device.type != "cpu"
                or x.dtype != w.dtype or x.dim() < 2 or not orientations.applies(x.numel() // x.shape[-1], w)):
            return nn.functional.linear(x, w, b)  # a trained weight, another device or dtype, a small product
        return _FrozenLinear.apply(x, w, b, orientations)

    return forward


def install(orientations: Orientations, *roots: nn.Module) -> int:
    """Give every plain nn.Linear in `roots` (the decoder layers, the head: a plain nn.Linear or a module without
    one) the frozen forward above (it falls back to F.linear whenever its weight or bias is trained, or the input
    is not a CPU tensor of the weight's dtype, or the product is small). Returns how many."""
    count = 0
    for module in (m for root in roots if root is not None for m in root.modules()):  # a model may have no head
        if type(module) is nn.Linear:  # not subclasses (PEFT's LoRA wrappers hold their base nn.Linear inside)
            module.forward = _frozen_forward(module, orientations)
            count += 1
    return count
