"""The weight ring: how many layers' weights exist at once, what the schedule loads, and errors.

The live-weight check does not trust the ring's own bookkeeping: it wraps `acquire`, keeps a
weak reference to every weight tensor handed out, and counts, at each acquire, the decoder
layers that still have a live tensor anywhere (ring slots, autograd's saved tensors, a leak).
"""

from __future__ import annotations

import threading
import weakref

import pytest
import torch

from lema import MemoryStrategy
from lema.stream.layout import Placement, UnitLayout
from lema.stream.ring import WeightRing

LAYERS = 5
VOCAB = 96


class LiveWeights:
    """Wraps `ring.acquire`; `peak` is the most decoder layers with live weight tensors at any acquire."""

    def __init__(self, ring):
        self.live: dict[int, int] = {}            # unit -> live tensors handed out for it
        self.refs: dict[int, weakref.ref] = {}    # id(tensor) -> weak reference (callback on death)
        self.peak = 0
        self.acquires: list[int] = []
        self._lock = threading.Lock()
        original = ring.acquire

        def acquire(unit):
            weights = original(unit)
            self.acquires.append(unit)
            for t in weights.values():
                self._track(unit, t)
            self.peak = max(self.peak, self.units_alive())
            return weights

        ring.acquire = acquire

    def _track(self, unit: int, t: torch.Tensor) -> None:
        with self._lock:
            if id(t) in self.refs and self.refs[id(t)]() is t:
                return
            key = id(t)

            def died(_, unit=unit, key=key):
                with self._lock:
                    self.live[unit] -= 1
                    self.refs.pop(key, None)

            self.refs[key] = weakref.ref(t, died)
            self.live[unit] = self.live.get(unit, 0) + 1

    def units_alive(self) -> int:
        with self._lock:
            return sum(n > 0 for n in self.live.values())


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(seed))


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.peft_model.named_parameters() if ".lora_" in n}


CASES = [  # (arch, file dtype, prefetch)
    ("llama", torch.float32, True),     # CPU zero-copy: the views are the mmap
    ("llama", torch.bfloat16, True),    # bf16 file, fp32 compute: converted into host slot buffers
    ("llama", torch.float32, False),    # no loader thread: loads run at acquire
    ("mixtral", torch.float32, True),   # converted units (experts fused by Transformers' converter)
]


@pytest.mark.parametrize("keep", [0, None], ids=["recompute", "kept"])
@pytest.mark.parametrize("num_buffers", [2, 3])
@pytest.mark.parametrize("arch,file_dtype,prefetch", CASES,
                         ids=[f"{a}-{str(d).split('.')[-1]}-{'prefetch' if p else 'sync'}" for a, d, p in CASES])
def test_ring_bounds_live_layers_and_matches_resident(arch, file_dtype, prefetch, num_buffers, keep, tiny_dir,
                                                      make_lema):
    """Recomputed layers, and layers keeping their activations (keep_activations=None: all of them fit
    here), hold the same ring bound: the autograd graph of a kept layer holds no weight tensor."""
    path = tiny_dir(arch, num_layers=LAYERS, dtype=file_dtype)
    model = make_lema(path, strategy=MemoryStrategy.STREAMING, num_buffers=num_buffers, prefetch=prefetch,
                      keep_activations=keep)
    resident = make_lema(path, strategy=MemoryStrategy.RESIDENT)
    ring = model.source
    assert len(ring.slots) == num_buffers
    if file_dtype != torch.float32 or arch == "mixtral":  # Mixtral's experts are stacked from per-expert tensors
        assert all(s.host is not None for s in ring.slots), "a conversion needs host slot buffers"
        assert ring._zero_copy is None
    watch = LiveWeights(ring)
    trainers = [m.get_trainer(torch.optim.AdamW(m.get_trainable_parameters(), lr=1e-2)) for m in (model, resident)]

    L, k = LAYERS, num_buffers
    for step in range(2):
        loads_before = ring.stats.loads
        ids = batch(step)
        (_, loss), (_, ref_loss) = (t.train_step(ids) for t in trainers)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
        assert len(model.streamed.keep) == (0 if keep == 0 else LAYERS)
        # Forward F0..F(L-1), backward B(L-1)..B0: one acquire each.
        assert watch.acquires[-2 * L:] == list(range(L)) + list(reversed(range(L)))
        # Loads: step 1 starts empty, so the forward loads all L layers; the first k backward layers are
        # still in the slots (hits), so the backward loads L - k. Step 2 starts with B(k-1)..B0 still
        # in the slots, so its forward loads only L - k, and so does its backward.
        want = 2 * L - k if step == 0 else 2 * (L - k)
        assert ring.stats.loads - loads_before == want, f"step {step}: {ring.stats}"
    assert watch.peak <= num_buffers, f"{watch.peak} layers' weights alive at once with num_buffers={num_buffers}"
    assert watch.peak == num_buffers  # the ring does use its slots (else the bound above says little)
    assert ring.stats.peak_occupied <= num_buffers
    assert ring.stats.peak_in_use == 1  # a backward layer is released before the next is acquired
    assert model.streamed.peak_bound == 1
    # Every acquire but the very first (F0 of step 1) finds its layer already loaded (prefetched ahead).
    assert ring.stats.hits == 4 * L - 1
    assert not any(s.in_use for s in ring.slots)
    for name, want in lora_state(resident).items():
        torch.testing.assert_close(lora_state(model)[name], want, atol=1e-5, rtol=0, msg=name)


