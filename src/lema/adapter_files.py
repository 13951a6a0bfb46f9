"""A PEFT adapter folder on disk: its config and its weights file, checked once for every reader."""

from __future__ import annotations

import json
import os
import shutil

from .cli_errors import reason
from .fsutil import make_temp_folder, replace_folder

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}  # what save_pretrained writes


class AdapterFileError(ValueError):
    """An adapter folder that cannot be read as it stands: a config that is not one (damaged or edited by hand), a
    weights file cut short or damaged, or a config whose r is not the rank of its weights."""


def read_adapter(path: str) -> tuple[dict, str]:
    """(adapter_config.json as a dict, path of adapter_model.safetensors); a clear error if either is missing."""
    cfg_path = os.path.join(path, "adapter_config.json")
    weights = os.path.join(path, "adapter_model.safetensors")
    if not (os.path.isfile(cfg_path) and os.path.isfile(weights)):
        inner = os.path.join(path, "adapter")  # a `lema train` run folder: its final adapter is in adapter/
        hint = (f"; {inner!r} is one: give that" if os.path.isfile(os.path.join(inner, "adapter_config.json")) else
                f"; a checkpoint's is in {os.path.join(path, 'checkpoint-STEP', 'adapter')!r}"
                if any(n.startswith("checkpoint-") for n in (os.listdir(path) if os.path.isdir(path) else ())) else "")
        raise FileNotFoundError(f"adapter {path!r} is not a PEFT adapter folder (it needs adapter_config.json and "
                                "adapter_model.safetensors, as written by save_adapter or OUT/adapter of lema train)"
                                + hint)
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{cfg_path!r} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{cfg_path!r} holds a {type(config).__name__}, not an adapter config (a JSON object)")
    r = config.get("r")
    if config.get("peft_type", "LORA") == "LORA" and (not isinstance(r, int) or isinstance(r, bool) or r < 1):
        given = "has no LoRA rank r" if r is None else f"gives the LoRA rank r={r!r}, not a positive whole number"
        raise AdapterFileError(f"{cfg_path!r} {given}; copy the adapter folder again")
    return config, weights


def read_adapter_weights(path: str, config: dict, weights: str):
    """The adapter's tensors (CPU), once the file has read whole and every lora_A / lora_B has the config's rank r.

    `config` and `weights` are `read_adapter(path)`'s. A file cut short or damaged, or a config that does not
    describe these weights (another r would scale the update by another alpha / r), is an AdapterFileError
    naming the file: `lema train` sets such a checkpoint aside (checkpointing.py), the commands print it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(weights)
    except SafetensorError as e:
        raise AdapterFileError(f"adapter weights {weights!r} are truncated or damaged ({reason(e)}; the file has "
                               f"{os.path.getsize(weights):,} bytes); copy or download the adapter again, or "
                               "write it again from its run (`lema train ... --resume` rewrites OUT/adapter "
                               "from the last checkpoint)") from None
    if config.get("rank_pattern"):  # per-module ranks: every reader refuses them before it uses the weights
        return state
    r = config.get("r")
    for key, tensor in state.items():
        rank = (tensor.shape[0] if key.endswith(".lora_A.weight") else
                tensor.shape[1] if key.endswith(".lora_B.weight") else r)  # (r, in) and (out, r)
        if rank != r:
            raise AdapterFileError(f"adapter {path!r}: adapter_config.json says r={r} but the weights have rank "
                                   f"{rank} ({key!r} has shape {tuple(tensor.shape)}); the config does not belong "
                                   f"to these weights: copy the adapter folder again (or, if only r was edited, "
                                   f"set r back to {rank})")
    return state


def save_adapter(peft_model, path: str) -> None:
    """`LemaModel.save_adapter`: `peft_model` saved at `path`, atomically; a folder holding anything but an
    adapter is refused."""
    if not path:
        raise ValueError("save_adapter: give a folder path for the adapter")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"save_adapter: {path!r} is a file; give a folder path")
    others = sorted(set(os.listdir(path)) - ADAPTER_FILES) if os.path.isdir(path) else []
    if others:
        raise ValueError(f"save_adapter: {path!r} holds other files than an adapter's (e.g. {others[:3]}), which "
                         "saving there would delete; give a new or empty folder, or an adapter folder")
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = make_temp_folder(parent, ".tmp-adapter-")
    try:
        peft_model.save_pretrained(tmp)
        replace_folder(tmp, path)  # the old adapter stays until the new one is in place
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def load_adapter(model, path: str) -> None:
    """`LemaModel.load_adapter`: the adapter at `path` into `model`'s LoRA weights, refused unless made for this
    model, its targets, rank and alpha."""
    from peft import set_peft_model_state_dict

    acfg, weights = read_adapter(path)
    unsupported = [k for k in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern") if acfg.get(k)]
    if unsupported:
        raise ValueError(f"adapter {path!r} uses {unsupported}, which LEMA's LoRA does not; "
                         "train or convert a plain LoRA adapter")
    state = read_adapter_weights(path, acfg, weights)  # whole, and of the config's r, before it meets ours
    if acfg.get("r") != model.config.lora_rank:
        raise ValueError(f"adapter {path!r} has rank r={acfg.get('r')} but this model was set up with "
                         f"lora_rank={model.config.lora_rank}; set lora_rank={acfg.get('r')}")
    if acfg.get("lora_alpha") is not None and float(acfg["lora_alpha"]) != float(model.config.lora_alpha):
        # the LoRA update is scaled by alpha / r: loading with another alpha silently changes the model
        raise ValueError(f"adapter {path!r} has lora_alpha={acfg['lora_alpha']} but this model was set up "
                         f"with lora_alpha={model.config.lora_alpha}; set lora_alpha={acfg['lora_alpha']}")
    own = {n.replace(".default.", "."): p for n, p in model.peft_model.named_parameters() if ".lora_" in n}
    own_short = {n.split("base_model.model.", 1)[-1]: p for n, p in own.items()}
    wrong = [k for k in state if k.split("base_model.model.", 1)[-1] not in own_short]
    bad_shape = [(k, tuple(v.shape)) for k, v in state.items() if k not in wrong and
                 tuple(own_short[k.split("base_model.model.", 1)[-1]].shape) != tuple(v.shape)]
    if wrong or bad_shape or len(state) != len(own):
        detail = (f"unknown tensors {wrong[:2]}" if wrong else f"shape mismatch {bad_shape[:2]}" if bad_shape
                  else f"{len(state)} tensors where this model has {len(own)}")
        raise ValueError(f"adapter {path!r} was made for another model or other target modules "
                         f"({detail}); base model here: {model.config.model_name_or_path!r}, "
                         f"targets {model.lora_targets}")
    set_peft_model_state_dict(model.peft_model, {k: v.to(model.device) for k, v in state.items()})
