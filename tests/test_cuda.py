"""The CUDA path of the ring: pinned host slots, device slots, the copy stream and its events.

Skipped without a GPU. On a GPU these check that streaming through the ring (host -> pinned ->
device, copy stream synchronised by events, NOTE [ring protocol] in stream/ring.py) gives the
same numbers as the resident strategy, and that the weights a layer runs with are views of the
preallocated device slots (nothing allocated per layer load).
"""

from __future__ import annotations

import pytest
import torch

from lema import MemoryStrategy

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LAYERS = 5
VOCAB = 96


def batch(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.peft_model.named_parameters() if ".lora_" in n}


def assert_trains_like(model, reference, steps: int = 2) -> None:
    """`steps` AdamW steps of both models: the same losses and the same LoRA weights after them."""
    trainers = [m.get_trainer(torch.optim.AdamW(m.get_trainable_parameters(), lr=1e-2)) for m in (model, reference)]
    for step in range(steps):
        ids = batch(step).cuda()
        (_, loss), (_, ref_loss) = (t.train_step(ids) for t in trainers)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    for name, want in lora_state(reference).items():
        torch.testing.assert_close(lora_state(model)[name], want, atol=1e-4, rtol=0, msg=name)


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 matmuls without TF32, so the streamed and resident runs can be compared tightly."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


CASES = [  # (arch, file dtype, compute dtype, relative tolerance)
    ("llama", torch.float32, "float32", 1e-5),
    ("llama", torch.bfloat16, "float32", 1e-5),   # converted into the pinned slot on the way
    ("gpt2", torch.float32, "float32", 1e-5),     # Conv1D layers, tied head
    ("mixtral", torch.float32, "bfloat16", 1e-3),  # fused experts; bf16 so the experts may use grouped_mm
]


@pytest.mark.parametrize("num_buffers", [2, 3])
@pytest.mark.parametrize("arch,file_dtype,dtype,rel", CASES, ids=[f"{c[0]}-{c[2]}" + ("-bf16file" if c[1] ==
                                                                   torch.bfloat16 else "") for c in CASES])
def test_streaming_matches_resident_on_cuda(arch, file_dtype, dtype, rel, num_buffers, tiny_dir, make_lema):
    path = tiny_dir(arch, num_layers=LAYERS, dtype=file_dtype)
    models = {s: make_lema(path, strategy=s, device="cuda", dtype=dtype, num_buffers=num_buffers)
              for s in (MemoryStrategy.STREAMING, MemoryStrategy.RESIDENT)}
    trainers = {s: m.get_trainer(torch.optim.AdamW(m.get_trainable_parameters(), lr=1e-2, weight_decay=0.0))
                for s, m in models.items()}
    for step in range(3):
        ids = batch(step).cuda()
        out = {s: t.train_step(ids, labels=ids) for s, t in trainers.items()}
        (logits, loss), (ref_logits, ref_loss) = out[MemoryStrategy.STREAMING], out[MemoryStrategy.RESIDENT]
        assert logits.is_cuda and torch.isfinite(loss)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=rel)  # host sync
        torch.testing.assert_close(logits.float(), ref_logits.float(), atol=10 * rel, rtol=10 * rel)
    streamed, resident = (lora_state(models[s]) for s in (MemoryStrategy.STREAMING, MemoryStrategy.RESIDENT))
    assert streamed.keys() == resident.keys()
    for name in resident:
        torch.testing.assert_close(streamed[name], resident[name], atol=10 * rel, rtol=0, msg=name)
    ring = models[MemoryStrategy.STREAMING].source
    L, k = LAYERS, num_buffers
    assert ring.stats.loads == (2 * L - k) + 2 * 2 * (L - k)  # see test_ring.py for the derivation
    assert ring.stats.peak_occupied <= num_buffers
    assert not any(s.in_use for s in ring.slots)


def test_layer_packed_file_on_cuda(tiny_dir, make_lema, tmp_path_factory):
    """A `lema convert` output, staged: each layer moves as one memcpy into the pinned slot, one H2D copy."""
    from lema.convert import convert

    src = tiny_dir("llama", num_layers=LAYERS)
    out = convert(src, str(tmp_path_factory.mktemp("packed") / "out"), progress=False)
    model = make_lema(out, device="cuda", num_buffers=2, zero_copy=False)
    resident = make_lema(src, device="cuda", strategy=MemoryStrategy.RESIDENT)
    assert all(layout.packed is not None for layout in model.layouts)
    assert_trains_like(model, resident)


