"""The planner's GPU step-time model: how long a step streams and computes (`step_time_model`), and how
the room a budget leaves is shared between resident layers and kept activations by the step time each saves
(`split_room`).
"""

from __future__ import annotations

from typing import Optional

from .plan_bytes import ModelFacts, _text_config, hidden_streams

# CUDA, to share the room a budget leaves between resident layers and kept activations (`split_room`): the time
# model of a step, from the H200 measurements of session 6 (BENCHMARKS.md). Streaming through pinned slots, both
# stream-bound: the 7B b8 x 512 step moved 64 layers of 404 MB in 1.098 s (17.2 ms each), the TinyLlama b2 x 2048
# step ~41 of 88 MB in 0.286 s (7.0 ms each): 31 GB/s plus 4 ms per layer (the fill from the page cache sets that
# pace; zero-copy DMA from the registered page cache measured 55 GB/s, its per-layer cost is not measured: the
# staged one is assumed). The 7B b8 x 512 step of Transformers + PEFT (167 TFLOP with its recompute) took 0.607 s,
# 275 TFLOP/s; at b1 x 512 a layer's forward + backward + recompute took 15 ms whatever its FLOPs (kernel
# launches): 5 ms per forward-equivalent. Another card moves the absolute times; the split follows their ratio.
GPU_STREAM_BYTES_S = {"staged": 31e9, "zero_copy": 55e9}
GPU_STREAM_LAYER_S = 0.004  # each layer's transfer costs this much beyond its bytes
GPU_FLOPS_S = 275e12
GPU_LAUNCH_S = 0.005  # a layer's forward (or backward, or recompute) takes at least this long


def step_time_model(f: ModelFacts, batch: int, seq: int, s: int, resident: int, keep: int,
                    zero_copy: bool, offload: bool = False) -> tuple[float, float]:
    """(streaming, compute) seconds of a GPU training step with `resident` layers loaded once and `keep` layers
    keeping their activations, by the GPU_* rates: every streamed layer crosses the bus twice, and with
    `offload` every recomputed layer's input too, out and back (on a stream of their own, HostOffload); every
    layer runs forward and backward (~2 forwards: the frozen weights' gradient is not needed), a recomputed
    layer one forward more. The two overlap, so the step takes about the larger."""
    c = _text_config(f.hf_config)
    layer_bytes = f.layer_bytes
    # the weights' matmuls, and attention's two (causal: half of 4 B T^2 H)
    fwd_flops = 2 * batch * seq * (layer_bytes // s) + 2 * batch * seq * seq * c.hidden_size
    fwd_s = max(GPU_LAUNCH_S, fwd_flops / GPU_FLOPS_S)
    per_layer = layer_bytes / GPU_STREAM_BYTES_S["zero_copy" if zero_copy else "staged"] + GPU_STREAM_LAYER_S
    stream_s = 2 * (f.L - resident) * per_layer
    if offload:
        stream_s += (2 * (f.L - keep) * batch * seq * c.hidden_size * s * hidden_streams(f.hf_config)
                     / GPU_STREAM_BYTES_S["zero_copy"])
    return stream_s, (3 * f.L - keep) * fwd_s


def split_room(room: int, f: ModelFacts, batch: int, seq: int, s: int, kept_extra: int, zero_copy: bool = False,
               keep: Optional[int] = None) -> tuple[int, int]:
    """(resident layers, kept layers) for `room` bytes beyond the plan's peak without either, on a GPU.

    Greedy on the step time of `step_time_model`: one more resident layer (a ring slot's bytes) saves two
    transfers, one more kept layer (`kept_extra` bytes) saves a recompute; take whichever saves more time per
    byte, while one saves any. Streaming usually dominates (7B bf16 at b1 x 512 on the H200: 34 ms of transfer
    against 15 ms of compute per layer), so resident layers come first, until what is left to stream hides
    behind the compute. The room still left then goes to kept layers (they shorten the compute that overlap
    leaves exposed), never to more resident layers. `keep` given: only resident layers are decided."""
    slot, L = f.slot_bytes, f.L
    r, k = 0, keep or 0
    step = lambda r_, k_: max(step_time_model(f, batch, seq, s, r_, k_, zero_copy))  # noqa: E731
    while True:
        now, best = step(r, k), None
        if r < L and slot and room >= slot:
            gain = (now - step(r + 1, k)) / slot
            best = ("r", gain) if gain > 0 else best
        if keep is None and k < L and kept_extra and room >= kept_extra:
            gain = (now - step(r, k + 1)) / kept_extra
            best = ("k", gain) if gain > 0 and (best is None or gain > best[1]) else best
        if best is None:
            break
        if best[0] == "r":
            r, room = r + 1, room - slot
        else:
            k, room = k + 1, room - kept_extra
    if keep is None and kept_extra:
        k = min(L, k + max(0, int(room // kept_extra)))
    return r, k
