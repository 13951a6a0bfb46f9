"""`lema convert`: every source format -> one layer-packed file, checked byte by byte and against Transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lema import LemaConfig, LemaModel
from lema.convert import ConvertError, convert
from lema.store import PACKED_FORMAT, SafetensorsFile, WeightStore, WeightsFileError
from tiny_models import save_tiny

TESTS = os.path.dirname(os.path.abspath(__file__))
SRC_DIR = os.path.join(os.path.dirname(TESTS), "src")


def model_tensors(folder: str) -> dict[str, torch.Tensor]:
    """The state dict Transformers loads from `folder` (names of the model, tied weights once)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_packed(out: str, buffers: frozenset = frozenset()) -> None:
    """Units in step order, each one contiguous range holding exactly its tensors' bytes, back to back; the
    persistent `buffers` the model stores in no unit, before the first or after the last."""
    path = os.path.join(out, "model.safetensors")
    f = SafetensorsFile(path)
    assert f.metadata["lema.format"] == PACKED_FORMAT
    assert f.data_start % 4096 == 0
    units = json.loads(f.metadata["lema.units"])
    n_layers = len(units) - 2
    assert list(units) == ["embed"] + [f"layer.{i}" for i in range(n_layers)] + ["head"]
    entries = sorted(f.entries.values(), key=lambda e: e.start)
    assert entries[0].start == f.data_start and entries[-1].end == f.size
    with open(path, "rb") as raw:
        data = raw.read()
    first = min(start for start, _ in units.values())
    stray = [e for e in entries if not any(start <= e.start < end for start, end in units.values())]
    assert {e.key for e in stray} == set(buffers)
    lead, trail = [e for e in stray if e.start < first], [e for e in stray if e.start >= first]
    previous_end = lead[-1].end if lead else f.data_start
    for unit, (start, end) in units.items():
        assert start == previous_end, f"{unit} does not follow the previous unit"
        inside = [e for e in entries if start <= e.start < end]
        assert inside and inside[0].start == start and inside[-1].end == end
        joined = b"".join(f.view(e.key).contiguous().view(torch.uint8).numpy().tobytes() for e in inside)
        assert data[start:end] == joined
        if unit.startswith("layer."):
            assert all(f".{unit.split('.')[1]}." in e.key for e in inside)
        previous_end = end
    assert previous_end == (trail[0].start if trail else f.size)
    assert all(e.start % e.dtype.itemsize == 0 for e in stray)
    assert set(WeightStore(out).units) == set(units)
    f.close()


def no_leftovers(parent: str, name: str) -> bool:
    return not [p for p in os.listdir(parent) if p == name or p.startswith(name + ".tmp-")]


# ----- formats --------------------------------------------------------------------------------------
def test_sharded_and_bin_convert_to_identical_tensors(tmp_path):
    sharded = save_tiny("llama", str(tmp_path / "sharded"), max_shard_size="20KB")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    legacy = str(tmp_path / "bin")
    os.makedirs(legacy)
    model_state = read_all(sharded)
    keys = list(model_state)
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):  # two legacy shards
        torch.save({k: model_state[k] for k in part}, os.path.join(legacy, f"pytorch_model-0000{i + 1}-of-00002.bin"))
    with open(os.path.join(sharded, "config.json")) as f:
        config = f.read()
    with open(os.path.join(legacy, "config.json"), "w") as f:
        f.write(config)

    a = convert(sharded, str(tmp_path / "a"), progress=False)
    b = convert(legacy, str(tmp_path / "b"), progress=False)
    for out in (a, b):
        assert_packed(out)
    fa, fb = SafetensorsFile(a + "/model.safetensors"), SafetensorsFile(b + "/model.safetensors")
    assert list(fa.entries) == list(fb.entries)
    for key in fa.entries:
        assert torch.equal(fa.view(key), fb.view(key))
        assert torch.equal(fa.view(key), model_state[key])
    assert sorted(fa.entries) == sorted(model_state)


