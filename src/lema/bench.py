"""Benchmark helpers for `lema bench`: model shapes, random-weight models on disk, timed workers.

- `SHAPES`: Transformers configs of well-known models (config only, no weights).
- `build_shape(name, cache)`: writes a random-weight checkpoint of that shape once, into
  `<cache>/shapes/<name>/`, tensor by tensor (a 27 GB model never sits in RAM). The file is a
  valid safetensors checkpoint (Transformers loads it) whose tensors are ordered unit by unit,
  with the `lema.units` byte ranges of a layer-packed file, so each layer is one contiguous read.
- `Worker`: one contender (Transformers + PEFT, LEMA RESIDENT, LEMA STREAMING) in its own
  process. The parent runs the contenders in interleaved rounds (one step each, in turn), so
  machine drift hits all of them alike, and only one runs at a time. Separate processes keep
  each contender's peak memory its own.

Peak memory on the CPU is the peak *anonymous* resident memory (`RssAnon` in /proc/self/status),
sampled every millisecond by a thread in the worker. `VmHWM` is not used: it counts file-backed
pages too, i.e. the page cache that the mmap'd weights occupy, which is not memory the run owns.
We report the peak both absolute and above the worker's baseline taken after imports (the Python
+ torch + Transformers runtime, a few hundred MB), and compare the latter with the planner.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import statistics
import struct
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Optional

from . import cpu_allocator
from .fsutil import default_cache
from .host_memory import heap_allocated
from .planner import human

if TYPE_CHECKING:  # for annotations; the functions import torch themselves
    import torch

# ----- shapes ---------------------------------------------------------------------------------

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


# ----- measurement helpers ----------------------------------------------------------------------

_statm: Optional[tuple[int, int]] = None  # (pid, fd of its /proc/<pid>/statm): reopened in a child process
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_anon() -> int:
    """Anonymous resident bytes of this process (heap, tensors; not the mmap'd page cache): /proc/self/status's
    RssAnon, read from /proc/self/statm as resident - shared (shared is the file and shmem pages), with one
    pread on a kept descriptor. The PeakSampler calls it every millisecond beside the step it measures: parsing
    /proc/self/status took ~30 us of Python a sample (with the GIL) and slowed a 7B STREAMING step by 8-10%
    (14.5 s against 13.1 s, 16 layers); this takes ~3 us."""
    global _statm
    pid = os.getpid()
    if _statm is None or _statm[0] != pid:
        _statm = (pid, os.open(f"/proc/{pid}/statm", os.O_RDONLY))
    fields = os.pread(_statm[1], 128, 0).split()
    return (int(fields[1]) - int(fields[2])) * _PAGE


def disk_read_bytes() -> int:
    """Bytes this process caused to be read from the block device (page faults and reads)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


CPU_STATES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_ticks() -> list[int]:
    """The machine's CPU time by state (/proc/stat), in ticks; [] where unavailable."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:1 + len(CPU_STATES)]]
    except (OSError, ValueError):
        return []


def cpu_shares(before: list[int], after: list[int]) -> dict[str, float]:
    """Where the machine's CPU time went between two `cpu_ticks()`: {state: fraction}. On a VM, `steal`
    is time the hypervisor took (e.g. to serve the virtual disk)."""
    d = [b - a for a, b in zip(before, after)]
    total = sum(d)
    return {n: v / total for n, v in zip(CPU_STATES, d)} if total > 0 else {}


# The kernel's memory work beside a step (/proc/vmstat, pages or events): reclaim by kswapd (in the background, on one
# of the cores) and by the allocating thread itself, compaction stalls (a 2 MiB page wanted, memory compacted first),
# and file pages read again after they were dropped or evicted. Target 2's remaining gap was open on these (session 13).
VM_COUNTERS = ("pgsteal_kswapd", "pgscan_kswapd", "pgsteal_direct", "compact_stall", "workingset_refault_file")


def vm_counters() -> dict[str, int]:
    """The machine's VM_COUNTERS now (/proc/vmstat), in bytes (compact_stall: events); {} where unavailable."""
    try:
        with open("/proc/vmstat") as f:
            found = dict(line.split() for line in f)
        return {k: int(found[k]) * (1 if k == "compact_stall" else _PAGE) for k in VM_COUNTERS if k in found}
    except (OSError, ValueError):
        return {}


class DevicePeak:
    """PeakSampler's interface over CUDA's allocator statistics: the peak of allocated device memory."""

    def __init__(self, device):
        import torch

        self.torch, self.device = torch, device
        self.peak = 0

    def start(self) -> None:
        self.torch.cuda.reset_peak_memory_stats(self.device)

    def pause(self) -> None:
        self.peak = max(self.peak, self.torch.cuda.max_memory_allocated(self.device))

    def reset(self) -> None:
        self.peak = 0

    def stop(self) -> None:
        pass


def h2d_ceiling(device, nbytes: int = 2**30, repeats: int = 5) -> float:
    """Bytes/s of pinned host -> device copies of `nbytes` (median of `repeats`, timed with CUDA events):
    the ceiling for streaming on a GPU."""
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)  # warm-up
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del host, dev
    return nbytes / statistics.median(times)


