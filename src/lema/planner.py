"""The memory planner: what one training step needs, where it lives, and whether it fits.

Everything comes from the model's config: the skeleton is built on the meta device and PEFT's LoRA is
injected into it (so the LoRA sizes are PEFT's own); of a folder's weights only the files' headers are read,
and checked as the model checks them (plan_bytes._folder_facts).

Notation: B batch, T sequence length, a = B*T tokens, H hidden size, I MLP intermediate size,
nh / nkv attention / key-value heads, d head dim, V vocabulary, L decoder layers, r LoRA rank,
s bytes per element of the compute dtype (4 fp32, 2 bf16/fp16), k ring depth (num_buffers).

    frozen units   embed, head: their parameters x s, resident on the device (tied = once); on the CPU, with the file
                   in the compute dtype, an untied embedding is a view of the mmap (page cache): 0
                   layer i: its parameters x s; a ring slot holds the largest layer, each tensor
                   padded to 64 bytes (stream/layout.py)
    ring           k slots x slot bytes on the device; on CUDA also k pinned host slots of that
                   size in whole pages (host_memory.PinnedBuffer; host memory, outside the budget). On
                   the CPU with the weights file already in the compute dtype, and every layer tensor
                   stored as the model uses it, the ring hands out views of the mmap: page cache, no
                   anonymous memory.
    LoRA           sum over adapted linears of r x (in + out) parameters, float32
    gradients      = LoRA bytes (float32)
    optimizer      AdamW/Adam: 2 x LoRA bytes (exp_avg, exp_avg_sq, float32); SGD: 0
    optimizer step AdamW/Adam: + 1 x LoRA bytes while `step()` runs (foreach sqrt(exp_avg_sq))
    boundary       L x a x H x s: each layer's input, kept by the checkpoint for the recompute (x n for a
                   layer input of n stacked hidden states: Gemma 3n's AltUp streams)
    logits kept    a x V x s: the output's logits, alive until the step returns
    head work      a x V x (s + 12) [+ a x V x (4 + s) when s != 4]: the logits; log-softmax output
                   (fp32, saved for backward), the NLL gradient and the log-softmax gradient (fp32)
                   alive together in backward; plus the fp32 upcast and its gradient when the
                   compute dtype is not fp32
    layer work     the recompute + backward of one layer (the largest transient while layers
                   run backward), per token, in elements of size s unless marked; all but
                   `backward` are the tensors autograd saves (a kept layer keeps exactly those):
                     norms         H x 4/s (x 2 when s != 4) RMSNorm's fp32 input (the first one's is
                                                          the layer input itself in fp32), + 2 x 4/s
                     attention in  nh d + 2 nkv d         rotated q; k, v as SDPA gets them (kv heads)
                     attention out nh d + nh x 4/s        SDPA output (o_proj's input), logsumexp
                     mlp           4 I (3 I when s != 4)  gate, up, act(gate) [, act(gate) x up]
                                   3 I k + k H            MoE with frozen experts (k routed, I per expert):
                                                          gate_up, act, the down output the routing weight
                                                          scales (no input is saved for a weight gradient)
                                   m I (- I, s != 4)      an MLP without a gate (GPT-2, OPT): the act's input
                                                          and output, m = 2; ReLU (OPT) its output, m = 1;
                                                          gelu_new (GPT-2) five ops, m = 5
                     attention     3 nh T x 4/s           on the CPU with attention dropout (GPT-2's 0.1 when
                     probs                                training), SDPA takes its math path, in float32: the
                                                          B nh T T probabilities, their dropped copy, the bmm's
                                                          input (q, k, v float32 too; see `backward`)
                     dropout masks 2 H (x 1/s on CUDA)    sublayer-output dropout (GPT-2's resid_pdrop)
                     lora          n_t x r x 4/s          each adapted linear's A output (fp32), and its
                                   + 2 H                  input: the two norms' outputs when s = 4 (one when
                                                          only attention is adapted, Mixtral's default); when
                                   (Σ in_t x 4/s)         s != 4, PEFT's float32 cast of it, one per
                                                          adapted linear (Σ in_t = 6 H + I for Llama)
                     backward      2 H + 2 I              gradients alive at once in the MLP backward (the I-wide
                                                          ones x 4/s where PEFT adapts the MLP; all x 4/s for
                                                          routed experts, scaled by float32 router weights; 4 I
                                                          for Bloom's own GeLU), or, where larger, attention's
                                                          T x T gradients less the MLP's saved bytes (freed by
                                                          then): nh T x 4/s on the CPU's math path, nh T (4 + s)/s
                                                          with eager attention on the CPU (Bloom's nh T (8 + s)/s);
                                                          on a GPU eager attention adds 2 nh T x 4/s (unmeasured)
                     recurrence    (4 N + 8) I x 4/s      no attention heads: the recurrent mixer's saved
                                   24 H x 4/s             tensors, a conservative bound measured on the PyTorch
                                                          paths (Mamba's scan, N = state_size; RWKV's loop)
                     altup         (2 n + 22) H x 4/s     Gemma 3n (n AltUp streams, LAuReL, more norms): ditto
                     head norms    Σ w x 4/s              q_norm, k_norm [, v_norm] after their projection (Qwen3,
                                                          OLMo 2, Gemma 3, 4): each keeps its float32 input, w
                                                          wide (nh d for q, nkv d for k and v)
                     attention     + 2 (nh - nkv) d       attention given a mask (`padded` batches; a sliding-
                     (masked)      mask T                 window layer once T reaches the window; Falcon, which
                                                          always materialises its mask): Transformers
                                                          repeats k, v to every head, SDPA keeps the mask as a
                                                          bias in the dtype (B x T x T a layer)
                   where the layers differ (per-layer configs: Gemma 4's head_dim; per-layer lists: Gemma 3n's
                   intermediate_size), each term is its largest over the layers
                   (the saved terms checked against autograd's saved tensors of a real layer: Llama in
                   fp32 and bf16, GPT-2 in fp32 and bf16, OPT, Mixtral, Gemma 2, Qwen3, Gemma 4, padded
                   Llama, Gemma 3's window, tests/test_planner.py; rotary cos/sin and the boolean mask
                   Transformers builds are shared, SDPA's bias made from it is not)

    allocator      CPU (LEMA): layer work bytes, how far above the step's peak of live tensors LEMA's
    cache          CPU allocator may hold freed blocks of 64 KiB or more for the next tensors of their sizes
                   (cpu_allocator.py; below the peak it may keep as many as it had in use)
    kept           n_keep x saved terms: layers that keep what autograd saves instead of being
                   recomputed (their input is already counted in the boundary)
    chunked loss   (engine/chunked_loss.py) logits kept 0; head work = one chunk of c tokens'
                   float32 logits and logsumexp's shifted copy + 2 a H s, c = 64 MiB / (4 V)

Peak = frozen (embed + head + ring or all layers) + LoRA + gradients + optimizer + allocator cache
       + max(boundary + kept + head work, boundary + kept + logits kept + layer work,
             logits kept + optimizer step).

Decisions: the ring depth (applied through `num_buffers`, no more than the layers streamed); the loss, chunked when the float32
logits would pass 64 MiB (applied, LemaConfig.chunked_loss); how many layers keep their
activations: as many as the budget leaves room for (on a GPU less ALLOCATOR_SLACK, 10% of it, left
to the caching allocator's slack), or, with no budget, what the run leaves of the free memory, at most half
(applied, LemaConfig.keep_activations; the engine asks `ActivationBudget` at each new step size);
how many layers stay resident (LemaConfig.resident_layers, applied, spread through the stack; the
plan says how many more the budget allows; `lema train` lets the plan choose: on a GPU `split_room`
shares the room between resident and kept layers by the step time each saves, from a time model
calibrated on the H200; on the CPU none); where the boundary activations live: on the
device, or (GPU) in pinned host memory when only that meets the budget, or when asked
(LemaConfig.offload_activations, applied per step size like the kept layers; then the boundary
term leaves the device peak, except the kept layers' inputs).
"""

