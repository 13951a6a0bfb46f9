"""The plan of one training step as `lema plan` prints it: the `Plan` the planner fills, its rows and table,
and `spread`, which layers of the stack the resident (and kept) layers are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from .plan_bytes import largest_layer_bytes

if TYPE_CHECKING:  # for annotations; the functions import torch themselves
    import torch


@dataclass
class Row:
    item: str
    where: str
    nbytes: int
    note: str = ""


@dataclass
class Plan:
    """A plan for one training step. Byte counts are exact for weights and LoRA, estimates for activations."""

    model_type: str
    dtype: torch.dtype
    device_type: str
    strategy: str
    batch_size: int
    seq_len: int
    lora_rank: int
    max_vram_bytes: Optional[int]
    num_layers: int
    unit_bytes: dict[str, int]
    slot_bytes: int
    lora_params: int
    lora_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    boundary_bytes: int
    logits_bytes: int
    head_work_bytes: int
    layer_work_bytes: int
    layer_saved_bytes: int
    ring_depth: int
    ring_device_bytes: int
    ring_host_bytes: int
    frozen_device_bytes: int
    peak_bytes: int
    peak_phase: str
    activations_on: str = "device"
    resident_layers: int = 0        # streaming: layers loaded once for the run (applied: LemaConfig.resident_layers)
    resident_layer_indices: list[int] = field(default_factory=list)  # which: spread through the stack
    resident_layers_fit: int = 0    # how many the budget would allow in all
    resident_auto: bool = False     # resident_layers decided by the plan (split_room), not given
    modelled_s: Optional[tuple[float, float]] = None  # GPU streaming: (streaming, compute) s of step_time_model
    ring_depth_fit: int = 0
    chunked_loss: bool = False
    kept_layers: int = 0            # decoder layers keeping their activations (no recompute)
    kept_extra_bytes: int = 0       # what one kept layer saves beyond its input
    keep_decided_at_run_time: bool = False
    advice: list[str] = field(default_factory=list)
    layer_terms: dict[str, int] = field(default_factory=dict)
    # CPU, weights as views: how many decoder layers the page cache holds (None: not applicable), the
    # pager's window in bytes (0: no pager) and the bytes read from disk per training step, steady state
    page_cache_layers: Optional[int] = None
    gpu_copies: Optional[str] = None  # a GPU's layer copies: "zero-copy", or "staged: <why>" (planner.cuda_zero_copy)
    page_cache_window: int = 0
    page_cache_adaptive: bool = False  # the window is sized at run time (smaller where the kernel evicts from it)
    disk_read_bytes: int = 0
    embedding_view_bytes: int = 0  # CPU, file in the compute dtype: the untied embedding stays a view of the mmap
    allocator_cache_bytes: int = 0  # CPU: what LEMA's CPU allocator may hold above the live peak
    hidden_streams: int = 1  # H-wide hidden states stacked in a layer's input (Gemma 3n's AltUp: 4)
    shared_layer_bytes: int = 0  # of the head unit, the blocks several decoder layers share (Zamba's), resident

    @property
    def layer_bytes(self) -> int:
        return largest_layer_bytes(self.unit_bytes)

    def _embedding_row(self) -> Row:
        embed, view = self.unit_bytes["embed"], self.embedding_view_bytes
        if not view:
            return Row("embedding", self.device_type, embed, "frozen, resident")
        if view == embed:
            return Row("embedding", "page cache", 0, f"a view of the mmap'd weights: lookups read their rows of "
                                                     f"{human(view)}")
        return Row("embedding", self.device_type, embed - view, f"frozen, resident; the {human(view)} not tied to "
                                                                f"the head a view of the mmap'd weights")

    def rows(self) -> list[Row]:
        L = self.num_layers
        dev = self.device_type
        ring_note = f"{self.ring_depth} slots x {human(self.slot_bytes)}"
        if self.strategy == "resident":
            ring = Row(f"decoder layers ({L})", dev, self.frozen_device_bytes - self.unit_bytes["embed"]
                       + self.embedding_view_bytes - self.unit_bytes["head"], "resident (strategy resident)")
        elif self.ring_device_bytes == 0:
            ring = Row(f"ring ({self.ring_depth} slots)", "page cache", 0,
                       f"views of the mmap'd weights; {ring_note} of page cache")
        else:
            ring = Row(f"ring ({self.ring_depth} slots)", dev, self.ring_device_bytes, ring_note)
        resident = ([Row(f"resident layers ({self.resident_layers})", dev, self.resident_layers * self.slot_bytes,
                         f"loaded once: layers {_short(self.resident_layer_indices)}")]
                    if self.strategy == "streaming" and self.resident_layers else [])
        head = self.unit_bytes["head"] - self.shared_layer_bytes
        shared = [Row("blocks shared by layers", dev, self.shared_layer_bytes, "frozen, resident: run by several "
                      "decoder layers")] if self.shared_layer_bytes else []
        rows = [
            self._embedding_row(),
            Row("head (norm + lm_head)", dev, head,
                "frozen, resident" + (" (tied to the embedding)" if head < 1024 else "")),
            *shared,
            ring,
            *resident,
            Row("LoRA adapters", dev, self.lora_bytes, f"{self.lora_params:,} params, r={self.lora_rank}, fp32"),
            Row("LoRA gradients", dev, self.grad_bytes, "fp32"),
            Row("optimizer state", dev, self.optimizer_bytes, "AdamW: 2 x LoRA, fp32"),
            Row("boundary activations", dev if self.activations_on == "device" else "host", self.boundary_bytes,
                f"{L} x B{self.batch_size} x T{self.seq_len} x H x {self.dtype.itemsize} B"
                + (f" x {self.hidden_streams} streams" if self.hidden_streams > 1 else "")),
            Row(f"kept activations ({self.kept_layers} layers)", dev, self.kept_layers * self.kept_extra_bytes,
                f"saved for backward, no recompute: {human(self.kept_extra_bytes)} per layer"),
            Row("logits kept", dev, self.logits_bytes,
                "none: chunked loss" if self.chunked_loss else "B x T x V x s, until the step returns"),
            Row("head work (loss)", dev, self.head_work_bytes,
                "transient: one chunk's logits + grads" if self.chunked_loss
                else "transient: log-softmax + grads, fp32"),
            Row("one layer's recompute", dev, self.layer_work_bytes, "transient: saved + backward tensors"
                + ("; attention masked (padding, a sliding window or chunk): k, v per head, SDPA's mask"
                   if "attention mask" in self.layer_terms else "")),
        ]
        if self.allocator_cache_bytes:
            rows.append(Row("allocator cache", dev, self.allocator_cache_bytes,
                            "at most, above the live peak: freed blocks >= 64 KiB kept for reuse"))
        if self.ring_host_bytes:
            rows.append(Row("pinned host slots", "host", self.ring_host_bytes, ring_note + " (not in the budget)"))
        return rows

    def table(self) -> str:
        """The plan as a printable table, the predicted peak and the decisions."""
        head = (f"memory plan: {self.model_type}, {str(self.dtype).split('.')[-1]}, {self.strategy}, "
                f"device {self.device_type}, batch {self.batch_size} x seq {self.seq_len}, LoRA r{self.lora_rank}")
        w = max(len(r.item) for r in self.rows())
        lines = [head, "",
                 f"  {'what':<{w}}  {'where':<10}  {'bytes':>15}  {'':>10}  note",
                 f"  {'-' * w}  {'-' * 10}  {'-' * 15}  {'-' * 10}  ----"]
        for r in self.rows():
            lines.append(f"  {r.item:<{w}}  {r.where:<10}  {r.nbytes:>15,}  {human(r.nbytes):>10}  {r.note}")
        lines.append("")
        lines.append(f"  predicted peak: {human(self.peak_bytes)} ({self.peak_bytes:,} B), at {self.peak_phase}"
                     + ("; plus the layers that keep their activations, decided at run time from the free memory "
                        "(--keep-activations N or --max-vram fixes them here)" if self.keep_decided_at_run_time else ""))
        if self.max_vram_bytes is not None:
            lines.append(f"  budget:         {human(self.max_vram_bytes)}, headroom "
                         f"{human(self.max_vram_bytes - self.peak_bytes)}")
        lines.append("")
        lines.append("  decisions:")
        lines.append(f"    ring depth: {self.ring_depth} (applied: num_buffers, no more than the streamed layers)"
                     + (f"; the budget would allow {self.ring_depth_fit}" if self.ring_depth_fit > self.ring_depth
                        else ""))
        lines.append(f"    boundary activations: "
                     + ("on the device" if self.activations_on == "device" else "in pinned host memory (one copy each "
                        "way per recomputed layer)") + " (applied: --offload-activations)")
        if self.strategy == "streaming":
            n, fit = self.resident_layers, self.resident_layers_fit
            how = ("auto: streaming time against compute, --resident-layers N to set" if self.resident_auto
                   else "applied: --resident-layers")
            if self.resident_auto and self.device_type == "cpu":
                how = "auto: none on the CPU, where the page cache holds the layers"
            elif self.resident_auto and self.keep_decided_at_run_time:  # no budget, no free memory known here
                how = "auto: no --max-vram here, so `lema train` decides from the device's free memory"
            lines.append(f"    resident layers: {n} ({how}"
                         + (f"; layers {_short(self.resident_layer_indices)}" if n else "") + ")"
                         + (f"; {fit} would fit the budget, spread as layers {_short(spread(fit, self.num_layers))}"
                            if fit > n else ""))
        if self.gpu_copies and self.resident_layers < self.num_layers:
            lines.append("    host to device: " + (
                "zero-copy, each layer one DMA from its file pages, registered with CUDA and locked in RAM "
                "(--zero-copy off stages them)" if self.gpu_copies == "zero-copy" else
                f"through pinned host slots ({self.gpu_copies.split(': ', 1)[-1]})"))
        if self.modelled_s:
            lines.append(f"    time model (rates measured on an H200; another card scales both): streaming "
                         f"{self.modelled_s[0]:.2f} s, compute {self.modelled_s[1]:.2f} s per step, overlapped")
        lines.append(f"    loss: {'chunked, the full logits never built' if self.chunked_loss else 'full logits'}"
                     " (applied)")
        if self.keep_decided_at_run_time:
            lines.append(f"    kept activations: decided at run time from free memory "
                         f"({human(self.kept_extra_bytes)} per layer kept instead of recomputed)")
        else:
            lines.append(f"    kept activations: {self.kept_layers} of {self.num_layers} layers skip the recompute (applied)")
        if self.page_cache_layers is not None:
            L, held = self.num_layers - self.resident_layers, self.page_cache_layers
            if L == 0:
                lines.append("    page cache: every layer is resident, read from disk once")
            elif held >= L:
                lines.append(f"    page cache: all {L} layers fit; read from disk once")
            else:
                how = (f"the pager holds a window of {'up to ' if self.page_cache_adaptive else ''}{held} layers "
                       f"({human(self.page_cache_window)}{', less what the kernel evicts of it' if self.page_cache_adaptive else ''}) and reads"
                       if self.page_cache_window else f"about {held} stay cached (page cache left to the kernel,"
                       " which evicts more);")
                lines.append(f"    page cache: {held} of {L} layers fit; {how} 2 x {L - held} layers "
                             f"= {human(self.disk_read_bytes)} from disk per training step (applied)")
                if self.modelled_s and self.disk_read_bytes:  # a GPU: the disk against the time model's bus
                    rate = self.disk_read_bytes / max(self.modelled_s)
                    lines.append(f"    disk: reading that in the time model's {max(self.modelled_s):.2f} s step takes "
                                 f"{rate / 1e9:.1f} GB/s; a slower disk sets the step time")
        for a in self.advice:
            lines.append(f"    advice: {a}")
        return "\n".join(lines)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _short(idx: list[int]) -> str:
    return str(idx) if len(idx) <= 8 else f"[{', '.join(map(str, idx[:6]))}, ..., {idx[-1]}] (every ~{idx[1] - idx[0]})"


def ring_depth(num_buffers: int, streamed: int) -> int:
    """Slots of a ring for `streamed` layers: `num_buffers`, no more than the layers (a slot past them would hold
    nothing), at least 2 (one computes while the next loads); 0 where nothing streams (LemaModel and the plan)."""
    return min(num_buffers, max(2, streamed)) if streamed > 0 else 0


def spread(n: int, L: int) -> list[int]:
    """n layer indices spread evenly through 0..L-1 (not the first n: transfers keep overlapping compute)."""
    if n <= 0:
        return []
    if n >= L:
        return list(range(L))
    return sorted({int((i + 0.5) * L / n) for i in range(n)})