@pytest.mark.parametrize("packed", [False, True], ids=["safetensors", "layer-packed"])
def test_zero_copy_on_cuda_copies_from_the_registered_page_cache(packed, tiny_dir, make_lema, tmp_path_factory):
    """zero_copy=True on a GPU: the layers' file pages are registered with CUDA, each load copies them to the
    device slot directly (no pinned staging slot); the step equals RESIDENT's; close() unregisters them."""
    from lema.convert import convert

    src = tiny_dir("llama", num_layers=LAYERS)
    path = convert(src, str(tmp_path_factory.mktemp("zc") / "out"), progress=False) if packed else src
    model = make_lema(path, device="cuda", num_buffers=2, zero_copy=True)
    resident = make_lema(src, device="cuda", strategy=MemoryStrategy.RESIDENT)
    ring = model.source
    assert ring._host_views is not None and ring._thread is None
    assert all(s.host is None and s.device is not None for s in ring.slots)
    assert all(f._registered for f in model.store.files if any(r[0] is f for l in model.layouts for r in l.ranges))
    pieces = model._host_pieces(model.layouts[0])
    assert all(t.is_pinned() for _, t in pieces)  # registered memory: the copies run as DMA
    assert_trains_like(model, resident)
    model.close()
    assert not any(f._registered for f in model.store.files)


def test_zero_copy_with_a_resident_layer_registers_only_the_streamed_runs(tiny_dir, make_lema, tmp_path_factory):
    """zero_copy=True with resident layers: the resident one (layer 2 of 5) stays pageable, the streamed layers
    are registered as two spans (0-1, 3-4); the step equals RESIDENT's; close() unregisters both."""
    from lema.convert import convert

    src = tiny_dir("llama", num_layers=LAYERS)
    path = convert(src, str(tmp_path_factory.mktemp("zcr") / "out"), progress=False)
    model = make_lema(path, device="cuda", num_buffers=2, zero_copy=True, resident_layers=1)
    assert sorted(model.source.resident) == [2]
    (f,) = model.store.files
    assert len(f._registered) == 2
    assert_trains_like(model, make_lema(src, device="cuda", strategy=MemoryStrategy.RESIDENT))
    model.close()
    assert not f._registered


@pytest.mark.parametrize("packed", [False, True], ids=["safetensors", "layer-packed"])
def test_pinned_staging_reads_through_the_pager(packed, tiny_dir, make_lema, tmp_path_factory):
    """Staged copies (pinned slots filled by the loader's reads) with a pager window of 2 layers: the pager pages
    the layers' file ranges ahead of the loader and drops the rest; the step equals RESIDENT's. Zero-copy gets
    no pager (its registered pages stay locked)."""
    from lema.convert import convert

    src = tiny_dir("llama", num_layers=LAYERS)
    path = convert(src, str(tmp_path_factory.mktemp("pg") / "out"), progress=False) if packed else src
    model = make_lema(path, device="cuda", num_buffers=2, page_cache="1KB")
    pager = model.source.pager
    assert pager is not None and model.source._host_views is None
    assert_trains_like(model, make_lema(src, device="cuda", strategy=MemoryStrategy.RESIDENT))
    assert pager.wait_idle(10) and pager.stats.populated >= LAYERS - 2 and pager.stats.dropped >= LAYERS - 2
    assert make_lema(path, device="cuda", num_buffers=2, page_cache="1KB", zero_copy=True).source.pager is None


def test_zero_copy_on_cuda_refuses_a_file_in_another_dtype(tiny_dir, make_lema):
    with pytest.raises(ValueError, match="not stored in torch.float32.*--zero-copy auto"):
        make_lema(tiny_dir("llama", num_layers=LAYERS, dtype=torch.bfloat16), device="cuda", zero_copy=True)


def test_cuda_copies_are_zero_copy_by_default_where_they_can_be(tiny_dir, make_lema):
    """zero_copy=None on a GPU: the registered page cache where the file holds the layers in the compute dtype;
    pinned staging where each load converts (a bf16 file, fp32 compute) or a page-cache size asks for the
    pager; zero_copy=False stages."""
    path = tiny_dir("llama", num_layers=LAYERS)
    auto = make_lema(path, device="cuda", num_buffers=2)
    assert auto.source._host_views is not None and all(s.host is None for s in auto.source.slots)
    converted = make_lema(tiny_dir("llama", num_layers=LAYERS, dtype=torch.bfloat16), device="cuda", num_buffers=2)
    paged = make_lema(path, device="cuda", num_buffers=2, page_cache="1KB")
    off = make_lema(path, device="cuda", num_buffers=2, zero_copy=False)
    for m in (converted, paged, off):
        assert m.source._host_views is None and all(s.host is not None and s.host.is_pinned() for s in m.source.slots)
    assert paged.source.pager is not None
    assert_trains_like(auto, off)