def test_no_grad_pass_loads_forward_only(tiny_dir, make_lema):
    model = make_lema(tiny_dir("llama", num_layers=LAYERS), num_buffers=2)
    watch = LiveWeights(model.source)
    with torch.no_grad():
        model(batch())
    assert watch.acquires == list(range(LAYERS))
    assert model.source.stats.loads == LAYERS
    assert watch.peak <= 2


# ----------------------------------------------------------------------------- ring on its own
def fake_layouts(n: int) -> list[UnitLayout]:
    return [UnitLayout(f"layer.{i}", [Placement(f"w{i}", torch.float32, (4,), 0)], 16) for i in range(n)]


def make_ring(fill, prefetch: bool, n: int = 3) -> WeightRing:
    return WeightRing(fake_layouts(n), fill, None, lambda layout: None, torch.device("cpu"), 2, prefetch=prefetch)


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "sync"])
def test_loader_exception_surfaces_at_acquire_with_unit_named(prefetch):
    broken = {1}

    def fill(layout, dst):
        if int(layout.unit.split(".")[1]) in broken:
            raise OSError(f"disk read failed for {layout.unit}")
        dst[:16].view(torch.float32).fill_(float(layout.unit.split(".")[1]))

    ring = make_ring(fill, prefetch)
    try:
        ring.begin([0, 1, 2])
        w0 = ring.acquire(0)
        assert float(w0["w0"][0]) == 0.0
        ring.release(0)
        with pytest.raises(RuntimeError, match=r"layer\.1.*disk read failed") as info:
            ring.acquire(1)
        assert isinstance(info.value.__cause__, OSError)
        # The ring is not wedged: the failed slot is free again and a retry loads afresh.
        assert not any(s.in_use for s in ring.slots)
        broken.clear()
        ring.begin([1, 2])
        assert float(ring.acquire(1)["w1"][0]) == 1.0
        ring.release(1)
        assert float(ring.acquire(2)["w2"][0]) == 2.0
        ring.release(2)
    finally:
        ring.close()
    assert ring._thread is None


def test_ring_serves_off_schedule_acquires():
    def fill(layout, dst):
        dst[:16].view(torch.float32).fill_(float(layout.unit.split(".")[1]))

    ring = make_ring(fill, prefetch=True, n=4)
    try:
        ring.begin([0, 1, 2, 3])
        for unit in (2, 0, 3, 3, 1):  # not the announced order
            assert float(ring.acquire(unit)[f"w{unit}"][0]) == unit
            ring.release(unit)
        assert ring.stats.peak_occupied <= 2
    finally:
        ring.close()


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16], ids=["zero-copy", "convert"])
def test_model_loader_error_names_the_layer_and_the_model_recovers(file_dtype, tiny_dir, make_lema):
    model = make_lema(tiny_dir("llama", num_layers=LAYERS, dtype=file_dtype), num_buffers=2)
    ring = model.source
    attr = "_zero_copy" if ring._zero_copy is not None else "_fill"
    assert attr == ("_zero_copy" if file_dtype == torch.float32 else "_fill")
    load = getattr(ring, attr)

    def broken(layout, *args):
        if layout.unit == "layer.3":
            raise OSError("simulated read error")
        return load(layout, *args)

    setattr(ring, attr, broken)
    ids = batch()
    opt = torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-2)
    trainer = model.get_trainer(opt)
    with pytest.raises(RuntimeError, match=r"loading layer\.3 .*OSError: simulated read error"):
        trainer.train_step(ids)
    assert not any(s.in_use for s in ring.slots) and model.streamed.bound_now == 0
    setattr(ring, attr, load)
    _, loss = trainer.train_step(ids)
    assert torch.isfinite(loss) and trainer.last_step_applied


