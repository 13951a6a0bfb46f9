"""A bad config.json, a data file that is not UTF-8 or holds nothing to train on, and a weights file with tensors the
model does not use: each is one line naming the file (and key, value or line) and the fix, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lema import LemaConfig, LemaModel
from lema.data import DataError, TokenizedDataset, load_jsonl
from lema.store import WeightsFileError
from test_engine_errors import build, copy_model, edit_config, raises


# --------------------------------------------------------------------------------- config.json
def write_config(path: str, damage) -> None:
    """Damage config.json: `damage` is raw bytes for the whole file, or a function that edits its settings."""
    config = os.path.join(path, "config.json")
    if isinstance(damage, bytes):
        with open(config, "wb") as f:
            f.write(damage)
        return
    with open(config) as f:
        settings = json.load(f)
    damage(settings)
    with open(config, "w") as f:
        json.dump(settings, f)


DAMAGED_CONFIGS = {  # name: (damage, fragments the message must hold)
    "heads-not-dividing": (lambda c: c.update(num_attention_heads=5), ["not a multiple", "attention heads (5)"]),
    "size-as-string": (lambda c: c.update(hidden_size="32"), ["hidden_size='32'", "expected int"]),
    "bogus-rope-type": (lambda c: c["rope_parameters"].update(rope_type="bogus"),
                        ["rope_parameters.rope_type='bogus'", "'linear'"]),
    "bogus-rope-scaling": (lambda c: c.update(rope_scaling={"rope_type": "bogus", "factor": 2.0}),
                           ["rope_scaling.rope_type='bogus'"]),
    "bogus-activation": (lambda c: c.update(hidden_act="bogus"), ["hidden_act='bogus'", "'silu'"]),
    "zero-layers": (lambda c: c.update(num_hidden_layers=0), ["num_hidden_layers=0", "positive"]),
    "a-list": (b"[]", ["JSON list", "not an object"]),
    "null": (b"null", ["JSON null", "not an object"]),
    "binary": (b'{"model_type": "llama", "x": "\xe9\xff"}', ["not UTF-8", "0xe9", "UTF-8"]),
}


@pytest.mark.parametrize("name", list(DAMAGED_CONFIGS))
def test_config_json_transformers_rejects_is_named_with_the_fix(name, tiny_dir, tmp_path):
    damage, fragments = DAMAGED_CONFIGS[name]
    path = copy_model(tiny_dir("llama"), tmp_path / "m")
    write_config(path, damage)
    with raises(ValueError, os.path.join(path, "config.json"), *fragments) as info:
        build(path)
    assert "config.json" in str(info.value).rsplit(";", 1)[-1]  # the fix: what to do with config.json


def lema(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lema", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, LEMA_DEBUG=""))


def assert_one_line_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    err = done.stderr.strip()
    assert done.returncode == 1 and "Traceback" not in err and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in: {err}"


@pytest.mark.parametrize("name", ["heads-not-dividing", "size-as-string", "null"])
def test_lema_plan_names_a_bad_config_json_in_one_line(name, tiny_dir, tmp_path):
    path = copy_model(tiny_dir("llama"), tmp_path / "m")
    write_config(path, DAMAGED_CONFIGS[name][0])
    assert_one_line_error(lema("plan", "--model", path, "--device", "cpu"), os.path.join(path, "config.json"))


# ---------------------------------------------------------------------------- data encodings
OK_LINE = '{"text": "hello"}\n'


@pytest.mark.parametrize("encoding, line, fragments", [
    ("latin-1", 3, ["byte 0xe9", "Latin-1", "save it as UTF-8"]),
    ("utf-16", 1, ["UTF-16", "save it as UTF-8"]),        # with a byte-order mark
    ("utf-16-le", 1, ["UTF-16", "save it as UTF-8"]),     # without
])
def test_data_file_not_utf8_names_file_line_and_fix(encoding, line, fragments, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes((OK_LINE * 2 + '{"text": "caf\u00e9"}\n').encode(encoding))
    with raises(DataError, f"{path}:{line}:", *fragments):
        load_jsonl(path)


def test_a_stray_nul_byte_or_a_device_as_data_is_named_as_such(tmp_path):
    """One NUL byte in UTF-8 text was called "probably UTF-16", and iconv from UTF-16 would garble the file;
    /dev/null was "not found"."""
    path = tmp_path / "data.jsonl"
    path.write_bytes((OK_LINE + '{"text": "a\x00b"}\n').encode())
    with raises(DataError, f"{path}:2: a NUL byte at column 12"):
        load_jsonl(path)
    with raises(DataError, "/dev/null is not a regular file (a device or a pipe)"):
        load_jsonl("/dev/null")


def test_data_file_with_utf8_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(OK_LINE.encode("utf-8-sig"))
    assert list(load_jsonl(path)) == [{"text": "hello"}]


def test_lema_train_names_a_latin1_data_file_in_one_line(tiny_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    done = lema("train", "--model", tiny_dir("llama"), "--data", data, "--output", tmp_path / "run")
    assert_one_line_error(done, f"{data}:1:", "save it as UTF-8")


# ------------------------------------------------------------------ weights the model does not use
def add_tensors(path: str, **tensors: torch.Tensor) -> None:
    from safetensors.torch import load_file, save_file

    weights = os.path.join(path, "model.safetensors")
    state = load_file(weights)
    state.update(tensors)
    save_file(state, weights, metadata={"format": "pt"})


@pytest.mark.parametrize("arch, key", [("llama", "num_hidden_layers"), ("gpt2", "n_layer")])
def test_config_with_fewer_layers_than_the_weights(arch, key, tiny_dir, tmp_path):
    path = copy_model(tiny_dir(arch), tmp_path / "m")
    edit_config(path, **{key: 2})  # the file has 3
    layer = "model.layers.2." if arch == "llama" else "transformer.h.2."
    with raises(WeightsFileError, os.path.join(path, "model.safetensors"), layer, "does not use",
                f"the file has 3 decoder layers but config.json's {key} is 2", f"set {key} to 3"):
        build(path)


def test_packed_file_with_fewer_layers_in_config(tiny_dir, tmp_path):
    from lema.convert import convert

    out = convert(tiny_dir("llama"), str(tmp_path / "packed"), progress=False)
    build(out)  # as written: every tensor used
    edit_config(out, num_hidden_layers=2)
    with raises(WeightsFileError, "model.layers.2.", "num_hidden_layers is 2"):
        build(out)


def test_tensor_of_another_model_is_refused(tiny_dir, tmp_path):
    path = copy_model(tiny_dir("llama"), tmp_path / "m")
    add_tensors(path, **{"vision_tower.proj.weight": torch.zeros(2, 2)})
    with raises(WeightsFileError, "1 tensor(s)", "['vision_tower.proj.weight']", "another model"):
        build(path)


@pytest.mark.parametrize("arch, key, tensor", [
    ("llama", "model.layers.0.self_attn.rotary_emb.inv_freq", torch.zeros(4)),  # old checkpoints' rotary buffers
    ("gpt2", "transformer.h.0.attn.bias", torch.zeros(1, 1, 64, 64)),          # GPT-2's causal masks
    ("gpt2", "transformer.h.0.attn.masked_bias", torch.tensor(-1e4)),           # 2020's GPT-2 checkpoints
])
def test_tensors_transformers_ignores_on_load_are_accepted(arch, key, tensor, tiny_dir, tmp_path):
    path = copy_model(tiny_dir(arch), tmp_path / "m")
    add_tensors(path, **{key: tensor})
    build(path)
    from lema.convert import convert

    build(convert(path, str(tmp_path / "packed"), progress=False))  # converted without them, no warning


def test_convert_and_merge_refuse_a_config_with_fewer_layers_than_the_weights(tiny_dir, tmp_path, capsys):
    """They used to warn and write a 2-layer model out of the 3-layer weights; now they refuse as `lema train` does."""
    from lema.cli import main
    from lema.convert import convert

    path = copy_model(tiny_dir("llama"), tmp_path / "m")
    adapter = str(tmp_path / "adapter")
    with LemaModel(LemaConfig(model_name_or_path=path, lora_rank=4)) as model:
        model.save_adapter(adapter)
    edit_config(path, num_hidden_layers=2)
    with raises(WeightsFileError, os.path.join(path, "model.safetensors"), "model.layers.2.",
                "the file has 3 decoder layers but config.json's num_hidden_layers is 2"):
        convert(path, str(tmp_path / "packed"), progress=False)
    capsys.readouterr()  # what building the fixtures printed (Transformers' progress bars)
    assert main(["merge", "--model", path, "--adapter", adapter, "--output", str(tmp_path / "merged")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lema merge: error: ") and "set num_hidden_layers to 3" in err
    assert sorted(os.listdir(tmp_path)) == ["adapter", "m"]  # nothing written, no temporary folder left


@pytest.mark.parametrize("damage, fragments", [
    ("truncate", ["model.safetensors' is truncated", "1000 missing"]),
    ("other-shape", ["tensor 'model.layers.0.mlp.down_proj.weight' has shape (32, 64) in the weights file but "
                     "config.json implies (32, 80)"]),
    ("fewer-layers", ["the file has 3 decoder layers but config.json's num_hidden_layers is 2"]),
    ("missing-tensor", ["lack 1 tensor(s)", "model.layers.1.mlp.up_proj.weight"]),
])
def test_lema_plan_refuses_weights_lema_train_would_refuse(damage, fragments, tiny_dir, tmp_path, capsys):
    """It planned from config.json alone and said nothing; the plan is what a user runs before a long run."""
    from safetensors.torch import load_file, save_file

    from lema.cli import main

    path = copy_model(tiny_dir("llama"), tmp_path / "m")
    weights = os.path.join(path, "model.safetensors")
    if damage == "truncate":
        os.truncate(weights, os.path.getsize(weights) - 1000)
    elif damage == "fewer-layers":
        edit_config(path, num_hidden_layers=2)
    elif damage == "other-shape":  # lema train and generate refused it; the plan passed it
        edit_config(path, intermediate_size=80)
    else:
        state = load_file(weights)
        del state["model.layers.1.mlp.up_proj.weight"]
        save_file(state, weights, metadata={"format": "pt"})
    argv = ["plan", "--model", path, "--device", "cpu", "--batch-size", "1", "--seq-len", "16"]
    capsys.readouterr()  # what building the fixtures printed (Transformers' progress bars)
    assert main(argv) == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and out.err.startswith("lema plan: error: ")
    assert all(f in out.err for f in fragments), out.err
    os.remove(weights)  # a folder without weights (a config to plan from) still plans
    assert main(argv) == 0 and "predicted peak" in capsys.readouterr().out


def test_a_gbi_path_is_planned_from_its_own_file(tmp_path):
    """The packed file named by gbi_path is the weights: the folder's own (an index whose shards were deleted after
    `lema convert`) is not opened by the plan or the engine's activation budget."""
    from tiny_models import save_tiny

    from lema.convert import convert
    from lema.planner import plan_for_config

    src = save_tiny("llama", str(tmp_path / "src"), max_shard_size="20KB")
    packed = convert(src, str(tmp_path / "packed"), progress=False)
    for name in os.listdir(src):
        if name.endswith(".safetensors"):
            os.remove(os.path.join(src, name))  # the index stays, naming shards that are gone
    config = LemaConfig(model_name_or_path=src, gbi_path=os.path.join(packed, "model.safetensors"), lora_rank=4)
    assert plan_for_config(config, 1, 16).peak_bytes > 0
    with LemaModel(config) as model:
        trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-3))
        trainer.train_step(torch.randint(0, 96, (1, 16)))
        assert trainer.last_step_applied


