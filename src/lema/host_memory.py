"""Host (CPU) memory that follows the plan: freed tensors go back to the OS.

glibc's malloc keeps freed memory below its mmap threshold (which grows up to 32 MiB as large
blocks are freed) in its heap, and a few MiB-sized tensors that live long (a layer's output kept
for the recompute) pin the heap's high-water mark: measured on the Llama-2-7B shape at 128 tokens,
the resident anonymous memory grew by ~1 GiB over one forward while the tensors alive grew by
~0.1 GiB. With the threshold fixed at 1 MiB, every tensor of 1 MiB or more is its own mapping,
returned to the OS when freed, and the process's anonymous memory stays close to the planner's
peak. The price is a fresh mapping (and its page faults) per large tensor, so LEMA sets it only
when a CPU run has a memory budget (`LemaConfig.max_vram` with device='cpu').
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
THRESHOLD_BYTES = 1 << 20


def return_freed_memory_to_os(threshold: int = THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes (process-wide); False where not glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1