def test_dropped_model_is_freed_and_its_loader_thread_ends(tiny_dir):
    """The loader and pager threads must not keep a model alive that the user dropped without close()."""
    import gc
    import time

    from lema import LemaConfig, LemaModel

    # CPU zero-copy (file dtype == compute dtype) loads inline, without a thread ...
    inline = LemaModel(LemaConfig(model_name_or_path=tiny_dir("llama"), lora_rank=4))
    assert inline.source._thread is None
    inline.close()
    # ... a bf16 file computed in fp32 converts in the loader thread; views with a page-cache window
    # have the pager's thread (stream/pager.py), which must not keep the model alive either
    for config, thread_of in ((dict(model_name_or_path=tiny_dir("llama", dtype=torch.bfloat16)), "_thread"),
                              (dict(model_name_or_path=tiny_dir("llama"), page_cache="1KB"), "pager")):
        model = LemaModel(LemaConfig(lora_rank=4, **config))
        thread = getattr(model.source, thread_of)
        thread = thread._thread if thread_of == "pager" else thread
        assert thread is not None and thread.is_alive()
        ref = weakref.ref(model)
        del model
        gc.collect()
        assert ref() is None, f"the model is still referenced after del (its {thread.name} thread holds it?)"
        deadline = time.monotonic() + 5
        while thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not thread.is_alive(), thread.name


def test_more_buffers_than_layers(tiny_dir, make_lema):
    """num_buffers >= num_layers: everything stays loaded after the first step, later steps load nothing."""
    model = make_lema(tiny_dir("llama"), num_buffers=4)  # 3 layers
    trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-2))
    trainer.train_step(batch(0))
    assert model.source.stats.loads == 3
    trainer.train_step(batch(1))
    assert model.source.stats.loads == 3 and model.source.stats.peak_occupied == 3


def test_ring_skips_ahead_in_the_schedule():
    """An acquire that skips units of the announced order keeps prefetching from there on."""
    def fill(layout, dst):
        dst[:16].view(torch.float32).fill_(float(layout.unit.split(".")[1]))

    ring = make_ring(fill, prefetch=False, n=5)
    try:
        ring.begin([0, 1, 2, 3, 4])
        for unit in (0, 2, 3, 4):  # layer 1 skipped
            assert float(ring.acquire(unit)[f"w{unit}"][0]) == unit
            ring.release(unit)
        # 0 at its acquire and 1 ahead of it (wasted), 2 at its acquire; 3 and 4 prefetched, so hits.
        assert ring.stats.loads == 5 and ring.stats.hits == 2
    finally:
        ring.close()


@pytest.mark.parametrize("zero_copy", [None, False], ids=["views", "slots"])
@pytest.mark.parametrize("num_buffers", [2, 3])
def test_layer_packed_file_streams_like_the_original(num_buffers, zero_copy, tiny_dir, make_lema, tmp_path_factory):
    """A `lema convert` output (each layer one contiguous byte range) streams through the ring with
    the same bound and schedule, and trains exactly like the original folder held resident; as
    views of the mmap, or (zero_copy=False) read by the loader thread into the slots with one pread."""
    from lema.convert import convert

    src = tiny_dir("llama", num_layers=LAYERS)
    out = convert(src, str(tmp_path_factory.mktemp("packed") / "out"), progress=False)
    model = make_lema(out, num_buffers=num_buffers, gbi_path=out + "/model.safetensors", zero_copy=zero_copy)
    resident = make_lema(src, strategy=MemoryStrategy.RESIDENT)
    assert all(layout.packed is not None for layout in model.layouts)
    if zero_copy is False:
        assert all(s.host is not None for s in model.source.slots) and model.source._thread is not None
    else:
        assert all(s.host is None for s in model.source.slots)
    watch = LiveWeights(model.source)
    trainers = [m.get_trainer(torch.optim.AdamW(m.get_trainable_parameters(), lr=1e-2)) for m in (model, resident)]
    for step in range(2):
        (_, loss), (_, ref_loss) = (t.train_step(batch(step)) for t in trainers)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert model.source.stats.loads == (2 * LAYERS - num_buffers) + 2 * (LAYERS - num_buffers)
    assert watch.peak == num_buffers
    for name, want in lora_state(resident).items():
        torch.testing.assert_close(lora_state(model)[name], want, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16], ids=["views", "slots"])
