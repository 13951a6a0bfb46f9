"""`lema bench` on a tiny shape: the shape builder, the JSON it prints, the planner compared. Never timing."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lema.cli import main
from lema.commands.bench import format_table
from lema.contenders import layer_timeline
from lema.host_memory import heap_allocated
from lema.measure import VM_COUNTERS, vm_counters
from lema.shapes import build_shape, shape_config

KEYS = {"median_step_s", "tokens_per_s", "peak_anon_bytes", "peak_run_bytes", "predicted_peak_bytes",
        "predicted_over_measured", "prediction_within_10pct", "bytes_streamed_per_step", "achieved_bytes_per_s", "achieved_over_ceiling",
        "vs_peft", "vs_resident", "losses"}


def test_build_shape_writes_a_packed_checkpoint_once(tmp_path):
    from transformers import AutoModelForCausalLM

    from lema.store import WeightStore

    folder = build_shape("tiny-llama", str(tmp_path))
    cfg = shape_config("tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(folder)  # a valid Transformers checkpoint
    assert model.config.hidden_size == cfg.hidden_size
    store = WeightStore(folder)
    assert {f"layer.{i}" for i in range(cfg.num_hidden_layers)} <= set(store.units)
    f, start, end = store.units["layer.1"]
    assert start % 64 == 0 and end - start == sum(p.numel() * 4 for p in model.model.layers[1].parameters())
    store.close()
    mtime = os.path.getmtime(os.path.join(folder, "model.safetensors"))
    assert build_shape("tiny-llama", str(tmp_path)) == folder
    assert os.path.getmtime(os.path.join(folder, "model.safetensors")) == mtime  # not rebuilt


def _file_mapped(t: torch.Tensor, path: str) -> bool:
    """Whether `t`'s data lies in a mapping of file `path` (/proc/self/maps)."""
    ptr, real = t.data_ptr(), os.path.realpath(path)
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= ptr < hi:
                return len(fields) == 6 and fields[5].strip() == real
    return False


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
def test_transformers_maps_a_file_in_the_compute_dtype(tmp_path):
    """What the plan of the Transformers + PEFT contender assumes (weights_mapped): its weights are the file's
    pages when the file is in the compute dtype, anonymous copies when they are cast."""
    from transformers import AutoModelForCausalLM

    folder = build_shape("tiny-llama", str(tmp_path))
    weights = os.path.join(folder, "model.safetensors")
    mapped = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert all(_file_mapped(p, weights) for p in mapped.parameters())
    cast = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert not any(_file_mapped(p, weights) for p in cast.parameters())