def test_ring_slots_are_pinned_host_and_device_buffers(tiny_dir, make_lema):
    model = make_lema(tiny_dir("llama", num_layers=LAYERS), device="cuda", num_buffers=3, zero_copy=False)
    ring = model.source
    assert ring.copy_stream is not None and ring.copy_stream != torch.cuda.current_stream()
    assert len(ring.slots) == 3
    for s in ring.slots:
        assert s.host is not None and s.host.device.type == "cpu" and s.host.is_pinned()
        assert s.pinned.exact and s.pinned.registered  # page-locked at its size (not torch's power-of-two block)
        assert s.device is not None and s.device.is_cuda and s.device.dtype == torch.uint8
        assert s.host.numel() == s.device.numel() == ring.slot_bytes >= max(l.nbytes for l in model.layouts)
        assert all(isinstance(e, torch.cuda.Event) for e in (s.ready, s.done, s.h2d_done))

    # Every weight a layer runs with is a view into one of the device slots: no allocation per load.
    ranges = [(s.device.data_ptr(), s.device.data_ptr() + s.device.numel()) for s in ring.slots]
    outside = []
    original = ring.acquire

    def acquire(unit):
        weights = original(unit)
        for name, t in weights.items():
            lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
            if not t.is_cuda or not any(a <= lo and hi <= b for a, b in ranges):
                outside.append(name)
        return weights

    ring.acquire = acquire
    trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-2))
    trainer.train_step(batch(0).cuda())
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    for step in (1, 2):
        trainer.train_step(batch(step).cuda())
    torch.cuda.synchronize()
    assert not outside, f"weights not served from the device slots: {outside[:3]}"
    assert torch.cuda.memory_allocated() <= allocated + 2**20  # steady state: nothing grows per step

    stats = model.memory_stats(trainer.optimizer)
    assert {"device_allocated", "device_peak"} <= stats.keys()
    assert stats["frozen_weights_now"] == stats["frozen_weights_peak"]
    assert stats["frozen_weights_peak"] - ring.bytes_on_device() > 0  # embedding + head, resident
    assert ring.bytes_on_device() == 3 * ring.slot_bytes
    model.close()
    assert not any(s.pinned.registered or s.host.is_pinned() for s in ring.slots)  # close() unregistered them


def test_streaming_on_cuda_matches_cpu_reference(tiny_dir, make_lema):
    """The same adapter and batch on the CPU (fp32) and streamed on CUDA give the same loss."""
    path = tiny_dir("llama", num_layers=LAYERS)
    ids = batch(7)
    losses = {}
    for device in ("cpu", "cuda"):
        model = make_lema(path, device=device, num_buffers=2)
        with torch.no_grad():
            losses[device] = model(ids.to(device), labels=ids.to(device)).loss.item()
            if device == "cuda":  # CPU inputs go to the GPU through pinned copies (LemaModel._to_device)
                losses["cpu inputs"] = model(ids, labels=ids).loss.item()
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-4)
    assert losses["cpu inputs"] == losses["cuda"]


def test_loader_error_on_cuda_names_the_unit(tiny_dir, make_lema):
    model = make_lema(tiny_dir("llama", num_layers=LAYERS), device="cuda", num_buffers=2, zero_copy=False)
    ring = model.source
    fill = ring._fill

    def broken(layout, dst):
        if layout.unit == "layer.3":
            raise OSError("simulated read error")
        fill(layout, dst)

    ring._fill = broken
    ids = batch(0).cuda()
    with pytest.raises(RuntimeError, match=r"layer\.3.*simulated read error"):
        with torch.no_grad():
            model(ids)
    ring._fill = fill
    with torch.no_grad():
        assert torch.isfinite(model(ids, labels=ids).loss)
    assert not any(s.in_use for s in ring.slots)


@pytest.mark.parametrize("keep", [0, None], ids=["recompute", "kept"])
def test_kept_activations_on_cuda_match_resident(keep, tiny_dir, make_lema):
    """Kept layers re-acquire their weights into device slots in backward (the rebuilt views point at
    whichever slot the ring chose then): same LoRA as RESIDENT."""
    path = tiny_dir("llama", num_layers=LAYERS)
    streamed = make_lema(path, strategy=MemoryStrategy.STREAMING, device="cuda", num_buffers=2,
                         keep_activations=keep)
    resident = make_lema(path, strategy=MemoryStrategy.RESIDENT, device="cuda", keep_activations=0)
    for m in (streamed, resident):
        m.get_trainer(torch.optim.AdamW(m.get_trainable_parameters(), lr=1e-2)).train_step(batch(0).cuda())
    assert len(streamed.streamed.keep) == (0 if keep == 0 else LAYERS)
    for name, want in lora_state(resident).items():
        torch.testing.assert_close(lora_state(streamed)[name], want, atol=1e-5, rtol=0, msg=name)


