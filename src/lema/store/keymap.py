"""Checkpoint keys -> the model's parameter names, through Transformers' own conversion rules.

Transformers 5 renames and fuses some checkpoint tensors on load (Mixtral's per-expert
`block_sparse_moe.experts.N.w1.weight` become one `mlp.experts.gate_up_proj`, prefixes such as
`transformer.` come and go). We apply the same `WeightRenaming`/`WeightConverter` list that
`from_pretrained` uses, so every architecture Transformers can load maps here without code
written for it. A parameter is then either *direct* (one file tensor, viewable zero-copy and,
in a packed file, copied as raw bytes) or *converted* (computed from several file tensors).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..engine.skeleton import text_config
from .checkpoint import WeightStore
from .safetensors_file import WeightsFileError


@dataclass
class ParamSource:
    """How to produce one model parameter from the store."""

    name: str                # the model's parameter name, e.g. model.layers.3.mlp.experts.gate_up_proj
    key: str | None = None   # direct: the file key holding exactly this tensor
    group: "ConvertedGroup | None" = None  # converted: the group computing it

    @property
    def file_keys(self) -> list[str]:
        """The file tensors it is read from: its own key, or its group's."""
        return [self.key] if self.key is not None else [k for k, _ in self.group.sources]


@dataclass
class ConvertedGroup:
    """Several file tensors -> one or more parameters, by a Transformers WeightConverter."""

    target: str
    converter: object
    sources: list[tuple[str, str]] = field(default_factory=list)  # (file key, source pattern)

    def materialize(self, store: WeightStore, model) -> dict[str, torch.Tensor]:
        conv = copy.deepcopy(self.converter)
        for key, pattern in self.sources:
            conv.add_tensor(self.target, key, pattern, store.view(key))
        return conv.convert(self.target, model=model, config=model.config)

    def output_names(self) -> list[str]:
        first = self.converter.target_patterns[0]
        return [self.target.replace(first, t) for t in self.converter.target_patterns]


def map_checkpoint(model, store: WeightStore) -> tuple[dict[str, ParamSource], list[str]]:
    """Map every file key onto the (meta) model. Returns (param name -> source, unexpected keys)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    meta = dict(model.state_dict(keep_vars=True))
    transforms = get_model_conversion_mapping(model) or []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    prefix = getattr(model, "base_model_prefix", None) or None

    sources: dict[str, ParamSource] = {}
    groups: dict[str, ConvertedGroup] = {}
    unexpected: list[str] = []
    for key in sorted(store.keys(), key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if renamed not in meta and key in meta:
            renamed, pattern = key, None
        if renamed not in meta:
            unexpected.append(key)
            continue
        if pattern is None:
            sources[renamed] = ParamSource(renamed, key=key)
        else:
            group = groups.setdefault(renamed, ConvertedGroup(renamed, by_pattern[pattern]))
            group.sources.append((key, pattern))
    for group in groups.values():
        for name in group.output_names():
            sources[name] = ParamSource(name, group=group)
    return sources, unexpected


def ignored_on_load(model) -> "re.Pattern | None":
    """The file keys Transformers' `from_pretrained` drops without a word (`_adjust_missing_and_unexpected_keys`):
    the class's `_keys_to_ignore_on_load_unexpected` (GPT-2's attn.bias masks, a model's extra MTP layers), and
    the rotary `inv_freq` and `position_ids` buffers old checkpoints saved; also the `masked_bias` constants of
    2020's GPT-2 checkpoints, which Transformers loads past with a warning."""
    patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    patterns.add(r"(^|\.)masked_bias$")
    buffers = [name for name, _ in model.named_buffers()]
    if any(name.endswith("rotary_emb.inv_freq") for name in buffers):
        patterns.add(r"rotary_emb\.inv_freq")
    if any(name.endswith("position_ids") for name in buffers):
        patterns.add(r"(^|\.)position_ids$")
    return re.compile("|".join(f"({p})" for p in patterns)) if patterns else None


def check_complete(model, sources: dict, folder: str) -> None:
    """Refuse weights that lack a parameter of the model (`sources`: map_checkpoint's)."""
    missing = [n for n, _ in model.named_parameters() if n not in sources]
    if missing:
        raise WeightsFileError(
            f"the weights in {folder!r} lack {len(missing)} tensor(s) that {type(model).__name__} needs, e.g. "
            f"{missing[:3]}; the weights do not belong to this config.json")


def stored_buffers(model, sources: dict) -> list[str]:
    """The model's persistent buffers that the weights hold (DeepSeek-V3's router `e_score_correction_bias`,
    trained; Gemma 4's `layer_scalar`): from_pretrained loads them, so LEMA must too (the skeleton built them
    with their __init__ values). Rotary `inv_freq` and masks are not persistent, so not in `sources`."""
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return [name for name, _ in model.named_buffers() if name in sources and name not in params]


