"""`lema bench`'s contenders, each in its own process: Transformers + PEFT, LEMA RESIDENT, LEMA STREAMING
and the floor's probes.

- `BenchSpec`: the run every contender is built for (the model, the step's size, LoRA, LEMA's settings).
- `Worker`: one contender (Transformers + PEFT, LEMA RESIDENT, LEMA STREAMING) in its own
  process, serving one step at a time. Separate processes keep each contender's peak memory its own.
- `layer_timeline`: where a LEMA step's time went on the CPU, layer by layer, beside the pager's reads.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import statistics
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Optional

from . import cpu_allocator
from .measure import (DevicePeak, PeakSampler, allocated_bytes, cpu_shares, cpu_ticks, disk_read_bytes,
                      peak_allocations, rss_anon, step_faults, vm_counters)

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

        from transformers import AutoConfig, AutoModelForCausalLM

        from .config import parse_dtype
        from .engine.skeleton import attention_implementation, default_lora_targets, find_decoder_layers, with_lora

        spec = self.spec
        model = AutoModelForCausalLM.from_pretrained(
            spec.model, dtype=parse_dtype(spec.dtype),
            attn_implementation=attention_implementation(AutoConfig.from_pretrained(spec.model)))
        model.config.use_cache = False
        model.to(spec.device)
        targets = spec.targets or default_lora_targets(find_decoder_layers(model)[1])
        model = with_lora(model, spec.lora_rank, 2 * spec.lora_rank, targets)
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
        from transformers import AutoConfig, AutoModelForCausalLM

        from .config import parse_dtype
        from .engine import cpu_linear
        from .engine.skeleton import attention_implementation, default_lora_targets, find_decoder_layers, with_lora

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
        m = with_lora(m, spec.lora_rank, 2 * spec.lora_rank, targets)
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
    """Runs in the contender's process: build, then serve 'step' / 'profile' / 'memory_peak' / 'stop' requests."""
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
                pager_thread = pager.thread_id if pager is not None else None
                v0, f0 = vm_counters(), step_faults((pager_thread,))
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
                repeats = cmd.get("repeat", 1)
                f1 = step_faults((pager_thread,))  # (minor, major) a step
                faults = [(n - n0) / repeats for n, n0 in zip(f1, f0)] if f0 is not None and f1 is not None else None
                msg = {"ok": True, "time": dt, "loss": loss, "bytes": contender.bytes_loaded() - b0, "faults": faults,
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
            elif cmd["op"] == "memory_peak":  # CUDA: one step's allocator history, what is live at its peak
                device = torch.device(spec.device)
                index = device.index if device.index is not None else torch.cuda.current_device()
                torch.cuda.synchronize(index)
                start = torch.cuda.memory_allocated(index)
                torch.cuda.reset_peak_memory_stats(index)
                torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
                try:
                    float(contender.step())
                    torch.cuda.synchronize(index)
                    snapshot = torch.cuda.memory._snapshot()
                finally:
                    torch.cuda.memory._record_memory_history(enabled=None)
                found = peak_allocations(snapshot, start, index)
                conn.send({"ok": True, **found, "max_memory_allocated": torch.cuda.max_memory_allocated(index)})
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