def test_resident_layers_are_spread_loaded_once_and_train_the_same(file_dtype, tiny_dir, make_lema):
    """resident_layers=2 of 5: layers 1 and 3 (spread, not the first two) are loaded once at build and
    never by the ring; the ring streams the other three (its schedule skips the resident ones); losses
    and LoRA weights after AdamW equal those of the RESIDENT strategy."""
    from lema.plan_table import spread

    path = tiny_dir("llama", num_layers=LAYERS, dtype=file_dtype)
    model = make_lema(path, num_buffers=2, resident_layers=2)
    resident = make_lema(path, strategy=MemoryStrategy.RESIDENT)
    ring = model.source
    assert sorted(ring.resident) == spread(2, LAYERS) == [1, 3]
    held = {i: {n: t.data_ptr() for n, t in w.items()} for i, w in ring.resident.items()}
    watch = LiveWeights(ring)
    trainers = [m.get_trainer(torch.optim.AdamW(m.get_trainable_parameters(), lr=1e-2)) for m in (model, resident)]
    streamed = [0, 2, 4]
    for step in range(2):
        loads, resident_hits = ring.stats.loads, ring.stats.resident_hits
        ids = batch(step)
        (_, loss), (_, ref_loss) = (t.train_step(ids) for t in trainers)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
        assert watch.acquires[-2 * LAYERS:] == list(range(LAYERS)) + list(reversed(range(LAYERS)))
        assert ring.schedule == streamed + streamed[::-1]
        assert ring.stats.resident_hits - resident_hits == 2 * 2  # each resident layer, forward and backward
        assert ring.stats.loads - loads <= 2 * len(streamed) and ring.stats.loads > loads
        assert {s.occupant for s in ring.slots} <= set(streamed)
    assert {i: {n: t.data_ptr() for n, t in w.items()} for i, w in ring.resident.items()} == held  # never reloaded
    assert ring.bytes_on_device() >= sum(t.numel() * t.element_size() for w in ring.resident.values()
                                         for t in w.values())
    for name, want in lora_state(resident).items():
        torch.testing.assert_close(lora_state(model)[name], want, atol=1e-5, rtol=0, msg=name)


def test_every_layer_resident_streams_nothing_and_trains_the_same(tiny_dir, make_lema):
    """resident_layers >= the layer count (what the plan's auto split picks when a card holds the model): the
    ring's schedule is empty, nothing loads after the build, and training equals the RESIDENT strategy."""
    path = tiny_dir("llama", num_layers=LAYERS)
    model = make_lema(path, num_buffers=2, resident_layers=LAYERS + 1)
    resident = make_lema(path, strategy=MemoryStrategy.RESIDENT)
    ring = model.source
    assert sorted(ring.resident) == list(range(LAYERS)) and ring.slots == []  # no ring slot allocated
    trainers = [m.get_trainer(torch.optim.AdamW(m.get_trainable_parameters(), lr=1e-2)) for m in (model, resident)]
    for step in range(2):
        ids = batch(step)
        (_, loss), (_, ref_loss) = (t.train_step(ids) for t in trainers)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
        assert ring.schedule == [] and ring.stats.loads == 0
    for name, want in lora_state(resident).items():
        torch.testing.assert_close(lora_state(model)[name], want, atol=1e-5, rtol=0, msg=name)


def test_resident_layers_setting_is_checked():
    from lema import LemaConfig

    with pytest.raises(ValueError, match="resident_layers=-1"):
        LemaConfig(model_name_or_path="x", resident_layers=-1)


