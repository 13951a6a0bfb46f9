"""The ring: `num_slots` weight slots filled by a loader thread in the order the step needs them.

NOTE [ring protocol] — every sync point in this file points here.

    schedule (set by the engine per pass):  F0 F1 ... F(L-1) | B(L-1) ... B1 B0
    slots s = 0..k-1, each: pinned host buffer P[s] (page-locked at its exact size, host_memory.PinnedBuffer)
                            and device buffer D[s] (CUDA),
                            or one host buffer (CPU, dtype conversion), or none (CPU zero-copy)

    main thread (acquire/release)           loader thread                  copy stream        compute stream
    ------------------------------          -------------                  -----------        --------------
    pick slot s for unit u (bookkeeping     wait h2d_done[s] (host):
      is main-thread only)                    P[s] free again
    put request(s, u) on the queue  ──────▶  fill P[s] from the mmap
                                             (one memcpy for a packed unit)
                                             copy stream waits done[s] ──▶ wait done[s]
                                                                           D[s] <- P[s] (async)
                                                                           record ready[s], h2d_done[s]
                                             set request.loaded  ─────┐
    acquire(u): wait request.loaded (host)  ◀─────────────────────────┘
      compute stream waits ready[s]  ──────────────────────────────────────────────────────▶ wait ready[s]
      bind views of D[s]; layer runs                                                         layer kernels
    release(u): record done[s] on compute stream ───────────────────────────────────────────▶ record done[s]

- Nothing calls torch.cuda.synchronize(); the host waits only on `request.loaded` (the loader
  has *issued* the copy) and, in the loader thread, on h2d_done[s] before overwriting P[s].
- A slot is chosen for refill only when it is not in use and its occupant is not needed within
  the look-ahead window; among those, the one whose next use is farthest (never, best). That is
  why the last forward layers' slots serve the first backward layers without a reload.
- A layer recomputed in backward stays in use until the next acquire or the end of the backward
  pass: autograd runs the layer's backward *after* the recompute returned, reading the bound
  weights (see engine/streamed_layer.py).
- CUDA zero-copy (`host_views`: the file's pages registered with cudaHostRegister, LemaConfig.zero_copy):
  no P[s]; the copy stream waits done[s] and copies D[s] <- the mmap's pages directly. Issuing that
  takes microseconds, so it runs inline at prefetch time, without the loader thread.
- On the CPU with zero-copy views there is no loader thread: `_load` runs inline at prefetch
  time; the disk -> page-cache stage is the kernel's read-ahead started by madvise(WILLNEED), or,
  when the layers do not all fit in the page cache, the pager's thread (stream/pager.py), which
  `begin` and every `acquire` tell where the schedule stands.
- Shutdown: `close()` waits for the copy stream, sets the stop event, joins, and unregisters the
  P[s] pages; the worker polls the queue with a timeout, so it exits within one poll interval. The
  worker holds the ring only by a weak reference, so a ring dropped without close() is freed too,
  and its worker exits at the next poll.
- Errors: a loader exception is carried to the consumer, re-raised at the acquire that waits for
  that unit, with the unit named; that slot is then freed, so a later acquire loads it afresh.
"""

from __future__ import annotations

import queue
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..host_memory import PinnedBuffer
from .layout import UnitLayout

POLL_S = 0.1


@dataclass
class _Request:
    slot: int
    unit: int
    loaded: threading.Event = field(default_factory=threading.Event)
    error: Optional[BaseException] = None


@dataclass
class _Slot:
    occupant: Optional[int] = None
    request: Optional[_Request] = None
    in_use: bool = False
    host: Optional[torch.Tensor] = None       # pinned staging (CUDA) or the slot itself (CPU conversion)
    pinned: Optional[PinnedBuffer] = None     # what page-locks `host` (CUDA)
    device: Optional[torch.Tensor] = None     # device buffer (CUDA)
    views: Optional[dict] = None              # the unit's weights, bound by the engine
    ready: object = None                      # CUDA events (see NOTE [ring protocol])
    done: object = None
    h2d_done: object = None


@dataclass
class RingStats:
    loads: int = 0              # units loaded into a slot
    hits: int = 0               # acquires served by a slot that already held the unit
    bytes_loaded: int = 0
    peak_in_use: int = 0        # most units bound at the same time
    peak_occupied: int = 0      # most slots holding a unit at the same time
    resident_hits: int = 0      # acquires of a resident unit (never loaded by the ring)


