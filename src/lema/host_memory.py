"""Host (CPU) memory that follows the plan: freed tensors go back to the OS.

glibc's malloc keeps freed memory below its mmap threshold (which grows up to 32 MiB as large
blocks are freed) in its heap, and a few MiB-sized tensors that live long (a layer's output kept
for the recompute) pin the heap's high-water mark: measured on the Llama-2-7B shape at 128 tokens,
the resident anonymous memory grew by ~1 GiB over one forward while the tensors alive grew by
~0.1 GiB. With the threshold fixed at 1 MiB, every tensor of 1 MiB or more is its own mapping,
returned to the OS when freed, and the process's anonymous memory stays close to the planner's
peak. The price is a fresh mapping (and its page faults) per large tensor, so LEMA sets it only
when a CPU run has a memory budget (`LemaConfig.max_vram` with device='cpu'), and the `lema` command
asks PyTorch for huge pages (`use_huge_pages_for_tensors`), which makes those faults 512 times fewer
where the memory has free 2 MiB blocks; LEMA also installs its caching CPU allocator on every CPU run
(cpu_allocator.py), which reuses freed blocks of 64 KiB or more by size, so the faults are paid once.

Also here: `madvise` and `resident_fraction` (ctypes, GIL released) and `memory_available` for the
page-cache pager (stream/pager.py), within a container's memory cgroup limit where it has one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
from typing import Optional

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
THRESHOLD_BYTES = 1 << 20


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = None


def _c_library():
    """The C library, loaded once, with the signatures used here; False where there is none."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name, use_errno=True) if name else False
        except OSError:
            _libc = False
        if _libc:
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _libc.madvise.restype = ctypes.c_int
            _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            _libc.mincore.restype = ctypes.c_int
            if hasattr(_libc, "mallinfo2"):  # glibc >= 2.33
                _libc.mallinfo2.restype = _Mallinfo2
    return _libc