@pytest.mark.parametrize("arch, file_dtype, zero_copy, view", [
    ("llama", torch.float32, None, True),          # untied, the file in the compute dtype: a view
    ("llama", torch.bfloat16, None, False),        # converted to fp32 at load: a copy
    ("llama", torch.float32, False, False),        # views turned off
    ("llama-tied", torch.float32, None, False),    # it is the head too, read in full each step: a copy
    ("gpt2", torch.float32, None, False),          # wte is the head (a copy); wpe, untied, a view
], ids=["view", "converted", "zero-copy-off", "tied", "gpt2"])
def test_cpu_embedding_is_a_view_of_the_mmap_unless_tied_or_converted(arch, file_dtype, zero_copy, view,
                                                                       tiny_dir, make_lema):
    """On the CPU the input embedding stays a view of the mmap'd file where it can (a lookup reads only its
    rows; a copy would hold all of it in anonymous memory): the model's weight lies inside the file's mapping,
    the plan puts it in the page cache, and the logits equal those of a model that copies everything."""
    from lema.planner import plan_for_config

    path = tiny_dir(arch, num_layers=LAYERS, dtype=file_dtype)
    model = make_lema(path, num_buffers=2, zero_copy=zero_copy)
    weight = model.base_model.get_input_embeddings().weight
    mapped = any(f._address <= weight.data_ptr() < f._address + f.size for f in model.store.files)
    assert mapped == view
    nbytes = weight.numel() * weight.element_size()
    positions = model.base_model.get_submodule("transformer.wpe").weight if arch == "gpt2" else None
    position_bytes = positions.numel() * positions.element_size() if arch == "gpt2" else 0
    assert model.embedding_view_bytes == (nbytes if view else position_bytes)
    p = plan_for_config(model.config, batch_size=2, seq_len=8)
    assert p.embedding_view_bytes == model.embedding_view_bytes
    row = p.rows()[0]
    assert (row.where == "page cache") == view
    assert row.nbytes == p.unit_bytes["embed"] - p.embedding_view_bytes  # what the embedding holds in memory
    if arch == "gpt2":
        assert any(f._address <= positions.data_ptr() < f._address + f.size for f in model.store.files)
        assert row.where == "cpu" and "not tied to the head a view" in row.note
    copied = make_lema(path, num_buffers=2, zero_copy=False)
    ids = batch(0)
    torch.testing.assert_close(model(ids).logits, copied(ids).logits, atol=0, rtol=0)
    assert not weight.requires_grad


def test_cpu_layers_built_on_load_come_from_the_slots_and_the_plan_counts_them(tiny_dir, make_lema):
    """Mixtral's experts are stacked from the file's per-expert tensors at each load: as mmap views they were a
    fresh allocation per load the plan did not count (a 342 MB Mixtral-shaped model at b4 x 256: predicted / run
    peak 0.84 with a budget). They are built into the ring's preallocated slots, and the plan counts those."""
    from lema.planner import plan_for_config

    model = make_lema(tiny_dir("mixtral", num_layers=LAYERS), num_buffers=3)
    ring = model.source
    ranges = [(s.host.data_ptr(), s.host.data_ptr() + s.host.numel()) for s in ring.slots]
    outside = []
    original = ring.acquire

    def acquire(unit):
        weights = original(unit)
        outside.extend(n for n, t in weights.items()
                       if not any(a <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= b
                                  for a, b in ranges))
        return weights

    ring.acquire = acquire
    model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-2)).train_step(batch(0))
    assert not outside, f"weights not served from the slots: {outside[:3]}"
    p = plan_for_config(model.config, batch_size=2, seq_len=10)
    assert p.ring_device_bytes == 3 * p.slot_bytes > 0
    assert p.embedding_view_bytes == model.embedding_view_bytes > 0  # the embedding is one tensor: still a view


def test_zero_copy_registers_only_the_streamed_layers(tiny_dir, make_lema, tmp_path_factory):
    """CUDA zero-copy page-locks the streamed layers' file ranges (the registration itself needs a GPU; its
    spans are computed here): adjacent streamed layers merge into one page-rounded span, a resident layer
    between two runs stays pageable, no page is in two spans, every streamed byte is in one."""
    from lema.convert import convert
    from lema.stream.layout import registration_spans

    src = tiny_dir("llama", num_layers=6)
    out = convert(src, str(tmp_path_factory.mktemp("packed") / "out"), progress=False)
    layouts = make_lema(out, gbi_path=out + "/model.safetensors").layouts
    page = 4096
    ranges = [layout.ranges[0] for layout in layouts]  # packed: one (file, start, end) per layer
    f = ranges[0][0]
    assert all(len(layout.ranges) == 1 and r[0] is f for layout, r in zip(layouts, ranges))
    down = lambda x: x // page * page  # noqa: E731
    up = lambda x: -(-x // page) * page  # noqa: E731
    assert all(r[2] - r[1] > 2 * page for r in ranges), "layers this small would share pages"

    spans = registration_spans(layouts, [0, 1, 3, 4], page)  # layers 2 and 5 resident
    assert spans == {f: [(down(ranges[0][1]), up(ranges[1][2])), (down(ranges[3][1]), up(ranges[4][2]))]}
    (lo1, hi1), (lo2, hi2) = spans[f]
    assert hi1 < lo2 and hi1 - lo1 >= ranges[1][2] - ranges[0][1]
    assert not any(lo < ranges[2][2] - page and hi > ranges[2][1] + page for lo, hi in spans[f])  # layer 2 out
    assert hi2 < ranges[5][2] - page  # layer 5 out

    every = registration_spans(layouts, list(range(6)), page)
    assert every == {f: [(down(ranges[0][1]), up(ranges[5][2]))]}
    assert registration_spans(layouts, [], page) == {}