def test_convert_refuses_a_bin_checkpoint_holding_another_models_tensor(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    from lema.convert import convert

    legacy = copy_model(tiny_dir("llama"), tmp_path / "legacy")
    weights = os.path.join(legacy, "model.safetensors")
    state = load_file(weights)
    os.remove(weights)
    torch.save({**state, "vision_tower.proj.weight": torch.zeros(2, 2)}, os.path.join(legacy, "pytorch_model.bin"))
    with raises(WeightsFileError, repr(legacy), "['vision_tower.proj.weight']", "another model"):
        convert(legacy, str(tmp_path / "packed"), progress=False)


# ------------------------------------------------------------------------ nothing to train on
@pytest.fixture(scope="module")
def tok():
    """A word-level tokenizer with a chat template: enough to mask assistant turns, built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<eos>", "<unk>", "user", "assistant", ":", "hi", "hello", "word"]
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
                               "{% if add_generation_prompt %}assistant : {% endif %}")
    return tokenizer


def jsonl(tmp_path, name: str, *examples: dict):
    path = tmp_path / name
    path.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
    return path


def test_chat_without_assistant_turn_is_named_not_truncation(tok, tmp_path):
    path = jsonl(tmp_path, "eval.jsonl", {"messages": [{"role": "user", "content": "hi"}]})
    with raises(DataError, str(path), f"{path}:1", "without an assistant turn", '"role": "assistant"') as info:
        TokenizedDataset(load_jsonl(path), tok, seq_len=32)
    assert "truncation" not in str(info.value) and "seq_len" not in str(info.value)


def test_empty_text_is_named_not_truncation(tok, tmp_path):
    path = jsonl(tmp_path, "train.jsonl", {"text": ""})
    with raises(DataError, str(path), 'empty "text"') as info:
        TokenizedDataset(load_jsonl(path), tok, seq_len=32)
    assert "truncation" not in str(info.value)


def test_each_cause_is_counted_with_its_fix(tok, tmp_path):
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    path = jsonl(tmp_path, "d.jsonl", chat, {"prompt": "word " * 10, "completion": "hello"}, chat)
    with raises(DataError, "none of the 3 examples", "2 examples without an assistant turn", f"{path}:1",
                "1 example cut by truncation to seq_len=4", f"{path}:2", "increase --seq-len"):
        TokenizedDataset(load_jsonl(path), tok, seq_len=4)


# ------------------------------------------------------------------------------- line keys
def test_keys_beside_a_format_are_ignored(tmp_path):
    path = jsonl(tmp_path, "d.jsonl", {"text": "hi", "id": 5}, {"prompt": "p", "completion": "c", "source": "x"})
    assert [e["id" if "text" in e else "source"] for e in load_jsonl(path)] == [5, "x"]


@pytest.mark.parametrize("line, fragments, absent", [
    ({"prompt": "p"}, ['"prompt" without "completion"'], "unrecognised"),
    ({"prompt": "p", "response": "r"}, ['"prompt" without "completion"', "['response']"], "'prompt'"),
    ({"question": "q", "answer": "a", "text": 1}, ['"text" must be a string'], "question"),
    ({"question": "q", "answer": "a"}, ["unrecognised keys ['answer', 'question']"], "text'"),
    ({"text": "t", "prompt": "p", "completion": "c"}, ["mix formats"], "unrecognised"),
])
def test_only_the_wrong_keys_are_named(line, fragments, absent, tmp_path):
    path = jsonl(tmp_path, "d.jsonl", line)
    with raises(DataError, f"{path}:1:", *fragments) as info:
        load_jsonl(path)
    assert absent not in str(info.value).split("; valid lines look like")[0]
