"""The planner's byte arithmetic: what one decoder layer's recompute and backward, the head and the loss
hold in one step (`layer_work_terms`, `head_work_bytes`, `chunked_head_work_bytes`; the formulas in planner.py's
docstring), and the model's own sizes they start from (`ModelFacts`, measured by `model_facts` on the meta
skeleton with PEFT's LoRA in it; no weight is read).
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # for annotations; the functions import torch themselves
    import torch

ALIGN = 64  # stream/layout.py pads each tensor of an unpacked slot to this many bytes


def largest_layer_bytes(unit_bytes: dict[str, int]) -> int:
    """The largest decoder layer's weight bytes."""
    return max((b for u, b in unit_bytes.items() if u.startswith("layer.")), default=0)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _text_config(hf_config):
    from .engine.skeleton import text_config  # imported here: the planner's module loads without torch's models

    return text_config(hf_config)


def hidden_streams(hf_config) -> int:
    """How many H-wide hidden states a decoder layer takes and returns per token: 1, or Gemma 3n's AltUp
    streams (altup_num_inputs), stacked into each layer's input (its boundary activation)."""
    return getattr(_text_config(hf_config), "altup_num_inputs", None) or 1


# An MLP without a gate (fc -> act -> proj): per token, the I-wide tensors it saves: the activation's input and
# output (F.gelu, silu); ReLU keeps its output alone; gelu_new (GPT-2's) is five ops saving three more
UNGATED_MLP_SAVED = {"relu": 1, "gelu_new": 5, "quick_gelu": 3}
ALWAYS_MASKED = {"falcon"}  # models that always hand SDPA a materialised mask (Falcon's, for its ALiBi variant:
# `create_causal_mask(..., allow_is_causal_skip=False)` in Transformers 5.23)
OWN_ATTENTION = {"bloom"}  # its own attention (baddbmm with ALiBi, float32 softmax, dropout) and GeLU function:
# in backward one float32 B x nh x T x T more than eager attention, and 4 I-wide gradients (3.5 measured), not 2


def _layer_configs(hf_config) -> list:
    """The text config as each decoder layer sees it: Transformers' per-layer configs where the layers differ
    (`per_layer_config`: Gemma 4's full-attention layers have their own head_dim and kv heads; the global config
    then refuses to answer for them), else the one config for every layer."""
    c = _text_config(hf_config)
    L = getattr(c, "num_hidden_layers", None) or 1
    return [c.per_layer_config[i] for i in range(L)] if getattr(c, "is_heterogeneous", False) else [c] * L


def _of_layer(value, i: int, L: int):
    """A setting as layer i of L has it: a list holds one per layer (Gemma 3n's intermediate_size), or, of
    another length, its largest is taken."""
    if isinstance(value, (list, tuple)):
        return value[i] if len(value) == L else max(value, default=None)
    return value


def layer_work_terms(hf_config, a: int, s: int, lora_rank: int, n_targets: int,
                     lora_in_features: Optional[int] = None, seq_len: Optional[int] = None,
                     device_type: str = "cuda", mlp_gated: bool = True,
                     experts_adapted: bool = False, mlp_adapted: bool = True, norms: int = 2,
                     eager_attention: bool = False, head_norms: int = 0, padded: bool = False) -> dict[str, int]:
    """Bytes of one layer's recompute + backward working set, term by term (see planner.py's module docstring).
    `lora_in_features`: the adapted linears' input widths, summed over one layer (default: Llama's seven,
    6 H + I). `mlp_gated` False: an MLP without a gate projection (GPT-2's fc -> act -> proj). `seq_len` and
    `device_type`: where attention has dropout, the CPU's SDPA saves the T x T probabilities (its math path).
    `norms`: hidden-width norms per layer (2 in the formulas). `eager_attention`: Transformers' eager attention
    (Gemma 2, for its soft-capping), which keeps the T x T scores and k, v repeated to every head. `head_norms`:
    the widths, summed, of the projections that attention normalises before use (Qwen3's and Gemma 3's q_norm
    and k_norm, Gemma 4's v_norm too; ModelFacts.head_norms), whose float32 input each norm keeps. `padded`: the
    batch's rows are right-padded (an attention mask with zeros), so every layer's attention takes a mask, as a
    sliding-window layer does once the sequence reaches its window.
    Where the layers differ (heads, head_dim or MLP width set per layer), each term is its largest over the
    layers: the peak is the largest layer's recompute, and a kept layer is counted as the largest (a bound)."""
    configs = _layer_configs(hf_config)
    terms: dict[str, int] = {}
    for i, c in enumerate(configs):
        one = _one_layer_terms(c, i, len(configs), a, s, lora_rank, n_targets, lora_in_features, seq_len,
                               device_type, mlp_gated, experts_adapted, mlp_adapted, norms, eager_attention, padded)
        for name, b in one.items():
            terms[name] = max(terms.get(name, 0), b)
    if head_norms:
        terms["head norms"] = a * 4 * head_norms  # the input in float32 (upcast in 16 bits, itself in fp32)
    return terms


