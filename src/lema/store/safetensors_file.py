"""One safetensors file, memory-mapped: its header parsed once, its tensors as zero-copy views.

A safetensors file is `u64 header_len | JSON header | data`. The header gives each tensor's
dtype, shape and byte range relative to the data section. We parse it ourselves (instead of
`safe_open`) because the streaming path needs the *byte ranges*: a unit of a layer-packed file
is copied to pinned memory in one memcpy, and that needs file offsets, not tensors.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import torch

from ..host_memory import (CUDA_HOST_REGISTER_READ_ONLY, MADV_DONTNEED, MADV_POPULATE_READ, cuda_host_register,
                           cuda_host_unregister, madvise, resident_fraction)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


PARALLEL_PIECE_MIN = 4 * 2**20  # a parallel read gives each thread at least this much
PAGE_ALIGN = 2**21              # pieces start on 2 MiB boundaries (huge pages of the destination)
_POOL: "Optional[ThreadPoolExecutor]" = None
_POOL_LOCK = threading.Lock()


def _read_pool(threads: int) -> "ThreadPoolExecutor":
    """The process's pool of reader threads (grown, never shrunk, to the largest `threads` asked)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < threads:
            old, _POOL = _POOL, ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lema-read")
            if old is not None:
                old.shutdown(wait=False)
        return _POOL


class WeightsFileError(ValueError):
    """A weights file that is missing, truncated or malformed; the message names the file and the fix."""