def return_freed_memory_to_os(threshold: int = THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes (process-wide); False where not glibc."""
    try:
        mallopt = _c_library().mallopt
    except AttributeError:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1


def trim_heap() -> bool:
    """Give the heap's free pages back to the OS (glibc malloc_trim): blocks under the mmap threshold,
    freed by the last step, stay in the heap otherwise (150 MiB on the SmolLM2 b4 x 256 step, which
    RssAnon then counts above the plan). False where not glibc."""
    try:
        _c_library().malloc_trim(0)
    except AttributeError:
        return False
    return True


def heap_allocated() -> Optional[int]:
    """Bytes malloc has handed out and not had back, over all arenas (glibc's mallinfo2: in-use heap chunks
    plus mmap'd ones): what the process's tensors hold, without the freed blocks the heap keeps, which RssAnon
    also counts. The CPU's counterpart of torch.cuda.memory_allocated. None where not glibc 2.33 or later."""
    libc = _c_library()
    if not (libc and hasattr(libc, "mallinfo2")):
        return None
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


MADV_DONTNEED = 4
MADV_POPULATE_READ = 22  # Linux >= 5.14: fault a range in (reading the file) and map it, no copy


def _madvise_fn():
    libc = _c_library()
    return libc.madvise if libc else None


def madvise(address: int, length: int, advice: int) -> bool:
    """madvise(2) on [address, address + length), widened to whole pages; False where it failed or
    is unavailable. Called through ctypes, so the GIL is released while the kernel works (a populate
    of a layer reads it from the disk: seconds the main thread keeps running Python)."""
    fn = _madvise_fn()
    if fn is None or length <= 0:
        return False
    page = mmap.PAGESIZE
    lo = address - address % page
    return fn(lo, address + length - lo, advice) == 0


SAMPLE_BYTES = 2 << 20  # one sample of `resident_fraction`: a huge page's worth


def resident_fraction(address: int, length: int, samples: int = 16) -> Optional[float]:
    """The fraction of the pages of a mapped range that are in memory (mincore(2)), from `samples`
    evenly spaced 2 MiB pieces (the whole range when it is smaller): about 0.3 ms for any range,
    where all 200k pages of an 809 MB layer take 15-20 ms. None where mincore is unavailable."""
    if _madvise_fn() is None or length <= 0:
        return None
    page = mmap.PAGESIZE
    lo, hi = address - address % page, address + length
    piece = SAMPLE_BYTES if hi - lo > samples * SAMPLE_BYTES else hi - lo
    starts = [lo] if piece == hi - lo else [lo + (hi - lo - piece) * i // (samples - 1) for i in range(samples)]
    pages = -(-piece // page) + 1
    vec = (ctypes.c_ubyte * pages)()
    resident = total = 0
    for start in starts:
        start -= start % page
        n = -(-(min(start + piece, hi) - start) // page)
        if _libc.mincore(start, n * page, vec) != 0:
            return None
        resident += bytes(vec)[:n].count(1)  # bit 0: in memory (the other bits are reserved, 0)
        total += n
    return resident / total


def proc_bytes(path: str, field: str) -> int:
    """A `Field:  N kB` line of a /proc file (meminfo, self/status) in bytes; 0 where absent."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory_available() -> int:
    """MemAvailable of /proc/meminfo: free memory plus the page cache the kernel could reclaim; less where this
    process's memory cgroup (a container's limit) allows less (`cgroup_memory`: its limit less what it holds
    but its page cache)."""
    available = proc_bytes("/proc/meminfo", "MemAvailable")
    room = cgroup_memory()
    return available if room is None else min(available, room[0])


def memory_free() -> int:
    """MemFree of /proc/meminfo: memory no one holds, not even the page cache (the kernel starts evicting
    when it nears its watermarks, ~100 MiB here); a huge number where /proc is absent (nothing is short); less
    where this process's memory cgroup has less left below its limit (`cgroup_memory`)."""
    free = proc_bytes("/proc/meminfo", "MemFree") or 1 << 62
    room = cgroup_memory()
    return free if room is None else min(free, room[1])


UNLIMITED = 1 << 60  # a cgroup limit at or above this is none (v1 writes 2^63 less a page)


def cgroup_memory(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> Optional[tuple[int, int]]:
    """(available, free) bytes under this process's memory cgroup limits, the least over its cgroup and those
    above it that have a limit: available = limit - (usage - file pages), as MemAvailable counts the page cache
    as reclaimable (the active and inactive file pages: not shmem or tmpfs, which `file` and `cache` include
    and only swap could take); free = limit - usage. None where no limit applies or none can be read (no
    cgroup, /sys not mounted): then /proc/meminfo alone says it. cgroup v2 (memory.max, memory.current,
    memory.stat) and v1 (memory.limit_in_bytes, memory.usage_in_bytes, memory.stat's total_ counts)."""
    import os

    best = None
    for folder, v2 in _memory_cgroups(proc_cgroup, root):
        try:
            limit = _read_number(os.path.join(folder, "memory.max" if v2 else "memory.limit_in_bytes"))
            if limit is None or limit >= UNLIMITED:
                continue
            usage = _read_number(os.path.join(folder, "memory.current" if v2 else "memory.usage_in_bytes")) or 0
            stat, prefix = _stat_fields(os.path.join(folder, "memory.stat")), "" if v2 else "total_"
            cache = stat.get(f"{prefix}active_file", 0) + stat.get(f"{prefix}inactive_file", 0)
        except (OSError, ValueError):  # a file gone, or not a number: this level says nothing
            continue
        room = (max(0, limit - usage + cache), max(0, limit - usage))
        best = room if best is None else (min(best[0], room[0]), min(best[1], room[1]))
    return best


@functools.lru_cache(maxsize=None)
def _memory_cgroups(proc_cgroup: str, root: str) -> tuple[tuple[str, bool], ...]:
    """(folder, v2) of the process's memory cgroup and each one above it that has a limit file (read once: a
    process does not change cgroups)."""
    import os

    try:
        with open(proc_cgroup) as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f if line.count(":") >= 2]
    except OSError:
        return ()
    dirs = []
    for _, controllers, path in lines:
        v2 = controllers == ""
        if not v2 and "memory" not in controllers.split(","):
            continue
        base = root if v2 else os.path.join(root, "memory")
        parts = [p for p in path.split("/") if p]
        for n in range(len(parts), -1, -1):  # the process's cgroup, then each one above it
            folder = os.path.join(base, *parts[:n])
            if os.path.exists(os.path.join(folder, "memory.max" if v2 else "memory.limit_in_bytes")):
                dirs.append((folder, v2))
    return tuple(dirs)


def _read_number(path: str) -> Optional[int]:
    with open(path) as f:
        text = f.read().strip()
    return None if text == "max" else int(text)


def _stat_fields(path: str) -> dict[str, int]:
    """A cgroup's memory.stat as {name: bytes}; {} where it cannot be read."""
    try:
        with open(path) as f:
            return {name: int(value) for name, _, value in (line.partition(" ") for line in f) if value.strip()}
    except (OSError, ValueError):
        return {}


THP_ENV = "THP_MEM_ALLOC_ENABLE"
_thp_set_here = False  # whether use_huge_pages_for_tensors set THP_ENV (not the user)


def use_huge_pages_for_tensors(weights_bytes: Optional[int] = None) -> None:
    """Ask PyTorch to back CPU tensors of 2 MiB or more with transparent huge pages
    (THP_MEM_ALLOC_ENABLE: 2 MiB-aligned, madvise(MADV_HUGEPAGE)), unless the environment already says.

    PyTorch reads the variable once, at its first CPU allocation, so this only takes effect early: the
    `lema` command calls it before anything is allocated; a program importing lema sets it itself. It
    matters with a bounded heap (`return_freed_memory_to_os`): every large tensor is then a fresh mapping,
    and faulting it in 4 KiB pages cost 37% of a step on the Llama-2-7B shape (8 layers, 128 tokens:
    18.5 s against 13.5 s unbounded); with huge pages, 14.5 s (BENCHMARKS.md).

    Not when `weights_bytes` (the model's weights) exceed the memory available: the pager then keeps the
    RAM full of page cache by design, and a huge-page fault finds no free 2 MiB block without compacting
    memory first, in the compute thread. Measured on the 7B shape in fp32 (target 2, BENCHMARKS.md session
    7): compaction stalls in a run 1815 with huge pages, 36 and 464 without, direct reclaim 703k pages
    against 3k and 308k; step times 65.1 s with, 53.7 and 62.3 s without: within this VM's noise."""
    global _thp_set_here
    import os

    if THP_ENV not in os.environ and (weights_bytes is None or weights_bytes <= memory_available()):
        os.environ[THP_ENV] = "1"
        _thp_set_here = True


def no_huge_pages_in_children(weights_bytes: int) -> None:
    """`use_huge_pages_for_tensors` for processes started after this call (lema bench's contenders), once the
    weights are known: huge pages off where they exceed the memory available, unless the user set THP_ENV."""
    import os

    if _thp_set_here and weights_bytes > memory_available():
        os.environ[THP_ENV] = "0"



CUDA_HOST_REGISTER_DEFAULT = 0    # cudaHostRegisterDefault
CUDA_HOST_REGISTER_READ_ONLY = 8  # cudaHostRegisterReadOnly: for a file mapped read-only


def cuda_host_register(address: int, nbytes: int, flags: int = CUDA_HOST_REGISTER_DEFAULT) -> Optional[str]:
    """Page-lock host memory [address, address + nbytes) for the GPU's copy engine (cudaHostRegister): a
    host-to-device copy from it then runs as DMA, asynchronously. None on success, else CUDA's reason.

    Called in a thread of its own: a failed call leaves CUDA's last error (per thread, and not cleared by
    torch's binding) in that thread, not in the caller's, where the next kernel launch's check would report it."""
    import threading

    import torch

    result: dict = {}

    def register() -> None:
        try:
            result["err"] = int(torch.cuda.cudart().cudaHostRegister(address, nbytes, flags))
        except Exception as e:  # no CUDA build, no driver
            result["exc"] = e

    worker = threading.Thread(target=register, name="lema-cuda-register")
    worker.start()
    worker.join()
    if "exc" in result:
        return f"{type(result['exc']).__name__}: {result['exc']}"
    return None if result["err"] == 0 else f"cudaHostRegister failed: {result['err']}"


def cuda_host_unregister(address: int) -> None:
    """Undo `cuda_host_register` (the pages become ordinary pageable memory again)."""
    import torch

    torch.cuda.cudart().cudaHostUnregister(address)


class PinnedBuffer:
    """`nbytes` of page-locked host memory taken at their exact size (whole pages): anonymous pages mapped
    here and registered with CUDA (`cuda_host_register`). torch's pinned allocator (`pin_memory=True`)
    rounds every request up to a power of two to reuse its blocks, so the 7B shape's 386 MiB ring slots
    would take 512 MiB each; the ring's slots live for the run and are never handed back, so rounding buys
    nothing there. Where registration fails (a driver that refuses it), falls back to torch's allocator
    and says so. `tensor` is the buffer (uint8, CPU); `release()` unregisters it, after which it is
    ordinary memory: call it once no copy from it is queued (the ring's close() waits for its copy stream)."""

    def __init__(self, nbytes: int, register=cuda_host_register, unregister=cuda_host_unregister,
                 fallback=None):
        import warnings

        import torch

        self.nbytes = nbytes
        self._unregister = unregister
        self._address: Optional[int] = None
        self._map = mmap.mmap(-1, max(-(-nbytes // mmap.PAGESIZE), 1) * mmap.PAGESIZE)
        tensor = torch.frombuffer(self._map, dtype=torch.uint8, count=nbytes)
        reason = register(tensor.data_ptr(), len(self._map), CUDA_HOST_REGISTER_DEFAULT)
        if reason is None:
            self._address = tensor.data_ptr()
            self.tensor = tensor
            self.exact = True
            return
        del tensor
        self._map = None  # the mapping goes with its last view
        self.tensor = (fallback or (lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True)))(nbytes)
        self.exact = False
        warnings.warn(f"could not page-lock a {nbytes:,}-byte host buffer at its exact size ({reason}); "
                      f"using torch's pinned allocator, which rounds it up to a power of two", RuntimeWarning)

    @property
    def registered(self) -> bool:
        return self._address is not None

    def release(self) -> None:
        """Unregister the pages (idempotent); the tensor stays valid as pageable memory."""
        if self._address is not None:
            address, self._address = self._address, None
            self._unregister(address)

    def __del__(self):
        try:
            self.release()
        except Exception:  # interpreter shutdown, CUDA already torn down
            pass