def read_all(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder by file key, copied out of the mmap."""
    store = WeightStore(folder)
    return {k: store.view(k).clone() for k in store.keys()}


def test_converted_loads_in_transformers_with_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    for arch in ("llama-tied", "gpt2", "deepseek_v3"):  # DeepSeek-V3: a persistent buffer, written too
        src = save_tiny(arch, str(tmp_path / arch))
        out = convert(src, str(tmp_path / (arch + "-out")), progress=False)
        assert_packed(out, frozenset(f"model.layers.{i}.mlp.gate.e_score_correction_bias" for i in (1, 2)
                                     if arch == "deepseek_v3"))
        ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        got, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(got(ids).logits, ref(ids).logits, rtol=0, atol=0)
        if arch == "llama-tied":  # the tied lm_head is written once, as the embedding
            assert "lm_head.weight" not in SafetensorsFile(out + "/model.safetensors").entries
        if arch == "deepseek_v3":  # the router's bias was dropped (from_pretrained kept __init__'s zeros)
            from lema import LemaConfig, LemaModel

            with LemaModel(LemaConfig(model_name_or_path=out, lora_rank=4)) as model, torch.no_grad():
                torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
        with open(os.path.join(out, "config.json")) as f:
            assert json.load(f)["dtype"] == "float32"


def test_mixtral_legacy_experts_come_out_fused_and_stream(tmp_path):
    src = save_tiny("mixtral", str(tmp_path / "mixtral"))
    assert any(".experts.0.w1." in k for k in WeightStore(src).keys())  # the legacy per-expert layout
    out = convert(src, str(tmp_path / "out"), progress=False)
    assert_packed(out)
    keys = SafetensorsFile(out + "/model.safetensors").entries
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys and not any(".w1." in k for k in keys)

    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids, labels=ids).loss
    model = LemaModel(LemaConfig(model_name_or_path=out))
    model.initialize_lora()
    assert all(layout.packed is not None for layout in model.layouts)  # each layer is one memcpy
    with torch.no_grad():
        got = model(ids, labels=ids).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    packed = LemaModel(LemaConfig(model_name_or_path=out, gbi_path=out + "/model.safetensors"))
    packed.initialize_lora()
    with torch.no_grad():
        torch.testing.assert_close(packed(ids, labels=ids).loss, want, rtol=1e-5, atol=1e-6)


def test_bfloat16_conversion_with_verify(tmp_path):
    src = save_tiny("qwen2", str(tmp_path / "src"))
    out = convert(src, str(tmp_path / "out"), dtype="bfloat16", verify=True, progress=False)
    assert_packed(out)
    f = SafetensorsFile(out + "/model.safetensors")
    source = read_all(src)
    for key, entry in f.entries.items():
        assert entry.dtype == torch.bfloat16
        assert torch.equal(f.view(key), source[key].to(torch.bfloat16))
    with open(os.path.join(out, "config.json")) as cfg:
        assert json.load(cfg)["dtype"] == "bfloat16"
    model = LemaModel(LemaConfig(model_name_or_path=out, dtype="bfloat16"))
    assert all(layout.packed is not None for layout in model.layouts)


def test_overwrite_replaces_and_verify_catches_a_changed_source(tmp_path, monkeypatch):
    src = save_tiny("llama", str(tmp_path / "src"))
    out = str(tmp_path / "out")
    convert(src, out, progress=False)
    with pytest.raises(ConvertError, match="not empty.*--overwrite"):
        convert(src, out, progress=False)
    convert(src, out, overwrite=True, verify=True, progress=False)
    assert_packed(out)
    assert no_leftovers(str(tmp_path), "out.old") and sorted(os.listdir(tmp_path)) == ["out", "src"]

    import lema.convert as conv

    real = conv.write_packed

    def corrupting(path, planned, header, read, store, progress, desc):  # flips one written byte
        real(path, planned, header, read, store, progress, desc)
        with open(path, "r+b") as f:
            f.seek(-1, 2)
            last = f.read(1)
            f.seek(-1, 2)
            f.write(bytes([last[0] ^ 0x40]))

    monkeypatch.setattr(conv, "write_packed", corrupting)
    with pytest.raises(ConvertError, match="verify"):
        convert(src, str(tmp_path / "bad"), verify=True, progress=False)
    assert no_leftovers(str(tmp_path), "bad")


# ----- memory -------------------------------------------------------------------------------------
def test_peak_memory_is_about_one_tensor_not_the_model(tmp_path):
    """A 64 MiB model whose largest tensor is 2 MiB converts with RSS growth far below the model size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    src = str(tmp_path / "big")
    LlamaForCausalLM(cfg).save_pretrained(src)
    total = sum(e.nbytes for e in WeightStore(src).where.values() for e in [e[1]])
    largest = max(e[1].nbytes for e in WeightStore(src).where.values())
    assert total > 25 * largest
    bound = 6 * largest + 16 * 2**20  # a cast copy, the mmap pages of one unit, allocator slack
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {TESTS!r})
        from lema.convert import convert
        from tiny_models import save_tiny
        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        convert(save_tiny("llama", {str(tmp_path / 'warm')!r}), {str(tmp_path / 'warm-out')!r}, progress=False)
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
        base = status("VmRSS")
        convert({src!r}, {str(tmp_path / 'out32')!r}, progress=False)
        convert({src!r}, {str(tmp_path / 'out16')!r}, dtype="bfloat16", progress=False)
        print(status("VmHWM") - base)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": SRC_DIR})
    assert run.returncode == 0, run.stderr[-2000:]
    growth = int(run.stdout.split()[-1])
    print(f"peak RSS growth {growth / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB, model {total / 2**20:.0f} MiB")
    assert growth < bound, f"peak RSS grew by {growth / 2**20:.1f} MiB converting a {total / 2**20:.0f} MiB model"
    assert os.path.getsize(tmp_path / "out32" / "model.safetensors") > total


