"""LemaConfig: the one settings object of a run, resolved once at the edge.

Every field has a docstring under it; the command line reuses them as `--help` text
(`lema.cli` reads them with `field_docs`). Derived values (`torch_device`, `torch_dtype`)
are computed once in `__post_init__` and passed inward; nothing below this file parses
strings such as "cuda:1" or "bfloat16" again.
"""

from __future__ import annotations

import ast
import enum
import inspect
import math
import os
from dataclasses import dataclass, fields
from typing import Optional

import torch


class MemoryStrategy(str, enum.Enum):
    """Where the frozen base weights live during a step."""

    STREAMING = "streaming"
    """Decoder layers stream from the weights file through a ring of `num_buffers` slots."""
    RESIDENT = "resident"
    """Every unit is loaded into device memory once; the same engine otherwise."""


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype) and name in _DTYPES.values():
        return name
    if isinstance(name, str) and name in _DTYPES:
        return _DTYPES[name]
    raise ValueError(f"dtype={name!r} is not supported; use one of float32, bfloat16, float16")


def parse_device(name: str | torch.device) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:  # TypeError: None, a float, a list
        raise ValueError(f"device={name!r} is not a device name; use 'cpu', 'cuda' or 'cuda:N'") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but CUDA is not available on this machine "
                             "(no GPU, or a CPU-only PyTorch build); use device='cpu'")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"device={name!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise ValueError(f"device={name!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
    return device


def parse_bytes(text: str | int | float | None, name: str = "max_vram") -> Optional[int]:
    """'16GB' -> 16e9 bytes, '512MiB' -> 512*2**20; a number is taken as bytes (a float only if whole: 16e9).
    None stays None; anything else, zero and negative sizes included, is refused."""
    if text is None:
        return None
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    size = None
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    elif isinstance(text, float) and text.is_integer():  # nan and inf are not integer
        size = int(text)
    elif isinstance(text, str):
        s = text.strip().upper().replace(" ", "")
        number = s.rstrip("KMGTIB")
        unit = s[len(number):]
        try:
            value = float(number)
        except ValueError:
            value = math.nan
        if unit in units and math.isfinite(value):  # nan and inf are no size either
            size = int(value * units[unit])
    if size is None:
        raise ValueError(f"{name}={text!r} is not a size; write it like '16GB' or '12GiB', or give a whole number "
                         "of bytes")
    if size <= 0:
        raise ValueError(f"{name}={text!r} must be positive; write it like '16GB' or '12GiB'")
    return size


def check_seed(seed: int) -> None:
    """A seed torch.manual_seed takes as a whole number (beyond it: "Overflow when unpacking long long")."""
    if not 0 <= seed < 2**63:
        raise ValueError(f"--seed={seed} must be >= 0 and < 2**63")


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # True is an int to Python, not a rank


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _flag(v) -> bool:
    return v is None or isinstance(v, bool)


# field -> (accepts the value?, the rest of "field=value ..."): types and ranges LemaConfig can judge alone.
# Limits that need the model (keep_activations or resident_layers above its layer count) are LemaModel's.
_CHECKS = {
    "lora_rank": (lambda v: _integer(v) and v > 0, "must be a positive integer (16 is usual)"),
    "lora_alpha": (lambda v: _number(v) and v > 0,
                   "must be a number > 0: the update is scaled by alpha / r (2 * lora_rank is usual)"),
    "lora_dropout": (lambda v: _number(v) and 0 <= v < 1, "must be a number in [0, 1)"),
    "lora_target_modules": (lambda v: v is None or isinstance(v, (list, tuple)) and len(v) > 0
                            and all(isinstance(n, str) and n for n in v),
                            "must be a list of module names, e.g. ['q_proj'], or None for every linear layer "
                            "inside the decoder layers"),
    "num_buffers": (lambda v: _integer(v) and v >= 2, "must be an integer >= 2: one slot computes while the next "
                    "loads (3 gives the triple buffer)"),
    "keep_activations": (lambda v: v is None or _integer(v) and v >= 0,
                         "must be a non-negative integer, or None to let the planner choose"),
    "resident_layers": (lambda v: _integer(v) and v >= 0, "must be a non-negative integer (0 streams every "
                        "layer; `lema plan --max-vram ...` says how many fit)"),
    "gradient_checkpointing": (lambda v: isinstance(v, bool), "must be True or False"),
    "prefetch": (lambda v: isinstance(v, bool), "must be True or False"),
    "zero_copy": (_flag, "must be True, False or None (None: LEMA decides)"),
    "offload_activations": (_flag, "must be True, False or None (None: LEMA decides)"),
    "chunked_loss": (_flag, "must be True, False or None (None: LEMA decides)"),
}


@dataclass
class LemaConfig:
    """Settings of a LEMA model: where the weights are, how they stream, and the LoRA adapter."""

    model_name_or_path: str = ""
    """A Transformers checkpoint folder (config.json + *.safetensors), e.g. one written by `lema convert`
    (a str or any os.PathLike, kept as a str)."""
    gbi_path: Optional[str] = None
    """A layer-packed weights file written by `lema convert` (str or os.PathLike); None reads the folder's own
    safetensors."""
    strategy: MemoryStrategy = MemoryStrategy.STREAMING
    """streaming: decoder layers stream through a ring of slots; resident: all weights loaded once."""
    device: str = "cpu"
    """Where compute runs: 'cpu', 'cuda' or 'cuda:N' (or a torch.device)."""
    dtype: str = "float32"
    """Compute dtype of the frozen weights: float32, bfloat16 or float16, as a name or a torch.dtype (adapters stay
    float32)."""
    lora_rank: int = 16
    """LoRA rank r."""
    lora_alpha: float = 32
    """LoRA alpha, a number > 0; the update is scaled by alpha / r."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input, in [0, 1); the recompute in backward draws the same mask."""
    lora_target_modules: Optional[list[str]] = None
    """A list of module names to adapt (e.g. ['q_proj', 'v_proj']; names, not PEFT's regex string); None adapts
    every linear layer inside the decoder layers."""
    gradient_checkpointing: bool = True
    """Keep only each layer's input in forward and recompute the layer in backward (always on when streaming)."""
    num_buffers: int = 3
    """Ring depth: how many decoder layers' weights may be in device memory at once (>= 2; no more slots are made
    than there are layers to stream)."""
    max_vram: Optional[str | int] = None
    """Device memory budget for the planner, e.g. '16GB' or a number of bytes (on the CPU: anonymous memory, and
    glibc then returns freed tensors of 1 MiB or more to the OS); None: no budget check (`lema train` then refuses
    a plan whose peak passes the memory free at its start, and keeps layers' activations only within it)."""
    prefetch: bool = True
    """Load the next units in a background thread while the current one computes."""
    zero_copy: Optional[bool] = None
    """CPU: hand out views of the memory-mapped weights (no copy, page cache only) instead of reading each
    layer into a ring slot in the loader thread. None: views whenever the file is in the compute dtype.
    CUDA: True page-locks the streamed layers' file pages for the GPU (cudaHostRegister, read-only) and copies
    each layer straight from them, with no pinned staging slot (the file must hold the layers in the compute
    dtype and they must fit in RAM; refused otherwise). None: so wherever that holds and no `page_cache` size
    is given, else staged through pinned slots (on an H200 the 7B step took 0.69 s zero-copy, 1.05 s staged).
    False: staged."""
    page_cache: Optional[str | int] = None
    """Streaming (all but CUDA zero-copy, whose pages stay locked): how much of the page cache the streamed layers'
    file bytes may hold, e.g. '16GB' or a number of bytes (> 0). A pager thread then keeps the layers needed soonest
    there (read ahead, mapped) and drops the rest, so disk reads overlap compute, whoever reads the pages (the CPU's
    views, the loader thread's conversions, a GPU's pinned staging). None: on when the streamed layers' file bytes
    exceed the memory available less 2 GiB, sized to that and shrunk where the kernel evicts part of it; 'off':
    leave the page cache to the kernel."""
    resident_layers: int = 0
    """Streaming: this many decoder layers stay loaded (on the device) for the whole run instead of streaming,
    spread evenly through the stack (not the first n, so the copies of the others keep overlapping compute);
    each saves two transfers per step; the layer count or more keeps every layer. `lema plan` says how many fit
    the budget."""
    keep_activations: Optional[int] = None
    """How many decoder layers keep their activations from forward to backward instead of being recomputed
    (faster: no second forward; costs their activations' memory). None: as many as the memory budget allows
    (max_vram; else what the run leaves of the free memory, at most half); 0: recompute every layer."""
    offload_activations: Optional[bool] = None
    """Keep the recomputed layers' inputs (the boundary activations) in pinned host memory between forward
    and backward instead of device memory: a copy each way per layer, on a stream of its own, the next
    backward layer's input copied back while the current one recomputes (engine/streamed_layer.HostOffload).
    None: only when the step would not fit `max_vram` otherwise (the plan says so); the CPU never needs it."""
    chunked_loss: Optional[bool] = None
    """Compute the head and the loss in chunks of tokens, never building the full logits (a forward with
    labels then returns logits=None). None: only when a step's float32 logits would exceed 64 MiB;
    False: always Transformers' own head and loss, logits returned."""

    def __post_init__(self):
        for name in ("model_name_or_path", "gbi_path"):  # a pathlib.Path is as good as a str; kept as a str
            path = getattr(self, name)
            path = os.fspath(path) if isinstance(path, os.PathLike) else path
            if not (isinstance(path, str) or path is None and name == "gbi_path"):
                raise ValueError(f"{name}={path!r} must be a path: a str or an os.PathLike")
            setattr(self, name, path)
        if not self.model_name_or_path:
            raise ValueError("model_name_or_path is empty; give a Transformers checkpoint folder "
                             "(run `lema convert SRC OUT` to make one)")
        try:
            self.strategy = MemoryStrategy(self.strategy)
        except ValueError:
            raise ValueError(f"strategy={self.strategy!r} is not one of "
                             f"{[s.value for s in MemoryStrategy]}") from None
        for name, (ok, must) in _CHECKS.items():
            if not ok(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r} {must}")
        if self.lora_target_modules is not None:
            self.lora_target_modules = list(self.lora_target_modules)
        self.torch_dtype: torch.dtype = parse_dtype(self.dtype)
        self.torch_device: torch.device = parse_device(self.device)
        self.max_vram_bytes: Optional[int] = parse_bytes(self.max_vram)
        try:
            self.page_cache_bytes: Optional[int] = None if self.page_cache in (None, "off") else parse_bytes(
                self.page_cache, "page_cache")
        except ValueError as e:  # 0 would be a pager holding only the layers in use, not the page cache left alone
            raise ValueError(f"{e} ('off' leaves the page cache to the kernel)") from None


def field_docs(cls) -> dict[str, str]:
    """The docstring written under each dataclass field, for `--help` text."""
    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)):
            docs[node.target.id] = str(nxt.value.value).strip()
    return {f.name: docs.get(f.name, "") for f in fields(cls)}
