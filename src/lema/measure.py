"""What `lema bench` measures beside a step: memory, disk reads, the machine's CPU and kernel counters, ceilings.

Peak memory on the CPU is the peak *anonymous* resident memory (`RssAnon` in /proc/self/status),
sampled every millisecond by a thread in the worker. `VmHWM` is not used: it counts file-backed
pages too, i.e. the page cache that the mmap'd weights occupy, which is not memory the run owns.
We report the peak both absolute and above the worker's baseline taken after imports (the Python
+ torch + Transformers runtime, a few hundred MB), and compare the latter with the planner.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from typing import Optional

from . import cpu_allocator
from .host_memory import heap_allocated

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


def step_faults(exclude: tuple = ()) -> Optional[tuple[int, int]]:
    """(minor, major) page faults the process's threads have taken so far, but the threads of `exclude` (native
    ids: the pager's, whose populates are its reads, not the step's); the threads torch runs its products on count.
    Summed from /proc/self/task/*/stat (a thread that has ended no longer counts); None where there is none."""
    minor = major = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tasks:
        if int(tid) in exclude:
            continue
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except (OSError, IndexError):
            continue  # the thread ended meanwhile
        minor, major = minor + int(fields[7]), major + int(fields[9])  # stat fields 10 (minflt) and 12 (majflt)
    return minor, major


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
    """The FLOPs of one LoRA training step's products, counted from the model's shape (`facts`: plan_bytes.ModelFacts):
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


def peak_allocations(snapshot: dict, start_allocated: int, device: int = 0, top: int = 15) -> dict:
    """What was live at a step's peak of allocated device memory, from the CUDA allocator's history of that step
    (`torch.cuda.memory._snapshot()` after `_record_memory_history`; the step began with `start_allocated` bytes
    allocated, whose own history is not in it). The history's `alloc` adds a block's bytes and `free_requested`
    takes them off (as `memory_allocated` counts them: a block still read by another stream is no longer
    allocated). The history gives the bytes asked for; the allocator counts whole blocks, each at least 512 B
    and a multiple of it (ALLOCATOR_ROUND, as added here), and now and then a cached block larger than asked
    for, so the replayed peak can fall short of `max_memory_allocated` by those spare bytes. Returns
    {"peak_bytes", "before_step_live_bytes" (allocated before the step and still live at its peak), "groups": [{"where", "bytes", "count", "sizes"}, ...] (largest first, `top` of them)}: each group
    is where its blocks were allocated, the innermost Python frame outside torch, or, for blocks allocated with
    no Python frame (autograd's backward runs in C++), their size."""
    trace = [dict(e, size=_block_bytes(e["size"])) for e in snapshot.get("device_traces", [[]])[device]
             if e["action"] in ("alloc", "free_requested")]
    now = peak = start_allocated
    peak_at = -1
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            now += e["size"]
            if now > peak:
                peak, peak_at = now, i
        else:
            now -= e["size"]
    live: dict[int, dict] = {}
    freed_before = 0  # blocks allocated before the step, freed before its peak
    for e in trace[:peak_at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif live.pop(e["addr"], None) is None:  # free_requested of a block allocated before the step
            freed_before += e["size"]
    groups: dict[str, dict] = {}
    for e in live.values():
        where = _allocation_site(e.get("frames") or [])
        if where is None:
            where = f"no Python frame (C++: autograd's backward), blocks of {e['size']:,} B"
        g = groups.setdefault(where, {"where": where, "bytes": 0, "count": 0, "sizes": set()})
        g["bytes"] += e["size"]
        g["count"] += 1
        g["sizes"].add(e["size"])
    rows = sorted(groups.values(), key=lambda g: -g["bytes"])[:top]
    for g in rows:
        g["sizes"] = sorted(g["sizes"], reverse=True)[:5]
    return {"peak_bytes": peak, "before_step_live_bytes": start_allocated - freed_before, "groups": rows}


ALLOCATOR_ROUND = 512  # CUDA's caching allocator: a block is a multiple of this many bytes, at least one


def _block_bytes(requested: int) -> int:
    return max(ALLOCATOR_ROUND, -(-requested // ALLOCATOR_ROUND) * ALLOCATOR_ROUND)


def _allocation_site(frames: list[dict]) -> Optional[str]:
    """The innermost frame of an allocation's Python stack that is not torch's own code, as 'path:line function'
    (the path from the package folder on)."""
    for f in frames:
        path = f.get("filename", "")
        if "/torch/" in path or path.startswith("<"):
            continue
        for root in ("site-packages/", "src/"):
            if root in path:
                path = path.rsplit(root, 1)[1]
                break
        return f"{path}:{f.get('line')} {f.get('name')}"
    return None