# ----- bad inputs: a clear error, and neither OUT nor a temporary folder left ------------------------
def test_bad_inputs_are_refused_and_leave_nothing(tmp_path, monkeypatch):
    src = save_tiny("llama", str(tmp_path / "src"))
    out = str(tmp_path / "out")

    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert(str(tmp_path / "nope"), out, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConvertError, match="no config.json"):
        convert(str(empty), out, progress=False)
    (empty / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    with pytest.raises(ConvertError, match="no weights"):
        convert(str(empty), out, progress=False)

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    data = open(os.path.join(src, "model.safetensors"), "rb").read()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFileError, match="truncated"):
        convert(str(truncated), out, progress=False)

    broken_bin = tmp_path / "broken_bin"
    broken_bin.mkdir()
    (broken_bin / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    (broken_bin / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ConvertError, match="cannot be read as a PyTorch state dict"):
        convert(str(broken_bin), out, progress=False)

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file" * 10)
    with pytest.raises(ConvertError, match="not a readable GGUF file"):
        convert(str(junk), out, progress=False)

    gguf_path = str(tmp_path / "odd.gguf")
    write_gguf_with_architecture(gguf_path, "tinyfakearch")
    with pytest.raises(ConvertError, match="tinyfakearch"):
        convert(gguf_path, out, progress=False)

    import lema.convert as conv

    monkeypatch.setattr(conv, "free_bytes", lambda path: 1000)
    with pytest.raises(ConvertError, match=r"needs [\d,]+ bytes .* but 1,000 bytes are free"):
        convert(src, out, progress=False)
    monkeypatch.undo()

    with pytest.raises(ConvertError, match="overlap"):
        convert(src, os.path.join(src, "inside"), progress=False)
    with pytest.raises(ValueError, match="dtype='int8'"):
        convert(src, out, dtype="int8", progress=False)
    assert no_leftovers(str(tmp_path), "out") and not os.path.exists(os.path.join(src, "inside"))

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="not empty"):
        convert(src, str(taken), progress=False)
    assert os.listdir(taken) == ["keep.txt"] and no_leftovers(str(tmp_path), "taken.tmp")