def kept_in_float32(model, dtype: torch.dtype) -> Callable[[str], bool]:
    """Whether from_pretrained keeps the tensor `name` in float32 at `dtype` (the class's
    `_keep_in_fp32_modules_strict` in bf16 and fp16, `_keep_in_fp32_modules` in fp16: DeepSeek-V3's router
    `e_score_correction_bias`, which picks the experts)."""
    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    found = [re.compile(r"(^|\.)" + re.escape(k).replace(r"\*", r"[^.]+") + r"($|\.)") for k, d in plan.items()
             if d == torch.float32]
    return lambda name: any(p.search(name) for p in found)


def held_dtype(model, dtype: torch.dtype) -> Callable[[str], torch.dtype]:
    """The dtype LemaModel holds the parameter or stored buffer `name` in, as from_pretrained does: float32 where
    the class keeps it so (kept_in_float32: Ernie 4.5's router weight, DeepSeek-V3's router bias buffer, in a bf16
    model); else the dtype the skeleton (`model`, built in `dtype`) made it in where its __init__ chose one
    (OLMo-Hybrid's and Zamba's float32 `A_log`, an integer buffer); else `dtype`."""
    float32 = kept_in_float32(model, dtype)
    own = {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()] if t.dtype != dtype}
    return lambda name: torch.float32 if float32(name) else own.get(name, dtype)


def first_not_held(pairs, store, held: Callable[[str], torch.dtype]) -> Optional[str]:
    """Of (parameter name, file key) `pairs`, the first tensor the file stores in another dtype than `held` holds
    it in, said as "NAME: bfloat16 in the file, held in float32" (None: every one as held)."""
    for name, key in pairs:
        stored, want = store.entry(key).dtype, held(name)
        if stored != want:
            return f"{name}: {str(stored).split('.')[-1]} in the file, held in {str(want).split('.')[-1]}"
    return None


def check_shapes(model, sources: dict, store) -> None:
    """Every parameter stored as one file tensor has the model's shape and a floating dtype (LemaModel and the
    plan alike; parameters built from several tensors are checked when built)."""
    params = dict(model.named_parameters())
    for name, src in sources.items():
        if src.key is None or name not in params:
            continue
        entry = store.entry(src.key)
        have, want = tuple(entry.shape), tuple(params[name].shape)
        if have != want:
            raise WeightsFileError(f"tensor {src.key!r} has shape {have} in the weights file but config.json "
                                   f"implies {want}; the weights do not belong to this config.json")
        if not entry.dtype.is_floating_point:
            raise WeightsFileError(f"tensor {src.key!r} is {entry.dtype}; quantized "
                                   "checkpoints are not streamed yet, convert to float with `lema convert`")


def check_unused(model, store, unexpected: list[str], layers_prefix: str, num_layers: int,
                 where: Optional[str] = None) -> None:
    """Refuse file tensors the model does not use (but those Transformers ignores too): a config.json with fewer
    layers than the file, or the weights of another model, would otherwise run (or be converted, or merged) as a
    smaller model, silently. `where` names the weights where `store` has no `file_of` (convert's `.bin` store)."""
    ignored = ignored_on_load(model)
    unused = [k for k in unexpected if ignored is None or ignored.search(k) is None]
    if not unused:
        return
    where = where or store.file_of(unused[0]).path
    said = (f"{where!r} holds {len(unused)} tensor(s) that {type(model).__name__}, as config.json describes it, "
            f"does not use, e.g. {unused[:3]}")
    # the file's decoder layers: keys `<...>.layers.N.` (the last part of the layer list's name, e.g. GPT-2's `h`)
    layer = re.compile(rf"(?:^|\.){re.escape(layers_prefix.rsplit('.', 1)[-1])}\.(\d+)\.")
    stored = 1 + max((int(m.group(1)) for m in map(layer.search, store.keys()) if m), default=-1)
    if stored > num_layers:
        text = text_config(model.config)
        key = (getattr(text, "attribute_map", None) or {}).get("num_hidden_layers", "num_hidden_layers")
        raise WeightsFileError(f"{said}: the file has {stored} decoder layers but config.json's {key} is "
                               f"{num_layers}; set {key} to {stored} in config.json (or use the config.json that "
                               "came with these weights)")
    raise WeightsFileError(f"{said}: they are weights of another model, or config.json is not theirs; use the "
                           "config.json that came with these weights")


def reader_for(sources: dict[str, ParamSource], store: WeightStore, model) -> Callable[[str], torch.Tensor]:
    """A function name -> CPU tensor (a zero-copy view for direct params; computed for converted ones).

    Converted groups are cached for the duration of one unit's read by the caller, which asks
    for every name of a unit in turn; the cache holds at most one group.
    """
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def read(name: str) -> torch.Tensor:
        src = sources[name]
        if src.key is not None:
            return store.view(src.key)
        group = src.group
        if group.target not in cache:
            cache.clear()
            cache[group.target] = group.materialize(store, model)
        return cache[group.target][name]

    return read
