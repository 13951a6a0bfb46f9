"""host_memory: the heap follows the live tensors with the mmap threshold fixed; the CUDA ring's exact-size pinned buffers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

SCRIPT = r"""
import sys, torch
from lema.host_memory import return_freed_memory_to_os
from lema.measure import rss_anon
if sys.argv[1] == "bounded":
    assert return_freed_memory_to_os()
torch.set_num_threads(1)
start = rss_anon()
kept = []
for i in range(64):  # the fragmenting pattern of a forward: transients, and one 2 MiB tensor kept per layer
    a = torch.ones(3 * 2**18)        # 3 MiB transient
    b = torch.ones(2**19)            # 2 MiB kept
    c = torch.ones(5 * 2**18)        # 5 MiB transient
    kept.append(b)
    del a, c
live = sum(t.numel() * 4 for t in kept)
print((rss_anon() - start) / live)
"""


def run(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def test_bounded_heap_follows_live_tensors():
    """(glibc's default here: ~1.3x on this pattern, ~10x on a 7B forward; see host_memory.py.)"""
    bounded = run("bounded")
    assert bounded < 1.1, f"anonymous memory grew {bounded:.2f}x the live tensors with the threshold fixed"


def test_allocated_bytes_counts_live_tensors_not_the_freed_blocks_kept():
    """malloc's bytes in use, plus the blocks LEMA's CPU allocator handed out where an earlier test with a CPU
    budget installed it in this process (the 32 MiB tensor is then its block, not malloc's mmap'd chunk)."""
    from lema.measure import allocated_bytes

    if allocated_bytes() is None:
        pytest.skip("needs glibc's mallinfo2")
    before = allocated_bytes()
    small = [torch.ones(4096) for _ in range(2000)]  # 16 KiB each: heap chunks, under the mmap threshold
    big = torch.ones(8 * 2**20)                        # 32 MiB: an mmap'd chunk, or the CPU allocator's block
    live = allocated_bytes()
    assert live - before >= 2000 * 16 * 2**10 + 32 * 2**20
    del small, big
    assert allocated_bytes() - before < 4 * 2**20  # freed: no longer counted, whatever the heap or cache keeps


def test_trim_heap_returns_freed_small_blocks_to_the_os():
    """Blocks under the mmap threshold, freed below a live one, stay in the heap until trim_heap (the CPU
    budget's engine trims at each pass start: RssAnon then follows the live tensors the plan counts)."""
    import ctypes

    from lema.host_memory import proc_bytes, trim_heap

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(64 * 1024) for _ in range(2000)]  # 125 MiB in heap blocks, below the threshold
    for b in blocks:
        ctypes.memset(b, 1, 64 * 1024)  # touched: resident
    keep = libc.malloc(64 * 1024)  # a live block above them: the heap's top cannot shrink past it
    rss = lambda: proc_bytes("/proc/self/status", "RssAnon")
    for b in blocks:
        libc.free(b)
    before = rss()
    assert trim_heap()
    assert before - rss() > 100 * 2**20
    libc.free(keep)


def test_huge_pages_for_tensors_unless_the_weights_fill_the_memory(monkeypatch):
    """THP for tensors when the weights fit the memory available; not when they exceed it (the pager keeps the
    RAM full of page cache, and huge-page faults then compact memory in the compute thread); never over the
    user's own setting. lema bench turns it off for its contenders once it knows the weights' size."""
    import lema.host_memory as hm
    from lema.cli import _model_folder

    monkeypatch.setattr(hm, "memory_available", lambda: 10 * 2**30)
    for weights, want in ((None, "1"), (2**30, "1"), (20 * 2**30, None)):
        monkeypatch.delenv(hm.THP_ENV, raising=False)
        monkeypatch.setattr(hm, "_thp_set_here", False)
        hm.use_huge_pages_for_tensors(weights)
        assert os.environ.get(hm.THP_ENV) == want, weights
    monkeypatch.setenv(hm.THP_ENV, "0")  # the user's
    monkeypatch.setattr(hm, "_thp_set_here", False)
    hm.use_huge_pages_for_tensors(None)
    hm.no_huge_pages_in_children(20 * 2**30)
    assert os.environ[hm.THP_ENV] == "0" and not hm._thp_set_here
    monkeypatch.delenv(hm.THP_ENV)
    hm.use_huge_pages_for_tensors(None)  # lema's, then the weights turn out bigger than the memory
    hm.no_huge_pages_in_children(2**30)
    assert os.environ[hm.THP_ENV] == "1"
    hm.no_huge_pages_in_children(20 * 2**30)
    assert os.environ[hm.THP_ENV] == "0"
    assert _model_folder(["train", "--model", "m", "--data", "d"]) == "m"
    assert _model_folder(["bench", "--model=f"]) == "f" and _model_folder(["bench", "--shape", "x"]) is None


