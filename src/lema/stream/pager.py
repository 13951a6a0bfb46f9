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
longest ago are the ones needed soonest. And it reclaims in batches, far more than asked when a huge
page is wanted (the activations are in transparent huge pages, host_memory.py). So the pager keeps
the kernel from having to:

- It watches free memory (MemFree: before each populate, and every POLL_S while it holds the window).
  When free memory falls below FREE_CRITICAL_BYTES while the window is what crowds the memory (less than
  the reserve is available beyond it; stale cache of other files the kernel takes first), it drops the
  held layer needed last (Belady's choice) and holds a smaller window for the rest of the pass (`shed`).
- Between passes it sizes the window on the last pass: smaller by what it had to shed and by how far
  free memory fell below FREE_MARGIN_BYTES; after a pass that needed neither, larger by half of how far
  free memory stayed above the margin (`PagerStats.trim`, down to -(RESERVE_BYTES - 2 * FREE_MARGIN_BYTES):
  the window may take some of the reserve back when the step needs less).
- Evictions still happen (a huge page's compaction reclaims whatever it finds): at every acquire the
  pager samples whether the layer it holds is still cached (mincore, ~0.3 ms), and at every pass start
  it re-checks the whole window and reads evicted layers again ahead of use. A pass that lost more
  than EVICTED_TOLERANCE of the window shrinks the next one by what was lost.

Measured on the 7B shape (fp32, 23.5 GiB RAM, BENCHMARKS.md): with a fixed 2 GiB reserve, the window
implied 10.6 GiB read per step and the kernel's evictions made it 18.7 GiB; with eviction feedback only
(the window shrunk by what the kernel evicted), one run's first two steps lost 3-4 GiB to kswapd twice
and the window stayed 7.8 GiB smaller (28.2 GiB read per step); shedding a whole layer whenever free
memory was under 512 MiB ratcheted it 3.7 GiB smaller (19.6 GiB).
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..host_memory import memory_available, memory_free
from .layout import UnitLayout

POLL_S = 0.1
HISTORY = 64  # passes PagerStats.history keeps
# Left to the process's growth during a step, the kernel and the rest of the machine, before the window adapts
# (module docstring): the least it starts with. Measured on the 7B shape (fp32, 23.5 GiB RAM, 3 GB of activations
# and state) with no adapting: with 2 GiB the kernel evicted window pages and a step read 18.7 GiB where the
# window implied 10.6 (56.9 s); with a window 2.3 GiB smaller it read the 15.1 GiB implied (53.5 s).
RESERVE_BYTES = 2 * 2**30
EVICTED_TOLERANCE = 0.01    # a pass that lost more than this share of the window shrinks the next one
# The free memory the window is sized to leave at the step's peak, and the level at which the pager drops the
# window's last layer at once (module docstring): both above the kernel's low watermark (~80 MiB on 24 GiB),
# so the step's allocations find free memory without reclaim.
FREE_MARGIN_BYTES = 512 * 2**20
FREE_CRITICAL_BYTES = 256 * 2**20


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
    shed: int = 0               # held units the pager dropped early because free memory ran short
    shed_bytes: int = 0
    min_free: int = 0           # the lowest free memory seen in the last pass (while the window crowded it)
    trim: int = 0               # bytes the window is kept below the memory available less the reserve
    history: list = field(default_factory=list)  # the last HISTORY passes: (window, evicted, shed, lowest free, trim after)


class PageCachePager:
    """Holds the window of upcoming layers in the page cache (module docstring). The ring tells it
    the schedule (`begin`) and each acquire (`follow`); the work happens in its thread."""

    def __init__(self, layouts: list[UnitLayout], capacity: Optional[int] = None,
                 available: Callable[[], int] = memory_available, thread: bool = True,
                 free: Callable[[], int] = memory_free):
        """`capacity`: bytes of the window (None: `available()` less RESERVE_BYTES at each pass, kept within
        what `free()` allows during it); `thread=False`: no thread, the caller runs `step()` (a deterministic
        schedule, for tests)."""
        self.ranges = [layout.ranges for layout in layouts]
        self.sizes = [sum(end - start for _, start, end in r) for r in self.ranges]
        self.fixed_capacity = capacity
        self._available = available
        self._free = free
        self.stats = PagerStats()
        # Unknown at the start: assume every unit cached, so the first window drops all the others.
        self.held: set[int] = set(range(len(layouts)))
        self._schedule: list[int] = []
        self._cursor = 0
        self._passes = 0
        self._evicted_in_pass = 0
        self._min_free = None   # the lowest free memory seen in this pass while the window crowded the memory
        self._shed_in_pass = 0
        self._paused = False    # lema bench runs other processes between steps: their memory is not the run's
        self._generation = 0
        self._cond = threading.Condition()
        self._idle = threading.Event()  # set while the window is held (nothing to read)
        self._idle.set()
        self._stop = False
        self._thread = None
        self.read_log: Optional[list] = None  # a list: each populate appends (start, end, bytes), perf_counter times
        if thread:  # weakly: a model dropped without close() is still freed (as the ring's loader)
            self._thread = threading.Thread(target=_pager_main, args=(weakref.ref(self), self._cond),
                                            name="lema-pager", daemon=True)
            self._thread.start()

    @property
    def thread_id(self) -> Optional[int]:
        """The pager thread's native id (its page faults are its reads: `lema bench` counts a step's apart)."""
        return self._thread.native_id if self._thread is not None else None

    def expect_step(self, growth: int) -> None:
        """The coming training step will take `growth` more bytes of memory (activations, gradients, optimizer
        state: the plan's, beyond the weights and adapters). Before the first pass, where the window has nothing
        to adapt from yet, it starts that much below what the reserve leaves: the first step's growth then finds
        free memory instead of making the pager shed layers and the kernel evict others, and the reserve stays
        for the kernel and the rest of the machine (7B fp32 at 128 tokens, 1.7 GiB planned growth: with the window
        only the growth and the free margin below the memory available, the kernel evicted 7-8 GiB of it in the
        first step in two runs of three, BENCHMARKS.md session 10). Later passes size the window on what they saw
        (`_adapt`), growing it back by half the spare margin a pass."""
        with self._cond:
            if self.fixed_capacity is None and self._passes == 0:
                self.stats.trim = max(self.stats.trim, growth)

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
            self._adapt(self._evicted_in_pass + lost, self._min_free, self._shed_in_pass)
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
        for memory taken by something outside the run (lema bench's floor probes run between its steps).
        Every held layer is populated again, not only those the residency sample finds evicted: the sample
        (16 x 2 MiB a layer) misses scattered evictions, and the compute then faults them in itself (measured:
        6 GiB a step more than the window implied). Populating what is still cached only maps it."""
        with self._cond:
            self.held.clear()  # forget, don't drop: the thread populates the whole window again, in order
            self._paused = False
            self._set(self._schedule, self._cursor)

    def pause(self) -> None:
        """Until the next `refill`, watch no free memory and shed nothing: what other processes take between
        two steps (lema bench's other contenders) is not the run's, and refill reads back what they evict."""
        with self._cond:
            self._paused = True

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

    def _adapt(self, evicted: int, min_free: Optional[int], shed: int) -> None:
        """Between passes (under the lock): size the next window from the last pass (module docstring): smaller
        by what the kernel evicted of it, what the pager shed and how far free memory fell below the margin;
        after a pass that needed none of that, larger by half of how far free memory stayed above it. A fixed
        capacity stays."""
        if self.fixed_capacity is None and self._passes:
            if min_free is not None:
                self.stats.min_free = min_free
            shortfall = shed + (evicted if evicted > EVICTED_TOLERANCE * self.stats.capacity else 0)
            if min_free is not None and min_free < FREE_MARGIN_BYTES:
                shortfall += FREE_MARGIN_BYTES - min_free
            if shortfall:
                self.stats.trim += shortfall
            elif min_free is not None:
                floor = -(RESERVE_BYTES - 2 * FREE_MARGIN_BYTES)
                self.stats.trim = max(floor, self.stats.trim - (min_free - FREE_MARGIN_BYTES) // 2)
            self.stats.history = (self.stats.history + [(self.stats.capacity, evicted, shed, min_free,
                                                         self.stats.trim)])[-HISTORY:]
        self._evicted_in_pass = 0
        self._shed_in_pass = 0
        self._min_free = None
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
        unit, making room first when free memory is short (module docstring). False when the window
        is held (nothing to do until the cursor moves)."""
        with self._cond:
            schedule, cursor, capacity = self._schedule, self._cursor, self.stats.capacity
        if not schedule:
            return False
        want = hold_window(schedule, cursor, self.sizes, capacity)
        keep = set(want)
        for unit in sorted(self.held - keep):
            self._drop(unit)
        for i, unit in enumerate(want):
            if unit not in self.held:
                if i >= 2 and not self._make_room(want, i):
                    return False  # memory allows no more of the window this pass (it shrank to what is held)
                t0 = time.perf_counter()
                for f, start, end in self.ranges[unit]:
                    f.populate(start, end)
                if self.read_log is not None:
                    self.read_log.append((t0, time.perf_counter(), self.sizes[unit]))
                self.held.add(unit)
                self.stats.populated += 1
                self.stats.bytes_populated += self.sizes[unit]
                return True
        self._make_room(want, len(want))  # held: keep the margin while the step's memory grows
        return False

    def _drop(self, unit: int) -> None:
        self.held.discard(unit)  # first: a residency sample (follow, begin) never takes a drop for an eviction
        for f, start, end in self.ranges[unit]:
            f.drop(start, end)
        self.stats.dropped += 1

    def _short(self, need: int) -> bool:
        """Sample free memory; whether reading `need` more bytes would take it below FREE_CRITICAL_BYTES while
        the window is what crowds the memory (module docstring). Never with a fixed capacity: that size was
        asked for."""
        if self.fixed_capacity is not None or self._paused:
            return False
        free = self._free()
        if free < FREE_MARGIN_BYTES + need:
            held = sum(self.sizes[u] for u in self.held)
            if self._available() - held >= RESERVE_BYTES:
                return False  # others' cache is what fills the memory: the kernel reclaims that first
        with self._cond:
            self._min_free = free if self._min_free is None else min(self._min_free, free)
        return free < FREE_CRITICAL_BYTES + need

    def _make_room(self, want: list[int], i: int) -> bool:
        """Before reading want[i] (or, i == len(want), while holding the window): while free memory is short,
        drop the held unit of want[2:] needed last, if it is needed after want[i], and hold a window that
        ends before it for the rest of the pass. False when want[i] should not be read (no farther unit to
        give way)."""
        reading = i < len(want)
        need = self.sizes[want[i]] if reading else 0
        while self._short(need):
            farther = [u for u in want[max(i + 1, 2) if reading else 2:] if u in self.held]
            if not farther:
                if reading:  # the window is what is held: reading further would only evict it
                    self._end_window_before(want, i)
                return False
            unit = farther[-1]
            self._drop(unit)
            self._end_window_before(want, want.index(unit))
            with self._cond:
                self.stats.shed += 1
                self.stats.shed_bytes += self.sizes[unit]
                self._shed_in_pass += self.sizes[unit]
        return True

    def _end_window_before(self, want: list[int], k: int) -> None:
        """For the rest of the pass, hold no more of the window than its units before want[k]."""
        with self._cond:
            self.stats.capacity = min(self.stats.capacity, sum(self.sizes[u] for u in want[:k]))

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._idle.set()
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10 * POLL_S)
        self._thread = None


def _pager_main(pager_ref: "weakref.ref[PageCachePager]", cond: threading.Condition) -> None:
    """The pager thread: works while the window is not held, then sleeps until the cursor moves, waking
    every POLL_S to check free memory. Holds the pager strongly only while working, so a dropped model
    is still freed."""
    done = -1
    while True:
        with cond:
            pager = pager_ref()
            if pager is None or pager._stop:
                return
            if pager._generation == done:  # the window is held: wait for the cursor, at most POLL_S, then
                del pager                    # step() again all the same (it keeps the free-memory margin)
                cond.wait(POLL_S)
                pager = pager_ref()
                if pager is None or pager._stop:
                    return
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