def test_resident_layers_on_cuda_stay_on_the_device_and_match(tiny_dir, make_lema):
    """resident_layers=2: those layers' weights are device tensors loaded once; the ring streams the
    others through its slots (zero-copy, the default here: the resident layers are read before the streamed ones'
    pages are registered, as a tensor on a page shared with a registered span cannot be copied); same LoRA as
    RESIDENT after a step."""
    path = tiny_dir("llama", num_layers=LAYERS)
    streamed = make_lema(path, device="cuda", num_buffers=2, resident_layers=2)
    resident = make_lema(path, strategy=MemoryStrategy.RESIDENT, device="cuda")
    ring = streamed.source
    assert len(ring.resident) == 2 and ring._host_views is not None
    assert all(t.is_cuda for w in ring.resident.values() for t in w.values())
    for m in (streamed, resident):
        m.get_trainer(torch.optim.AdamW(m.get_trainable_parameters(), lr=1e-2)).train_step(batch(0).cuda())
    assert ring.stats.resident_hits == 2 * 2 and ring.stats.loads <= 2 * (LAYERS - 2)
    for name, want in lora_state(resident).items():
        torch.testing.assert_close(lora_state(streamed)[name], want, atol=1e-5, rtol=0, msg=name)


def test_offloaded_boundary_on_cuda_is_pinned_host_and_matches(tiny_dir, make_lema):
    """offload_activations=True on a GPU: the checkpoint's saved inputs (the hidden states only) are pinned host
    copies made on the offload stream, each recompute but the first copies the next layer's input back early,
    and the step equals RESIDENT's."""
    path = tiny_dir("llama", num_layers=LAYERS)
    streamed = make_lema(path, device="cuda", num_buffers=2, keep_activations=0, offload_activations=True)
    resident = make_lema(path, strategy=MemoryStrategy.RESIDENT, device="cuda", keep_activations=0)
    offload = streamed.streamed.host_offload
    entries = []
    original = offload.pack
    offload.pack = lambda t: entries.append(original(t)) or entries[-1]
    for m in (streamed, resident):
        m.get_trainer(torch.optim.AdamW(m.get_trainable_parameters(), lr=1e-2)).train_step(batch(0).cuda())
    torch.cuda.synchronize()
    assert len(entries) == LAYERS and all(e.host.is_pinned() and e.host.device.type == "cpu" for e in entries)
    assert offload.stream is not None and offload.stream != torch.cuda.current_stream()
    assert offload.prefetched == LAYERS - 1 and offload.last is None
    assert streamed.streamed.offloaded_bytes == streamed.streamed.boundary_bytes > 0
    for name, want in lora_state(resident).items():
        torch.testing.assert_close(lora_state(streamed)[name], want, atol=1e-5, rtol=0, msg=name)


def test_lema_bench_on_cuda(tmp_path, capsys):
    """`lema bench --device cuda`: device peaks, the pinned H2D ceiling, an emulated card, the PCIe floor."""
    import json

    from lema.cli import main

    rc = main(["bench", "--shape", "tiny-llama", "--cache-dir", str(tmp_path), "--steps", "2", "--batch-size", "2",
               "--seq-len", "16", "--num-buffers", "2", "--device", "cuda", "--gpu-memory", "4GB", "--floor", "--json",
               "--resident-layers", "0", "--memory-peak"])  # every layer streamed (auto would choose by the time model)
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    for name, m in out["memory_peak"].items():  # the allocator history replayed: torch's own peak of that step,
        # less what cached blocks handed out whole held beyond the bytes asked for (measure.peak_allocations)
        assert m["peak_bytes"] == pytest.approx(m["max_memory_allocated"], rel=0.02), name
        assert m["before_step_live_bytes"] + sum(g["bytes"] for g in m["groups"]) <= m["peak_bytes"], name
    assert out["ceiling_kind"] == "pinned host-to-device copy" and out["ceiling_bytes_per_s"] > 1e9
    for name, c in out["contenders"].items():
        assert 0 < c["peak_anon_bytes"] < 4e9, name
    s = out["contenders"]["streaming"]
    assert out["floor"]["disk_s"] == pytest.approx(s["bytes_streamed_per_step"] / out["ceiling_bytes_per_s"])
    # 2 slots of 3 layers: the last forward layer serves the first backward one, so a bit under two passes
    assert out["floor"]["disk_s"] < out["floor"]["two_passes_s"] <= 2 * out["weights_bytes"] / out["ceiling_bytes_per_s"]