def write_gguf_with_architecture(path: str, arch: str) -> None:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ----- command line -------------------------------------------------------------------------------
def lema(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lema", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": SRC_DIR})


def test_overwrite_refuses_a_folder_that_is_not_a_model(tmp_path):
    """`lema convert SRC . --overwrite` from a project folder would have deleted the project: --overwrite replaces a
    model folder only (config.json, no folder inside)."""
    src = save_tiny("llama", str(tmp_path / "src"))
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match=r"is not a model folder \(it holds folders \(.git\)\), and --overwrite "
                                           r"\(overwrite=True\) would delete it whole"):
        convert(src, str(project), overwrite=True, progress=False)
    (project / ".git").rmdir()
    with pytest.raises(ConvertError, match=r"is not a model folder \(it has no config.json\)"):
        convert(src, str(project), overwrite=True, progress=False)
    assert sorted(os.listdir(project)) == ["notes.txt"] and sorted(os.listdir(tmp_path)) == ["project", "src"]


def test_cli(tmp_path, capsys):
    from lema.cli import main

    src = save_tiny("llama", str(tmp_path / "src"))
    out = str(tmp_path / "out")
    done = lema("convert", src, out, "--dtype", "float16", "--verify")   # the real entry point, once
    assert done.returncode == 0, done.stderr[-2000:]
    assert "wrote" in done.stdout
    assert_packed(out)
    assert all(e.dtype == torch.float16 for e in SafetensorsFile(out + "/model.safetensors").entries.values())

    assert main(["convert", src, out, "--quiet"]) == 1                   # a user error: status 1, one line
    assert "--overwrite" in capsys.readouterr().err
    for argv in (["convert", src], ["convert", "--default"], ["convert", src, out, "--dtype", "int4"],
                 ["convert", "a", "b", "c"], ["convert", "--default", out, "--dtype", "bfloat16"]):
        with pytest.raises(SystemExit) as usage:
            main(argv)
        assert usage.value.code == 2, argv  # usage errors: status 2, as from `python -m lema`
    with pytest.raises(SystemExit) as helped:
        main(["convert", "--help"])
    assert helped.value.code == 0 and "--default" in capsys.readouterr().out


@pytest.mark.parametrize("config, key, message", [
    ({"rank_pattern": {"q_proj": 8}}, "lora_A", "rank_pattern"),
    ({}, "lora_embedding_A", "lora_A / lora_B"),
])
def test_merge_refuses_adapters_it_would_fold_wrong(tmp_path, config, key, message):
    """Per-module ranks or alphas, or LoRA on an embedding: refused with the reason, not merged with one scale."""
    from safetensors.torch import save_file

    from lema.merge import lora_deltas

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                              **config}))
    save_file({f"base_model.model.model.layers.0.self_attn.q_proj.{key}.weight": torch.zeros(4, 8)},
              str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=message):
        lora_deltas(str(tmp_path))


def test_a_buffer_transformers_keeps_in_float32_stays_float32(tmp_path):
    """DeepSeek-V3's router bias picks the experts; from_pretrained keeps it in float32 in a bf16 model
    (`_keep_in_fp32_modules_strict`). LEMA held it in bf16, and `lema convert --dtype bfloat16` wrote it so."""
    from transformers import AutoModelForCausalLM

    from lema import LemaConfig, LemaModel

    name = "model.layers.1.mlp.gate.e_score_correction_bias"
    src = save_tiny("deepseek_v3", str(tmp_path / "ds3"))
    out = convert(src, str(tmp_path / "ds3-bf16"), dtype="bfloat16", progress=False)
    assert SafetensorsFile(out + "/model.safetensors").entries[name].dtype == torch.float32
    want = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).get_buffer(name)
    assert want.dtype == torch.float32
    for folder in (src, out):
        with LemaModel(LemaConfig(model_name_or_path=folder, dtype="bfloat16", lora_rank=4)) as model:
            torch.testing.assert_close(model.base_model.get_buffer(name), want, rtol=0, atol=0)