class WeightRing:
    """Serves decoder layers' weights through `num_slots` slots. See NOTE [ring protocol]."""

    def __init__(self, layouts: list[UnitLayout], fill: Callable[[UnitLayout, torch.Tensor], None],
                 zero_copy: Optional[Callable[[UnitLayout], dict]], hint: Callable[[UnitLayout], None],
                 device: torch.device, num_slots: int, prefetch: bool = True, pager=None,
                 resident: Optional[dict[int, dict]] = None,
                 host_views: Optional[Callable[[UnitLayout], list[tuple[int, torch.Tensor]]]] = None):
        """`resident`: units loaded once for the run (LemaConfig.resident_layers), unit -> its weights; they
        are served as they are and left out of the schedule, so the ring prefetches the next streamed unit
        while a resident one computes. `host_views` (CUDA, the file's pages registered with CUDA): a unit's
        (slot offset, page-locked view of the mmap) pieces, copied to the device slot with no pinned staging."""
        self.layouts = layouts
        self.resident = resident or {}
        self.pager = pager            # CPU zero-copy, weights over the page cache: stream/pager.py
        self._fill = fill
        self._zero_copy = zero_copy   # CPU, dtype already right: views of the mmap, no buffer at all
        self._hint = hint
        self._host_views = host_views  # CUDA zero-copy: the copy engine reads the page cache itself
        self.device = device
        self.slots = [_Slot() for _ in range(num_slots)]
        self.stats = RingStats()
        self.schedule: list[int] = []
        self.cursor = 0
        self._lock = threading.RLock()
        self.slot_bytes = max(l.nbytes for l in layouts) if layouts else 0
        cuda = device.type == "cuda"
        if zero_copy is None:
            for s in self.slots:
                # Preallocated once at the exact size: no allocation in the per-layer path.
                if host_views is None and cuda:
                    s.pinned = PinnedBuffer(self.slot_bytes)  # page-locked at its size, not a power of two
                    s.host = s.pinned.tensor
                elif host_views is None:
                    s.host = torch.empty(self.slot_bytes, dtype=torch.uint8)
                if cuda:
                    s.device = torch.empty(self.slot_bytes, dtype=torch.uint8, device=device)
                    s.ready, s.done, s.h2d_done = (torch.cuda.Event(), torch.cuda.Event(), torch.cuda.Event())
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        self._queue: "queue.Queue[_Request]" = queue.Queue()
        self._stop = threading.Event()
        self._thread = None
        # CPU zero-copy: a "load" is an madvise(WILLNEED) hint (the kernel reads ahead on its own) and a
        # few views; it runs inline, since a thread handoff per layer would cost more than the work.
        # With host_views a load only issues async copies: inline too (NOTE [ring protocol]).
        if prefetch and zero_copy is None and host_views is None:
            # Weakly: a ring (and the model owning it) dropped without close() is still freed (NOTE [ring protocol]).
            self._thread = threading.Thread(target=_worker, args=(weakref.ref(self), self._queue, self._stop),
                                            name="lema-loader", daemon=True)
            self._thread.start()

    # ----- schedule -----------------------------------------------------------------------
    def begin(self, schedule: list[int]) -> None:
        """Start a pass: the units will be acquired in this order."""
        with self._lock:
            self.schedule = [u for u in schedule if u not in self.resident]
            self.cursor = 0
        if self.pager is not None:
            self.pager.begin(self.schedule)

    def _next_use(self, unit: int) -> int:
        for pos in range(self.cursor, len(self.schedule)):
            if self.schedule[pos] == unit:
                return pos
        return len(self.schedule) + 1  # never again in this pass

    # ----- main-thread side ---------------------------------------------------------------
    def acquire(self, unit: int) -> dict:
        if unit in self.resident:
            self.stats.resident_hits += 1
            return self.resident[unit]
        with self._lock:
            pos = self._next_use(unit)
            if pos < len(self.schedule):  # on schedule, or skipping ahead in it: carry on from there
                self.cursor = pos + 1
            else:  # off-schedule (an unusual call order): serve it, prefetch nothing until the next begin()
                self.schedule = [unit]
                self.cursor = 1
            if self.pager is not None:
                self.pager.follow(self.schedule, self.cursor)
            slot = self._find(unit)
            if slot is not None:
                self.stats.hits += 1
            else:
                slot = self._start_load(unit, protect={unit})
            protect = set(self.schedule[self.cursor: self.cursor + len(self.slots) - 1]) | {unit}
            for upcoming in self.schedule[self.cursor: self.cursor + len(self.slots) - 1]:
                if self._find(upcoming) is None:  # prefetch what comes next into a free slot
                    if self._victim(protect) is None:
                        break
                    self._start_load(upcoming, protect)
            s = self.slots[slot]
            s.in_use = True
            self.stats.peak_in_use = max(self.stats.peak_in_use, sum(x.in_use for x in self.slots))
            request = s.request
        request.loaded.wait()  # host waits until the loader has issued this unit (NOTE [ring protocol])
        if request.error is not None:
            with self._lock:  # free the slot, so that a retry loads the unit afresh
                if s.request is request:
                    s.occupant, s.request, s.views, s.in_use = None, None, None, False
            where = "in the loader thread" if self._thread is not None else "at acquire"
            raise RuntimeError(f"loading {self.layouts[unit].unit} ({self.layouts[unit].nbytes} bytes) failed "
                               f"{where}: {type(request.error).__name__}: {request.error}") from request.error
        if s.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(s.ready)  # GPU-side wait, no host sync
        return s.views

    def release(self, unit: int) -> None:
        if unit in self.resident:
            return
        with self._lock:
            slot = self._find(unit)
            if slot is None:
                return
            s = self.slots[slot]
            s.in_use = False
            if s.done is not None:
                s.done.record(torch.cuda.current_stream(self.device))  # NOTE [ring protocol]

    def _find(self, unit: int) -> Optional[int]:
        for i, s in enumerate(self.slots):
            if s.occupant == unit:
                return i
        return None

    def _victim(self, protect: set) -> Optional[int]:
        best, best_use = None, -1
        for i, s in enumerate(self.slots):
            if s.in_use or (s.occupant is not None and s.occupant in protect):
                continue
            use = len(self.schedule) + 2 if s.occupant is None else self._next_use(s.occupant)
            if use > best_use:
                best, best_use = i, use
        return best

    def _start_load(self, unit: int, protect: set) -> int:
        slot = self._victim(protect)
        if slot is None:
            raise RuntimeError(f"all {len(self.slots)} ring slots are in use; raise num_buffers")
        s = self.slots[slot]
        s.occupant, s.views = unit, None
        s.request = _Request(slot, unit)
        self.stats.loads += 1
        self.stats.bytes_loaded += self.layouts[unit].nbytes
        self.stats.peak_occupied = max(self.stats.peak_occupied, sum(x.occupant is not None for x in self.slots))
        if self._thread is not None:
            self._queue.put(s.request)
        else:
            self._load(s.request)
        return slot

    # ----- loader side --------------------------------------------------------------------
    def _load(self, req: _Request) -> None:
        s = self.slots[req.slot]
        layout = self.layouts[req.unit]
        try:
            if self._zero_copy is not None:
                if self.pager is None:           # else the pager holds the window of upcoming layers
                    self._hint(layout)           # disk -> page cache, asynchronously in the kernel
                s.views = self._zero_copy(layout)
            elif self._host_views is not None:  # CUDA zero-copy: registered page cache -> D[s], no staging
                pieces = self._host_views(layout)
                with torch.cuda.stream(self.copy_stream):
                    self.copy_stream.wait_event(s.done)  # D[s]'s previous occupant is finished with
                    for offset, src in pieces:
                        s.device[offset: offset + src.numel()].copy_(src, non_blocking=True)
                    s.ready.record(self.copy_stream)
                s.views = layout.views(s.device)
            elif self.copy_stream is None:       # CPU with dtype conversion: the host buffer is the slot
                self._fill(layout, s.host)
                s.views = layout.views(s.host)
            else:
                s.h2d_done.synchronize()         # P[s] no longer read by the previous H2D copy
                self._fill(layout, s.host)       # mmap -> pinned
                with torch.cuda.stream(self.copy_stream):
                    self.copy_stream.wait_event(s.done)  # D[s]'s previous occupant is finished with
                    s.device[: layout.nbytes].copy_(s.host[: layout.nbytes], non_blocking=True)
                    s.ready.record(self.copy_stream)
                    s.h2d_done.record(self.copy_stream)
                s.views = layout.views(s.device)
        except BaseException as e:  # carried to the consumer (NOTE [ring protocol])
            req.error = e
        finally:
            req.loaded.set()

    def close(self) -> None:
        if self.copy_stream is not None:
            # copies still queued (a pass that raised mid-way) write slots the caching allocator may hand out
            # once the ring is gone, and, zero-copy, read pages the model unregisters next
            self.copy_stream.synchronize()
        self._stop.set()
        if self.pager is not None:
            self.pager.close()
        if self._thread is not None:
            if self._thread is not threading.current_thread():  # a finalizer may run on the worker itself
                self._thread.join(timeout=10 * POLL_S)
            self._thread = None
        for s in self.slots:  # no copy from them is queued now (the copy stream was synchronised above)
            if s.pinned is not None:
                s.pinned.release()

    def bytes_on_device(self) -> int:
        """Frozen-weight bytes the ring holds in device memory (its preallocated slots and resident units)."""
        resident = sum(t.numel() * t.element_size() for w in self.resident.values() for t in w.values())
        return resident + (sum(s.device.numel() for s in self.slots if s.device is not None) or (
            sum(s.host.numel() for s in self.slots if s.host is not None) if self.device.type == "cpu" else 0))


def _worker(ring_ref: "weakref.ref[WeightRing]", requests: "queue.Queue[_Request]", stop: threading.Event) -> None:
    """The loader thread (NOTE [ring protocol]); holds the ring strongly only while loading."""
    torch.set_num_threads(1)
    while not stop.is_set():
        try:
            req = requests.get(timeout=POLL_S)
        except queue.Empty:
            if ring_ref() is None:
                return
            continue
        ring = ring_ref()
        if ring is None:
            return
        ring._load(req)
        del ring


class ResidentLayers:
    """The RESIDENT strategy's weight source: every layer loaded once, same interface as the ring."""

    def __init__(self, layouts: list[UnitLayout], load):
        self.weights = [load(layout) for layout in layouts]
        self.nbytes = sum(t.numel() * t.element_size() for w in self.weights for t in w.values())

    def begin(self, schedule):  # nothing to prefetch
        pass

    def acquire(self, unit: int) -> dict:
        return self.weights[unit]

    def release(self, unit: int) -> None:
        pass

    def close(self) -> None:
        pass