from __future__ import annotations

import mmap
import os
from typing import Optional

from .plan_bytes import (ModelFacts, chunked_head_work_bytes, head_work_bytes, hidden_streams, layer_work_terms,
                         model_facts)
from .plan_table import Plan, human, ring_depth, spread
from .plan_time import split_room, step_time_model

OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 0, "sgd-momentum": 1}
"""Float32 tensors of optimizer state per trainable parameter."""
OPTIMIZER_TEMPS = {"adamw": 1, "adam": 1, "sgd": 0, "sgd-momentum": 0}
"""Float32 temporaries per trainable parameter inside `step()` (torch's foreach Adam: sqrt(exp_avg_sq))."""

ALLOCATOR_SLACK = 0.10  # GPU: share of the budget the kept layers leave free (allocator slack, plan error)


def pinned_slot_bytes(nbytes: int) -> int:
    """Host memory a CUDA ring slot takes page-locked: its bytes in whole pages (host_memory.PinnedBuffer; torch's
    pinned allocator would round a 386 MiB slot up to 512 MiB)."""
    return -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE


class PlanError(ValueError):
    """The run cannot fit its budget; the message gives the numbers and the setting to change."""


def plan(model, dtype="float32", lora_rank: int = 16, targets: Optional[list[str]] = None,
         optimizer: str = "adamw", batch_size: int = 1, seq_len: int = 512,
         max_vram_bytes: Optional[int] = None, device_type: str = "cuda", num_buffers: int = 3,
         strategy: str = "streaming", zero_copy: Optional[bool] = None, chunked_loss: Optional[bool] = None,
         keep_activations: Optional[int] = None, free_bytes: Optional[int] = None,
         gradient_checkpointing: bool = True, facts: Optional["ModelFacts"] = None,
         page_cache: Optional[int | str] = None, resident_layers: Optional[int] = 0,
         offload_activations: Optional[bool] = None, weights_mapped: bool = False,
         host_allocator: Optional[bool] = None, padded: bool = False) -> Plan:
    """Plan one training step of `model` (a Transformers config, or a checkpoint folder).

    `zero_copy`: on the CPU, False reads the layers into slots; None or True (no more than auto there, as in
    LemaModel): views of the mmap where the folder's file holds every layer tensor in the compute dtype (a
    config alone: as if it did), and of the embedding's untied tensors stored so. On a GPU, True: the copies
    read the registered page cache (no pinned host slots), refused where that cannot apply; None: so wherever
    the engine does it on its own (`cuda_zero_copy`), else staged through pinned host slots.
    `chunked_loss`, `keep_activations`: as in LemaConfig (None: decided here, as the engine decides).
    `free_bytes`: memory the run may take beyond the plan's own peak when no budget is given (the engine
    passes what the run leaves of the free memory, at most half: plan_for_config); with neither, no layer keeps
    its activations.
    `facts`: `model_facts(model, dtype, lora_rank, targets)` computed before (it is the slow part).
    `page_cache` (streaming, but CUDA zero-copy): the pager's window in bytes, 'off', or None (as the engine
    decides it from the memory available now).
    `resident_layers` (streaming): decoder layers loaded once for the run, spread through the stack
    (LemaConfig.resident_layers); they count in the frozen bytes at the largest layer's size. None: decided
    here (`split_room`): on a GPU, the room the budget (or `free_bytes`) leaves is shared between resident
    layers and kept layers where each saves the most step time; on the CPU none (the page cache holds the
    layers; a resident copy would only take anonymous memory from it).
    `offload_activations`: the recomputed layers' inputs in pinned host memory (LemaConfig.offload_activations);
    None: on a GPU, only when the budget is not met otherwise (and then no layer keeps its activations).
    `weights_mapped` (resident, CPU): the frozen weights are views of the mmap'd weights file, none of them
    anonymous memory: how Transformers' own loader holds a file already in the compute dtype (lema bench's
    Transformers + PEFT contender; LEMA RESIDENT copies them).
    `host_allocator` (CPU): LEMA's caching CPU allocator runs and its cache counts (None: unless
    $LEMA_CPU_ALLOCATOR is "0"; lema bench's Transformers + PEFT contender: False).
    `padded`: the batches' rows are right-padded to the longest (`lema train` on rows of different lengths), so
    attention takes a mask: Transformers then repeats k and v to every head and SDPA saves the mask in each layer.
    Raises PlanError when `max_vram_bytes` is given and the predicted peak exceeds it.
    """
    from . import cpu_allocator
    from .config import parse_dtype
    from .engine.skeleton import EMBED, HEAD, model_positions

    dtype = parse_dtype(dtype)
    strategy = getattr(strategy, "value", strategy)
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer={optimizer!r} is not one of {sorted(OPTIMIZER_STATES)}")
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len), ("lora_rank", lora_rank)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name}={v!r} must be a positive integer")
    if num_buffers < 2:
        raise ValueError(f"num_buffers={num_buffers} must be >= 2")
    folder = model if isinstance(model, str) else None
    f = facts or model_facts(model, dtype, lora_rank, targets)
    positions = model_positions(f.hf_config)
    if positions and seq_len > positions:  # the step itself would refuse it (LemaModel's forward)
        raise ValueError(f"seq_len={seq_len} exceeds the model's {positions} positions; use --seq-len {positions} "
                         "or less")
    # a layer tensor built on load (Mixtral's stacked experts) cannot be served as stored: slots, on any device
    gpu_copies = None
    if device_type != "cpu" and strategy == "streaming":
        gpu_copies = cuda_zero_copy(f, dtype, folder, zero_copy, page_cache)
    gpu_zero_copy = gpu_copies == "zero-copy"  # at the bus's rate
    host_slots = device_type != "cpu" and strategy == "streaming" and not gpu_zero_copy
    # the CPU's views, as LemaModel decides them (True is no more than auto there): the layers where the file holds
    # every layer tensor in the compute dtype, as used; of the embedding, its untied tensors stored so
    embed_views = zero_copy is not False
    zero_copy = zero_copy is not False and f.layers_stored_as_held() and f.layers_as_stored
    hf_config, unit_bytes, slot_bytes, L, V, H = f.hf_config, f.unit_bytes, f.slot_bytes, f.L, f.V, f.H
    lora_params = f.lora_params
    s = dtype.itemsize
    lora_bytes = lora_params * 4
    grad_bytes = lora_bytes
    optimizer_bytes = OPTIMIZER_STATES[optimizer] * lora_bytes
    optimizer_temp = OPTIMIZER_TEMPS[optimizer] * lora_bytes

    from .engine.chunked_loss import CHUNK_BYTES, chunk_rows

    a = batch_size * seq_len
    layer_input = a * H * s * hidden_streams(hf_config)  # a layer's input, which the recompute keeps
    boundary = L * layer_input
    chunked = f.chunk_ok and chunked_loss is not False and (bool(chunked_loss) or a * V * 4 > CHUNK_BYTES)
    if chunked:
        logits = 0
        head_work = chunked_head_work_bytes(a, V, H, s, chunk_rows(V), f.softcap)
    else:
        logits = a * V * s
        head_work = head_work_bytes(a, V, s, f.softcap, device_type)
    terms = layer_work_terms(hf_config, a, s, lora_rank, f.n_targets, f.lora_in_features, seq_len, device_type,
                             f.mlp_gated, f.experts_adapted, f.mlp_adapted, f.norms, f.eager_attention, f.head_norms,
                             padded)
    layer_work = sum(terms.values())
    layer_saved = layer_work - terms["backward"]
    kept_extra = layer_saved  # what a kept layer saves beyond its input (the input is in the boundary)

    cpu = device_type == "cpu"
    # on the CPU, LEMA's CPU allocator keeps up to one layer's transient of freed blocks (cpu_allocator.py)
    cache = layer_work if cpu and (cpu_allocator.enabled() if host_allocator is None else host_allocator) else 0
    layers_total = sum(b for u, b in unit_bytes.items() if u not in (EMBED, HEAD))
    embed_view = f.embedding_view() if cpu and embed_views else 0  # LemaModel._load_resident_units
    embed = unit_bytes[EMBED] - embed_view

    def peak_of(depth: int, on_device_acts: bool = True, keep: int = 0) -> tuple[int, int, int, str]:
        """The peak with a ring of `depth`; `on_device_acts` False: the recomputed layers' inputs on the host
        (a kept layer's input stays with its other activations on the device)."""
        if strategy == "resident":
            ring_dev = 0
            frozen = 0 if weights_mapped and cpu else embed + unit_bytes[HEAD] + layers_total
        else:
            ring_dev = 0 if (cpu and zero_copy) or resident >= L else depth * slot_bytes  # all resident: no ring
            frozen = embed + unit_bytes[HEAD] + ring_dev + resident * slot_bytes
        fixed = frozen + lora_bytes + grad_bytes + optimizer_bytes + cache
        static = fixed + (boundary if on_device_acts else keep * layer_input) + keep * kept_extra
        prefetched = 0 if on_device_acts else layer_input  # offloaded: the next layer's input copied back early
        phases = {"the loss (head forward/backward)": static + head_work,
                  "the first layer's recompute in backward": static + logits + layer_work + prefetched,
                  "the optimizer step": fixed + logits + optimizer_temp}
        phase = max(phases, key=phases.get)
        return phases[phase], ring_dev, frozen, phase

    depth = num_buffers
    auto_resident = resident_layers is None and strategy == "streaming" and not cpu and L > 0
    resident = min(resident_layers or 0, L) if strategy == "streaming" else 0
    recompute = strategy == "streaming" or gradient_checkpointing
    # the boundary on the host: asked for, or (None, on a GPU) what makes the budget when nothing else does
    offload = recompute and not cpu and (offload_activations is True or (
        offload_activations is None and max_vram_bytes is not None and peak_of(depth)[0] > max_vram_bytes
        and peak_of(depth, on_device_acts=False)[0] <= max_vram_bytes))
    # on a GPU the caching allocator holds more than the live tensors (blocks split and cached): the kept
    # layers and resident layers, speed choices, leave that slack free (the 7B b1 x 4096 plan that filled 16 GB
    # to 14.4 GiB planned ran out of memory with 0.7 GiB reserved but unallocated)
    usable = (max_vram_bytes * (1 - ALLOCATOR_SLACK) if not cpu else max_vram_bytes) \
        if max_vram_bytes is not None else None
    if not recompute:
        keep = 0
    elif keep_activations is not None:
        keep = min(keep_activations, L)
    elif offload and offload_activations is None:
        keep = 0  # offloading was needed to fit: nothing to spare for kept layers
    else:
        room = (usable - peak_of(depth, not offload)[0]) if usable is not None else free_bytes
        if auto_resident and room is not None:
            resident, keep = split_room(room, f, batch_size, seq_len, s, kept_extra, gpu_zero_copy)
        else:
            keep = max(0, min(L, int(room // kept_extra))) if room is not None and kept_extra else 0
    if auto_resident and keep_activations is not None and not offload:  # kept layers fixed: resident takes the rest
        room = (usable - peak_of(depth, not offload, keep=keep)[0]) if usable is not None else free_bytes
        if room is not None:
            resident = split_room(room, f, batch_size, seq_len, s, kept_extra, gpu_zero_copy, keep=keep)[0]
    if strategy == "streaming":  # as LemaModel makes the ring (all resident: peak_of counts none)
        depth = ring_depth(num_buffers, L - resident) or depth
    peak, ring_dev, frozen, phase = peak_of(depth, not offload, keep=keep)
    p = Plan(model_type=f.model_type, dtype=dtype, device_type=device_type, strategy=strategy,
             batch_size=batch_size, seq_len=seq_len, lora_rank=lora_rank, max_vram_bytes=max_vram_bytes,
             num_layers=L, unit_bytes=unit_bytes, slot_bytes=slot_bytes, lora_params=lora_params,
             lora_bytes=lora_bytes, grad_bytes=grad_bytes, optimizer_bytes=optimizer_bytes,
             boundary_bytes=boundary, hidden_streams=hidden_streams(hf_config), logits_bytes=logits,
             shared_layer_bytes=f.shared_layer_bytes,
             head_work_bytes=head_work,
             layer_work_bytes=layer_work, layer_saved_bytes=layer_saved, ring_depth=depth,
             ring_device_bytes=ring_dev,
             ring_host_bytes=depth * pinned_slot_bytes(slot_bytes) if host_slots and resident < L else 0,
             frozen_device_bytes=frozen, peak_bytes=peak, peak_phase=phase, layer_terms=terms,
             chunked_loss=chunked, kept_layers=keep, kept_extra_bytes=kept_extra,
             keep_decided_at_run_time=recompute and keep_activations is None and max_vram_bytes is None
             and free_bytes is None, resident_layers=resident, resident_layer_indices=spread(resident, L),
             resident_auto=resident_layers is None and strategy == "streaming",
             modelled_s=step_time_model(f, batch_size, seq_len, s, resident, keep, gpu_zero_copy, offload)
             if strategy == "streaming" and not cpu and L else None,
             activations_on="host" if offload else "device", embedding_view_bytes=embed_view,
             allocator_cache_bytes=cache, gpu_copies=gpu_copies)
    for flag, asked in (("--keep-activations", keep_activations), ("--resident-layers", resident_layers)):
        if asked is not None and asked > L:  # applied as all of them; said, not silently clamped
            p.advice.append(f"{flag} {asked} is more than the model's {L} decoder layers: all {L} apply")
    stored = sorted((d for d in f.layer_dtypes if d.is_floating_point), key=str) or (
        [f.file_dtype] if f.file_dtype is not None and f.file_dtype.is_floating_point else [])
    if strategy == "streaming" and L and not gpu_zero_copy:  # CUDA zero-copy locks the layers' pages in RAM
        # the page cache holds the file's bytes: another dtype's size where the layers are converted on load
        _page_cache(p, f.layer_file_bytes or layers_total, page_cache)
    _decide(p, lambda d, on_device_acts=not offload: peak_of(d, on_device_acts, keep), num_buffers, zero_copy)
    if folder and f.from_folder and not f.safetensors:  # a config alone plans; train and generate need weights
        import glob

        from .convert import ConvertError, resolve_source

        try:  # the source `lema convert` takes the folder as (its .bin shards)
            kind = resolve_source(folder).kind
        except ConvertError:
            kind = None
        ggufs = sorted(glob.glob(os.path.join(folder, "*.gguf")))  # beside a config.json convert takes one by name
        if kind == "bin":
            p.advice.append(f"{folder!r} holds .bin weights, not safetensors: planned from its config; `lema train` "
                            f"streams them after `lema convert {folder} OUT`")
        elif ggufs:
            p.advice.append(f"{folder!r} holds GGUF weights, not safetensors: planned from its config; `lema train` "
                            f"streams them after `lema convert {ggufs[0]} OUT`")
        else:
            p.advice.append(f"{folder!r} holds no weights: planned from its config alone; `lema train` needs its "
                            "safetensors weights beside it")
    if strategy == "streaming" and folder and L > p.resident_layers:
        converted = [] if f.layers_as_stored else ["built on load from several tensors (experts stacked)"]
        if stored and not f.layers_stored_as_held():
            # all in the compute dtype, yet not as held: tensors Transformers holds in float32 (Ernie 4.5's router)
            converted.insert(0, "stored in " + " and ".join(str(d).split(".")[-1] for d in stored)
                             + (f", not as held ({f.not_held})" if set(stored) == {dtype} else ""))
        if converted:
            name = str(dtype).split(".")[-1]
            p.advice.append(f"the layers are {' and '.join(converted)}: every load converts them, in the loader "
                            f"thread (up to {2 * (L - p.resident_layers)} loads a step, CPU time beside the compute); "
                            f"`lema convert {folder} OUT --dtype {name}` stores them as used, once")
    return p


def cuda_zero_copy(f: ModelFacts, dtype, folder: Optional[str], zero_copy: Optional[bool],
                   page_cache: Optional[int | str]) -> str:
    """How a GPU's layer copies read the host (LemaModel's rule): "zero-copy" (the layers' file pages registered
    with CUDA, each copy one DMA from them; `zero_copy` True, or None where the file holds the layers as used in
    the compute dtype, no page-cache size asks for the pager, and they fit in the RAM, where their pages stay
    locked), else "staged: <why>" (through pinned host slots). Auto counts every layer against the RAM, in the
    plan (before it decides which stay resident) and in the engine alike; asked for, the engine counts the
    streamed layers, the ones it locks."""
    from .engine.skeleton import EMBED, HEAD
    from .host_memory import memory_available
    from .stream.pager import RESERVE_BYTES

    if zero_copy is False:
        return "staged: --zero-copy off"
    why = None
    if not f.layers_as_stored:
        why = "layer tensors built on load (experts stacked)"
    elif folder and not f.safetensors:  # LemaModel refuses them, naming `lema convert`: no zero-copy error first
        return "staged: no safetensors weights in the folder (`lema convert` makes them)"
    elif folder and not f.layers_stored_as_held():
        held = ", ".join(sorted(str(d).split(".")[-1] for d in f.layer_dtypes))
        why = f"the file holds the layers in {held}, converted on the way" + (
            f" ({f.not_held})" if f.layer_dtypes == {dtype} else "")
    if why is not None and zero_copy:  # asked for: LemaModel refuses it, and so does the plan
        raise ValueError(f"zero_copy=True on cuda: {why}; use --zero-copy auto to stage each layer through pinned "
                         "host slots")
    if why is not None:
        return f"staged: {why}"
    if zero_copy:
        return "zero-copy"
    if page_cache not in (None, "off"):
        return "staged: --page-cache sets the pager's window"
    layers = sum(b for u, b in f.unit_bytes.items() if u not in (EMBED, HEAD))
    if layers > memory_available() - RESERVE_BYTES:
        return f"staged: the layers ({layers / 2**30:.1f} GiB) do not fit in the RAM, where they would stay locked"
    return "zero-copy"


def _page_cache(p: Plan, layers_total: int, page_cache: Optional[int | str]) -> None:
    """How many layers stay in the page cache and what a training step reads from disk (stream/pager.py:
    a window of C of L layers reads L - C layers in each direction)."""
    from .host_memory import memory_available
    from .stream.pager import RESERVE_BYTES

    # As the pager sizes it at each pass: the memory available then, which the run's own weights, adapters and
    # optimizer state (allocated by then; on a GPU, the pinned slots) no longer count in, less the reserve for a
    # step's activations.
    fixed = (p.frozen_device_bytes + p.lora_bytes + p.grad_bytes + p.optimizer_bytes if p.device_type == "cpu"
             else p.ring_host_bytes)
    cache = max(0, memory_available() - fixed - RESERVE_BYTES) if page_cache in (None, "off") else int(page_cache)
    pager = page_cache != "off" and (page_cache is not None or layers_total > cache)
    per_layer = layers_total / p.num_layers
    streamed = p.num_layers - p.resident_layers  # resident layers are copies, read once
    held = min(streamed, max(2 if pager else 0, int(cache // per_layer)))
    if pager and page_cache not in (None, "off") and cache < 2 * per_layer and streamed > 2:
        p.advice.append(f"--page-cache {human(cache)} is less than two layers ({human(2 * per_layer)}): the pager "
                        "holds two")
    p.page_cache_layers = held
    p.page_cache_window = cache if pager else 0
    p.page_cache_adaptive = pager and page_cache is None
    p.disk_read_bytes = int(2 * (streamed - held) * per_layer)


def _decide(p: Plan, peak_of, num_buffers: int, zero_copy: bool) -> None:
    """Fill the decisions and advice of `p`; raise PlanError when it cannot fit."""
    budget = p.max_vram_bytes
    L = p.num_layers
    streaming = p.strategy == "streaming"
    ring_costs = streaming and not (p.device_type == "cpu" and zero_copy)
    if budget is None:
        p.resident_layers_fit = p.resident_layers
        if streaming:
            p.advice.append("no --max-vram given: nothing checked against a budget")
        return
    two_slots = peak_of(2)[0] if p.peak_bytes > budget and ring_costs and num_buffers > 2 else None
    if two_slots is not None and two_slots <= budget:
        p.advice.append(f"--num-buffers {num_buffers} does not fit, 2 does: set --num-buffers 2 "
                        "(loads then overlap compute less)")
    if p.peak_bytes > budget:
        no_acts = peak_of(p.ring_depth, on_device_acts=False)[0]
        offload_fits = p.device_type != "cpu" and p.activations_on == "device" and no_acts <= budget
        _refuse(p, budget, no_acts if offload_fits else None,
                two_slots if two_slots is not None and two_slots <= budget else None)
    free = budget - p.peak_bytes
    if ring_costs:
        extra = int(free // p.slot_bytes) if p.slot_bytes else 0
        cap = ring_depth(L, L - p.resident_layers)  # as the engine: no more slots than layers to stream
        p.ring_depth_fit = p.ring_depth + min(extra, max(0, cap - p.ring_depth))
        if p.ring_depth_fit > p.ring_depth:
            p.advice.append(f"a ring of {p.ring_depth + 1} would fit; it helps only when single loads are "
                            "uneven (compute-bound runs gain nothing)")
    if streaming and p.slot_bytes:
        p.resident_layers_fit = min(L, p.resident_layers + int(free // p.slot_bytes))


def _refuse(p: Plan, budget: int, without_acts: Optional[int], two_slots: Optional[int] = None) -> None:
    """Raise the PlanError naming the settings that would make the run fit (`without_acts`: the peak with the
    boundary activations offloaded, when that fits and offloading was turned off; `two_slots`: the peak with
    a ring of 2, when that fits)."""
    over = p.peak_bytes - budget
    kept = p.kept_layers * p.kept_extra_bytes
    acts = p.boundary_bytes + kept + max(p.head_work_bytes, p.logits_bytes + p.layer_work_bytes) \
        + p.allocator_cache_bytes  # one layer's work too: it scales with the tokens
    fixed = p.peak_bytes - acts
    lines = [f"the run needs {human(p.peak_bytes)} of {p.device_type} memory at its peak ({p.peak_phase}) "
             f"but --max-vram is {human(budget)} ({human(over)} over)."]
    if fixed >= budget:
        lines.append(f"Weights, ring, LoRA and optimizer alone take {human(fixed)}: raise --max-vram above "
                     f"{human(fixed + acts)}, or lower --lora-rank / --num-buffers.")
    else:
        # activations scale with batch x seq: the largest batch that fits at this seq_len
        per_token = acts / (p.batch_size * p.seq_len)
        tokens = int((budget - fixed) // per_token) if per_token else 0
        fixes = ([f"lower --batch-size to {tokens // p.seq_len}"] if tokens // p.seq_len >= 1 else []) + \
            ([f"lower --seq-len to {tokens // p.batch_size}"] if tokens // p.batch_size >= 1 else []) + \
            [f"raise --max-vram to at least {human(p.peak_bytes)}"]
        lines.append(f"Activations (batch {p.batch_size} x seq {p.seq_len}) take {human(acts)}; "
                     f"about {tokens:,} tokens per step fit: {', '.join(fixes[:-1])}"
                     f"{' or ' if len(fixes) > 1 else ''}{fixes[-1]}.")
        if kept:
            lines.append(f"{p.kept_layers} layers keep their activations ({human(kept)}): lower "
                         "--keep-activations to trade memory for recompute.")
        if without_acts is not None:
            lines.append(f"With the boundary activations in pinned host memory it needs {human(without_acts)}: "
                         "--offload-activations on.")
    if p.resident_layers:
        lines.append(f"{p.resident_layers} resident layers take {human(p.resident_layers * p.slot_bytes)}: "
                     "lower --resident-layers.")
    if two_slots is not None:
        lines.append(f"With --num-buffers 2 it needs {human(two_slots)}, which fits (loads then overlap compute less).")
    raise PlanError(" ".join(lines))


def free_memory_bytes(device) -> int:
    """Memory free for activations now: the device's free memory on CUDA, MemAvailable on the CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    from .host_memory import memory_available

    return memory_available()


def plan_for_config(config, batch_size: int, seq_len: int, optimizer: str = "adamw",
                    facts: Optional[ModelFacts] = None, free_bytes: Optional[int] = None,
                    auto_resident: bool = False, free_now: Optional[int] = None,
                    allocated: bool = False, padded: bool = False) -> Plan:
    """The plan of a `LemaConfig` run (for `lema train` to print before it allocates). Without a budget
    (max_vram), `free_bytes` bounds the kept activations (and, with `auto_resident`, the resident layers) beyond
    the plan's peak, as in the engine; by default half the memory free now (`free_now`, else measured), and no
    more than what the run without them leaves of it: kept layers, a speed choice, never take a run past the
    free memory (`allocated`: `free_now` was measured with the model's weights and adapters already in memory,
    so they are not taken from it twice). `auto_resident`: the plan decides the resident layers
    (config.resident_layers ignored; `lema train` then builds the model with the plan's number: it is fixed for
    the run, unlike the kept layers). `padded`: as in `plan`."""
    facts = facts or model_facts(config.model_name_or_path, config.torch_dtype, config.lora_rank,
                                 config.lora_target_modules, config.gbi_path)

    def planned(free_bytes, keep_activations, resident_layers):
        return plan(config.model_name_or_path, config.torch_dtype, config.lora_rank, config.lora_target_modules,
                    optimizer, batch_size, seq_len, config.max_vram_bytes, config.torch_device.type,
                    config.num_buffers, config.strategy,
                    # CPU: views only where the file is in the compute dtype (the engine's rule; None reads it);
                    # CUDA: zero-copy as asked (the engine refuses it where the dtype differs)
                    zero_copy=config.zero_copy if config.torch_device.type != "cpu" or config.zero_copy is False
                    else None,
                    chunked_loss=config.chunked_loss,
                    keep_activations=keep_activations, free_bytes=free_bytes,
                    gradient_checkpointing=config.gradient_checkpointing, facts=facts,
                    page_cache="off" if config.page_cache == "off" else config.page_cache_bytes,
                    resident_layers=resident_layers, offload_activations=config.offload_activations,
                    padded=padded)

    resident = None if auto_resident else config.resident_layers
    if free_bytes is None and config.max_vram_bytes is None:
        free_now = free_memory_bytes(config.torch_device) if free_now is None else free_now
        # the run with no layer kept (nor resident, where the plan would choose them): what it leaves free
        base = planned(0, 0 if config.keep_activations is None else config.keep_activations,
                       0 if resident is None else resident)
        need = base.peak_bytes - (base.frozen_device_bytes + base.lora_bytes if allocated else 0)
        # on a GPU the caching allocator's slack stays free, as under a budget (ALLOCATOR_SLACK)
        usable = free_now if config.torch_device.type == "cpu" else int(free_now * (1 - ALLOCATOR_SLACK))
        free_bytes = max(0, min(free_now // 2, usable - need))
    return planned(free_bytes, config.keep_activations, resident)


class ActivationBudget:
    """The engine's run-time answers for a step of `tokens` tokens (`seq_len` per row where known: attention's
    T x T terms need it): how many layers keep their activations (LemaModel.kept_layers), whether the boundary
    goes to host memory (LemaModel.offloads_activations) and how much memory the step will still take beyond
    the weights and adapters (`step_growth`, for the CPU's page-cache pager) and the CPU allocator's cache
    (`allocator_cache`): the plan's own decisions,
    computed once per step shape (`padded`: a batch with padding, whose attention takes a mask; plan's)."""

    def __init__(self, config, free_bytes: Optional[int] = None, held_bytes: int = 0):
        self.config = config
        self.facts = model_facts(config.model_name_or_path, config.torch_dtype, config.lora_rank,
                                 config.lora_target_modules, config.gbi_path)
        self.free_bytes = free_bytes  # None: from the memory free at construction (plan_for_config)
        # with the weights and adapters in memory (`allocated`), and `held_bytes` of what the plan's peak counts
        # beside them (a loaded optimizer state), which the plan's peak takes from the free memory again
        self.free_now = free_memory_bytes(config.torch_device) + held_bytes if free_bytes is None \
            and config.max_vram_bytes is None else None
        self._cache: dict[tuple, tuple[int, bool, int, int]] = {}

    def _decide(self, tokens: int, seq_len: Optional[int], padded: bool) -> tuple[int, bool, int, int]:
        key = (tokens, seq_len, padded)
        if key not in self._cache:
            batch, seq = (tokens // seq_len, seq_len) if seq_len and tokens % seq_len == 0 else (1, max(1, tokens))
            try:
                p = plan_for_config(self.config, batch, seq, facts=self.facts, free_bytes=self.free_bytes,
                                    free_now=self.free_now, allocated=True, padded=padded)
                self._cache[key] = (p.kept_layers, p.activations_on == "host",
                                    max(0, p.peak_bytes - p.frozen_device_bytes - p.lora_bytes),
                                    p.allocator_cache_bytes)
            except PlanError:  # over budget even so: keep nothing, offload what can be (the plan printed said so)
                self._cache[key] = (0, self.config.torch_device.type == "cuda"
                                    and self.config.offload_activations is not False, 0, 0)
        return self._cache[key]

    def keepable_layers(self, tokens: int, seq_len: Optional[int] = None, padded: bool = False) -> int:
        return self._decide(tokens, seq_len, padded)[0]

    def offloads(self, tokens: int, seq_len: Optional[int] = None, padded: bool = False) -> bool:
        return self._decide(tokens, seq_len, padded)[1]

    def step_growth(self, tokens: int, seq_len: Optional[int] = None, padded: bool = False) -> int:
        return self._decide(tokens, seq_len, padded)[2]

    def allocator_cache(self, tokens: int, seq_len: Optional[int] = None, padded: bool = False) -> int:
        """The most freed memory LEMA's CPU allocator may keep in a step of this size (the plan's row)."""
        return self._decide(tokens, seq_len, padded)[3]
