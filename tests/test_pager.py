"""The page-cache pager (stream/pager.py): which layers it holds, how far ahead it reads, that it
really drops and maps pages, and that training through it is unchanged."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import time
from types import SimpleNamespace

import pytest
import torch

from lema import LemaConfig, MemoryStrategy
from lema.stream.pager import PageCachePager, hold_window

L = 6
SCHEDULE = list(range(L)) + list(reversed(range(L)))  # F0..F5 B5..B0, as a training pass


def test_hold_window_follows_the_schedule_in_next_use_order():
    sizes = [1] * L
    assert hold_window(SCHEDULE, 0, sizes, 3) == [0, 1, 2]          # before F0
    assert hold_window(SCHEDULE, 3, sizes, 3) == [2, 3, 4]          # F2 in use
    assert hold_window(SCHEDULE, 6, sizes, 3) == [5, 4, 3]          # F5 in use; B5, B4, B3 next
    assert hold_window(SCHEDULE, 9, sizes, 3) == [3, 2, 1]          # B3 in use
    assert hold_window(SCHEDULE, 12, sizes, 3) == [0, 1, 2]         # B0 in use; next pass F0, F1, F2
    assert hold_window(SCHEDULE, 3, sizes, 100) == [2, 3, 4, 5, 1, 0]  # everything fits
    assert hold_window(SCHEDULE, 3, sizes, 0) == [2, 3]             # never less than the unit in use + the next
    assert hold_window(SCHEDULE, 3, [1, 1, 1, 5, 1, 1], 3) == [2, 3]  # sizes, not counts


class RecordingFile:
    """Stands in for a SafetensorsFile: records the pager's calls and keeps which ranges are in the page
    cache (populate brings one in, drop and `evict`, the kernel's doing, take it out)."""

    def __init__(self):
        self.calls: list[tuple[str, int]] = []
        self.cached: set[int] = set()
        self.pager = None         # set: every drop checks its unit already left the pager's held set
        self.dropped_held: list[int] = []

    def populate(self, start, end):
        self.calls.append(("populate", start))
        self.cached.add(start)

    def drop(self, start, end):
        self.calls.append(("drop", start))
        self.cached.discard(start)
        if self.pager is not None and start // 100 in self.pager.held:
            self.dropped_held.append(start // 100)  # a residency sample now would call it an eviction

    def evict(self, start):
        self.cached.discard(start)

    def resident(self, start, end):
        return 1.0 if start in self.cached else 0.0


def test_pager_reads_each_missing_layer_a_window_ahead_and_no_more_than_belady():
    """Driven synchronously through 3 training passes with a window of C = 3 of 6 layers: every
    acquired layer is held when acquired; a layer is populated C - 1 acquires before its use (the
    lead that lets the disk overlap compute); a steady-state pass reads 2 (L - C) layers, the fewest
    any cache of C layers can on F0..F5 B5..B0 (each turn reuses C layers, the other L - C of each
    half must come in); and never more than C layers are held."""
    C = 3
    f = RecordingFile()
    layouts = [SimpleNamespace(ranges=[(f, u * 100, u * 100 + 100)]) for u in range(L)]
    f.cached = {u * 100 for u in range(L)}  # the file was just written: all of it cached
    pager = PageCachePager(layouts, capacity=C * 100, thread=False)
    pager.read_log = []  # lema bench's record of the reads (layer_timeline)
    f.pager = pager
    acquires: list[int] = []
    populated_at: list[tuple[int, int]] = []   # (unit, acquire index when populated)
    per_pass = []
    for _ in range(3):
        pager.begin(SCHEDULE)
        before = pager.stats.populated
        for cursor in range(1, len(SCHEDULE) + 1):
            pager.follow(SCHEDULE, cursor)
            n = len(f.calls)
            while pager.step():
                pass
            populated_at += [(start // 100, len(acquires)) for op, start in f.calls[n:] if op == "populate"]
            unit = SCHEDULE[cursor - 1]
            assert unit in pager.held, f"layer {unit} acquired but not held ({sorted(pager.held)})"
            assert len(pager.held) <= C
            acquires.append(unit)
        per_pass.append(pager.stats.populated - before)
    assert per_pass[1:] == [2 * (L - C)] * 2, per_pass
    assert len(pager.read_log) == pager.stats.populated and all(n == 100 and b >= a for a, b, n in pager.read_log)
    for unit, at in populated_at:
        if at == 0:
            continue  # before the first acquire
        use = acquires.index(unit, at)  # its next acquire
        assert use - at >= C - 1, f"layer {unit} populated at acquire {at}, used at {use}"
    dropped = [start // 100 for op, start in f.calls if op == "drop"]
    assert dropped[:L - C] == [3, 4, 5]  # the first window (F0..F2) drops what the pass needs last
    assert f.dropped_held == [], "a unit was dropped while still counted as held"


def _run_pass(pager, evict=None, at=None):
    """One training pass driven synchronously; `evict(unit)` is called (the kernel evicting) before
    acquire number `at`. Returns the acquires whose unit the pager did not hold."""
    pager.begin(SCHEDULE)
    while pager.step():
        pass
    late = []
    for cursor in range(1, len(SCHEDULE) + 1):
        if cursor == at:
            evict()
        before = pager.stats.late
        pager.follow(SCHEDULE, cursor)
        if pager.stats.late > before:
            late.append(SCHEDULE[cursor - 1])
        while pager.step():
            pass
    return late


def test_window_shrinks_by_what_the_kernel_evicted_and_grows_back(monkeypatch):
    """Memory for 4 of 6 layers of 100 bytes (600 bytes, reserve 200). The kernel evicts a held layer at a
    pass start: the pager finds it, reads it again before its use (not late) and the next window is one
    layer smaller; a layer evicted mid-pass is counted at its acquire the same way. A pass that loses
    nothing and leaves free memory above the margin grows the window back by half the excess."""
    f, mem, pager = _memory_pager(monkeypatch)
    assert _run_pass(pager) == [] and pager.stats.capacity == 400 and pager.stats.trim == 0
    assert _run_pass(pager) == [] and pager.stats.capacity == 400 and pager.stats.evicted_bytes == 0
    assert pager.held == {0, 1, 2, 3}  # after B0: the next pass's F0..F3
    f.evict(200)   # layer 2, held, needed third in the next pass
    calls = len(f.calls)
    assert _run_pass(pager) == []                            # read again at the pass start, before its use
    assert ("populate", 200) in f.calls[calls:]
    assert pager.stats.evicted_bytes == 100 and pager.stats.trim == 100 and pager.stats.capacity == 300
    assert pager.stats.history[-1] == (400, 100, 0, pager.stats.min_free, 100)  # the pass that lost layer 2
    # 3 layers held: 300 bytes free, 200 over the margin; the next window takes half of that back
    assert _run_pass(pager) == [] and pager.stats.min_free == 300 and pager.stats.trim == 0
    assert pager.stats.capacity == 400
    # Mid-pass: layer 4 is populated for the backward (held), then evicted before B4 is acquired.
    _run_pass(pager, evict=lambda: f.evict(400), at=SCHEDULE.index(4, L) + 1)
    assert pager.stats.evicted_bytes == 200
    _run_pass(pager)
    assert pager.stats.trim == 100 and pager.stats.capacity == 300
    assert pager.stats.shed == 0 and f.dropped_held == []


def test_first_window_leaves_room_for_the_steps_planned_growth(monkeypatch):
    """Before the first pass the window has nothing to adapt from: told the step will take 100 bytes, it starts
    that much below what the 200-byte reserve leaves (3 layers, not 4); once a pass has run, the window sizes
    itself on what it saw and the hint changes nothing."""
    f, mem, pager = _memory_pager(monkeypatch)
    pager.expect_step(100)
    assert pager.stats.trim == 100 and pager.capacity() == 600 - 200 - 100
    _run_pass(pager)
    assert pager.stats.history == [] and pager.stats.capacity == 300  # the first pass is not recorded: no adapting
    pager.expect_step(500)
    assert pager.stats.trim == 100


def test_a_training_step_tells_the_pager_its_planned_growth(tiny_dir, make_lema, monkeypatch):
    import lema.model

    monkeypatch.setattr(lema.model, "memory_available", lambda: 2**30)  # the layers do not fit: a pager
    model = make_lema(tiny_dir("llama", num_layers=L))
    told = []
    model.source.pager.expect_step = told.append
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        model(ids)
    assert told == []  # generation and evaluation grow nothing worth a hint
    model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-3)).train_step(ids)
    budget = model._activation_budget()
    assert told == [budget.step_growth(16, 8)] and told[0] > 0


def test_refill_reads_back_evictions_without_shrinking_the_window(monkeypatch):
    f, mem, pager = _memory_pager(monkeypatch)
    _run_pass(pager)
    _run_pass(pager)
    for start in list(f.cached):  # lema bench's probes took the memory between two steps
        f.evict(start)
    pager.refill()
    while pager.step():
        pass
    assert f.cached == {0, 100, 200, 300}
    # pages the residency sample cannot see gone (it reads 1.0): every held layer is populated again anyway
    calls = len(f.calls)
    pager.refill()
    while pager.step():
        pass
    assert [c for c in f.calls[calls:]] == [("populate", u * 100) for u in range(4)]
    assert _run_pass(pager) == [] and pager.stats.trim == 0 and pager.stats.evicted_bytes == 0


class Memory:
    """A machine of TOTAL bytes for the pager's memory checks: the step's own memory (`step`), the layers
    cached (the RecordingFile's), stale cache of other files the kernel would reclaim first (`stale`), the
    rest free."""

    def __init__(self, f, total: int, stale: int = 0):
        self.f, self.total, self.stale, self.step = f, total, stale, 0

    def free(self) -> int:
        return self.total - self.step - self.stale - 100 * len(self.f.cached)

    def available(self) -> int:
        return self.total - self.step


def _memory_pager(monkeypatch, stale=0, capacity=None):
    """A pager of 6 layers of 100 bytes on a Memory of 600 bytes (+ `stale`): reserve 200, free-memory
    margin 100, critical level 50."""
    import lema.stream.pager as pager_mod

    monkeypatch.setattr(pager_mod, "RESERVE_BYTES", 200)
    monkeypatch.setattr(pager_mod, "FREE_MARGIN_BYTES", 100)
    monkeypatch.setattr(pager_mod, "FREE_CRITICAL_BYTES", 50)
    f = RecordingFile()
    mem = Memory(f, total=600 + stale, stale=stale)
    layouts = [SimpleNamespace(ranges=[(f, u * 100, u * 100 + 100)]) for u in range(L)]
    pager = PageCachePager(layouts, capacity, available=mem.available, free=mem.free, thread=False)
    f.pager = pager
    return f, mem, pager


def _shed_setup(monkeypatch, stale=0, capacity=None):
    f, mem, pager = _memory_pager(monkeypatch, stale, capacity)
    _run_pass(pager)
    _run_pass(pager)
    return f, mem, pager


def test_short_free_memory_drops_the_window_unit_needed_last_and_shrinks_the_next_pass(monkeypatch):
    """6 layers of 100 bytes, a window of 4 (600 bytes of memory, reserve 200). At the turn (F5 in use, B5..B2
    held) the step's memory grows by 200: free memory falls to 0, below the critical 50. The pager drops B2,
    the held layer needed last (the kernel's LRU would take the one read longest ago: B5/B4, needed next),
    reads it back once the window moves past B5 and before its use (nothing is late), and the next pass's
    window is smaller by how far free memory fell below the margin (100)."""
    f, mem, pager = _shed_setup(monkeypatch)
    assert pager.stats.capacity == 400 and pager.stats.shed == 0
    pager.begin(SCHEDULE)
    while pager.step():
        pass
    late = []
    for cursor in range(1, len(SCHEDULE) + 1):
        if cursor == L:  # F5 acquired: the step's activations now fill memory
            mem.step = 200
        calls, before = len(f.calls), pager.stats.late
        pager.follow(SCHEDULE, cursor)
        if pager.stats.late > before:
            late.append(SCHEDULE[cursor - 1])
        while pager.step():
            pass
        if cursor == L:
            assert f.calls[calls:] == [("drop", 200)] and pager.held == {5, 4, 3}
            assert pager.stats.shed == 1 and pager.stats.shed_bytes == 100 and pager.stats.capacity == 300
            assert mem.free() == 100
    assert late == [] and ("populate", 200) in f.calls[-6:]
    assert f.dropped_held == []
    mem.step = 0  # the step's memory freed: the next pass is smaller by the shed layer and the shortfall
    assert _run_pass(pager) == [] and pager.stats.min_free == 0 and pager.stats.trim == 100 + (100 - 0)
    assert pager.stats.capacity == 200
    # 2 layers held, 400 free: 300 over the margin, half of it back; then 300 free, back to the full window
    assert _run_pass(pager) == [] and pager.stats.trim == 50 and pager.stats.capacity == 350
    assert _run_pass(pager) == [] and pager.stats.trim == 0 and pager.stats.capacity == 400
    assert pager.stats.shed == 1


def test_paused_pager_sheds_nothing_and_refill_resumes(monkeypatch):
    """lema bench's other contenders run between two steps: a paused pager neither sheds for their memory
    nor counts it against the window; refill reads back what they took and watches again."""
    f, mem, pager = _shed_setup(monkeypatch)
    pager.pause()
    mem.step = 300  # another process
    while pager.step():
        pass
    assert pager.stats.shed == 0 and pager._min_free == 200  # the run's own low, not the other process's
    for start in (200, 300):
        f.evict(start)  # the kernel took them for it
    mem.step = 0
    pager.refill()
    while pager.step():
        pass
    assert f.cached == {0, 100, 200, 300} and not pager._paused
    assert _run_pass(pager) == [] and pager.stats.trim == 0 and pager.stats.capacity == 400


def test_short_free_memory_sheds_nothing_when_stale_cache_or_a_fixed_window_holds_it(monkeypatch):
    """Free memory below the margin is not the window's doing when other files' cache (which the kernel
    reclaims first) leaves the reserve available beyond the window; nor with a window size asked for."""
    for stale, capacity, held in ((1000, None, 6), (0, 400, 4)):  # with the stale cache, all 6 layers fit
        f, mem, pager = _shed_setup(monkeypatch, stale=stale, capacity=capacity)
        mem.step = 200
        assert mem.free() < 50
        dropped = pager.stats.dropped
        assert _run_pass(pager) == [] and pager.stats.shed == 0 and pager.stats.dropped - dropped == 2 * (L - held)


def _mincore_resident(address: int, length: int) -> float:
    """Fraction of the pages of [address, address + length) in the page cache (mincore(2))."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    page = mmap.PAGESIZE
    lo = -(-address // page) * page                       # whole pages inside the range only
    hi = (address + length) // page * page
    if hi <= lo:
        return 0.0
    n = (hi - lo) // page
    vec = (ctypes.c_ubyte * n)()
    assert libc.mincore(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec) / n


FOLIO = 2 << 20  # the page cache may hold a file in folios up to this size: a drop frees only whole ones


def _can_drop_pages(folder: str) -> bool:
    """Whether this filesystem drops clean pages on request (tmpfs does not); checked with plain
    read + posix_fadvise, independent of the code under test."""
    path = os.path.join(folder, "probe.bin")
    size = 4 * FOLIO
    with open(path, "wb") as fh:
        fh.write(os.urandom(size))
        fh.flush()
        os.fsync(fh.fileno())  # dirty pages are not dropped
    with open(path, "rb") as fh:
        fh.read()
        os.posix_fadvise(fh.fileno(), 0, size, os.POSIX_FADV_DONTNEED)
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)  # for mincore; never touched
        anchor = ctypes.c_char.from_buffer(mapped)
        gone = _mincore_resident(ctypes.addressof(anchor), size)
        del anchor
        mapped.close()
    return gone == 0.0


def test_populate_caches_a_range_and_drop_empties_it(tmp_path):
    from lema.store.safetensors_file import SafetensorsFile

    if not _can_drop_pages(str(tmp_path)):
        pytest.skip("this filesystem keeps clean pages on POSIX_FADV_DONTNEED (tmpfs?)")
    path = str(tmp_path / "w.safetensors")
    size = 8 * FOLIO
    header = b'{"x":{"dtype":"U8","shape":[%d],"data_offsets":[0,%d]}}' % (size, size)
    with open(path, "wb") as fh:
        fh.write(len(header).to_bytes(8, "little") + header + os.urandom(size))
        fh.flush()
        os.fsync(fh.fileno())
    f = SafetensorsFile(path)
    e = f.entries["x"]
    inner = (f._address + e.start + FOLIO, e.nbytes - 2 * FOLIO)  # whole folios only
    view = f.view("x")
    assert int(view[123]) == open(path, "rb").read()[e.start + 123]  # mapped and cached now
    f.drop(e.start, e.end)
    assert _mincore_resident(*inner) == 0.0
    assert f.resident(e.start + FOLIO, e.end - FOLIO) == 0.0
    f.populate(e.start, e.end)
    assert _mincore_resident(f._address + e.start, e.nbytes) == 1.0
    assert f.resident(e.start, e.end) == 1.0
    f.drop(e.start + 4 * FOLIO, e.end)  # half of it: the sampled fraction sees it
    assert 0.4 <= f.resident(e.start, e.end) <= 0.6
    f.drop(e.start, e.end)
    assert _mincore_resident(*inner) == 0.0
    assert int(view[123]) == open(path, "rb").read()[e.start + 123]  # a view stays valid: read again
    f.close()


def _wide_llama(folder: str, layers: int) -> str:
    """A Llama of ~10 MB per layer in fp32: layers span many folios, so each can be dropped alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=512, intermediate_size=1024, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def test_pager_on_a_real_file_maps_the_window_drops_the_rest_and_trains_the_same(make_lema, tmp_path_factory):
    """A layer-packed file streamed as views with a 2-layer window: the losses and the LoRA weights
    after AdamW equal those of the same run with the page cache left to the kernel, and afterwards
    the window's layers are in the page cache."""
    from lema.convert import convert

    folder = tmp_path_factory.mktemp("paged")
    if not _can_drop_pages(str(folder)):
        pytest.skip("this filesystem keeps clean pages on POSIX_FADV_DONTNEED (tmpfs?)")
    layers = 4
    out = convert(_wide_llama(str(folder / "src"), layers), str(folder / "out"), progress=False)
    os.sync()  # written just now: dirty pages are not dropped
    runs = {}
    for page_cache in ("1KB", "off"):  # the paged run first: pages mapped by another model are never dropped
        model = make_lema(out, gbi_path=out + "/model.safetensors", page_cache=page_cache)
        trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-2))
        ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
        losses = [trainer.train_step(ids)[1].item() for _ in range(3)]
        lora = {n: p.detach().clone() for n, p in model.peft_model.named_parameters() if ".lora_" in n}
        runs[page_cache] = (losses, lora)
        if page_cache == "off":
            assert model.source.pager is None
            continue
        pager = model.source.pager
        deadline = time.monotonic() + 10  # its thread catches up with the last acquire (B0): window F0, F1
        while pager.held != {0, 1} and time.monotonic() < deadline:
            time.sleep(0.01)
        pager.close()
        assert pager.held == {0, 1} and pager.stats.populated >= layers - 2 and pager.stats.dropped >= layers - 2
        # (A dropped layer may be partly cached again: the kernel reads ahead past the end of the next
        # layer populated; that drop() itself empties the cache is checked on a file below.)
        for unit in pager.held:
            (f, start, end), = pager.ranges[unit]
            resident = _mincore_resident(f._address + start, end - start)
            assert resident == 1.0, f"layer {unit} is in the window but {resident:.0%} of it is cached"
    assert runs["1KB"][0] == runs["off"][0]
    for name, want in runs["off"][1].items():
        torch.testing.assert_close(runs["1KB"][1][name], want, atol=0, rtol=0, msg=name)


def test_pager_is_on_only_when_the_layers_exceed_the_available_memory(tiny_dir, make_lema, monkeypatch):
    import lema.model

    path = tiny_dir("llama", num_layers=L)
    monkeypatch.setattr(lema.model, "memory_available", lambda: 2**30)  # less than the reserve (RESERVE_BYTES)
    assert make_lema(path).source.pager is not None
    assert make_lema(path, page_cache="off").source.pager is None
    assert make_lema(path, strategy=MemoryStrategy.RESIDENT).source.__class__.__name__ == "ResidentLayers"
    assert make_lema(path, zero_copy=False).source.pager is not None  # the loader's preads read the page cache too
    monkeypatch.setattr(lema.model, "memory_available", lambda: 2**40)
    assert make_lema(path).source.pager is None
    assert make_lema(path, page_cache="64MB").source.pager.capacity() == 64 * 10**6


@pytest.mark.parametrize("arch,setting", [("llama", {"zero_copy": False}), ("llama", {"dtype": "bfloat16"}),
                                          ("mixtral", {})])
def test_pager_serves_the_paths_that_copy_into_slots(arch, setting, tiny_dir, make_lema):
    """Slots filled by the loader thread (views off; another dtype than the file's; Mixtral's experts stacked on
    load from one tensor per expert) get the pager too: it holds every file range a layer reads, the experts'
    included, and the run trains exactly as with the page cache left to the kernel."""
    from safetensors import safe_open

    path = tiny_dir(arch, num_layers=L)
    runs = {}
    for page_cache in ("1KB", "off"):
        model = make_lema(path, page_cache=page_cache, **setting)
        assert model.source._zero_copy is None  # the loader thread fills slots
        trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-2))
        ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
        losses = [trainer.train_step(ids)[1].item() for _ in range(2)]
        runs[page_cache] = (losses, {n: p.detach().clone() for n, p in model.peft_model.named_parameters()
                                     if ".lora_" in n})
        if page_cache == "off":
            assert model.source.pager is None
            continue
        pager = model.source.pager
        assert pager.wait_idle(10)
        assert pager.stats.populated >= L - 2 and pager.stats.dropped >= L - 2
        with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:  # every layer tensor of the file
            layer_bytes = sum(_numel(f.get_slice(k).get_shape()) * 4 for k in f.keys() if ".layers." in k)  # fp32
        assert sum(pager.sizes) == layer_bytes
        if arch == "mixtral":  # the stacked experts are read from several ranges each
            assert all(len(r) > len(model.layouts[i].placements) for i, r in enumerate(pager.ranges))
    assert runs["1KB"][0] == runs["off"][0]
    for name, want in runs["off"][1].items():
        torch.testing.assert_close(runs["1KB"][1][name], want, atol=0, rtol=0, msg=name)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def test_page_cache_setting_is_checked():
    with pytest.raises(ValueError, match="page_cache='lots'"):
        LemaConfig(model_name_or_path="x", page_cache="lots")


def test_resident_check_never_waits_for_a_populate(tmp_path):
    """The compute thread samples residency at every acquire; a populate holds the file's advice lock
    while it reads a whole layer from the disk, so the check must not take that lock."""
    import threading

    from lema.store.safetensors_file import SafetensorsFile

    path = str(tmp_path / "w.safetensors")
    header = b'{"x":{"dtype":"U8","shape":[8192],"data_offsets":[0,8192]}}'
    with open(path, "wb") as fh:
        fh.write(len(header).to_bytes(8, "little") + header + bytes(8192))
    f = SafetensorsFile(path)
    e = f.entries["x"]
    out = []
    with f._advice_lock:  # as during a populate in the pager's thread
        checker = threading.Thread(target=lambda: out.append(f.resident(e.start, e.end)))
        checker.start()
        checker.join(timeout=10)
        assert out, "resident() waited for the advice lock"
    assert 0.0 <= out[0] <= 1.0
    f.close()
    assert f.resident(e.start, e.end) == 1.0  # closed: nothing to tell, nothing looks evicted