def gemm_ceiling(device, dtype, n: Optional[int] = None, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` n x n x n products in `dtype` (after one untimed): the compute ceiling,
    measured in the same run as the contenders (the CPU: n = 2048, 17 GFLOP; CUDA: n = 8192, 1.1 TFLOP)."""
    import torch

    cuda = torch.device(device).type == "cuda"
    n = n or (8192 if cuda else 2048)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    best = math.inf
    for i in range(repeats + 1):
        sync()  # host-device sync: the product is timed alone
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        if i:
            best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def step_flops(facts, dtype, batch: int, seq: int, recomputed: int) -> float:
    """The FLOPs of one LoRA training step's products, counted from the model's shape (`facts`: planner.ModelFacts):
    - the decoder layers' frozen weights: 2 N P in the forward, as much in the backward (the inputs' gradient
      only: the weights are frozen), and a forward again for each of the `recomputed` layers;
    - attention's two products: causal, half of 4 B T^2 H in a forward, twice that in a backward;
    - LoRA: 2 N r (in + out) per adapted linear in a forward, three times that in a backward (the input's
      gradient and both factors');
    - the head: its forward and its input's gradient, 2 N V H each.
    Norms, activations, softmax and the optimizer are not counted (under 1% at the bench's shapes); a MoE
    layer's experts are all counted (an upper bound: a token runs through a few)."""
    import torch

    tokens = batch * seq
    itemsize = torch.empty(0, dtype=dtype).element_size()
    params = sum(b for u, b in facts.unit_bytes.items() if u.startswith("layer.")) // itemsize
    attention = 2 * batch * seq * seq * facts.H * facts.L
    forward = 2 * tokens * params + attention + 2 * tokens * facts.lora_params
    backward = 2 * tokens * params + 2 * attention + 6 * tokens * facts.lora_params
    return forward + backward + forward * recomputed / facts.L + 4 * tokens * facts.V * facts.H


def allocated_bytes() -> Optional[int]:
    """The bytes the process's tensors hold: malloc's in use (host_memory.heap_allocated) plus the blocks LEMA's
    CPU allocator has handed out (cpu_allocator.py, mapped apart from malloc). None where not glibc 2.33+."""
    heap = heap_allocated()
    if heap is None:
        return None
    cached = cpu_allocator.stats()
    return heap + (cached.in_use_bytes if cached else 0)


class PeakSampler:
    """A thread sampling RssAnon every `interval` seconds while active; `peak` is the largest value seen.
    With `allocated` on, also the tensors' bytes in use (`allocated_bytes`), `peak_allocated`: not in a
    timed step, as glibc's mallinfo2 walks the heap's free lists under its lock (160-300 us a call on the
    SmolLM2 step, which it slowed by up to 10%).

    Sampling runs only between `start()` and `pause()` (the steps), so idle contenders waiting
    for their turn cost no CPU.
    """

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.peak = rss_anon()
        self.allocated = False
        self.peak_allocated: Optional[int] = None
        self._active = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lema-peak-rss", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            if not self._active.wait(0.05):
                continue
            self._sample()
            time.sleep(self.interval)

    def _sample(self) -> None:
        self.peak = max(self.peak, rss_anon())
        if self.allocated:
            now = allocated_bytes()
            if now is not None:
                self.peak_allocated = max(self.peak_allocated or 0, now)

    def start(self) -> None:
        self._sample()
        self._active.set()

    def pause(self) -> None:
        self._active.clear()
        self._sample()

    def reset(self) -> None:
        self.peak = rss_anon()

    def stop(self) -> None:
        self._active.clear()
        self._stop.set()
        self._thread.join()


def read_ceiling(path: str, cold: bool = False, limit: int = 4 * 2**30) -> float:
    """Bytes/s of a sequential read of `path` (up to `limit` bytes) in 64 MiB blocks.

    Warm (default): what the page cache serves, the ceiling for a model that fits in RAM.
    `cold=True` first drops the range from the page cache (posix_fadvise DONTNEED) so the disk
    itself is measured: the ceiling for a model larger than RAM.
    """
    size = min(os.path.getsize(path), limit)
    buf = bytearray(64 * 2**20)
    with open(path, "rb", buffering=0) as f:
        if cold:
            os.posix_fadvise(f.fileno(), 0, size, os.POSIX_FADV_DONTNEED)
        else:  # warm it first
            while f.tell() < size and f.readinto(buf):
                pass
            f.seek(0)
        t0, done = time.perf_counter(), 0
        while done < size:
            n = f.readinto(buf)
            if not n:
                break
            done += n
        dt = time.perf_counter() - t0
    return done / dt if dt > 0 else float("inf")


# ----- contenders -----------------------------------------------------------------------------

CONTENDERS = ("peft", "resident", "streaming")
LABELS = {"peft": "Transformers + PEFT", "resident": "LEMA RESIDENT", "streaming": "LEMA STREAMING",
          **{f"floor-{n}{kind}": f"floor probe, {n} layer{'s' if n > 1 else ''}{' kept' if kind else ''}"
             for n in range(1, 9) for kind in ("", "-kept")}}


@dataclass
class BenchSpec:
    model: str
    dtype: str = "float32"
    batch_size: int = 4
    seq_len: int = 256
    lora_rank: int = 16
    targets: Optional[list[str]] = None
    num_buffers: int = 3
    seed: int = 0
    keep_activations: Optional[int] = None   # LEMA contenders (LemaConfig.keep_activations; None: the planner's)
    resident_layers: int = 0                 # LEMA STREAMING (LemaConfig.resident_layers)
    offload_activations: Optional[bool] = None  # LEMA contenders (LemaConfig.offload_activations)
    chunked_loss: Optional[bool] = None      # LEMA contenders (LemaConfig.chunked_loss)
    zero_copy: Optional[bool] = None         # LEMA contenders (LemaConfig.zero_copy)
    page_cache: Optional[str] = None         # LEMA STREAMING (LemaConfig.page_cache)
    max_vram: Optional[str] = None           # LEMA contenders: the budget their plan (kept layers) fits in
    device: str = "cpu"                      # "cuda": every contender on the GPU, peak = device memory
    device_memory: Optional[int] = None      # CUDA: emulate a card of this many bytes (memory fraction)


class _Contender:
    """Builds one contender and runs one training step at a time (AdamW on the LoRA parameters)."""

    def __init__(self, name: str, spec: BenchSpec):
        self.name, self.spec = name, spec
        import torch

        vocab = _vocab(spec.model)
        gen = torch.Generator().manual_seed(spec.seed)
        self.ids = torch.randint(0, vocab, (spec.batch_size, spec.seq_len), generator=gen).to(spec.device)
        self.ring = None
        self.orientations = None  # the frozen linears' product orientations (LEMA on the CPU, and the floor probes)
        self.info: dict = {}
        if name == "peft":
            self._build_peft()
        elif name.startswith("floor-"):
            self._build_floor(int(name.split("-")[1]), checkpointing=not name.endswith("-kept"))
        else:
            self._build_lema()

    def _build_peft(self):
        import torch

        from peft import LoraConfig, get_peft_model
        from transformers import AutoConfig, AutoModelForCausalLM

        from .config import parse_dtype
        from .engine.skeleton import attention_implementation, default_lora_targets, find_decoder_layers

        spec = self.spec
        model = AutoModelForCausalLM.from_pretrained(
            spec.model, dtype=parse_dtype(spec.dtype),
            attn_implementation=attention_implementation(AutoConfig.from_pretrained(spec.model)))
        model.config.use_cache = False
        model.to(spec.device)
        targets = spec.targets or default_lora_targets(find_decoder_layers(model)[1])
        model = get_peft_model(model, LoraConfig(r=spec.lora_rank, lora_alpha=2 * spec.lora_rank,
                                                 lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM"))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        for n, p in model.named_parameters():  # LoRA in float32, as LEMA keeps it
            if ".lora_" in n:
                p.data = p.data.float()
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        model.train()
        self.model = model
        self.step = self._hf_step

    def _hf_step(self):
        """One step of a Transformers + PEFT model (the PEFT contender and the floor probes)."""
        out = self.model(input_ids=self.ids, labels=self.ids)
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    def _build_lema(self):
        import torch

        from .config import LemaConfig, MemoryStrategy
        from .model import LemaModel
        from .stream.ring import WeightRing

        spec = self.spec
        strategy = MemoryStrategy.STREAMING if self.name == "streaming" else MemoryStrategy.RESIDENT
        cfg = LemaConfig(model_name_or_path=spec.model, strategy=strategy, dtype=spec.dtype,
                         lora_rank=spec.lora_rank, lora_alpha=2 * spec.lora_rank,
                         lora_target_modules=spec.targets, num_buffers=spec.num_buffers,
                         keep_activations=spec.keep_activations, chunked_loss=spec.chunked_loss,
                         resident_layers=spec.resident_layers if strategy == MemoryStrategy.STREAMING else 0,
                         offload_activations=spec.offload_activations,
                         zero_copy=spec.zero_copy, page_cache=spec.page_cache, max_vram=spec.max_vram,
                         device=spec.device)
        self.model = LemaModel(cfg)
        self.orientations = self.model.linear_orientations
        tokens = spec.batch_size * spec.seq_len
        self.info = {"kept_layers": len(self.model.kept_layers(tokens, spec.seq_len)),
                     "zero_copy": isinstance(self.model.source, WeightRing) and (
                         self.model.source._zero_copy is not None or self.model.source._host_views is not None),
                     "chunked_loss": self.model.uses_chunked_loss(tokens),
                     "offload_activations": self.model.offloads_activations(tokens, spec.seq_len)}
        pager = getattr(self.model.source, "pager", None)
        if pager is not None:
            self.info["page_cache_window"] = pager.capacity()
        self.pager = pager
        self.model.initialize_lora(spec.seed)
        self.opt = torch.optim.AdamW(self.model.get_trainable_parameters(), lr=1e-4)
        trainer = self.model.get_trainer(self.opt)
        self.ring = self.model.source if isinstance(self.model.source, WeightRing) else None
        self.step = lambda: self._lema_step(trainer, pager)
        if spec.device == "cpu":  # on a GPU the host's acquire/release times are not the layers' compute
            self.spans = _time_layers(self.model.source)
            if pager is not None:
                pager.read_log = []

    def _lema_step(self, trainer, pager) -> float:
        loss = float(trainer.train_step(self.ids, labels=self.ids)[1])
        if pager is not None:  # its read-ahead counts in this step and never overlaps another contender's
            pager.wait_idle()
        return loss

    def _build_floor(self, layers: int, checkpointing: bool):
        """The floor's compute probe: this shape with `layers` decoder layers, all in RAM (random weights),
        Transformers + PEFT with the same LoRA; with checkpointing (a recomputed layer) or without (a kept
        layer). Run in the rounds beside the other contenders, so it sees the same machine."""
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoConfig, AutoModelForCausalLM

        from .config import parse_dtype
        from .engine import cpu_linear
        from .engine.skeleton import attention_implementation, default_lora_targets, find_decoder_layers

        spec = self.spec
        cfg = AutoConfig.from_pretrained(spec.model)
        cfg.num_hidden_layers = layers
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(cfg, dtype=parse_dtype(spec.dtype),
                                             attn_implementation=attention_implementation(cfg))
        m.config.use_cache = False
        m.to(spec.device)
        layers = find_decoder_layers(m)[1]
        targets = spec.targets or default_lora_targets(layers)
        m = get_peft_model(m, LoraConfig(r=spec.lora_rank, lora_alpha=2 * spec.lora_rank, target_modules=targets))
        if spec.device == "cpu":  # the frozen linears' products as LEMA's layers run them (engine/cpu_linear.py)
            self.orientations = cpu_linear.Orientations()
            cpu_linear.install(self.orientations, layers, m.get_output_embeddings())  # and the head, as LemaModel
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            m.enable_input_require_grads()
        self.opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        m.train()
        self.model = m
        self.step = self._hf_step

    def bytes_loaded(self) -> int:
        return self.ring.stats.bytes_loaded if self.ring is not None else 0


def _time_layers(source) -> list:
    """Record each layer's acquire and release on `source` (the ring or the resident layers), as
    ("acquire" | "release", unit, time when called, time when the acquire returned): a layer runs from its
    acquire to its release (in backward, its recompute and its backward: NOTE [ring protocol])."""
    spans: list = []
    acquire, release = source.acquire, source.release

    def timed_acquire(unit):
        t = time.perf_counter()
        views = acquire(unit)
        spans.append(("acquire", unit, t, time.perf_counter()))
        return views

    def timed_release(unit):
        t = time.perf_counter()
        spans.append(("release", unit, t, t))
        return release(unit)

    source.acquire, source.release = timed_acquire, timed_release
    return spans


def layer_timeline(spans: list, reads: list, step_s: float) -> dict:
    """Where a step's time went, from `_time_layers`' records and the pager's `read_log` of the same step:
    the layers' forward and backward time (a unit's first acquire-release in the step is its forward, a
    second its backward), the time outside the layers (embedding, head and loss, optimizer), the time spent
    waiting in acquire for weights, the pager's bytes and seconds reading (one layer at a time), and the mean
    time of a layer that ran while the pager read (more than a quarter of its span) against one that did not:
    whether reading slows the compute that runs beside it."""
    opened: dict = {}
    runs = []  # (unit, start, end, waited, pass)
    seen: set = set()
    for kind, unit, t, t_ret in spans:
        if kind == "acquire":
            opened[unit] = (t, t_ret - t)
        elif unit in opened:
            start, waited = opened.pop(unit)
            runs.append((unit, start, t, waited, "backward" if unit in seen else "forward"))
            seen.add(unit)

    def overlap(a: float, b: float) -> float:
        return sum(max(0.0, min(b, e) - max(a, s)) for s, e, _ in reads)

    out = {"forward_s": sum(e - s for _, s, e, _, p in runs if p == "forward"),
           "backward_s": sum(e - s for _, s, e, _, p in runs if p == "backward"),
           "layer_runs": len(runs), "wait_s": sum(w for *_, w, _ in runs), "read_bytes": sum(n for *_, n in reads),
           "read_s": sum(e - s for s, e, _ in reads)}
    out["outside_layers_s"] = step_s - out["forward_s"] - out["backward_s"]
    near = [e > s and overlap(s, e) > (e - s) / 4 for _, s, e, _, _ in runs]
    beside = [e - s for (_, s, e, _, _), b in zip(runs, near) if b]
    alone = [e - s for (_, s, e, _, _), b in zip(runs, near) if not b]
    out["beside_read"] = {"runs": len(beside), "mean_s": statistics.mean(beside) if beside else None}
    out["alone"] = {"runs": len(alone), "mean_s": statistics.mean(alone) if alone else None}
    return out


def _vocab(folder: str) -> int:
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    return cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")


def _worker_main(name: str, spec_dict: dict, conn, threads: int) -> None:
    """Runs in the contender's process: build, then serve 'step' / 'profile' / 'stop' requests."""
    import torch

    try:
        torch.set_num_threads(threads)
        import transformers  # noqa: F401  (imports before the baseline: the runtime is not the run's memory)
        import peft  # noqa: F401

        spec = BenchSpec(**spec_dict)
        cuda = spec.device.startswith("cuda")
        if cuda and spec.device_memory:  # a smaller card, emulated: the allocator refuses past this size
            device = torch.device(spec.device)
            device = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, spec.device_memory / total), device)
        sampler = DevicePeak(spec.device) if cuda else PeakSampler()
        baseline = 0 if cuda else rss_anon()  # device memory: all of it is the run's
        baseline_allocated = None if cuda else allocated_bytes()
        t0 = time.perf_counter()
        contender = _Contender(name, spec)
        conn.send({"ok": True, "baseline": baseline, "baseline_allocated": baseline_allocated,
                   "build_s": time.perf_counter() - t0, **contender.info})
        while True:
            cmd = conn.recv()
            if cmd["op"] == "stop":
                break
            if cmd["op"] == "step":
                if cmd.get("reset_peak"):
                    sampler.reset()
                pager = getattr(contender, "pager", None)
                if pager is not None and cmd.get("refill"):  # memory the bench took between steps (run_rounds)
                    pager.refill()
                    pager.wait_idle()
                b0, d0, c0, a0 = contender.bytes_loaded(), disk_read_bytes(), cpu_ticks(), cpu_allocator.stats()
                v0 = vm_counters()
                spans = getattr(contender, "spans", None)
                reads = getattr(pager, "read_log", None)
                for log in (spans, reads):
                    if log is not None:
                        log.clear()
                allocated = bool(cmd.get("allocated"))  # an untimed step measuring malloc's bytes in use
                if allocated:
                    sampler.allocated, sampler.peak_allocated = True, None
                dt = math.inf
                for _ in range(cmd.get("repeat", 1)):  # the floor probes: the fastest of a few steps
                    sampler.start()
                    t = time.perf_counter()
                    loss = float(contender.step())  # host sync: the step is finished when its loss is read
                    dt = min(dt, time.perf_counter() - t)
                    sampler.pause()
                msg = {"ok": True, "time": dt, "loss": loss, "bytes": contender.bytes_loaded() - b0,
                       "disk": disk_read_bytes() - d0, "peak": sampler.peak, "cpu": cpu_shares(c0, cpu_ticks()),
                       "peak_allocated": sampler.peak_allocated if allocated else None,
                       "vm": {k: n - v0[k] for k, n in vm_counters().items() if k in v0}}
                if allocated:
                    sampler.allocated = False
                if spans is not None and cmd.get("repeat", 1) == 1:
                    msg["layers"] = layer_timeline(spans, reads or [], dt)
                a1 = cpu_allocator.stats() if cpu_allocator.installed() else None
                if a1 is not None and a0 is not None:  # large blocks reused vs newly mapped, this step
                    msg["allocator"] = {"hits": a1.hits - a0.hits, "misses": a1.misses - a0.misses}
                orientations = contender.orientations
                if orientations is not None and orientations.timings:  # the shapes timed so far (cpu_linear.py)
                    msg["linear"] = [[*key[:4], *t, orientations.picked[key]]
                                     for key, t in orientations.timings.items()]
                if pager is not None and cmd.get("refill"):
                    pager.pause()  # the other contenders' turns: their memory is not this run's (refill resumes)
                if pager is not None:  # cumulative counts; the window of the last pass
                    msg.update(pager_late=pager.stats.late, pager_evicted=pager.stats.evicted_bytes,
                               pager_capacity=pager.stats.capacity, pager_trim=pager.stats.trim,
                               pager_shed=pager.stats.shed_bytes, pager_min_free=pager.stats.min_free,
                               pager_history=pager.stats.history)
                conn.send(msg)
            elif cmd["op"] == "profile":
                from torch.profiler import ProfilerActivity, profile

                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                with profile(activities=activities, record_shapes=False) as prof:
                    float(contender.step())
                prof.export_chrome_trace(cmd["path"])
                table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                                  row_limit=15)
                conn.send({"ok": True, "table": table})
        sampler.stop()
        if contender.ring is not None:
            contender.model.close()
    except (ValueError, OSError) as e:  # a bad input, named by the message: the parent says it in one line
        conn.send({"ok": False, "error": str(e), "trace": None})
    except BaseException as e:  # anything else is a bug: carried to the parent with the traceback
        conn.send({"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})
    finally:
        conn.close()


class Worker:
    """The parent's handle on one contender process."""

    def __init__(self, name: str, spec: BenchSpec, threads: int):
        ctx = mp.get_context("spawn")
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(name, asdict(spec), child, threads), daemon=True)
        self.proc.start()
        child.close()
        self.info: Optional[dict] = None

    def wait_ready(self) -> dict:
        """Block until the contender is built (its baseline memory and build time)."""
        self.info = self._recv()
        return self.info

    def _recv(self) -> dict:
        try:
            msg = self.conn.recv()
        except EOFError:
            self.proc.join()
            raise RuntimeError(f"{LABELS[self.name]} worker died (exit code {self.proc.exitcode}); "
                               "out of memory?") from None
        if not msg["ok"]:
            if msg["trace"] is None:
                raise ValueError(f"{LABELS[self.name]}: {msg['error']}")
            raise RuntimeError(f"{LABELS[self.name]} failed: {msg['error']}\n{msg['trace']}")
        return msg

    def request(self, **cmd) -> dict:
        self.conn.send(cmd)
        return self._recv()

    def close(self) -> None:
        try:
            self.conn.send({"op": "stop"})
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()


@dataclass
class ContenderResult:
    name: str
    label: str
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    bytes_per_step: int = 0
    disk_bytes_per_step: int = 0  # the median step's
    disk_reads: list[int] = field(default_factory=list)
    baseline_rss: int = 0
    peak_rss: int = 0
    baseline_allocated: Optional[int] = None  # malloc's bytes in use (CPU, glibc): after imports, and the peak
    peak_allocated: Optional[int] = None
    build_s: float = 0.0
    builds: int = 0  # processes built: 1, or one per round for a transient contender
    info: dict = field(default_factory=dict)  # LEMA contenders: kept_layers, chunked_loss
    timelines: list = field(default_factory=list)  # LEMA on the CPU: layer_timeline() of each measured step

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else math.nan


def run_rounds(names: list[str], spec: BenchSpec, steps: int, warmup: int = 1, threads: Optional[int] = None,
               log=print, transient: tuple[str, ...] = (), between_rounds=None
               ) -> tuple[dict[str, ContenderResult], dict[str, "Worker"]]:
    """Warm-up steps, then `steps` interleaved rounds: each contender one step per round, in turn; on the CPU,
    then one more step each, untimed, that measures the peak of malloc's bytes in use (PeakSampler).

    The `transient` contenders (the floor probes of a model bigger than the RAM) live for their turn only:
    built before it, their process ended after it, so that their memory is not taken from the page cache
    the streamed run holds its window in, as it is not in `lema train`. Before each of its steps a LEMA
    contender then reads back what the kernel evicted of its window for them (`PageCachePager.refill`,
    not timed): the step starts as a step of a training run does, with its window held."""
    import torch

    threads = threads or torch.get_num_threads()
    results = {n: ContenderResult(n, LABELS[n]) for n in names}
    workers: dict[str, Worker] = {}

    def start(n: str) -> None:
        workers[n] = Worker(n, spec, threads)

    def ready(n: str) -> None:
        info = workers[n].wait_ready()
        results[n].builds += 1
        if results[n].builds == 1:
            results[n].baseline_rss = info["baseline"]
            results[n].baseline_allocated = info.get("baseline_allocated")
            results[n].build_s = info["build_s"]
            results[n].info = {k: v for k, v in info.items() if k not in ("ok", "baseline", "baseline_allocated",
                                                                          "build_s")}

    try:
        log(f"building {', '.join(LABELS[n] for n in names if n not in transient)} (in parallel) ...")
        for n in names:  # builds overlap; steps never do
            if n not in transient:
                start(n)
        for n in names:
            if n not in transient:
                ready(n)
        warm = {n: {} for n in names}  # each contender's last warm-up reply: the pager's counts before the rounds
        for _ in range(warmup):
            for n in names:
                if n not in transient:  # a transient probe's fastest of PROBE_REPEATS steps skips its first
                    warm[n] = workers[n].request(op="step")
        for r in range(steps):
            order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
            for n in order:
                if n in transient:
                    start(n)
                    ready(n)
                m = workers[n].request(op="step", reset_peak=False, repeat=PROBE_REPEATS if n.startswith("floor") else 1,
                                       refill=bool(transient))
                if n in transient:
                    workers.pop(n).close()
                res = results[n]
                res.times.append(m["time"])
                res.losses.append(m["loss"])
                res.bytes_per_step = m["bytes"]
                res.disk_reads.append(m["disk"])
                res.disk_bytes_per_step = int(statistics.median(res.disk_reads))
                res.peak_rss = max(res.peak_rss, m["peak"])
                if "layers" in m:
                    res.timelines.append(m["layers"])
                if "linear" in m:  # (pass, rows, out, in, torch's s, transposed s, pick) of each timed product shape
                    res.info["linear_orientations"] = m["linear"]
                if "allocator" in m:  # LEMA's CPU allocator: the last measured step's reuse
                    res.info["cpu_allocator"] = m["allocator"]
                if m.get("cpu"):  # the machine's CPU during this contender's steps, mean over the rounds
                    prev = res.info.get("cpu", {})
                    res.info["cpu"] = {k: (prev.get(k, 0.0) * r + v) / (r + 1) for k, v in m["cpu"].items()}
                if m.get("vm") is not None:  # the kernel's memory work during its steps, mean per step
                    prev = res.info.get("vm_per_step", {})
                    res.info["vm_per_step"] = {k: (prev.get(k, 0.0) * r + v) / (r + 1) for k, v in m["vm"].items()}
                if "pager_late" in m:  # acquires whose layer the pager had not read ahead, per measured step
                    res.info["pager_late_per_step"] = (m["pager_late"] - warm[n].get("pager_late", 0)) / (r + 1)
                    res.info.update(page_cache_window=m["pager_capacity"], page_cache_trim=m["pager_trim"],
                                    page_cache_evicted_per_step=(m["pager_evicted"] - warm[n].get("pager_evicted", 0)) / (r + 1),
                                    page_cache_shed_per_step=(m["pager_shed"] - warm[n].get("pager_shed", 0)) / (r + 1),
                                    page_cache_min_free=m["pager_min_free"])
                    res.info["page_cache_passes"] = m["pager_history"]  # (window, evicted, shed, lowest free, trim)
            log(f"round {r + 1}/{steps}: " + ", ".join(f"{n} {results[n].times[-1]:.3f} s" for n in names))
            if between_rounds is not None:  # no contender runs now
                between_rounds()
        for n in names:  # one more step each, untimed: the peak of malloc's bytes in use (the CPU)
            if n not in transient and spec.device == "cpu":
                results[n].peak_allocated = workers[n].request(op="step", reset_peak=False, allocated=True,
                                                               refill=bool(transient)).get("peak_allocated")
        return results, workers
    except BaseException:
        for w in workers.values():
            w.close()
        raise


def profile_contenders(workers: dict[str, "Worker"], trace: str) -> dict[str, str]:
    """One profiled step per contender; the Chrome trace goes to TRACE (or TRACE-<name>.json)."""
    tables = {}
    root, ext = os.path.splitext(trace)
    for n, w in workers.items():
        path = trace if len(workers) == 1 else f"{root}-{n}{ext or '.json'}"
        tables[n] = w.request(op="profile", path=os.path.abspath(path))["table"]
    return tables


# The probes' layer counts: the per-layer time is (t(4) - t(1)) / 3, a third of the noise of t(2) - t(1)
# (with 1 and 2 layers the 7B shape's per-layer time read 1.02-1.52 s and the rest -0.02-0.90 s between runs).
FLOOR_LAYERS = (1, 4)
PROBE_REPEATS = 3  # a probe's time in a round is its fastest of this many steps: noise only ever adds time,
                   # and the per-layer time is a difference of two probes, which doubles their noise


def floor_probes(kept_layers: int, num_layers: int) -> list[str]:
    """The probe contenders `floor_from_rounds` needs for a step where `kept_layers` layers keep their activations."""
    kinds = ([""] if kept_layers < num_layers else []) + (["-kept"] if kept_layers > 0 else [])
    return [f"floor-{n}{k}" for k in kinds for n in FLOOR_LAYERS]


def floor_from_rounds(model: str, results: dict[str, ContenderResult], kept_layers: int) -> dict:
    """The floor's compute time from the probes timed in the same rounds (each probe's fastest step): with
    n layers, t(n) = t_rest +
    n * t_layer, for recomputed layers (checkpointed probes) and kept layers (probes without checkpointing);
    the step's compute is t_rest + kept * t_layer_kept + (L - kept) * t_layer."""
    from transformers import AutoConfig

    L = AutoConfig.from_pretrained(model).num_hidden_layers
    a, b = FLOOR_LAYERS
    kinds = [kind for kind in ("", "-kept") if f"floor-{a}{kind}" in results]

    def fit(pick):
        """(recomputed, kept, t_rest, compute) from the probe times `pick` chooses of each probe's steps;
        recomputed and kept are (rest, t_layer, {layers: time})."""
        fits = {}
        for kind in kinds:
            ta, tb = pick(results[f"floor-{a}{kind}"].times), pick(results[f"floor-{b}{kind}"].times)
            t_layer = (tb - ta) / (b - a)
            fits[kind] = (ta - a * t_layer, t_layer, {a: ta, b: tb})
        recomputed = fits.get("", fits.get("-kept"))  # a missing kind (the plan guessed otherwise): the other's
        kept = fits.get("-kept", recomputed)
        t_rest = (recomputed[0] + kept[0]) / 2
        return recomputed, kept, t_rest, t_rest + kept_layers * kept[1] + (L - kept_layers) * recomputed[1]

    # the fastest over all rounds: noise (steal, other processes) only adds time, and the per-layer time, a
    # difference of two probes, would carry both probes' noise (medians varied +-40% between runs)
    recomputed, kept, t_rest, compute = fit(min)
    # and each round's probes alone: the floor of the hour each round ran in, for a ratio round by round (the
    # machine's drift between rounds then cancels, as the interleaving intends)
    rounds = min(len(results[f"floor-{n}{kind}"].times) for kind in kinds for n in FLOOR_LAYERS)
    by_round = [fit(lambda times, r=r: times[r])[3] for r in range(rounds)]
    return {"t_layer": recomputed[1], "t_layer_kept": kept[1], "t_rest": t_rest, "kept_layers": kept_layers,
            "compute_s": compute, "layers_timed": recomputed[2], "layers_timed_kept": kept[2], "interleaved": True,
            "probe_repeats": PROBE_REPEATS, "compute_by_round_s": by_round}
