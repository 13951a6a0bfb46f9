"""A caching allocator for PyTorch's large CPU tensors (native/cpu_allocator.cpp), for LEMA's CPU runs.

With a CPU budget, glibc's mmap threshold is fixed at 1 MiB (host_memory.return_freed_memory_to_os) so that
freed tensors leave the process and its anonymous memory follows the plan. The price: every tensor of 1 MiB
or more is a fresh mapping whose pages the kernel faults in and zeroes, then unmaps. On the Llama-2-7B shape
at batch 1 x 128 tokens that is ~2.2 M page faults a step (5.5-9.4 s of system time, BENCHMARKS.md session
11). A layer's tensors have the same sizes at every layer, so this allocator keeps each freed block of
`min_bytes` (64 KiB) or more, keyed by its size in whole pages, and hands it to the next request of that size.
What it holds (in use + cached) stays under the most it ever had in use (the step's peak of live tensors, which
the plan predicts) plus `cap_bytes` (the plan's "allocator cache" row): beyond that, cached blocks go back to
the OS, oldest first, and a size it does not hold then is mapped anew. So the cache may fill back up to the peak
between peaks (on SmolLM2 b4 x 256 a cap of one layer's work alone left ~750 tensors a step on new mappings)
without raising it. Smaller tensors go to the allocator that was there before. The blocks
between 64 KiB and 1 MiB are taken too: in glibc's heap they fragmented it (SmolLM2 b4 x 256 with a budget:
RssAnon 0.89 of the plan with 1 MiB, 1.02 with 64 KiB, BENCHMARKS.md session 12).

Without a budget glibc's own heap keeps freed blocks, but fragments: on SmolLM2 b4 x 256 a STREAMING process
(a library user's: no THP_MEM_ALLOC_ENABLE) peaked at 2689 MiB of RssAnon above its baseline with glibc, 1534
MiB with this allocator, same speed (5.62 / 5.46 s a step); under `lema bench` (huge pages on, as the `lema`
command sets them) 1.7 -> 1.6 GiB, planner check 0.88 -> 0.98, system time 7% -> 3% of the step, LEMA RESIDENT
0.81 -> 0.62x Transformers + PEFT (BENCHMARKS.md session 13). So LemaModel installs it on every CPU run.

PyTorch exposes no CPU allocator hook to Python, so the allocator is ~200 lines of C++ against c10's
`Allocator` interface, compiled with the system's C++ compiler on first use (about a second) into LEMA's cache
folder and loaded with ctypes. Where there is no compiler (or the build fails), `install` says why and returns
False, and the run goes on with glibc's allocator as before.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Optional

from .fsutil import default_cache

log = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(__file__), "native", "cpu_allocator.cpp")
MIN_BYTES = 1 << 16  # smaller tensors stay glibc's (heap chunks, reused without a fault)
DEFAULT_CAP_BYTES = 64 << 20  # until the plan of a step says (planner: the allocator cache row)
ENV = "LEMA_CPU_ALLOCATOR"  # "0" keeps glibc's allocator

_lib = None  # the loaded library, False where it could not be built
_why_not: Optional[str] = None
_installed = False


def _library_path() -> str:
    import torch

    key = hashlib.sha1()
    with open(SOURCE, "rb") as f:
        key.update(f.read())
    key.update(f"{torch.__version__} {torch.__file__} {torch._C._GLIBCXX_USE_CXX11_ABI}".encode())
    return os.path.join(default_cache(), "native", f"cpu_allocator-{key.hexdigest()[:16]}.so")


def _build(path: str) -> None:
    """Compiles SOURCE into `path` (written under a temporary name, then renamed: a killed build leaves none)."""
    import torch

    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    root = os.path.dirname(torch.__file__)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    cmd = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           "-I", os.path.join(root, "include"), SOURCE,
           "-L", os.path.join(root, "lib"), "-lc10", f"-Wl,-rpath,{os.path.join(root, 'lib')}", "-o", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{os.path.basename(compiler)} failed: {done.stderr.strip()[-400:]}")
    os.replace(tmp, path)


def _load():
    global _lib, _why_not
    if _lib is None:
        try:
            path = _library_path()
            if not os.path.exists(path):
                _build(path)
            lib = ctypes.CDLL(path)
            lib.lema_cpu_allocator_install.argtypes = [ctypes.c_uint64, ctypes.c_uint64]
            lib.lema_cpu_allocator_install.restype = ctypes.c_int
            lib.lema_cpu_allocator_release.argtypes = [ctypes.c_uint64]
            lib.lema_cpu_allocator_stats.argtypes = [ctypes.POINTER(ctypes.c_uint64)]
            _lib = lib
        except (OSError, RuntimeError) as e:
            _lib, _why_not = False, str(e)
    return _lib


def enabled() -> bool:
    """Whether LEMA's CPU runs use the allocator ($LEMA_CPU_ALLOCATOR is not "0"; the plan counts its cache)."""
    return os.environ.get(ENV, "1") != "0"


def install(cap_bytes: int, min_bytes: int = MIN_BYTES) -> bool:
    """Make the caching allocator PyTorch's CPU allocator for this process, for tensors of `min_bytes` or more,
    holding at most `cap_bytes` above the most it ever had in use (a later call only changes the cap). False,
    with the reason logged once, where it cannot be built or $LEMA_CPU_ALLOCATOR is "0"."""
    if not enabled():
        return False
    lib = _load()
    if not lib:
        if _why_not is not None:
            log.warning("LEMA's caching CPU allocator is not available (%s); large CPU tensors are mapped "
                        "fresh each time (slower)", _why_not)
            globals()["_why_not"] = None  # said once
        return False
    global _installed
    _installed = lib.lema_cpu_allocator_install(int(min_bytes), max(0, int(cap_bytes))) >= 0
    return _installed


def installed() -> bool:
    """Whether this process's CPU tensors come from the caching allocator."""
    return _installed


@dataclass
class Stats:
    in_use_bytes: int      # blocks handed out and not freed
    cached_bytes: int      # freed blocks kept for reuse
    hits: int              # requests served from the cache
    misses: int            # requests that mapped new memory
    releases: int          # cached blocks given back to the OS
    mapped_bytes: int      # in use + cached
    cap_bytes: int         # how far above `high_water_bytes` what it holds may go
    high_water_bytes: int  # the most it ever had in use: cached blocks fill back up to that, plus the cap


def stats() -> Optional[Stats]:
    """The allocator's counters; None where it is not loaded."""
    if not _lib:
        return None
    out = (ctypes.c_uint64 * 8)()
    _lib.lema_cpu_allocator_stats(out)
    return Stats(*[int(v) for v in out])


def release(keep_bytes: int = 0) -> None:
    """Give cached blocks back to the OS, oldest first, until at most `keep_bytes` stay."""
    if _lib:
        _lib.lema_cpu_allocator_release(int(keep_bytes))