def test_lema_bench_json(tmp_path, capsys):
    rc = main(["bench", "--shape", "tiny-llama", "--cache-dir", str(tmp_path), "--steps", "2",
               "--batch-size", "2", "--seq-len", "16", "--num-buffers", "2", "--threads", "1", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["contenders"]) == {"peft", "resident", "streaming"}
    for name, c in out["contenders"].items():
        assert KEYS <= set(c), name
        assert len(c["step_times_s"]) == 2 and c["predicted_peak_bytes"] > 0
    s, r = out["contenders"]["streaming"], out["contenders"]["resident"]
    assert s["bytes_streamed_per_step"] > 0 and r["bytes_streamed_per_step"] == 0  # 3 layers, 2 slots
    torch.testing.assert_close(torch.tensor(s["losses"]), torch.tensor(r["losses"]))  # same engine, same numbers
    assert out["contenders"]["peft"]["vs_peft"] == 1.0 and r["vs_resident"] == 1.0
    paired = [a / b for a, b in zip(s["step_times_s"], r["step_times_s"])]  # each round's pair, then the median
    assert s["vs_resident_by_round"] == pytest.approx(sum(paired) / 2) and r["vs_resident_by_round"] == 1.0
    assert out["ceiling_bytes_per_s"] > 0
    for name in ("resident", "streaming"):  # what LEMA decided, and the plan it is compared with, agree
        c = out["contenders"][name]
        assert c["kept_layers"] == 3 and c["chunked_loss"] is False  # tiny: everything fits, small logits
    for name in ("resident", "streaming"):  # the median step's layer timeline: 3 layers forward and backward
        t = out["contenders"][name]["layers"]
        assert t["layer_runs"] == 6 and t["forward_s"] > 0 and t["backward_s"] > 0 and t["outside_layers_s"] > 0
        assert t["forward_s"] + t["backward_s"] + t["outside_layers_s"] == pytest.approx(
            out["contenders"][name]["median_step_s"], rel=0.5)  # the step closest to the median (of 2)
    assert "layers" not in out["contenders"]["peft"]
    gemm = out["gemm_ceiling_flops_per_s"]  # the compute floor: the step's FLOPs over one large product's rate
    for c in out["contenders"].values():
        assert c["over_compute_ceiling"] == pytest.approx(c["median_step_s"] * gemm / c["flops_per_step"])
    peft = out["contenders"]["peft"]["flops_per_step"]  # it recomputes its 3 layers, LEMA keeps them: 3 forwards
    assert s["flops_per_step"] == r["flops_per_step"] < peft
    table = format_table(out)
    assert f"LEMA STREAMING: {s['flops_per_step'] / 1e12:.2f} TFLOP a step (counted from the shape)" in table
    assert "LEMA STREAMING" in table and "pred/run" in table and "3 layers kept" in table
    assert "LEMA STREAMING: where the median step went: layers forward" in table
    assert "round by round (median of each step over the other's in the same round): LEMA STREAMING " in table
    if heap_allocated() is not None:  # the check against malloc's bytes in use, from an untimed step
        for c in out["contenders"].values():
            assert c["peak_run_allocated_bytes"] > 0
            assert c["predicted_over_allocated"] == pytest.approx(c["predicted_peak_bytes"] / c["peak_run_allocated_bytes"])
            assert c["allocated_prediction_within_10pct"] == (abs(c["predicted_over_allocated"] - 1) <= 0.10)
            assert f"predicted / peak allocated (malloc's bytes in use) {c['predicted_over_allocated']:.2f}" in table
    # the planner check: each contender's prediction against its measured peak, flagged outside 10%
    for c in out["contenders"].values():
        assert c["prediction_within_10pct"] == (abs(c["predicted_over_measured"] - 1) <= 0.10)
        assert f"planner check, {c['label']}: predicted / run peak {c['predicted_over_measured']:.2f}" in table
    s["predicted_over_measured"], s["prediction_within_10pct"] = 0.63, False
    lines = [ln for ln in format_table(out).splitlines() if ln.startswith("planner check, LEMA STREAMING")]
    assert len(lines) == 1 and lines[0].startswith(
        "planner check, LEMA STREAMING: predicted / run peak 0.63, OUTSIDE 10% (RssAnon also counts what glibc's heap "
        "keeps of freed blocks, unbounded without --max-vram)")
    out["max_vram"] = "1GB"  # with a budget the heap is bounded: no excuse offered
    assert any(ln.startswith("planner check, LEMA STREAMING: predicted / run peak 0.63, OUTSIDE 10%") and "glibc" not in ln
               for ln in format_table(out).splitlines())


def test_step_flops_counts_the_products_of_the_layers_lora_and_head(tiny_dir):
    """step_flops against the parameters of the model itself: a recomputed layer adds one forward (its frozen
    weights' 2 N P, its LoRA's 2 N r (in + out), its attention's 2 B T^2 H), and a step without recompute is
    the forward and backward of the layers (the backward: 2 N P, 6 N r (in + out), twice the attention) plus the
    head's 4 N V H."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lema.engine.skeleton import default_lora_targets, find_decoder_layers
    from lema.measure import step_flops
    from lema.plan_bytes import model_facts

    path = tiny_dir("llama")
    facts = model_facts(path, torch.float32, 4)
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    frozen = sum(p.numel() for n, p in m.named_parameters() if ".layers." in n)
    m = get_peft_model(m, LoraConfig(r=4, target_modules=default_lora_targets(find_decoder_layers(m)[1])))
    lora = sum(p.numel() for n, p in m.named_parameters() if "lora_" in n)
    cfg, (B, T), L = m.config, (2, 16), m.config.num_hidden_layers
    N, attention = B * T, 2 * B * T * T * cfg.hidden_size * L
    forward = 2 * N * frozen + 2 * N * lora + attention
    kept = step_flops(facts, torch.float32, B, T, recomputed=0)
    assert kept == forward + 2 * N * frozen + 6 * N * lora + 2 * attention + 4 * N * cfg.vocab_size * cfg.hidden_size
    assert step_flops(facts, torch.float32, B, T, recomputed=L) == kept + forward


def test_layer_timeline_splits_the_step():
    """A 2-layer step: F0 F1 then B1 B0 (a unit's second run is its backward); reads beside B1 only."""
    spans = [("acquire", 0, 0.0, 0.1), ("release", 0, 1.0, 1.0), ("acquire", 1, 1.0, 1.0), ("release", 1, 2.0, 2.0),
             ("acquire", 1, 2.5, 2.5), ("release", 1, 4.5, 4.5), ("acquire", 0, 4.5, 4.5), ("release", 0, 5.5, 5.5)]
    t = layer_timeline(spans, [(2.5, 4.0, 100)], step_s=6.0)
    assert (t["forward_s"], t["backward_s"], t["layer_runs"]) == (2.0, 3.0, 4)
    assert t["outside_layers_s"] == pytest.approx(1.0) and t["wait_s"] == pytest.approx(0.1)
    assert t["beside_read"] == {"runs": 1, "mean_s": 2.0} and t["alone"] == {"runs": 3, "mean_s": 1.0}
    assert t["read_bytes"] == 100


def test_lema_bench_floor_is_timed_in_the_rounds(tmp_path, capsys):
    rc = main(["bench", "--shape", "tiny-llama", "--cache-dir", str(tmp_path), "--steps", "2", "--batch-size", "2",
               "--seq-len", "16", "--threads", "1", "--contenders", "streaming", "--floor", "--keep-activations",
               "0", "--chunked-loss", "on", "--page-cache", "1KB", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["contenders"]) == {"streaming"}  # the floor probes are not contenders
    s, fl = out["contenders"]["streaming"], out["floor"]
    assert s["kept_layers"] == 0 and s["chunked_loss"] is True
    assert fl["interleaved"] and set(fl["layers_timed"]) == {"1", "4"} and fl["kept_layers"] == 0
    t1, t4 = fl["layers_timed"]["1"], fl["layers_timed"]["4"]
    # 3 layers: t(n) = rest + n x t_layer, so t_layer = (t4 - t1) / 3 and the step = t1 + 2 t_layer
    assert fl["t_layer"] == pytest.approx((t4 - t1) / 3) and fl["compute_s"] == pytest.approx(t1 + 2 * (t4 - t1) / 3)
    assert fl["floor_s"] == pytest.approx(max(fl["compute_s"], fl["disk_s"]))
    # the disk's rate: the ceiling probe's, or the pager's own reads in the median step when they ran faster
    t = s["layers"]
    assert t["read_bytes"] > 0 and fl["pager_read_bytes_per_s"] == pytest.approx(t["read_bytes"] / t["read_s"])
    assert fl["disk_bytes_per_s"] == pytest.approx(max(out["ceiling_bytes_per_s"], fl["pager_read_bytes_per_s"]))
    assert fl["disk_s"] == pytest.approx(s["disk_bytes_read_per_step"] / fl["disk_bytes_per_s"])
    assert "the pager's own reads ran at" in format_table(out)
    assert fl["streaming_over_floor"] == pytest.approx(s["median_step_s"] / fl["floor_s"])
    assert fl["fastest_streaming_over_floor"] == pytest.approx(min(s["step_times_s"]) / fl["floor_s"])
    by_round = [t / max(fl["disk_s"], c) for t, c in zip(s["step_times_s"], fl["compute_by_round_s"])]
    assert len(by_round) == 2 and fl["streaming_over_floor_by_round"] == pytest.approx(by_round)
    assert fl["median_round_streaming_over_floor"] == pytest.approx(sum(by_round) / 2)
    assert "round by round, against the probes of the same round" in format_table(out)
    assert set(fl["probe_faults_per_step"]) == {"floor-1", "floor-4"}  # the probes' steps' faults, for comparison
    assert all(len(f) == 2 and min(f) >= 0 for f in fl["probe_faults_per_step"].values())
    assert "; page faults a step in the probes' processes: floor-1 " in format_table(out)


def test_floor_mixes_kept_and_recomputed_layer_times():
    from lema.bench import ContenderResult, floor_from_rounds, floor_probes

    assert floor_probes(0, 3) == ["floor-1", "floor-4"]
    assert floor_probes(3, 3) == ["floor-1-kept", "floor-4-kept"]
    assert floor_probes(1, 3) == ["floor-1", "floor-4", "floor-1-kept", "floor-4-kept"]
    results = {n: ContenderResult(n, n, times=[t]) for n, t in
               {"floor-1": 5.0, "floor-4": 14.0, "floor-1-kept": 4.0, "floor-4-kept": 10.0}.items()}
    import tempfile

    from transformers import LlamaConfig

    folder = tempfile.mkdtemp()
    LlamaConfig(num_hidden_layers=10).save_pretrained(folder)
    fl = floor_from_rounds(folder, results, kept_layers=4)
    # recomputed: rest 2, 3 s/layer; kept: rest 2, 2 s/layer -> 2 + 4 x 2 + 6 x 3
    assert fl["t_layer"] == 3.0 and fl["t_layer_kept"] == 2.0 and fl["t_rest"] == 2.0
    assert fl["compute_s"] == pytest.approx(2 + 4 * 2 + 6 * 3)
    assert fl["compute_by_round_s"] == pytest.approx([2 + 4 * 2 + 6 * 3])


def test_the_floor_round_by_round_follows_the_machine():
    """Round 2 ran with everything 1.5x slower (the VM's drift): the floor (fastest round) stays round 1's,
    and each round's own fit gives that round's compute, so a ratio round by round cancels the drift."""
    import tempfile

    from transformers import LlamaConfig

    from lema.bench import ContenderResult, floor_from_rounds

    results = {n: ContenderResult(n, n, times=[t, 1.5 * t]) for n, t in {"floor-1": 5.0, "floor-4": 14.0}.items()}
    folder = tempfile.mkdtemp()
    LlamaConfig(num_hidden_layers=10).save_pretrained(folder)
    fl = floor_from_rounds(folder, results, kept_layers=0)
    assert fl["compute_s"] == pytest.approx(2 + 10 * 3)
    assert fl["compute_by_round_s"] == pytest.approx([32.0, 48.0])


def test_lema_bench_reports_the_pager_and_the_cpu(tmp_path, capsys):
    """With a page-cache window (--page-cache), the streaming contender reports it, the disk reads it
    implies (2 x (L - window layers) layers per step) and how many acquires it was late for; every
    contender reports the machine's CPU shares during its steps."""
    rc = main(["bench", "--shape", "tiny-llama", "--cache-dir", str(tmp_path), "--steps", "1",
               "--batch-size", "1", "--seq-len", "8", "--contenders", "streaming", "--threads", "1",
               "--page-cache", "1KB", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    s = out["contenders"]["streaming"]
    assert s["page_cache_window"] == 1000
    from lema.store import WeightStore

    store = WeightStore(build_shape("tiny-llama", str(tmp_path)))  # built by the run: not rebuilt
    _, start, end = store.units["layer.1"]
    store.close()
    assert s["predicted_disk_bytes_per_step"] == 2 * (3 - 2) * (end - start)
    assert s["pager_late_per_step"] >= 0
    assert sum(s["cpu"].values()) == pytest.approx(1.0) and set(s["cpu"]) >= {"user", "system", "steal"}
    assert "held by the pager" in format_table(out)
    # the kernel's memory work during the steps (/proc/vmstat deltas, per step): counts, never negative
    assert set(s["vm_per_step"]) == set(VM_COUNTERS) and all(v >= 0 for v in s["vm_per_step"].values())
    out["contenders"]["streaming"]["vm_per_step"] = dict.fromkeys(VM_COUNTERS, 0) | {"pgsteal_kswapd": 2**20,
                                                                                      "compact_stall": 3}
    assert "the kernel's memory work a step: kswapd reclaimed 1.0 MiB" in format_table(out)
    assert "3 compaction stalls" in format_table(out)
    # page faults in the process but the pager's thread: counts a step, never negative
    assert len(s["faults_per_step"]) == 2 and min(s["faults_per_step"]) >= 0
    out["contenders"]["streaming"]["faults_per_step"] = [12345.0, 0.0]
    assert "LEMA STREAMING: page faults a step in its process (but the pager's thread): 12,345 minor, 0 major" in \
        format_table(out)


def test_step_faults_count_every_thread_but_the_excluded():
    """torch's worker threads take their share of a step's faults (a GEMM's, an elementwise op's first touches):
    counted; the pager's thread, whose faults are its reads, is left out by its native id."""
    import mmap
    import threading

    from lema.measure import step_faults

    ids, go, touched, done = [], threading.Event(), threading.Event(), threading.Event()

    def worker() -> None:
        ids.append(threading.get_native_id())
        go.wait()
        m = mmap.mmap(-1, 3000 * mmap.PAGESIZE)
        for i in range(3000):
            m[i * mmap.PAGESIZE] = 1  # a first write to each page of fresh anonymous memory: one fault each
        m.close()
        touched.set()
        done.wait()  # alive while counted: an ended thread's counts leave /proc/self/task with it

    other = threading.Thread(target=worker)
    other.start()
    while not ids:
        pass
    every, but_it = step_faults(), step_faults((ids[0],))
    go.set()
    touched.wait()
    every_after, but_it_after = step_faults(), step_faults((ids[0],))
    done.set()
    other.join()
    assert every_after[0] - every[0] >= 3000 and but_it_after[0] - but_it[0] < 1000


def test_vm_counters_read_the_kernels_counts_in_bytes():
    import mmap

    counters = vm_counters()
    with open("/proc/vmstat") as f:
        raw = {k: int(v) for k, v in (line.split() for line in f)}
    assert set(counters) == set(VM_COUNTERS) & set(raw)
    if "compact_stall" in counters:  # events, not pages
        assert raw["compact_stall"] <= counters["compact_stall"] <= raw["compact_stall"] + 1000
    if "pgscan_kswapd" in counters:  # pages, as bytes
        assert counters["pgscan_kswapd"] % mmap.PAGESIZE == 0 and counters["pgscan_kswapd"] >= raw["pgscan_kswapd"]


def test_transient_probes_live_for_their_turn_only(tmp_path):
    """For a model bigger than the RAM the floor probes are transient: a process per round, ended after
    its turn (its memory is not taken from the page cache of the streamed run); the streamed run's pager
    reports its window, what the kernel evicted of it and the trim, and the rounds still time everyone."""
    from lema.bench import run_rounds
    from lema.contenders import BenchSpec

    folder = build_shape("tiny-llama", str(tmp_path))
    spec = BenchSpec(model=folder, batch_size=1, seq_len=8, page_cache="1KB")
    names = ["streaming", "floor-1", "floor-2"]
    results, workers = run_rounds(names, spec, steps=2, threads=1, log=lambda *a: None,
                                  transient=("floor-1", "floor-2"))
    try:
        assert set(workers) == {"streaming"}  # the probes' processes are gone
        assert workers["streaming"].proc.is_alive()
    finally:
        for w in workers.values():
            w.close()
    assert results["streaming"].builds == 1 and len(results["streaming"].times) == 2
    for n in ("floor-1", "floor-2"):
        assert results[n].builds == 2 and len(results[n].times) == 2 and results[n].baseline_rss > 0
    info = results["streaming"].info
    assert info["page_cache_window"] == 1000 and info["page_cache_trim"] == 0  # a fixed window is not trimmed
    assert info["page_cache_evicted_per_step"] >= 0
    assert info["page_cache_shed_per_step"] == 0  # a fixed window never sheds for free memory


def test_the_transformers_contenders_build_a_soft_capped_model_with_eager_attention(tiny_dir):
    """The Transformers + PEFT contender and the floor probes attend as LEMA does: Gemma 2 soft-caps its attention
    logits, which SDPA cannot (Transformers 5.23 refuses SDPA for it, earlier versions silently drop the cap), so
    its contenders are built with eager attention; a Llama keeps SDPA."""
    from lema.contenders import BenchSpec, _Contender

    for arch, attention in (("gemma2", "eager"), ("llama", "sdpa")):
        spec = BenchSpec(model=tiny_dir(arch), batch_size=1, seq_len=8)
        for name in ("peft", "floor-1"):
            contender = _Contender(name, spec)
            assert contender.model.config._attn_implementation == attention, (arch, name)
            assert torch.isfinite(contender._hf_step()), (arch, name)


def test_a_bad_input_is_one_line_from_the_parent_or_a_contender(tmp_path, capsys):
    """A truncated weights file, a page-cache window or thread count that is no number are named before any
    contender starts, in one line; a bad input that only a contender's process meets comes back as the same one
    line (ValueError, its message), not as the worker's traceback, which only a bug still carries."""
    from lema.bench import run_rounds
    from lema.contenders import BenchSpec

    folder = build_shape("tiny-llama", str(tmp_path))
    cut = tmp_path / "cut"
    os.makedirs(cut)
    for name in os.listdir(folder):
        if name != "model.safetensors":
            os.symlink(os.path.join(folder, name), cut / name)
    with open(os.path.join(folder, "model.safetensors"), "rb") as f:
        (cut / "model.safetensors").write_bytes(f.read()[:5000])
    base = ["bench", "--steps", "1", "--batch-size", "1", "--seq-len", "8", "--contenders", "streaming"]
    for flags, message in ((["--model", str(cut)], "model.safetensors' is truncated"),
                           (["--model", folder, "--memory-peak"], "--memory-peak reads CUDA's allocator history"),
                           (["--model", folder, "--page-cache", "abc"], "--page-cache='abc' is not a size"),
                           (["--model", folder, "--threads", "-1"], "--threads=-1 must be positive")):
        assert main(base + flags) == 1, flags
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (flags, err)
    spec = BenchSpec(model=folder, batch_size=1, seq_len=8, page_cache="abc")  # past the command's own checks
    with pytest.raises(ValueError, match=r"^LEMA STREAMING: page_cache='abc' is not a size") as e:
        run_rounds(["streaming"], spec, steps=1, threads=1, log=lambda *a: None)
    assert "Traceback" not in str(e.value)


def test_peak_allocations_replays_the_allocator_history():
    """What is live at a step's peak, from a CUDA allocator history (the shape of torch.cuda.memory._snapshot()):
    `alloc` adds, `free_requested` takes off (as memory_allocated counts; `free_completed` is the pool's business),
    a block allocated before the step and freed in it lowers what was there before, and the groups are by the
    innermost frame outside torch, or by size where there is no Python frame."""
    from lema.commands.bench import format_memory_peak
    from lema.measure import peak_allocations

    def frames(*where):
        return [{"filename": f, "line": n, "name": fn} for f, n, fn in where]

    torch_frame = ("/usr/lib/python3/site-packages/torch/nn/functional.py", 10, "linear")
    peft = ("/venv/lib/python3.12/site-packages/peft/tuners/lora/layer.py", 700, "forward")
    hook = ("/repo/src/lema/engine/streamed_layer.py", 222, "_fetch")
    MiB = 2**20
    trace = [
        {"action": "alloc", "addr": 1, "size": 32 * MiB, "frames": frames(hook)},
        {"action": "free_requested", "addr": 900, "size": 8 * MiB, "frames": []},  # allocated before the step
        {"action": "free_completed", "addr": 900, "size": 8 * MiB, "frames": []},
        {"action": "alloc", "addr": 2, "size": 64 * MiB, "frames": frames(torch_frame, peft)},
        {"action": "alloc", "addr": 3, "size": 64 * MiB, "frames": frames(torch_frame, peft)},
        {"action": "alloc", "addr": 4, "size": 2 * MiB - 100, "frames": []},  # counted as the allocator's block
        {"action": "alloc", "addr": 6, "size": 4, "frames": frames(hook)},  # a 512 B block
        {"action": "free_requested", "addr": 2, "size": 64 * MiB, "frames": []},  # the peak was just before
        {"action": "alloc", "addr": 5, "size": 50 * MiB, "frames": frames(peft)},  # 50 < the 64 freed: no new peak
        {"action": "free_requested", "addr": 5, "size": 50 * MiB, "frames": []},
    ]
    found = peak_allocations({"device_traces": [trace]}, start_allocated=1000 * MiB)
    assert found["peak_bytes"] == (1000 - 8 + 32 + 64 + 64 + 2) * MiB + 512
    assert found["before_step_live_bytes"] == 992 * MiB
    groups = {g["where"]: (g["bytes"], g["count"]) for g in found["groups"]}
    assert groups == {"peft/tuners/lora/layer.py:700 forward": (128 * MiB, 2),
                      "lema/engine/streamed_layer.py:222 _fetch": (32 * MiB + 512, 2),
                      f"no Python frame (C++: autograd's backward), blocks of {2 * MiB:,} B": (2 * MiB, 1)}
    assert [g["bytes"] for g in found["groups"]] == [128 * MiB, 32 * MiB + 512, 2 * MiB]
    assert sum(g["bytes"] for g in found["groups"]) + found["before_step_live_bytes"] == found["peak_bytes"]
    text = format_memory_peak("LEMA STREAMING", dict(found, max_memory_allocated=found["peak_bytes"]), 10**9)
    assert "peft/tuners/lora/layer.py:700 forward" in text and "2 block(s) of 64.0 MiB" in text
    assert found == peak_allocations({"device_traces": [trace]}, 1000 * MiB, top=15)  # pure: same again
    assert peak_allocations({"device_traces": [[]]}, 5)["peak_bytes"] == 5  # nothing happened: the start
