"""SafetensorsFile.read_into: the packed-unit fill (one pread into a slot)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from lema.store import SafetensorsFile, WeightsFileError


def test_read_into_equals_the_mapped_bytes_and_refuses_a_shrunk_file(tmp_path):
    path = str(tmp_path / "w.safetensors")
    save_file({"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(7, 3)}, path)
    f = SafetensorsFile(path)
    e = f.entries["a"]
    dst = torch.zeros(e.nbytes + 16, dtype=torch.uint8)
    f.read_into(e.start, e.end, dst[: e.nbytes])
    assert torch.equal(dst[: e.nbytes].view(torch.float32), torch.arange(1000, dtype=torch.float32))
    assert int(dst[e.nbytes:].count_nonzero()) == 0  # nothing written past the range
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:  # the file shrinks after it was opened and checked
        fh.truncate(size - 100)
    with pytest.raises(WeightsFileError, match="shrank"):
        f.read_into(f.entries["b"].start, size, torch.empty(size - f.entries["b"].start, dtype=torch.uint8))
    f.close()


def test_read_into_split_over_threads_gives_the_same_bytes_and_refuses_a_shrunk_file(tmp_path):
    """A range read in pieces on several threads (the CUDA fill): every byte in place, none past the range,
    and a piece that hits the end of a shrunk file raises, naming it."""
    path = str(tmp_path / "w.safetensors")
    n = (5 * 4 * 2**20 + 12345) // 4  # over threads x PARALLEL_PIECE_MIN, not a multiple of the piece size
    weights = torch.randn(n, generator=torch.Generator().manual_seed(0))
    save_file({"w": weights, "tail": torch.ones(3)}, path)
    f = SafetensorsFile(path)
    e = f.entries["w"]
    for threads in (1, 4, 5):
        dst = torch.full((e.nbytes + 64,), 7, dtype=torch.uint8)
        f.read_into(e.start + 4, e.end, dst[: e.nbytes - 4], threads=threads)  # an unaligned start
        assert torch.equal(dst[: e.nbytes - 4].view(torch.float32)[: n - 1], weights[1:]), threads
        assert bool((dst[e.nbytes - 4:] == 7).all())
    with open(path, "r+b") as fh:
        fh.truncate(e.start + e.nbytes // 2)
    with pytest.raises(WeightsFileError, match="shrank"):
        f.read_into(e.start, e.end, torch.empty(e.nbytes, dtype=torch.uint8), threads=4)
    f.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer where CUDA is missing")
def test_register_with_cuda_reports_why_it_cannot_instead_of_raising(tmp_path):
    """Without CUDA the registration answers with the reason (the model turns it into an error naming the fix)."""
    path = str(tmp_path / "w.safetensors")
    save_file({"w": torch.ones(4096)}, path)
    f = SafetensorsFile(path)
    why = f.register_with_cuda(f.entries["w"].start, f.entries["w"].end)
    assert isinstance(why, str) and why and f._registered == []
    f.close()


def test_a_private_mapping_takes_an_in_place_write_without_changing_the_file(tmp_path):
    """A model that writes a weight in place (Gemma 3n's AltUp clamps its coefficients each forward) got a
    read-only view of the file on the CPU, and the process died of SIGSEGV. The CPU's views are copy-on-write:
    the write lands in the process's own copy of the page, never in the file. Run in a child process, so
    that the old behaviour fails this test instead of ending the test run."""
    import subprocess
    import sys

    path = str(tmp_path / "w.safetensors")
    save_file({"w": torch.arange(8, dtype=torch.float32)}, path)
    child = ("import torch; from lema.store import SafetensorsFile\n"
             f"f = SafetensorsFile({path!r}, private=True)\n"
             "w = f.view('w'); w.clamp_(max=3.0); assert w.tolist() == [0, 1, 2, 3, 3, 3, 3, 3], w\n")
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    f = SafetensorsFile(path)
    assert f.view("w").tolist() == list(range(8))  # the file is as it was
    f.close()


def test_a_private_mapping_of_a_file_bigger_than_the_memory_opens(tmp_path):
    """Copy-on-write mappings are charged whole against RAM + swap unless MAP_NORESERVE: a weights file bigger
    than that (the 7B shape in float32, 27 GB, on a 24 GiB machine) was refused with ENOMEM."""
    import psutil

    path = str(tmp_path / "big.safetensors")
    save_file({"w": torch.arange(8, dtype=torch.float32)}, path)
    os.truncate(path, 2 * (psutil.virtual_memory().total + psutil.swap_memory().total))  # sparse: no disk used
    f = SafetensorsFile(path, private=True)
    try:
        w = f.view("w")
        w.mul_(2)  # written in place: the process's own copy of that page
        assert w.tolist() == [2.0 * i for i in range(8)]
    finally:
        f.close()
