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
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"dtype={name!r} is not supported; use one of float32, bfloat16, float16")
    return _DTYPES[name]


def parse_device(name: str | torch.device) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as e:
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


def parse_bytes(text: str | int | None, name: str = "max_vram") -> Optional[int]:
    """'16GB' -> 16e9 bytes, '512MiB' -> 512*2**20; an int is taken as bytes."""
    if text is None or isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = None
    if value is None or unit not in units or not 0 <= value < float("inf"):  # nan and inf are no size either
        raise ValueError(f"{name}={text!r} is not a size; write it like '16GB' or '12GiB'")
    return int(value * units[unit])


@dataclass
class LemaConfig:
    """Settings of a LEMA model: where the weights are, how they stream, and the LoRA adapter."""

    model_name_or_path: str = ""
    """A Transformers checkpoint folder (config.json + *.safetensors), e.g. one written by `lema convert`."""
    gbi_path: Optional[str] = None
    """A layer-packed weights file written by `lema convert`; None reads the folder's own safetensors."""
    strategy: MemoryStrategy = MemoryStrategy.STREAMING
    """streaming: decoder layers stream through a ring of slots; resident: all weights loaded once."""
    device: str = "cpu"
    """Where compute runs: 'cpu', 'cuda' or 'cuda:N'."""
    dtype: str = "float32"
    """Compute dtype of the frozen weights: float32, bfloat16 or float16 (adapters stay float32)."""
    lora_rank: int = 16
    """LoRA rank r."""
    lora_alpha: float = 32
    """LoRA alpha; the update is scaled by alpha / r."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input; the recompute in backward draws the same mask."""
    lora_target_modules: Optional[list[str]] = None
    """Module names to adapt (e.g. q_proj v_proj); None adapts every linear layer inside the decoder layers."""
    gradient_checkpointing: bool = True
    """Keep only each layer's input in forward and recompute the layer in backward (always on when streaming)."""
    num_buffers: int = 3
    """Ring depth: how many decoder layers' weights may be in device memory at once (>= 2)."""
    max_vram: Optional[str] = None
    """Device memory budget for the planner, e.g. '16GB' (on the CPU: anonymous memory, and glibc then returns
    freed tensors of 1 MiB or more to the OS); None: no budget check."""
    prefetch: bool = True
    """Load the next units in a background thread while the current one computes."""
    zero_copy: Optional[bool] = None
    """CPU: hand out views of the memory-mapped weights (no copy, page cache only) instead of reading each
    layer into a ring slot in the loader thread. None: views whenever the file is in the compute dtype.
    CUDA: True page-locks the layers' file pages for the GPU (cudaHostRegister, read-only) and copies each
    layer straight from them, with no pinned staging slot (the file must be in the compute dtype and the
    layers must fit in RAM; refused otherwise). None/False: staged through pinned slots (not yet measured
    against each other on a GPU, so staging stays the default there)."""
    page_cache: Optional[str] = None
    """Streaming (all but CUDA zero-copy, whose pages stay locked): how much of the page cache the streamed layers'
    file bytes may hold, e.g. '16GB'. A pager thread then keeps the layers needed soonest there (read ahead,
    mapped) and drops the rest, so disk reads overlap compute, whoever reads the pages (the CPU's views, the
    loader thread's conversions, a GPU's pinned staging). None: on when the streamed layers' file bytes exceed
    the memory available less 2 GiB, sized to that and shrunk where the kernel evicts part of it; 'off': leave
    the page cache to the kernel."""
    resident_layers: int = 0
    """Streaming: this many decoder layers stay loaded (on the device) for the whole run instead of streaming,
    spread evenly through the stack (not the first n, so the copies of the others keep overlapping compute);
    each saves two transfers per step. `lema plan` says how many fit the budget."""
    keep_activations: Optional[int] = None
    """How many decoder layers keep their activations from forward to backward instead of being recomputed
    (faster: no second forward; costs their activations' memory). None: as many as the memory budget allows
    (max_vram; else half the free memory); 0: recompute every layer."""
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
        if not self.model_name_or_path:
            raise ValueError("model_name_or_path is empty; give a Transformers checkpoint folder "
                             "(run `lema convert SRC OUT` to make one)")
        try:
            self.strategy = MemoryStrategy(self.strategy)
        except ValueError:
            raise ValueError(f"strategy={self.strategy!r} is not one of "
                             f"{[s.value for s in MemoryStrategy]}") from None
        if not isinstance(self.lora_rank, int) or self.lora_rank <= 0:
            raise ValueError(f"lora_rank={self.lora_rank!r} must be a positive integer (16 is usual)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        if not isinstance(self.num_buffers, int) or self.num_buffers < 2:
            raise ValueError(f"num_buffers={self.num_buffers!r} must be an integer >= 2: one slot computes "
                             "while the next loads (3 gives the triple buffer)")
        if self.keep_activations is not None and (not isinstance(self.keep_activations, int)
                                                  or self.keep_activations < 0):
            raise ValueError(f"keep_activations={self.keep_activations!r} must be a non-negative integer, "
                             "or None to let the planner choose")
        if not isinstance(self.resident_layers, int) or self.resident_layers < 0:
            raise ValueError(f"resident_layers={self.resident_layers!r} must be a non-negative integer "
                             "(0 streams every layer; `lema plan --max-vram ...` says how many fit)")
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        self.torch_dtype: torch.dtype = parse_dtype(self.dtype)
        self.torch_device: torch.device = parse_device(self.device)
        self.max_vram_bytes: Optional[int] = parse_bytes(self.max_vram)
        self.page_cache_bytes: Optional[int] = None if self.page_cache in (None, "off") else parse_bytes(
            self.page_cache, "page_cache")


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
