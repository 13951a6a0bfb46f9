"""A PEFT adapter folder on disk: its config and its weights file, checked once for every reader."""

from __future__ import annotations

import json
import os

from .cli_errors import reason


class AdapterFileError(ValueError):
    """An adapter folder that cannot be read as it stands: a config that is not one (damaged or edited by hand), a
    weights file cut short or damaged, or a config whose r is not the rank of its weights."""


def read_adapter(path: str) -> tuple[dict, str]:
    """(adapter_config.json as a dict, path of adapter_model.safetensors); a clear error if either is missing."""
    cfg_path = os.path.join(path, "adapter_config.json")
    weights = os.path.join(path, "adapter_model.safetensors")
    if not (os.path.isfile(cfg_path) and os.path.isfile(weights)):
        raise FileNotFoundError(f"adapter {path!r} is not a PEFT adapter folder (it needs adapter_config.json and "
                                "adapter_model.safetensors, as written by save_adapter or OUT/adapter of lema train)")
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