@pytest.mark.parametrize("strategy", ["resident", "streaming"])
def test_parameters_transformers_keeps_in_float32_stay_float32(strategy, tmp_path):
    """Ernie 4.5's router weight and its correction bias are parameters that from_pretrained keeps in float32 in a
    bf16 model (`_keep_in_fp32_modules_strict`). LEMA held them in bf16, which picked other experts (logits 0.38
    apart). Both folders hold them in float32 now: the source (float32) and `lema convert --dtype bfloat16`'s file,
    where the layer is still one packed read and the plan counts the float32 bytes."""
    from transformers import AutoModelForCausalLM

    from lema import MemoryStrategy
    from lema.planner import model_facts

    router = "model.layers.1.mlp.gate"
    kept = (f"{router}.weight", f"{router}.moe_statics.e_score_correction_bias")
    src = save_tiny("ernie4_5_moe", str(tmp_path / "ernie"))
    out = convert(src, str(tmp_path / "ernie-bf16"), dtype="bfloat16", progress=False)
    entries = SafetensorsFile(out + "/model.safetensors").entries
    assert all(entries[n].dtype == torch.float32 for n in kept)
    assert entries["model.layers.1.self_attn.q_proj.weight"].dtype == torch.bfloat16
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    assert all(ref.get_parameter(n).dtype == torch.float32 for n in kept)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids, use_cache=False).logits.float()
    for folder in (src, out):
        with LemaModel(LemaConfig(model_name_or_path=folder, dtype="bfloat16", lora_rank=4,
                                  strategy=MemoryStrategy(strategy))) as model:
            seen = []
            gate = model.base_model.get_submodule(router)
            gate.register_forward_pre_hook(lambda m, _: seen.append((m.weight.dtype,
                                                                    m.moe_statics.e_score_correction_bias.dtype)))
            with torch.no_grad():
                got = model(ids).logits.float()
            assert seen and set(seen) == {(torch.float32, torch.float32)}
            torch.testing.assert_close(got, want, atol=0.02, rtol=0.02)
            if folder == out:
                assert model.layouts[1].packed is not None  # one read per layer, float32 tensors aligned in it
                facts = model_facts(out, "bfloat16", 4)
                assert facts.unit_bytes["layer.1"] == model.layouts[1].nbytes
                assert facts.layers_stored_as_held()


def test_a_file_storing_a_float32_kept_tensor_in_bf16_is_named_in_the_advice(tmp_path):
    """A bf16 file whose router Transformers holds in float32: LEMA upcasts it at each load, as from_pretrained does
    once, and the plan says which tensor is not stored as held (it said "stored in bfloat16" of a bf16 run)."""
    from transformers import AutoModelForCausalLM

    from lema.planner import plan

    src = save_tiny("ernie4_5_moe", str(tmp_path / "ernie"))
    folder = str(tmp_path / "ernie-allbf16")
    AutoModelForCausalLM.from_pretrained(src).to(torch.bfloat16).save_pretrained(folder)
    name = "model.layers.1.mlp.gate.weight"
    assert SafetensorsFile(folder + "/model.safetensors").entries[name].dtype == torch.bfloat16
    p = plan(folder, "bfloat16", batch_size=2, seq_len=12, device_type="cpu")
    assert any(f"not as held ({name}: bfloat16 in the file, held in float32)" in a for a in p.advice), p.advice
    want = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert want.get_parameter(name).dtype == torch.float32
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), LemaModel(LemaConfig(model_name_or_path=folder, dtype="bfloat16", lora_rank=4)) as model:
        torch.testing.assert_close(model(ids).logits, want(ids, use_cache=False).logits, atol=0, rtol=0)
