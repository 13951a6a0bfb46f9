"""The page-cache pager: on the CPU, for weights bigger than the RAM can cache.

With zero-copy views (NOTE [ring protocol]) the page cache is the disk -> RAM stage. When the
decoder layers do not all fit in it, leaving it to the kernel costs twice:

- the compute thread faults the missing pages in itself, so the disk reads run *in series* with
  the matmuls;
- the kernel's reclaim is LRU-like and knows nothing of the schedule, and evicts layers that are
  needed soonest.

Measured on the Llama-2-7B shape in fp32 (25 GiB on 24 GiB of RAM, BENCHMARKS.md, session 3),
back to back: left to the kernel, 87.7 s per step, 32.6 GiB read, 8% iowait; with the pager,
72.1 s, 22.6 GiB read, 1% iowait.

The schedule is known: F0..F(L-1), B(L-1)..B0, then the next step the same. So a thread holds a
*window*: the layers needed next, in the order of their next use, as many as `capacity` bytes
allow (the rest of this pass, then the pass again). It drops every layer outside the window
(munmap + fadvise(DONTNEED): what is passed and not needed again for longest, Belady's choice)
and populates the first layer of the window that it does not hold (MADV_POPULATE_READ: read
from the disk and mapped, in this thread, with the GIL released). With a window of C layers,
each pass reads L - C layers, spread over the C layers of compute before they are needed, and
the compute thread takes no fault:

    forward, cursor at F_i:   window = F_i .. F_(i+C-1)             drop F_(i-1), populate F_(i+C-1)
    turn:                     window = F_(L-C) .. F_(L-1) = B_(L-1) .. B_(L-C)    (nothing to read)
    backward, cursor at B_j:  window = B_j .. B_(j-C+1)             drop B_(j+1), populate B_(j-C+1)

Dropping and populating only change *where* bytes are: views stay valid, and a page the pager
dropped too early (or the kernel evicted) is read again on access. So a wrong window costs time,
never correctness.

How big the window may be is found out as the run goes. The page cache is the kernel's: when the
step's own memory grows (activations, optimizer state) or another process wants memory, the kernel
evicts pages, and its choice (least recently used) is the worst one here: the layers populated
longest ago are the ones needed soonest. So at every acquire the pager samples whether the layer it
holds is still in memory (mincore, ~0.3 ms), and at every pass start it re-checks the whole window
(evicted layers are read again ahead of use). A pass that lost more than 1% of the window shrinks
the next one by what was lost (`PagerStats.trim`); a pass that lost nothing grows it back by
REGROW_BYTES. Measured on the 7B shape with a fixed 2 GiB reserve: the window implied 10.6 GiB read
per step and the kernel's evictions made it 18.7 GiB.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

from ..host_memory import memory_available
from .layout import UnitLayout

POLL_S = 0.1
# Left to the process's growth during a step, the kernel and the rest of the machine, before the window adapts
# (module docstring): the least it starts with. Measured on the 7B shape (fp32, 23.5 GiB RAM, 3 GB of activations
# and state) with no adapting: with 2 GiB the kernel evicted window pages and a step read 18.7 GiB where the
# window implied 10.6 (56.9 s); with a window 2.3 GiB smaller it read the 15.1 GiB implied (53.5 s).
RESERVE_BYTES = 2 * 2**30
REGROW_BYTES = 256 * 2**20  # a pass the kernel evicted nothing of the window: the next may hold this much more
EVICTED_TOLERANCE = 0.01    # a pass that lost more than this share of the window shrinks the next one


def hold_window(schedule: list[int], cursor: int, sizes: list[int], capacity: int) -> list[int]:
    """The units to hold in the page cache, in the order of their next use: from the unit in use
    (schedule[cursor - 1]) through the rest of the pass and the next pass (the same schedule), as
    many distinct units as `capacity` bytes hold (the unit in use and the next one always)."""
    future = schedule[max(cursor - 1, 0):] + schedule
    want: list[int] = []
    seen: set[int] = set()
    total = 0
    for unit in future:
        if unit in seen:
            continue
        if len(want) >= 2 and total + sizes[unit] > capacity:
            break
        seen.add(unit)
        want.append(unit)
        total += sizes[unit]
    return want


@dataclass
class PagerStats:
    populated: int = 0          # units brought in by the pager
    bytes_populated: int = 0
    dropped: int = 0            # units dropped from the page cache
    late: int = 0               # acquires of a unit the pager had not brought in yet (compute faults it in)
    capacity: int = 0           # bytes of the window, last pass
    evicted_bytes: int = 0      # bytes of held units the kernel evicted, as found at acquires and pass starts
    trim: int = 0               # bytes the window is kept below the memory available less the reserve


class PageCachePager:
    """Holds the window of upcoming layers in the page cache (module docstring). The ring tells it
    the schedule (`begin`) and each acquire (`follow`); the work happens in its thread."""

    def __init__(self, layouts: list[UnitLayout], capacity: Optional[int] = None,
                 available: Callable[[], int] = memory_available, thread: bool = True):
        """`capacity`: bytes of the window (None: `available()` less RESERVE_BYTES at each pass);
        `thread=False`: no thread, the caller runs `step()` (a deterministic schedule, for tests)."""
        self.ranges = [layout.ranges for layout in layouts]
        self.sizes = [sum(end - start for _, start, end in r) for r in self.ranges]
        self.fixed_capacity = capacity
        self._available = available
        self.stats = PagerStats()
        # Unknown at the start: assume every unit cached, so the first window drops all the others.
        self.held: set[int] = set(range(len(layouts)))
        self._schedule: list[int] = []
        self._cursor = 0
        self._passes = 0
        self._evicted_in_pass = 0
        self._generation = 0
        self._cond = threading.Condition()
        self._idle = threading.Event()  # set while the window is held (nothing to read)
        self._idle.set()
        self._stop = False
        self._thread = None
        if thread:  # weakly: a model dropped without close() is still freed (as the ring's loader)
            self._thread = threading.Thread(target=_pager_main, args=(weakref.ref(self), self._cond),
                                            name="lema-pager", daemon=True)
            self._thread.start()

    def capacity(self) -> int:
        """Bytes the window may hold: fixed, or what the machine has available now (our own cached
        layers count as available) less a reserve for the step's growth."""
        if self.fixed_capacity is not None:
            return self.fixed_capacity
        return max(0, self._available() - RESERVE_BYTES - self.stats.trim)

    def begin(self, schedule: list[int]) -> None:
        """A pass starts: re-check the window (the kernel may have evicted some of it), size it from what
        the last pass lost (module docstring), and start holding it."""
        lost = self._recheck(count=self._passes > 0)  # the first pass: nothing was held yet
        with self._cond:
            self._adapt(self._evicted_in_pass + lost)
            self.stats.capacity = self.capacity()
            self._set(schedule, 0)

    def follow(self, schedule: list[int], cursor: int) -> None:
        """The ring acquired schedule[cursor - 1]."""
        unit = schedule[cursor - 1] if cursor > 0 else None
        missing = self._missing(unit) if unit in self.held else 0  # the compute reads these from the disk itself
        with self._cond:
            if unit is not None and unit not in self.held:
                self.stats.late += 1
            self._evicted_in_pass += missing
            self.stats.evicted_bytes += missing
            self._set(schedule, cursor)

    def refill(self) -> None:
        """Read back what the kernel evicted of the window, without counting it against the window's size:
        for memory taken by something outside the run (lema bench's floor probes run between its steps)."""
        self._recheck(count=False)
        with self._cond:
            self._set(self._schedule, self._cursor)

    def _missing(self, unit: int) -> int:
        """Bytes of `unit` not in the page cache (sampled; a few MiB are noise: the kernel's read-ahead)."""
        resident = sum(f.resident(start, end) * (end - start) for f, start, end in self.ranges[unit])
        missing = self.sizes[unit] - int(resident)
        return missing if missing > self.sizes[unit] // 100 else 0

    def _recheck(self, count: bool = True) -> int:
        """Forget the held units the kernel evicted (the thread reads them again); the bytes they miss."""
        lost = 0
        for unit in list(self.held):
            missing = self._missing(unit)
            if missing:
                self.held.discard(unit)
                lost += missing
        if count:
            self.stats.evicted_bytes += lost
        return lost

    def _adapt(self, evicted: int) -> None:
        """Between passes (under the lock): shrink the window by what the kernel evicted of it in the last
        pass, or grow it back by REGROW_BYTES after a pass that lost nothing; a fixed capacity stays."""
        if self.fixed_capacity is None and self._passes:
            if evicted > EVICTED_TOLERANCE * self.stats.capacity:
                self.stats.trim += evicted
            else:
                self.stats.trim = max(0, self.stats.trim - REGROW_BYTES)
        self._evicted_in_pass = 0
        self._passes += 1

    def _set(self, schedule: list[int], cursor: int) -> None:
        self._schedule, self._cursor = schedule, cursor
        self._generation += 1
        if self._thread is not None:
            self._idle.clear()
        self._cond.notify()

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Block until the thread holds the current window (a benchmark's step ends there, so that no
        reading spills into what is measured next); False on timeout."""
        return self._idle.wait(timeout)

    def step(self) -> bool:
        """One unit of work: drop what left the window, then populate the window's first missing
        unit. False when the window is held (nothing to do until the cursor moves)."""
        with self._cond:
            schedule, cursor, capacity = self._schedule, self._cursor, self.stats.capacity
        if not schedule:
            return False
        want = hold_window(schedule, cursor, self.sizes, capacity)
        keep = set(want)
        for unit in sorted(self.held - keep):
            self.held.discard(unit)  # first: a residency sample (follow, begin) never takes a drop for an eviction
            for f, start, end in self.ranges[unit]:
                f.drop(start, end)
            self.stats.dropped += 1
        for unit in want:
            if unit not in self.held:
                for f, start, end in self.ranges[unit]:
                    f.populate(start, end)
                self.held.add(unit)
                self.stats.populated += 1
                self.stats.bytes_populated += self.sizes[unit]
                return True
        return False

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._idle.set()
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10 * POLL_S)
        self._thread = None


def _pager_main(pager_ref: "weakref.ref[PageCachePager]", cond: threading.Condition) -> None:
    """The pager thread: works while the window is not held, then sleeps until the cursor moves.
    Holds the pager strongly only while working, so a dropped model is still freed."""
    done = -1
    while True:
        with cond:
            pager = pager_ref()
            if pager is None or pager._stop:
                return
            if pager._generation == done:
                del pager
                cond.wait(POLL_S)
                continue
            generation = pager._generation
        try:
            busy = pager.step()
        except (OSError, ValueError):  # a closed file (model shutting down): nothing left to page
            return
        if not busy:
            done = generation
            with cond:
                if pager._generation == generation:
                    pager._idle.set()
        del pager
