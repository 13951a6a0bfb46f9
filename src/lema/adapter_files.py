"""A PEFT adapter folder on disk: its config and its weights file, checked once for every reader."""

from __future__ import annotations

import json
import os


class AdapterFileError(ValueError):
    """An adapter folder whose adapter_config.json cannot be read as a config (damaged or edited by hand)."""


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
    return config, weights
