"""GGUF sources of `lema convert`: the config a .gguf file holds, a check that the file is whole, and its tensors
dequantised into a staging folder of safetensors files, which convert.py then reads as a sharded checkpoint.
"""

from __future__ import annotations

import os
import struct
from typing import Optional

import torch

from .cli_errors import reason
from .convert import ConvertError, Source


def gguf_config(source: Source):
    """The Transformers config stored in a GGUF file; an architecture Transformers cannot read is named."""
    from transformers import AutoConfig

    path = os.path.join(source.folder, source.gguf_file)
    check_gguf_whole(path)
    try:
        config = AutoConfig.from_pretrained(source.folder, gguf_file=source.gguf_file)
    except (ValueError, NotImplementedError, KeyError, OSError) as e:
        why = reason(e)
        if "valid JSON file" in why:  # Transformers' fallback wording once its GGUF reader has failed: no JSON here
            why = "its header cannot be parsed: the file is cut short or damaged"
        arch = gguf_architecture(path)
        if arch is None:
            raise ConvertError(f"{path!r} is not a readable GGUF file ({why}); download it again") from None
        raise ConvertError(f"{path!r}: GGUF architecture {arch!r} cannot be converted by this Transformers "
                           f"version ({why}); use a Transformers checkpoint folder of the model "
                           "instead") from None
    return config


def gguf_architecture(path: str) -> Optional[str]:
    """`general.architecture` of a GGUF file, or None when the file is not readable as GGUF."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(path).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception:  # any failure here only changes the wording of the error being raised
        return None


def check_gguf_whole(path: str) -> None:
    """Refuse a GGUF file cut short (an interrupted download or copy), with its sizes, before a reader trips on it.

    Transformers' own header reader (the one AutoConfig uses; the version is pinned) walks the key/values and
    the tensor table; a header that runs past the file's end fails there with a struct.error. The data must then
    reach the end of the last tensor. Anything else the reader refuses (ValueError: not GGUF, another version)
    is left to gguf_config, which words it."""
    from transformers.integrations.gguf.reader import GgufHeader

    size = os.path.getsize(path)
    try:
        header = GgufHeader.from_file(path)
    except (struct.error, IndexError):
        raise ConvertError(f"{path!r} is truncated or damaged: its header runs past the end of the file "
                           f"({size:,} bytes); download it again") from None
    except (ValueError, KeyError):
        return
    end = header.data_start + max((t.offset + t.nbytes for t in header.tensors), default=0)
    if end > size:
        raise ConvertError(f"{path!r} is truncated: it has {size:,} bytes but its header lays out {end:,} "
                           f"({end - size:,} missing); download it again")


def stage_gguf(path: str, model, staging: str, progress: bool) -> None:
    """Dequantise every tensor of a GGUF file into `staging/NNNNN.safetensors`, one tensor in memory at a time.

    Names come from Transformers' GGUF -> model map, values from its per-architecture processor
    (which reverses llama.cpp's q/k row permutation); tensors the map does not know are skipped,
    as `from_pretrained` skips them.
    """
    import numpy as np
    from gguf import GGUFReader, dequantize
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map)

    reader = GGUFReader(path)
    arch = bytes(reader.fields["general.architecture"].parts[reader.fields["general.architecture"].data[0]]).decode()
    config = model.config.to_dict()
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
    names = gguf_weight_names(model, processor, get_gguf_hf_weights_map)
    extra = {"config": config, "tensors": {}}  # some processors (MoE) leave their output here
    os.makedirs(staging)
    for i, t in enumerate(tqdm(reader.tensors, desc="dequantise GGUF", unit="tensor", disable=not progress)):
        result = processor.process(weights=dequantize(t.data, t.tensor_type), name=t.name,
                                   tensor_key_mapping=names, parsed_parameters=extra)
        if result.name in names:
            tensor = torch.from_numpy(np.require(result.weights, requirements=["C", "W"]))  # copies only mmap views
            save_file({names[result.name]: tensor}, os.path.join(staging, f"{i:05d}.safetensors"))
    for j, (name, tensor) in enumerate(extra["tensors"].items()):
        save_file({name: tensor.contiguous()}, os.path.join(staging, f"x{j:05d}.safetensors"))


class _FlatModel:
    """The model seen without its submodules, so `get_gguf_hf_weights_map` builds one name map, not one per module."""

    def __init__(self, model):
        self.config = model.config
        self._state = model.state_dict()

    def state_dict(self):
        return self._state

    def named_children(self):
        return []


def gguf_weight_names(model, processor, get_map) -> dict[str, str]:
    """GGUF tensor name -> model parameter name, by Transformers' map.

    Its recursion over every submodule rebuilds gguf's name table each time (about 20 s for a 30-layer
    model); the top level alone covers decoder-only models, so the full walk runs only when it does not.
    """
    names = get_map(_FlatModel(model), processor)
    if len(set(names.values())) < len(model.state_dict()):
        names = get_map(model, processor)
    return names
