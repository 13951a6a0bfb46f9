"""The GPU machine's ceilings, measured once per lease (scripts/gpu_check.sh runs it): what the streaming
path's stages can move at most, to set against `lema bench --device cuda`'s figures.

    python3 scripts/gpu_probe.py WEIGHTS.safetensors [--json OUT.json]

Prints: the bf16 matrix-product rate (8192^3, random operands), pinned host<->device copy bandwidth,
the slot fill (a packed layer read from the page cache into pinned memory, `SafetensorsFile.read_into`)
with 1-16 reader threads, and a host-to-device copy straight from the page cache (the file's mmap
registered with cudaHostRegister, read-only): the fill step the ring would skip if that works. And the disk:
layers read cold into the page cache (MADV_POPULATE_READ, what the pager does in one thread) by 1-8 threads each
populating a share of the layer, for a host whose RAM does not hold the model.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from lema.store import SafetensorsFile  # noqa: E402

GB = 1e9


def event_time(fn, repeats: int) -> float:
    """Median seconds of `fn()` on the current stream, timed with CUDA events after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def populate_rates(path: str, spans: list[tuple[int, int]], threads_list=(1, 2, 4, 8), per: int = 3) -> dict:
    """GB/s of reading file ranges cold into the page cache (each dropped first: MADV_DONTNEED + fadvise
    DONTNEED), split between `threads` threads each populating its share (MADV_POPULATE_READ, GIL released),
    median over `per` ranges of `spans` per thread count, no range read twice."""
    import threading

    from lema.host_memory import MADV_DONTNEED, MADV_POPULATE_READ, madvise

    fd = os.open(path, os.O_RDONLY)
    mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    base = torch.frombuffer(mm, dtype=torch.uint8).data_ptr()
    page = mmap.PAGESIZE
    rates, ranges = {}, iter(spans)
    try:
        for threads in threads_list:
            times, nbytes = [], []
            for lo, hi in [next(ranges) for _ in range(per)]:
                lo, hi = (lo // page) * page, -(-hi // page) * page
                madvise(base + lo, hi - lo, MADV_DONTNEED)
                os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
                share = -(-(hi - lo) // threads // page) * page
                parts = [(a, min(a + share, hi)) for a in range(lo, hi, share)]
                workers = [threading.Thread(target=madvise, args=(base + a, b - a, MADV_POPULATE_READ))
                           for a, b in parts]
                t = time.perf_counter()
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
                times.append(time.perf_counter() - t)
                nbytes.append(hi - lo)
            rates[threads] = statistics.median(n / t for n, t in zip(nbytes, times)) / GB
    finally:
        del base
        mm.close()
        os.close(fd)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("weights")
    ap.add_argument("--json")
    args = ap.parse_args()
    out: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0),
                 "cpus": os.cpu_count()}
    import peft
    import transformers
    out.update(transformers=transformers.__version__, peft=peft.__version__)

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    out["bf16_tflops"] = 2 * n**3 / event_time(lambda: a @ b, 10) / 1e12
    del a, b

    size = 2**30
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(size, dtype=torch.uint8, device="cuda")
    host.random_(0, 255)
    out["h2d_pinned_GBps"] = size / event_time(lambda: dev.copy_(host, non_blocking=True), 5) / GB
    out["d2h_pinned_GBps"] = size / event_time(lambda: host.copy_(dev, non_blocking=True), 5) / GB

    f = SafetensorsFile(args.weights)
    units = json.loads(f.metadata.get("lema.units", "{}"))
    spans = [tuple(v) for k, v in units.items() if k.startswith("layer")]
    start, end = spans[0]
    nbytes = end - start
    out["layer_bytes"] = nbytes
    slot = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    f.read_into(start, end, slot)  # into the page cache, if the build left it out
    fills = {}
    for threads in (1, 2, 4, 8, 16):
        times = []
        for lo, hi in spans[:6]:
            t = time.perf_counter()
            f.read_into(lo, hi, slot[: hi - lo], threads=threads)
            times.append(time.perf_counter() - t)
        fills[threads] = nbytes / statistics.median(times) / GB
    out["fill_GBps_by_threads"] = fills
    if len(spans) >= 12:  # the disk, cold: what the pager's reads could take with more threads
        try:
            out["cold_populate_GBps_by_threads"] = populate_rates(args.weights, spans)
        except Exception as e:  # a measurement, not a requirement: record why it failed
            out["cold_populate_GBps_by_threads"] = {"failed": f"{type(e).__name__}: {e}"}

    # The page cache registered with CUDA: the copy engine reads the file's pages itself.
    try:
        fd = os.open(args.weights, os.O_RDONLY)
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        page = mmap.PAGESIZE
        lo = (start // page) * page
        length = -(-(end - lo) // page) * page
        view = torch.frombuffer(mm, dtype=torch.uint8, count=length, offset=lo)
        cudart = torch.cuda.cudart()
        t = time.perf_counter()
        err = cudart.cudaHostRegister(view.data_ptr(), length, 8)  # cudaHostRegisterReadOnly
        reg_s = time.perf_counter() - t
        out["host_register"] = {"error": int(err), "register_s": reg_s, "bytes": length}
        if int(err) == 0:
            d = torch.empty(length, dtype=torch.uint8, device="cuda")
            out["host_register"]["is_pinned"] = bool(view.is_pinned())
            out["host_register"]["h2d_GBps"] = length / event_time(lambda: d.copy_(view, non_blocking=True), 5) / GB
            out["host_register"]["equal"] = bool(torch.equal(d.cpu(), view))
            cudart.cudaHostUnregister(view.data_ptr())
    except Exception as e:  # a measurement, not a requirement: record why it failed
        out["host_register"] = {"failed": f"{type(e).__name__}: {e}"}

    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