def test_model_folder_of_a_train_config(tmp_path):
    from lema.cli import _model_folder

    run = tmp_path / "run.yaml"
    run.write_text("model: runs/big\ndata: d.jsonl\n")
    assert _model_folder(["train", "--config", str(run)]) == "runs/big"
    assert _model_folder(["train", "--config", str(run), "--model", "m"]) == "m"  # the command line wins
    assert _model_folder(["train", "--config", str(tmp_path / "missing.yaml")]) is None
    for text in ("- not a mapping\n", "model: [unclosed\n"):
        run.write_text(text)
        assert _model_folder(["train", "--config", str(run)]) is None


def test_weights_bytes_of_a_folder(tmp_path):
    from lema.store import weights_bytes as weights_bytes_of

    (tmp_path / "a.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "b.safetensors").write_bytes(b"x" * 5)
    (tmp_path / "config.json").write_text("{}")
    assert weights_bytes_of(str(tmp_path)) == 15
    assert weights_bytes_of(str(tmp_path / "missing")) is None


def test_pinned_buffer_registers_its_exact_pages_and_releases_them_once():
    """The CUDA ring's staging slots (host_memory.PinnedBuffer): anonymous pages of the slot's size registered
    with CUDA; here a recording registrar stands in for cudaHostRegister (tests/test_cuda.py runs the real one)."""
    import mmap

    from lema.host_memory import CUDA_HOST_REGISTER_DEFAULT, PinnedBuffer

    calls = []
    nbytes = 3 * mmap.PAGESIZE + 5
    buf = PinnedBuffer(nbytes, register=lambda a, n, f: calls.append(("register", a, n, f)),
                       unregister=lambda a: calls.append(("unregister", a)))
    assert buf.exact and buf.registered and buf.tensor.numel() == nbytes and buf.tensor.dtype == torch.uint8
    address = buf.tensor.data_ptr()
    assert address % mmap.PAGESIZE == 0
    assert calls == [("register", address, 4 * mmap.PAGESIZE, CUDA_HOST_REGISTER_DEFAULT)]
    buf.tensor.fill_(7)  # writable: the loader thread fills it
    buf.release()
    buf.release()
    del buf
    assert calls[1:] == [("unregister", address)]


def test_pinned_buffer_falls_back_to_torchs_allocator_with_a_warning_when_registration_fails():
    from lema.host_memory import PinnedBuffer

    unregistered = []
    with pytest.warns(RuntimeWarning, match="could not page-lock a 1,000-byte host buffer.*out of memory"):
        buf = PinnedBuffer(1000, register=lambda a, n, f: "cudaHostRegister failed: 2 (out of memory)",
                           unregister=unregistered.append, fallback=lambda n: torch.zeros(n, dtype=torch.uint8))
    assert not buf.exact and not buf.registered and buf.tensor.numel() == 1000
    buf.release()
    assert unregistered == []


def test_rss_anon_is_statuss_rssanon_in_this_process_and_in_a_forked_child():
    """lema bench's RssAnon sampler reads /proc/<pid>/statm on a kept descriptor: the same bytes as
    /proc/self/status's RssAnon, and a forked child reads its own, not its parent's."""
    from lema.host_memory import proc_bytes
    from lema.measure import rss_anon

    kept = torch.ones(2**24)  # 64 MiB of anonymous pages
    assert abs(rss_anon() - proc_bytes("/proc/self/status", "RssAnon")) <= 2**20
    before = rss_anon()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # no torch here: only Python's own allocations
        try:
            extra = b"\x01" * (96 * 2**20)
            ok = abs(rss_anon() - proc_bytes("/proc/self/status", "RssAnon")) <= 2**20 and len(extra)
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.waitpid(pid, 0)
    assert abs(rss_anon() - before) < 32 * 2**20  # the child's 96 MiB is not the parent's
    del kept


def test_cgroup_memory_is_the_tightest_limit_above_the_process(tmp_path):
    """A container's memory limit bounds what the pager and CUDA zero-copy may count on: v2 and v1, the least
    over the process's cgroup and those above it, page cache counted as reclaimable in `available`; no limit
    ('max', v1's 2^63 less a page) or no cgroup file: None (then /proc/meminfo alone). Shmem (in `file` and
    `cache`) is not reclaimable: only the active and inactive file pages count."""
    from lema.host_memory import cgroup_memory

    GiB = 2**30

    def folder(path, **files):  # memory_limit_in_bytes= writes memory.limit_in_bytes
        path.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (path / name.replace("_", ".", 1)).write_text(text)

    v2 = tmp_path / "v2"
    folder(v2 / "box", memory_max=str(8 * GiB), memory_current=str(6 * GiB), memory_stat=f"anon 1\nfile {5 * GiB}\nactive_file {GiB}\ninactive_file {3 * GiB}\nshmem {GiB}\n")
    folder(v2 / "box" / "job", memory_max="max", memory_current=str(5 * GiB), memory_stat="file 0\nactive_file 0\ninactive_file 0\n")
    (tmp_path / "cg2").write_text("0::/box/job\n")
    assert cgroup_memory(str(tmp_path / "cg2"), str(v2)) == (6 * GiB, 2 * GiB)

    v1 = tmp_path / "v1"
    folder(v1 / "memory", memory_limit_in_bytes="9223372036854771712", memory_usage_in_bytes="1",
           memory_stat="total_cache 0\ntotal_active_file 0\ntotal_inactive_file 0\n")
    folder(v1 / "memory" / "a", memory_limit_in_bytes=str(16 * GiB), memory_usage_in_bytes=str(10 * GiB),
           memory_stat=f"cache {3 * GiB}\ntotal_cache {4 * GiB}\ntotal_active_file {GiB}\ntotal_inactive_file {2 * GiB}\n")
    folder(v1 / "memory" / "a" / "b", memory_limit_in_bytes=str(12 * GiB), memory_usage_in_bytes=str(9 * GiB),
           memory_stat=f"total_cache {GiB}\ntotal_inactive_file {GiB}\n")
    (tmp_path / "cg1").write_text("5:cpu,cpuacct:/x\n4:memory:/a/b\n0::/\n")
    assert cgroup_memory(str(tmp_path / "cg1"), str(v1)) == (4 * GiB, 3 * GiB)  # b: 12-9+1, 12-9; a: 9, 6

    (tmp_path / "cg3").write_text("4:memory:/a/b\n")
    assert cgroup_memory(str(tmp_path / "cg3"), str(tmp_path / "nothing")) is None
    (tmp_path / "cg4").write_text("0::/\n")
    folder(tmp_path / "v2max", memory_max="max", memory_current="5")
    assert cgroup_memory(str(tmp_path / "cg4"), str(tmp_path / "v2max")) is None
    assert cgroup_memory(str(tmp_path / "absent"), str(v2)) is None
    (v2 / "box" / "memory.current").write_text("")  # not a number: that level is skipped, not an error
    assert cgroup_memory(str(tmp_path / "cg2"), str(v2)) is None
