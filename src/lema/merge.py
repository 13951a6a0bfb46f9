"""`lema merge`: fold a LoRA adapter into the base weights, one tensor at a time.

W' = W + (alpha / r) · B A   (transposed for GPT-2's Conv1D, whose weight is stored fan-in first)
b' = b + (alpha / r) · lora_B.bias   (adapters made with lora_bias=True)

The output is written by `lema convert`'s packed writer, so it is a layer-packed Transformers
folder and memory stays at about one tensor: the base weight is read through its mmap view, the
delta is computed from the (small) adapter, the sum is written, and the next tensor follows.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import torch


def lora_deltas(adapter: str) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """A transform (param name, base tensor) -> merged tensor, from a PEFT adapter folder."""
    from .adapter_files import read_adapter, read_adapter_weights

    cfg, weights_path = read_adapter(adapter)
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora"):
        raise ValueError(f"adapter {adapter!r} is {cfg.get('peft_type')}{' with DoRA' if cfg.get('use_dora') else ''}; "
                         "lema merge folds plain LoRA adapters")
    patterns = [k for k in ("rank_pattern", "alpha_pattern") if cfg.get(k)]
    if patterns:  # per-module ranks or scales: one scale for all would merge some of them wrong
        raise ValueError(f"adapter {adapter!r} sets {' and '.join(patterns)} (per-module rank or alpha); lema merge "
                         "folds adapters with one r and lora_alpha for every module (merge this one with PEFT's "
                         "merge_and_unload)")
    if cfg.get("target_parameters"):  # LoRA on raw parameters (e.g. fused MoE experts): one A, B for many matrices
        raise ValueError(f"adapter {adapter!r} sets target_parameters {cfg['target_parameters']} (LoRA on parameters "
                         "such as fused MoE experts); lema merge folds LoRA on linear layers (target_modules) only "
                         "(merge this one with PEFT's merge_and_unload)")
    if "lora_alpha" not in cfg:
        raise ValueError(f"adapter {adapter!r}: its adapter_config.json lacks lora_alpha")
    state = read_adapter_weights(adapter, cfg, weights_path)  # whole, and of rank r: the scale below needs r
    r = cfg["r"]
    scale = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    biases: dict[str, torch.Tensor] = {}  # lora_bias=True: lora_B's bias, added to the base bias (scaled)
    for key, tensor in state.items():
        module, _, rest = key.partition(".lora_")
        module = module.removeprefix("base_model.model.")
        if not rest:  # modules_to_save, saved embedding layers (base_layer.weight), trained biases (bias="all")
            raise ValueError(f"adapter {adapter!r} holds the full weight {key!r} (modules_to_save, saved embedding "
                             "layers or trained biases); lema merge folds LoRA on linear layers (lora_A / lora_B) "
                             "only")
        part = rest.split(".")[0]
        if part not in ("A", "B"):  # lora_embedding_A/B, lora_magnitude_vector ...
            raise ValueError(f"adapter {adapter!r} holds {key!r}; lema merge folds LoRA on linear layers "
                             "(lora_A / lora_B) only")
        if rest == "B.bias":
            biases[module + ".bias"] = tensor
        else:
            pairs.setdefault(module + ".weight", {})[part] = tensor
    unused = set(pairs) | set(biases)

    def transform(name: str, base: torch.Tensor) -> torch.Tensor:
        # float32 out, whatever the source dtype: the writer casts once, to --dtype (a bfloat16 base merged
        # into float32 keeps the whole update, not the update rounded to bfloat16)
        if name in biases:
            unused.discard(name)
            delta = biases[name].float() * scale
        elif name in pairs:
            unused.discard(name)
            ab = pairs[name]
            delta = (ab["B"].float() @ ab["A"].float()) * scale
            if fan_in_fan_out:
                delta = delta.T
        else:
            return base
        if tuple(delta.shape) != tuple(base.shape):
            raise ValueError(f"adapter {adapter!r}: the update of {name!r} has shape {tuple(delta.shape)} but the "
                             f"base weight has {tuple(base.shape)}; the adapter was made for another model")
        return base.float() + delta

    def finish() -> None:
        if "lm_head.weight" in unused:  # a tied head is not a weight of its own: folding it changes the embedding
            raise _tied_head(adapter)
        no_bias = sorted(n for n in unused if n in biases and n.removesuffix(".bias") + ".weight" not in unused)
        if no_bias:  # lora_bias=True on a layer without a bias: nothing to add B's bias to (PEFT refuses it too)
            raise ValueError(f"adapter {adapter!r} was trained with lora_bias=True, but the base layer of "
                             f"{no_bias[0]!r} has no bias to fold lora_B's bias into; lema merge (as PEFT's "
                             "merge_and_unload) cannot merge it: load the adapter unmerged instead")
        if unused:
            raise ValueError(f"adapter {adapter!r} adapts weights this model does not have, e.g. "
                             f"{sorted(unused)[:3]}; it was made for another model")

    transform.finish = finish
    transform.adapted = frozenset(pairs) | frozenset(biases)
    transform.unused = unused  # the adapted names no tensor of the model was written under (so far)
    return transform


def _shared_weight_error(adapter: str, model: str, unused: set) -> ValueError | None:
    """Where the adapted names the model's file does not hold are other names of a weight the model ties (Zamba's
    transformer block, shared by several decoder layers: one weight, a LoRA update of its own at each layer), the
    error that says so; None where they are not."""
    from transformers.utils import logging as hf_logging

    from .engine.skeleton import build_meta_model, load_hf_config, parameter_aliases

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the error is the message: not Transformers' notes on building the model
    try:
        names = parameter_aliases(build_meta_model(load_hf_config(model), torch.float32)).values()
    except (OSError, ValueError, KeyError):  # no config to build it from: the plain message stands
        return None
    finally:
        hf_logging.set_verbosity(verbosity)
    for name in sorted(unused):
        others = next((n for n in names if name in n and len(n) > 1), None)
        if others is not None:
            first = next(n for n in others if n != name)
            return ValueError(f"adapter {adapter!r} adapts {name!r}, which the model shares with {first!r} (one weight "
                              "run by several decoder layers), with another LoRA update at each: no single merged "
                              "weight gives both; use the adapter unmerged (lema generate --adapter, or PEFT)")
    return None


def _tied_head(adapter: str) -> ValueError:
    return ValueError(f"adapter {adapter!r} adapts lm_head, which this model ties to its input embedding "
                      "(tie_word_embeddings): folding the update into the shared weight would change the "
                      "embedding too; train the adapter without lm_head in its target modules")


def merge(model: str, adapter: str, out: str, dtype: str = "float32", overwrite: bool = False,
          progress: bool = True) -> str:
    """Fold `adapter` into `model`, written to `out` (a layer-packed Transformers folder); returns `out`."""
    from .convert import Wording, convert, overlap

    if overlap(adapter, out):  # --overwrite would remove the adapter with the old output
        raise ValueError(f"--output {out!r} and --adapter {adapter!r} overlap; write the merged model to a "
                         "separate folder")
    transform = lora_deltas(adapter)
    if "lm_head.weight" in transform.adapted and os.path.isfile(os.path.join(model, "config.json")):
        from .engine.skeleton import load_hf_config, text_config

        config = load_hf_config(model)  # refused before anything is written (finish() would, after)
        if getattr(config, "tie_word_embeddings", False) or getattr(text_config(config), "tie_word_embeddings", False):
            raise _tied_head(adapter)
    words = Wording(src="--model", out="--output", overwrite="--overwrite", verb="merge", result="merged model")

    def finish() -> None:
        try:
            transform.finish()
        except ValueError as e:
            raise (_shared_weight_error(adapter, model, transform.unused) or e) from None

    return convert(model, out, dtype=dtype, overwrite=overwrite, progress=progress, transform=transform,
                   before_commit=finish, words=words)
