"""A unit's bytes and how they become weights.

A `UnitLayout` says where each of a unit's tensors sits inside one flat slot buffer (dtype,
shape, byte offset) and how to fill that buffer from the weight store:

- *packed*: the unit is one contiguous byte range of a layer-packed file, already in the compute
  dtype, laid out exactly as in the slot: the fill is one `pread` of that range into the slot;
- otherwise tensor by tensor, converting dtype (and running Transformers' conversions, e.g.
  Mixtral's expert fusion) on the way.

This is the seam for quantized units: an int8/NF4 unit is another layout whose `views` turn
slot bytes into weights (or into weight + scales that a quantized linear consumes).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..store import SafetensorsFile, WeightStore

ALIGN = 64  # bytes; keeps every tensor view aligned for vectorised kernels


@dataclass(frozen=True)
class Placement:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


class UnitLayout:
    """Placement of one unit's tensors in a flat uint8 slot, and the recipe to fill it."""

    def __init__(self, unit: str, placements: list[Placement], nbytes: int,
                 packed: Optional[tuple[SafetensorsFile, int, int]] = None,
                 ranges: Optional[list[tuple[SafetensorsFile, int, int]]] = None, stored_as_used: bool = True):
        self.unit = unit
        self.placements = placements
        self.nbytes = nbytes
        self.packed = packed  # (file, start, end) when the fill is a single read
        # (file, start, end) byte ranges the unit reads from the files, for the page cache (the prefetch hint, the
        # pager); stored as used: one per placement, in its order (CUDA registers them, zero-copy views them)
        self.ranges = ranges if ranges is not None else ([packed] if packed is not None else [])
        # every tensor lies in the file as one range of the compute dtype's layout (no tensor built on load from
        # several, such as Mixtral's stacked experts)
        self.stored_as_used = packed is not None or stored_as_used

    @classmethod
    def build(cls, unit: str, names: list[str], shapes: dict[str, tuple[int, ...]],
              dtype_of: Callable[[str], torch.dtype], store: WeightStore, direct_keys: dict[str, Optional[str]],
              built_from: Optional[dict[str, list[str]]] = None) -> "UnitLayout":
        """`dtype_of`: the dtype each tensor is held in (the compute dtype; float32 for those Transformers keeps
        so); `direct_keys`: each parameter's file key where it is stored as one tensor (else None); `built_from`:
        the file keys a tensor built on load is made from (its bytes are paged like the others')."""
        packed = store.units.get(unit)
        if packed is not None and all(direct_keys.get(n) for n in names):
            f, start, end = packed
            entries = [store.entry(direct_keys[n]) for n in names]
            # each tensor in its held dtype, aligned to it in the slot and in the file (the CPU's views of the
            # mapping: a unit after one that ends off float32's alignment is filled tensor by tensor instead)
            inside = all(start <= e.start and e.end <= end and e.dtype == dtype_of(n) and store.file_of(e.key) is f
                         and (e.start - start) % e.dtype.itemsize == 0 and e.start % e.dtype.itemsize == 0
                         for n, e in zip(names, entries))
            if inside:
                placements = [Placement(n, e.dtype, shapes[n], e.start - start) for n, e in zip(names, entries)]
                return cls(unit, placements, end - start, packed)
        offset, placements, ranges, seen = 0, [], [], set()
        for n in names:
            p = Placement(n, dtype_of(n), tuple(shapes[n]), offset)
            placements.append(p)
            offset += -(-p.nbytes // ALIGN) * ALIGN
            if direct_keys.get(n):
                keys = [direct_keys[n]]
            else:  # several tensors built from one group read its keys once
                keys = [k for k in (built_from or {}).get(n, []) if k not in seen]
                seen.update(keys)
            for key in keys:
                e = store.entry(key)
                ranges.append((store.file_of(e.key), e.start, e.end))
        return cls(unit, placements, offset, ranges=ranges, stored_as_used=all(direct_keys.get(n) for n in names))

    def fill(self, dst: torch.Tensor, read: Callable[[str], torch.Tensor], store: WeightStore,
             threads: int = 1) -> None:
        """Write the unit into `dst` (uint8, >= nbytes, CPU, usually pinned); a packed unit in one read,
        split over `threads` reader threads."""
        if self.packed is not None:
            f, start, end = self.packed
            f.read_into(start, end, dst[: end - start], threads)  # the one read
            return
        for p in self.placements:
            src = read(p.name)
            if tuple(src.shape) != p.shape:
                raise ValueError(f"weight {p.name!r} has shape {tuple(src.shape)} in the checkpoint but the model "
                                 f"config expects {p.shape}; the checkpoint does not match its config.json")
            self.view(dst, p).copy_(src)  # converts dtype when the file's differs

    @staticmethod
    def view(buf: torch.Tensor, p: Placement) -> torch.Tensor:
        return buf[p.offset: p.offset + p.nbytes].view(p.dtype).view(p.shape)

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unit's weights as views of a filled slot buffer (no copy)."""
        return {p.name: self.view(buf, p) for p in self.placements}


def registration_spans(layouts: list[UnitLayout], streamed: list[int], page: int = mmap.PAGESIZE) -> dict:
    """{file: [(lo, hi), ...]}: the streamed layers' byte ranges, page-rounded, with ranges that touch or
    overlap merged (a page is registered once: CUDA refuses a second registration), so a run of adjacent
    streamed layers is one span and a resident layer between two runs stays out of them."""
    by_file: dict = {}
    for i in streamed:
        for f, lo, hi in layouts[i].ranges:
            by_file.setdefault(f, []).append(((lo // page) * page, -(-hi // page) * page))
    spans: dict = {}
    for f, ranges in by_file.items():
        merged: list = []
        for lo, hi in sorted(ranges):
            if merged and lo <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        spans[f] = merged
    return spans