def _one_layer_terms(c, i: int, L: int, a: int, s: int, lora_rank: int, n_targets: int,
                     lora_in_features: Optional[int], seq_len: Optional[int], device_type: str, mlp_gated: bool,
                     experts_adapted: bool, mlp_adapted: bool, norms: int = 2,
                     eager_attention: bool = False, padded: bool = False) -> dict[str, int]:
    """layer_work_terms of layer i of L, whose config is `c`."""
    def get(*names):  # the first of the settings `names` this layer has
        return next((v for v in (_of_layer(getattr(c, n, None), i, L) for n in names) if v), None)

    H = c.hidden_size
    nh = get("num_attention_heads", "n_head") or 0  # 0: no attention (Mamba, RWKV): no attention terms
    # Falcon names no num_key_value_heads: its new architecture repeats its num_kv_heads to every head before
    # attention (nh is right); multi-query Falcon-7B keeps one, over-counted here by 2 (nh - 1) d
    nkv = get("num_key_value_heads") or nh
    d = get("head_dim") or (H // nh if nh else 0)
    I = get("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size") or 4 * H
    if getattr(c, "use_double_wide_mlp", False) and getattr(c, "num_kv_shared_layers", 0):
        I *= 2  # Gemma 4: the kv-shared layers' MLP is twice as wide
    k = getattr(c, "num_experts_per_tok", None)
    if k:  # MoE: the routed experts' intermediates
        I *= k
    f32 = 4
    cast = s != f32  # PEFT casts each adapted linear's input to the adapters' float32: a copy per linear
    lora_in = lora_in_features if lora_in_features is not None else 6 * H + I
    if k and not experts_adapted:
        # frozen experts save no input for a weight gradient: each routed copy keeps its gate_up output, the
        # activation's output and its down output (scaled by the routing weight)
        mlp = 3 + k * H / I
    elif mlp_gated:
        mlp = 3 if cast else 4
    else:
        act = _activation(c)
        mlp = UNGATED_MLP_SAVED.get(act, 2) - (1 if cast and act != "relu" else 0)
    # I-wide gradients alive at once in the MLP's backward: 2 (Llama's gated MLP, GPT-2's gelu_new, OPT's ReLU,
    # GELU, Falcon, routed experts: measured); Bloom's own GeLU function 4 (3.5 measured)
    own = getattr(c, "model_type", None) in OWN_ATTENTION
    mlp_grads = 4 if own else 2
    dropout = getattr(c, "attn_pdrop", None) or getattr(c, "attention_dropout", None) or 0.0
    math_path = device_type == "cpu" and dropout > 0 and seq_len is not None and nh > 0  # no fused CPU kernel
    attention_grads = 0  # attention's T x T gradients in backward, once the MLP's saved tensors are freed
    terms = {
        "norms": a * (H * f32 * (2 if cast else 1) + 2 * f32) * norms // 2,
        "attention in": a * (f32 if math_path else s) * (nh * d + 2 * nkv * d),
        "attention out": a * (s * nh * d + nh * f32),
        "mlp": int(a * s * I * mlp),
        "lora": a * (n_targets * lora_rank * f32 + (lora_in * f32 if cast else (2 if mlp_adapted else 1) * H * s)),
        # gradients alive at once in the MLP's backward: two hidden-width and `mlp_grads` I-wide, the I-wide ones
        # in float32 where the MLP's linears are adapted (PEFT's float32 path); routed experts: as many bytes as in
        # float32 in any dtype (measured, Mixtral bf16 and fp32: their outputs are scaled by the router's float32
        # weights). Attention's T x T ones come once the MLP's saved tensors are freed (below, on the CPU)
        "backward": a * (2 * H * (f32 if k else s) + mlp_grads * I * (f32 if mlp_adapted or k else s)),
    }
    if math_path:  # the probabilities, their dropped copy and the bmm's input: B x nh x T x T each, and like
        # q, k, v in float32 (the CPU's math path upcasts bf16/fp16). In backward, once the MLP's saved tensors
        # are freed, one T x T gradient at a time (each node frees what it saved as it runs)
        terms["attention probs"] = 3 * a * nh * seq_len * f32
        attention_grads = a * nh * seq_len * f32
    elif eager_attention and nh and seq_len:
        # eager attention: the float32 softmax, its cast to the dtype (the second bmm's input), the soft-capping's
        # tanh; k and v repeated to all nh heads. In backward, once the MLP's saved tensors are freed, the
        # softmax's gradient in float32 and the scores' in the dtype (B x nh x T x T each)
        cap = bool(getattr(c, "attn_logit_softcapping", None))
        terms["attention probs"] = a * nh * seq_len * (f32 + (s if s != f32 else 0) + (s if cap else 0))
        terms["attention in"] += 2 * a * (nh - nkv) * d * s
        if device_type == "cpu":  # measured: Gemma 2, Bloom
            attention_grads = a * nh * seq_len * (f32 + s + (f32 if own else 0))
        else:  # the former sum, two float32 T x T on top, until measured on a GPU (its caching allocator may not
            # hand the MLP's freed blocks to the T x T gradients)
            terms["backward"] += 2 * a * nh * seq_len * f32
    elif nh and seq_len:
        # SDPA given a mask (padding, or a sliding window or attention chunk the sequence reaches): Transformers
        # repeats k and v to every head (use_gqa_in_sdpa: only without a mask, and head_dim <= 256: Gemma 4's
        # global layers repeat them always), and SDPA saves the mask as a bias in the dtype, B x T x T, in each
        # layer (measured on the CPU, GQA 8/2: 2 (nh - nkv) d + T elements a token)
        masked = padded or _window_reached(c, i, L, seq_len) or getattr(c, "model_type", None) in ALWAYS_MASKED
        if masked or d > 256:
            terms["attention in"] += 2 * a * (nh - nkv) * d * s
        if masked:
            terms["attention mask"] = a * seq_len * s
    terms["backward"] = max(terms["backward"], attention_grads - terms["mlp"])
    if not nh:
        # no attention: a recurrent mixer the terms above do not describe. A conservative estimate of what it
        # saves, float32 per token, as measured on Transformers' PyTorch paths (the CPU's; a fused CUDA kernel
        # saves less), counted on top of the terms above: Mamba's scan (N = state_size: the discretised A, B x u
        # and the scanned states) 3.1-3.5 N I + 6-8 I, counted 4 N I + 8 I; RWKV's time loop 16-20 H, counted 24
        N = get("state_size")
        terms["recurrence"] = a * f32 * ((4 * N + 8) * I if N else 24 * (get("attention_hidden_size") or H))
    n_streams = getattr(c, "altup_num_inputs", None)
    if n_streams:
        # Gemma 3n's layer (AltUp's n streams of the hidden state, LAuReL, its per-layer input, more norms) saves
        # 20-25 H float32 per token beyond the terms above (12-15 in bf16; tiny configs, H 32-128): counted
        # conservatively as the stacked streams twice and 22 H
        terms["altup"] = a * f32 * H * (2 * n_streams + 22)
    resid = getattr(c, "resid_pdrop", None) or getattr(c, "hidden_dropout", None) or getattr(c, "dropout", None)
    if isinstance(resid, float) and resid > 0:
        # dropout on each sublayer's output (GPT-2's and OPT's two): the CPU keeps a mask in the dtype, CUDA bytes
        terms["dropout masks"] = 2 * a * H * (s if device_type == "cpu" else 1)
    return terms


def _activation(c) -> Optional[str]:
    """The MLP's activation as the config names it (Falcon's `activation`), or None (Bloom's own GeLU)."""
    return getattr(c, "hidden_act", None) or getattr(c, "activation_function", None) or getattr(c, "activation", None)


def _window_reached(c, i: int, L: int, seq_len: int) -> bool:
    """Whether layer i attends through a sliding window, or in chunks, that a sequence of `seq_len` reaches
    (Transformers then builds a mask; below it lets SDPA mask causally): layer_types says which layers slide
    (Gemma 2/3, gpt-oss) or chunk (Llama 4's attention_chunk_size); without it a sliding_window applies to every
    layer (Mistral)."""
    kind = _of_layer(getattr(c, "layer_types", None), i, L)
    if kind == "chunked_attention":
        chunk = getattr(c, "attention_chunk_size", None)
        return bool(chunk) and seq_len >= chunk
    window = getattr(c, "sliding_window", None)
    return bool(window) and seq_len >= window and (kind == "sliding_attention" if kind is not None else True)


def head_work_bytes(a: int, V: int, s: int, softcap: bool = False, device_type: str = "cuda") -> int:
    """Transformers' head + loss over the full logits (see planner.py's module docstring); the final logit
    soft-capping (Gemma 2) keeps its tanh, one a x V more. The float32 upcast's a x V x (4 + s) in a 16-bit
    dtype is not there on the CPU (measured: bf16, a = 1024, V = 8192, 14 a V held, not 20); on a GPU it is
    kept until measured there."""
    extra = a * V * (4 + s) if s != 4 and device_type != "cpu" else 0
    return a * V * (s + 12) + extra + (a * V * s if softcap else 0)


def chunked_head_work_bytes(a: int, V: int, H: int, s: int, rows: int, softcap: bool = False) -> int:
    """engine/chunked_loss.py: one chunk of `rows` tokens' float32 logits and logsumexp's shifted copy of
    them (the compute-dtype matmul output, when s != 4, is freed by then; soft-capping adds ~3 float32
    temporaries), and the hidden states' gradient (a x H x s) with its scaled copy in backward."""
    r = min(a, rows)
    per_row = V * 2 * 4 + (3 * V * 4 if softcap else 0) + H * s
    return r * per_row + 2 * a * H * s


@dataclass
class ModelFacts:
    """What the plan needs from the model itself: sizes from the meta skeleton with PEFT's LoRA in it."""

    hf_config: object
    model_type: str
    unit_bytes: dict[str, int]
    slot_bytes: int
    lora_params: int
    n_targets: int      # adapted linears per decoder layer
    lora_in_features: int  # their input widths, summed
    L: int
    V: int
    H: int
    chunk_ok: bool      # the chunked loss reproduces this model's head (engine/chunked_loss.py)
    softcap: bool
    embed_untied_bytes: int = 0  # the embedding unit's bytes not shared with the head (a CPU view can serve them)
    mlp_gated: bool = True  # the decoder layer's MLP has a gate projection (Llama's); GPT-2's has none
    experts_adapted: bool = False  # MoE: LoRA on the experts (by default only attention is adapted)
    mlp_adapted: bool = True  # LoRA on some linear outside attention (the MLP's), whose input it then keeps
    norms: int = 2  # hidden-width norms per decoder layer
    head_norms: int = 0  # widths of the projections attention normalises (q_norm, k_norm), the largest layer's
    shared_layer_bytes: int = 0  # of the head unit's bytes, the blocks several decoder layers share (Zamba's)
    eager_attention: bool = False  # the skeleton's attention is eager (Gemma 2's soft-capping): T x T kept
    layers_as_stored: bool = True  # the folder's layer tensors are the model's, none built on load from several
    file_dtype: Optional[torch.dtype] = None  # the folder's first floating tensor's dtype (None: a config, no file)
    layer_dtypes: frozenset = frozenset()  # the dtypes of the file's layer tensors (empty: a config, no file)
    layers_as_held: bool = False  # ... each the dtype LemaModel holds it in (keymap.held_dtype)
    not_held: Optional[str] = None  # else the first that is not, said (keymap.first_not_held)
    layer_file_bytes: int = 0  # the file's bytes of the layer tensors (0: a config, no file)
    embed_view_bytes: int = 0  # of the embedding, what the file holds as LemaModel maps it on the CPU: tensors
    #                            not tied to the head, each one tensor of the file, in the compute dtype
    from_folder: bool = False  # planned from a folder (not a config alone)
    safetensors: bool = False  # ... whose safetensors weights were read for these facts

    def layers_stored_as_held(self) -> bool:
        """The file holds every layer tensor in the dtype LemaModel holds it in, the compute dtype or float32 where
        Transformers keeps it so (LemaModel's test for serving them as they are: CPU views, CUDA zero-copy); True
        for a config alone, as the engine's own file would be; False for a folder without safetensors weights
        (.bin, GGUF: `lema convert` makes them)."""
        return (self.safetensors and self.layers_as_held) if self.from_folder else True

    def embedding_view(self) -> int:
        """Bytes of the embedding a CPU run maps from the file rather than copying (LemaModel._load_resident_units):
        for a config alone, every untied one, as the engine's own file would be."""
        return self.embed_view_bytes if self.from_folder else self.embed_untied_bytes

    @property
    def layer_bytes(self) -> int:
        return largest_layer_bytes(self.unit_bytes)


_FACTS: dict[tuple, ModelFacts] = {}  # model_facts of folders, newest last
_FACTS_KEPT = 4
SMALL_FILE = 1 << 20  # a folder's files up to this size are compared by their bytes' hash


def _files_signature(folder: str, gbi_path: Optional[str]) -> tuple:
    """The folder's files and `gbi_path`, each as (path, inode, size, mtime), and the small ones (config.json,
    an index: edited in place, same size, within the clock's tick) by a hash of their bytes: a folder whose
    files changed is measured anew."""
    paths = [e.path for e in os.scandir(folder) if e.is_file()] + ([gbi_path] if gbi_path else [])
    out = []
    for path in sorted(paths):
        try:
            st = os.stat(path)
            if st.st_size <= SMALL_FILE:
                with open(path, "rb") as f:
                    out.append((path, hashlib.sha1(f.read(), usedforsecurity=False).hexdigest()))
                continue
        except OSError:
            continue
        out.append((os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def model_facts(model, dtype, lora_rank: int, targets: Optional[list[str]] = None,
                gbi_path: Optional[str] = None) -> ModelFacts:
    """Build the meta skeleton of `model` (config or folder; its weights in `gbi_path` where given, as
    LemaConfig's), inject PEFT's LoRA, and measure it (~1 s for 7B). A folder's facts are kept for the next
    call with the same arguments while its files stay as they were (`lema train` plans, then its model plans
    each step size: one measurement)."""
    from .config import parse_dtype

    if not isinstance(model, str) or not os.path.isdir(model):
        return _measure_facts(model, dtype, lora_rank, targets, gbi_path)
    key = (os.path.abspath(model), parse_dtype(dtype), lora_rank, tuple(targets) if targets else None,
           _files_signature(model, gbi_path))
    facts = _FACTS.pop(key, None) or _measure_facts(model, dtype, lora_rank, targets, gbi_path)
    _FACTS[key] = facts
    while len(_FACTS) > _FACTS_KEPT:
        del _FACTS[next(iter(_FACTS))]
    return facts


def _measure_facts(model, dtype, lora_rank: int, targets: Optional[list[str]] = None,
                   gbi_path: Optional[str] = None) -> ModelFacts:
    import torch

    from .config import parse_dtype
    from .engine.chunked_loss import final_softcap, fused_head_supported
    from .engine.skeleton import (EMBED, HEAD, build_meta_model, check_lora_targets, default_lora_targets,
                                  find_decoder_layers, load_hf_config, parameter_aliases, unit_map, with_lora)
    from .store.keymap import held_dtype

    dtype = parse_dtype(dtype)
    hf_config = load_hf_config(model) if isinstance(model, str) else model
    base = build_meta_model(hf_config, dtype)
    units = unit_map(base)
    params = dict(base.named_parameters())
    held = held_dtype(base, dtype)  # the compute dtype, or float32 where from_pretrained keeps a tensor so
    size = {n: p.numel() * held(n).itemsize for n, p in params.items()}
    unit_bytes = {u: sum(size[n] for n in names) for u, names in units.units.items()}
    aliases = parameter_aliases(base)
    folder = {}
    embed_untied = sum(size[n] for n in units.units[EMBED] if len(aliases[id(params[n])]) == 1)
    if isinstance(model, str):  # Mixtral's experts, stacked from per-expert tensors at each load, are not views
        folder = _folder_facts(model, base, units, [n for u, names in units.units.items()
                                                    if u not in (EMBED, HEAD) for n in names], held, gbi_path)
        keyed = folder.pop("embed_dtypes", {})  # as LemaModel decides an embedding tensor's view, one by one
        folder["embed_view_bytes"] = sum(size[n] for n in units.units[EMBED]
                                         if len(aliases[id(params[n])]) == 1 and keyed.get(n) == held(n))
    slot_bytes = max((sum(_aligned(size[n]) for n in names)
                      for u, names in units.units.items() if u not in (EMBED, HEAD)), default=0)
    base.requires_grad_(False)  # as LemaModel: only LoRA trains, the head is frozen
    chunk_ok = fused_head_supported(base) is None
    prefix, layers = find_decoder_layers(base)
    mlp_gated = any("gate" in n for n, _ in layers[0].named_parameters()) if len(layers) else True
    # the hidden-width norms of a layer (Llama's two; Gemma 2's four: pre and post each sublayer), not the
    # per-head q/k norms some models add
    H = _text_config(hf_config).hidden_size
    norms = sum(1 for m in layers[0].modules() if "norm" in type(m).__name__.lower()
                and tuple(getattr(getattr(m, "weight", None), "shape", ())) == (H,)) if len(layers) else 2
    head_norms = max((_normalised_projections(layer) for layer in layers), default=0)
    targets = list(targets or default_lora_targets(layers))
    check_lora_targets(base, prefix, targets, lora_rank)  # as LemaModel: a target outside the layers is refused
    with torch.device("meta"):  # the adapters' shapes only: nothing allocated, nothing initialised
        peft_model = with_lora(base, lora_rank, 2 * lora_rank, targets)
    lora_params = sum(p.numel() for n, p in peft_model.named_parameters() if ".lora_" in n)
    # the adapted linears of each layer (their count and input widths), the largest layer's counted: the layers
    # may differ (Gemma 4's full-attention layers: a wider o_proj input)
    widths: dict[int, list[int]] = {}
    for n, p in peft_model.named_parameters():
        found = re.search(rf"{re.escape(prefix)}\.(\d+)\.", n) if ".lora_A." in n else None
        if found:
            widths.setdefault(int(found.group(1)), []).append(p.shape[-1])
    n_targets = max(map(len, widths.values()), default=0)
    lora_in_features = max(map(sum, widths.values()), default=0)
    adapted = [n for n, _ in peft_model.named_parameters() if ".lora_" in n and f"{prefix}.0." in n]
    experts_adapted = any("expert" in n for n in adapted)
    mlp_adapted = any(not re.search(r"\.(self_attn|attn|attention)\.", n) for n in adapted)
    c = _text_config(hf_config)
    return ModelFacts(hf_config, c.model_type, unit_bytes, slot_bytes, lora_params, n_targets, lora_in_features,
                      units.num_layers,
                      c.vocab_size, c.hidden_size, chunk_ok, final_softcap(hf_config) is not None, embed_untied,
                      mlp_gated, experts_adapted, mlp_adapted, norms=norms or 2, head_norms=head_norms,
                      shared_layer_bytes=sum(size[n] for n in units.units[HEAD] if n.startswith(prefix + ".")),
                      # as the skeleton runs it: eager for soft-capping, and where an architecture has no SDPA
                      eager_attention=getattr(base.config, "_attn_implementation", None) == "eager", **folder)


def _normalised_projections(layer) -> int:
    """The output widths, summed, of a layer's projections that a norm named after them follows (`q_norm` after
    `q_proj`: Qwen3, OLMo 2, Gemma 3 and 4, Cohere with use_qk_norm): each norm keeps its input, the full q, k or v
    (the hidden-width norms are ModelFacts.norms)."""
    width = 0
    for module in layer.modules():
        for name, child in module.named_children():  # o_norm (OLMo-Hybrid's) comes before its projection: not one
            proj = getattr(module, name[0] + "_proj", None) if name in ("q_norm", "k_norm", "v_norm") else None
            out = getattr(getattr(proj, "base_layer", proj), "out_features", None)
            if isinstance(out, int) and "norm" in type(child).__name__.lower():
                width += out
    return width


def _folder_facts(folder: str, meta_model, units, layer_names: list[str], held,
                  gbi_path: Optional[str] = None) -> dict:
    """From the folder's weights-file headers (one read), ModelFacts' fields: the dtype of its first floating
    tensor (file_dtype), whether every layer parameter of `meta_model` is one tensor of the file
    (layers_as_stored: LemaModel serves only those as views of the mmap on the CPU), the dtypes its layer tensors
    are stored in (layer_dtypes), whether each is in the dtype `held` (name -> dtype) says LemaModel holds it in
    (layers_as_held), their bytes in the file (layer_file_bytes), and the dtypes of the embedding's tensors that
    are one tensor of the file (embed_dtypes, by name). A folder without safetensors weights (a config to plan from, or .bin or GGUF
    weights that `lema convert` makes streamable) gives no dtype; weights that are there but that the model would refuse
    (a truncated file, a missing shard, tensors missing or of another model) raise its WeightsFileError, so a
    plan is not the first to pass them."""
    from .engine.skeleton import EMBED
    from .store import WeightStore
    from .store.keymap import check_complete, check_shapes, check_unused, first_not_held, map_checkpoint

    if gbi_path is None and not (glob.glob(os.path.join(folder, "*.safetensors"))
                                 or os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))):
        return dict(from_folder=True)
    store = WeightStore(folder, gbi_path)
    try:
        file_dtype = next((e.dtype for e in map(store.entry, store.keys()) if e.dtype.is_floating_point), None)
        sources, unexpected = map_checkpoint(meta_model, store)
        check_complete(meta_model, sources, gbi_path or folder)
        check_unused(meta_model, store, unexpected, units.layers_prefix, units.num_layers)
        check_shapes(meta_model, sources, store)
        layer_keys = {k: n for n in layer_names if n in sources for k in sources[n].file_keys}
        layer_dtypes = frozenset(store.entry(k).dtype for k in layer_keys)
        not_held = first_not_held(((n, k) for k, n in layer_keys.items()), store, held)
        layer_file_bytes = sum(store.entry(k).nbytes for k in layer_keys)
        # the embedding unit's tensors stored as one each (GPT-2's has two, the token and position tables)
        embed_dtypes = {n: store.entry(sources[n].key).dtype for n in units.units[EMBED] if n in sources
                        and sources[n].key is not None}
    finally:
        store.close()
    return dict(file_dtype=file_dtype, layers_as_stored=all(sources[n].key is not None for n in layer_names
                                                            if n in sources),
                layer_dtypes=layer_dtypes, layers_as_held=not_held is None, not_held=not_held,
                layer_file_bytes=layer_file_bytes,
                embed_dtypes=embed_dtypes, from_folder=True, safetensors=True)