# Linux's value (Python's mmap module names it from 3.12 only); elsewhere none, and a big file maps read-only
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: absolute offsets into its file."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsFile:
    """A memory-mapped safetensors file. `view(key)` is a zero-copy CPU tensor over the mmap."""

    def __init__(self, path: str, private: bool = False):
        self.path = path
        if not os.path.isfile(path):
            raise WeightsFileError(f"weights file {path!r} does not exist")
        self.size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsFileError(f"{path!r} is {self.size} bytes, too short to be a safetensors file "
                                       "(truncated download or copy?); fetch or convert it again")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(self.size - 8, 100 * 2**20):
                raise WeightsFileError(f"{path!r} has a header length of {header_len} bytes but the file has "
                                       f"{self.size}: it is truncated or not a safetensors file")
            raw = f.read(header_len)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsFileError(f"{path!r}: the safetensors header is not valid JSON ({e}); "
                                   "the file is corrupt, fetch or convert it again") from None
        self.data_start = 8 + header_len
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.entries: dict[str, TensorEntry] = {}
        for key, info in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                begin, end = info["data_offsets"]
                shape = tuple(int(s) for s in info["shape"])
            except (KeyError, TypeError, ValueError):
                raise WeightsFileError(f"{path!r}: tensor {key!r} has a malformed header entry {info!r}") from None
            entry = TensorEntry(key, dtype, shape, self.data_start + begin, self.data_start + end)
            numel = 1
            for s in shape:
                numel *= s
            if entry.nbytes != numel * dtype.itemsize:
                raise WeightsFileError(f"{path!r}: tensor {key!r} of shape {shape} and dtype {dtype} should take "
                                       f"{numel * dtype.itemsize} bytes but its range holds {entry.nbytes}")
            self.entries[key] = entry
        needed = max((e.end for e in self.entries.values()), default=self.data_start)
        if needed > self.size:
            raise WeightsFileError(f"{path!r} is truncated: its header needs {needed} bytes but the file has "
                                   f"{self.size} ({needed - self.size} missing); fetch or convert it again")
        self._file = open(path, "rb")
        # `private` (the CPU's views, which a layer computes with): copy-on-write, so that a model writing a weight
        # in place (Gemma 3n's AltUp clamps its coefficients each forward) changes its own copy of those pages,
        # never the file, where a read-only mapping ended the process with SIGSEGV. Pages nobody writes stay
        # the page cache's, as with ACCESS_READ. Not for CUDA: page-locking a private mapping could copy it.
        self._mmap = (self._map_private() if private else
                      mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)) if self.size else None
        # A read-only mmap cannot be wrapped by torch.frombuffer without a warning about writability;
        # the views we hand out are frozen weights (written, if at all, only on a private mapping).
        self._buffer = memoryview(self._mmap) if self._mmap is not None else None
        self._address = self.bytes_view(0, 1).data_ptr() if self._mmap is not None else 0  # the mapping's start
        self._registered: list[int] = []  # addresses page-locked for CUDA (register_with_cuda)
        self._advice_lock = threading.Lock()  # populate/drop (the pager's thread) against close()
        # resident() against close(): its own lock, so the compute thread's check never waits for a populate
        # (which holds the advice lock while it reads a layer from the disk, a second or more)
        self._resident_lock = threading.Lock()

    def _map_private(self):
        """The file mapped copy-on-write without reserving memory for it (MAP_NORESERVE): a private writable
        mapping is otherwise charged whole against RAM + swap, and a file bigger than that (a 7B model in float32
        on a 24 GiB machine) is refused (ENOMEM). Where the kernel charges it anyway (strict overcommit), read-only,
        as before: a model that writes a weight in place is then the one that fails."""
        try:
            return mmap.mmap(self._file.fileno(), 0, flags=mmap.MAP_PRIVATE | MAP_NORESERVE,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            return mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)

    def bytes_view(self, start: int, end: int) -> torch.Tensor:
        """uint8 CPU tensor over file bytes [start, end), zero-copy."""
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "non-writable buffer": we never write it
            return torch.frombuffer(self._buffer, dtype=torch.uint8, count=end - start, offset=start)

    def read_into(self, start: int, end: int, dst: torch.Tensor, threads: int = 1) -> None:
        """File bytes [start, end) into `dst` (uint8, CPU, contiguous, pinned or not) with pread: one
        sequential read the kernel reads ahead for, no page faults on the mmap, the GIL released.

        `threads` > 1 splits the range into that many pieces read at once (a shared pool): from the page
        cache one thread's copy runs at a few GB/s, under a GPU link's bandwidth (ring.py, fill threads)."""
        want = end - start
        view = memoryview(dst.numpy()).cast("B")
        if threads <= 1 or want < threads * PARALLEL_PIECE_MIN:
            self._pread(view, 0, want, start)
            return
        step = -(-want // threads // PAGE_ALIGN) * PAGE_ALIGN
        pieces = [(lo, min(lo + step, want)) for lo in range(0, want, step)]
        for f in [_read_pool(threads).submit(self._pread, view, lo, hi, start) for lo, hi in pieces]:
            f.result()  # re-raises a piece's error

    def _pread(self, view: memoryview, lo: int, hi: int, start: int) -> None:
        done = lo
        while done < hi:
            n = os.preadv(self._file.fileno(), [view[done:hi]], start + done)
            if n <= 0:
                raise WeightsFileError(f"{self.path!r}: read {done - lo} of {hi - lo} bytes at offset {start + lo}, then end of "
                                       "file: the file shrank after it was opened; fetch or convert it again")
            done += n

    def view(self, key: str) -> torch.Tensor:
        e = self.entries[key]
        if e.nbytes == 0:
            return torch.empty(e.shape, dtype=e.dtype)
        return self.bytes_view(e.start, e.end).view(e.dtype).view(e.shape)

    def advise_willneed(self, start: int, end: int) -> None:
        """Ask the kernel to read [start, end) into the page cache in the background (disk -> RAM stage)."""
        if self._mmap is None or not hasattr(self._mmap, "madvise"):
            return
        page = mmap.PAGESIZE
        lo = (start // page) * page
        self._mmap.madvise(mmap.MADV_WILLNEED, lo, min(end, self.size) - lo)

    def populate(self, start: int, end: int) -> None:
        """Bring file bytes [start, end) into the page cache and map them (MADV_POPULATE_READ): the
        calling thread waits for the disk, a later access through the mmap takes no fault. Falls back
        to an asynchronous read-ahead where the kernel lacks it."""
        with self._advice_lock:  # never on an address close() may have let go (it could be reused)
            if self._mmap is None or end <= start:
                return
            if not madvise(self._address + start, end - start, MADV_POPULATE_READ):
                os.posix_fadvise(self._file.fileno(), start, end - start, os.POSIX_FADV_WILLNEED)

    def drop(self, start: int, end: int) -> None:
        """Unmap file bytes [start, end) from this process and drop them from the page cache. Views of
        them stay valid: a later access reads them from the disk again."""
        with self._advice_lock:  # DONTNEED on a reused address would zero someone else's memory
            if self._mmap is None or end <= start:
                return
            madvise(self._address + start, end - start, MADV_DONTNEED)  # unmapped pages can be dropped
            os.posix_fadvise(self._file.fileno(), start, end - start, os.POSIX_FADV_DONTNEED)

    def resident(self, start: int, end: int) -> float:
        """The fraction of file bytes [start, end) in the page cache, sampled (host_memory.resident_fraction);
        1.0 where it cannot be told (then nothing looks evicted)."""
        with self._resident_lock:
            if self._mmap is None or end <= start:
                return 1.0
            fraction = resident_fraction(self._address + start, end - start)
        return 1.0 if fraction is None else fraction

    def register_with_cuda(self, start: int, end: int) -> Optional[str]:
        """Page-lock file bytes [start, end) of the mapping for the GPU's copy engine (cudaHostRegister,
        read-only): a host-to-device copy from a view of them then runs as DMA straight out of the page
        cache, with no copy into a pinned buffer first. Reads whatever is not cached yet; the pages stay
        in RAM until `close`. None on success, else CUDA's reason."""
        page = mmap.PAGESIZE
        lo, hi = (start // page) * page, min(-(-end // page) * page, self.size)
        if self._mmap is None or hi <= lo:
            return "nothing to register"
        reason = cuda_host_register(self._address + lo, hi - lo, CUDA_HOST_REGISTER_READ_ONLY)
        if reason is not None:
            return reason
        self._registered.append(self._address + lo)
        return None

    def unregister_cuda(self) -> None:
        """Undo `register_with_cuda` (the pages become evictable again)."""
        for address in self._registered:
            cuda_host_unregister(address)
        self._registered = []

    def close(self) -> None:
        # Views handed out keep the mapping alive (they hold buffer exports); dropping our
        # references lets the OS unmap once the last view dies.
        self.unregister_cuda()  # before the mapping can go: the driver holds its pages
        with self._advice_lock, self._resident_lock:
            self._buffer = None
            self._mmap = None
            self._file.close()
