"""Model shapes: Transformers configs of well-known models, and random-weight checkpoints of them on disk.

- `SHAPES`: Transformers configs of well-known models (config only, no weights).
- `build_shape(name, cache)`: writes a random-weight checkpoint of that shape once, into
  `<cache>/shapes/<name>/`, tensor by tensor (a 27 GB model never sits in RAM). The file is a
  valid safetensors checkpoint (Transformers loads it) whose tensors are ordered unit by unit,
  with the `lema.units` byte ranges of a layer-packed file, so each layer is one contiguous read.
"""

from __future__ import annotations

import json
import os
import struct
import time
from typing import TYPE_CHECKING, Optional

from .fsutil import default_cache
from .plan_table import human

if TYPE_CHECKING:  # for annotations; the functions import torch themselves
    import torch

_LLAMA_COMMON = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                     rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2)

SHAPES: dict[str, dict] = {
    "llama-2-7b": dict(_LLAMA_COMMON, vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False),
    # for `lema plan --shape` above all: `lema bench` builds its random weights only where the disk has 138 GB (bf16)
    "llama-2-70b": dict(_LLAMA_COMMON, vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False),
    "tinyllama-1.1b": dict(_LLAMA_COMMON, vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                           max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=False),
    "smollm2-135m": dict(_LLAMA_COMMON, vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
                         bos_token_id=0, eos_token_id=0),
    # other architectures, for the planner's check beside Llama's (GPT-2: fused qkv Conv1D, learned positions,
    # GELU MLP, LayerNorm; Mistral: grouped-query attention, a sliding window)
    "gpt2-124m": dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=50257, n_positions=1024,
                      n_embd=768, n_layer=12, n_head=12, activation_function="gelu_new", tie_word_embeddings=True,
                      bos_token_id=50256, eos_token_id=50256),
    "mistral-7b": dict(model_type="mistral", architectures=["MistralForCausalLM"], vocab_size=32000,
                       hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, max_position_embeddings=32768, rope_theta=10000.0,
                       sliding_window=4096, hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2),
    # for tests: seconds to build and run
    "tiny-llama": dict(_LLAMA_COMMON, vocab_size=128, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False),
}


def shape_config(name: str):
    """The Transformers config of a named shape."""
    from transformers import AutoConfig

    if name not in SHAPES:
        raise ValueError(f"--shape {name!r} is not known; use one of {', '.join(SHAPES)}")
    kwargs = dict(SHAPES[name])
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def build_shape(name: str, cache: Optional[str] = None, dtype: Optional["torch.dtype"] = None, seed: int = 0,
                log=print, device: str = "cpu") -> str:
    """A random-weight checkpoint of shape `name` in `<cache>/shapes/<name>-<dtype>/` (default float32); built once.
    `device="cuda"` draws the numbers on the GPU (a 7B shape in seconds, not minutes; other numbers than the CPU's)."""
    import torch

    dtype = dtype or torch.float32
    from .engine.skeleton import build_meta_model, unit_map
    from .store import PACKED_FORMAT
    from .store.safetensors_file import DTYPE_NAMES

    folder = os.path.join(cache or default_cache(), "shapes", f"{name}-{str(dtype).split('.')[-1]}")
    weights = os.path.join(folder, "model.safetensors")
    if os.path.isfile(os.path.join(folder, "complete")):
        return folder
    hf_config = shape_config(name)
    meta = build_meta_model(hf_config, dtype)
    units = unit_map(meta)
    params = dict(meta.named_parameters())  # deduplicated: a tied lm_head is not written
    order = [n for names in units.units.values() for n in names]
    total = sum(params[n].numel() * dtype.itemsize for n in order)
    free = _free_bytes(os.path.dirname(folder) if os.path.isdir(os.path.dirname(folder)) else cache or default_cache())
    if total > free - 2 * 2**30:
        raise OSError(f"building shape {name!r} needs {human(total)} on disk but {human(free)} is free "
                      f"under {cache or default_cache()}; free space or set --cache-dir elsewhere")
    os.makedirs(folder, exist_ok=True)

    # Header first (offsets known from shapes alone), then each tensor's bytes in unit order.
    header, offset, spans = {}, 0, {}
    for unit, names in units.units.items():
        start = offset
        for n in names:
            nbytes = params[n].numel() * dtype.itemsize
            header[n] = {"dtype": DTYPE_NAMES[dtype], "shape": list(params[n].shape),
                         "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        spans[unit] = (start, offset)
    header_len = 0
    for _ in range(2):  # the units' absolute offsets depend on the header length, and vice versa
        data_start = 8 + header_len
        meta_units = {u: [data_start + a, data_start + b] for u, (a, b) in spans.items() if b > a}
        header["__metadata__"] = {"format": "pt", "lema.format": PACKED_FORMAT,
                                  "lema.units": json.dumps(meta_units), "lema.random_shape": name}
        raw = json.dumps(header, separators=(",", ":")).encode()
        header_len = -(-(len(raw) + 8) // 64) * 64 - 8  # data section starts 64-byte aligned
    raw = raw.ljust(header_len, b" ")
    gen = torch.Generator(device=device).manual_seed(seed)
    chunk = 16 * 2**20  # elements per random draw: bounds RAM to ~64 MB whatever the model size
    tmp = weights + ".tmp"
    t0, written = time.perf_counter(), 0
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", header_len) + raw)
        for n in order:
            p = params[n]
            numel, std = p.numel(), (0.02 if p.dim() >= 2 else 0.0)
            for lo in range(0, numel, chunk):
                k = min(chunk, numel - lo)
                t = torch.ones(k) if std == 0.0 else torch.randn(k, generator=gen, device=device).mul_(std)
                t = t.to(dtype).cpu()
                f.write(t.numpy().tobytes() if dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
                written += k * dtype.itemsize
            if total > 2**30 and log is not None and n.endswith("down_proj.weight"):
                log(f"  building {name}: {human(written)} / {human(total)} "
                    f"({time.perf_counter() - t0:.0f} s)")
    os.replace(tmp, weights)
    hf_config.dtype = str(dtype).split(".")[-1]
    hf_config.save_pretrained(folder)
    with open(os.path.join(folder, "complete"), "w") as f:
        f.write(f"{total}\n")
    return folder


def _free_bytes(path: str) -> int:
    os.makedirs(path, exist_ok=True)
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
