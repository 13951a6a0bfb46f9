"""LemaConfig refuses every bad value itself, naming the field, the value and the fix: never a deep error from
torch, PEFT or Transformers later, never a value accepted and ignored. Builds LemaConfig only (no model)."""

import math
import pathlib

import pytest
import torch

from lema import LemaConfig, MemoryStrategy

P = "some/model"  # LemaConfig does not open the folder: LemaModel does


@pytest.mark.parametrize("field, value, fragment", [
    ("model_name_or_path", 123, "a str or an os.PathLike"),
    ("model_name_or_path", None, "a str or an os.PathLike"),
    ("gbi_path", 5, "a str or an os.PathLike"),
    ("lora_rank", True, "positive integer"),
    ("resident_layers", True, "non-negative integer"),
    ("keep_activations", False, "non-negative integer"),
    ("lora_alpha", "8", "number > 0"),
    ("lora_alpha", 0, "number > 0"),
    ("lora_alpha", -4, "number > 0"),
    ("lora_alpha", math.nan, "number > 0"),
    ("lora_alpha", math.inf, "number > 0"),
    ("lora_alpha", True, "number > 0"),
    ("lora_dropout", "0.1", "[0, 1)"),
    ("dtype", torch.float64, "float32, bfloat16, float16"),
    ("dtype", torch.int8, "float32, bfloat16, float16"),
    ("device", None, "'cpu', 'cuda' or 'cuda:N'"),
    ("device", 1.5, "'cpu', 'cuda' or 'cuda:N'"),
    ("max_vram", 1.5, "is not a size"),
    ("max_vram", math.inf, "is not a size"),
    ("max_vram", True, "is not a size"),
    ("max_vram", -5, "must be positive"),
    ("max_vram", 0, "must be positive"),
    ("max_vram", "0GB", "must be positive"),
    ("max_vram", "-1GB", "must be positive"),
    ("page_cache", -1, "'off' leaves the page cache to the kernel"),
    ("page_cache", 0, "'off' leaves the page cache to the kernel"),
    ("page_cache", "0MB", "'off' leaves the page cache to the kernel"),
    ("zero_copy", "yes", "True, False or None"),
    ("offload_activations", 1, "True, False or None"),
    ("chunked_loss", "no", "True, False or None"),
    ("gradient_checkpointing", None, "True or False"),
    ("prefetch", "yes", "True or False"),
    ("lora_target_modules", [], "or None for every linear layer"),
    ("lora_target_modules", "q_proj", "a list of module names, e.g. ['q_proj']"),
    ("lora_target_modules", [""], "a list of module names"),
    ("lora_target_modules", ["q_proj", 3], "a list of module names"),
])
def test_bad_value_is_refused_by_name(field, value, fragment):
    kwargs = {"model_name_or_path": P, field: value}
    with pytest.raises(ValueError) as info:
        LemaConfig(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert f"{field}={value!r}" in message, message
    assert fragment in message, message


@pytest.mark.parametrize("field, value, derived, expected", [
    ("model_name_or_path", pathlib.Path(P), "model_name_or_path", P),
    ("gbi_path", pathlib.Path(P) / "model.safetensors", "gbi_path", P + "/model.safetensors"),
    ("max_vram", "16GB", "max_vram_bytes", 16_000_000_000),
    ("max_vram", 16_000_000_000, "max_vram_bytes", 16_000_000_000),
    ("max_vram", 1.5e9, "max_vram_bytes", 1_500_000_000),
    ("page_cache", "512MiB", "page_cache_bytes", 512 * 2**20),
    ("page_cache", 2**30, "page_cache_bytes", 2**30),
    ("page_cache", "off", "page_cache_bytes", None),
    ("dtype", torch.bfloat16, "torch_dtype", torch.bfloat16),
    ("dtype", "fp16", "torch_dtype", torch.float16),
    ("device", torch.device("cpu"), "torch_device", torch.device("cpu")),
    ("lora_alpha", 16.0, "lora_alpha", 16.0),
    ("lora_alpha", 8, "lora_alpha", 8),
    ("lora_dropout", 0, "lora_dropout", 0),
    ("lora_target_modules", ("q_proj", "v_proj"), "lora_target_modules", ["q_proj", "v_proj"]),
    ("keep_activations", 0, "keep_activations", 0),
    ("zero_copy", False, "zero_copy", False),
    ("strategy", "resident", "strategy", MemoryStrategy.RESIDENT),
])
def test_good_value_is_kept(field, value, derived, expected):
    config = LemaConfig(**{"model_name_or_path": P, field: value})
    assert getattr(config, derived) == expected


@pytest.mark.parametrize("argv, fragment", [
    (["plan", "--shape", "tiny-llama", "--max-vram", "-1GB"], "max_vram='-1GB' must be positive"),
    (["plan", "--shape", "tiny-llama", "--max-vram", "-.5GB"], "max_vram='-.5GB' must be positive"),
    (["plan", "--shape", "tiny-llama", "--batch-size", "-1"], "argument --batch-size: '-1' is not a whole number >= 1"),
])
def test_a_negative_value_on_the_command_line_reaches_its_check(argv, fragment, capsys):
    """argparse read `--max-vram -1GB` as two options and said only "expected one argument"."""
    from lema.cli import main

    try:
        rc = main(argv)
    except SystemExit as stop:  # argparse's own usage error (a flag's type)
        rc = stop.code
    assert rc in (1, 2)
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1, err


@pytest.mark.parametrize("argv, fragment", [
    (["--num-buffers", "1"], "argument --num-buffers: 1 must be an integer >= 2"),
    (["--lora-rank", "0"], "argument --lora-rank: 0 must be a positive integer"),
    (["--seq-len", "0"], "argument --seq-len: '0' is not a whole number >= 1"),
])
def test_lema_plan_names_the_flag_of_a_bad_value(argv, fragment, capsys):
    """The planner's own checks named the Python parameter ("num_buffers=1 must be >= 2")."""
    from lema.cli import main

    with pytest.raises(SystemExit) as stop:  # argparse's usage error
        main(["plan", "--shape", "tiny-llama", *argv])
    assert stop.value.code == 2 and fragment in capsys.readouterr().err


def test_an_option_without_a_value_keeps_a_negative_looking_token_apart():
    """Only options that take a value get the next token attached: a flag stays a flag."""
    from lema.cli import _attach_negative_values, build_parser

    parser = build_parser()
    assert _attach_negative_values(parser, ["bench", "--json", "--threads", "-1"]) == ["bench", "--json",
                                                                                         "--threads=-1"]
    assert _attach_negative_values(parser, ["bench", "--floor", "-1x"]) == ["bench", "--floor", "-1x"]
    assert _attach_negative_values(parser, ["nosuch", "--max-vram", "-1GB"]) == ["nosuch", "--max-vram", "-1GB"]


def test_out_of_memory_is_one_line_with_the_settings_to_change(monkeypatch, capsys, tmp_path):
    from lema import cli

    def exhausted(args):
        raise RuntimeError("LEMA's CPU allocator: out of memory mapping 67108864 bytes")

    def a_bug(args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr("lema.commands.plan.run", exhausted)
    assert cli.main(["plan", "--shape", "tiny-llama"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of memory (LEMA's CPU allocator" in err and "--max-vram" in err
    monkeypatch.setattr("lema.commands.plan.run", exhausted)
    assert cli.main(["plan", "--shape", "tiny-llama", "--max-vram", "4GB"]) == 1  # a budget given: not advised again
    err = capsys.readouterr().err
    assert "lower --batch-size or --seq-len;" not in err and err.rstrip().endswith("lower --batch-size or --seq-len")
    monkeypatch.setattr("lema.commands.merge.run", lambda args: (_ for _ in ()).throw(
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes")))
    assert cli.main(["merge", "--model", "m", "--adapter", "a", "--output", "o"]) == 1
    err = capsys.readouterr().err
    assert "out of memory (DefaultCPUAllocator" in err and "--batch-size" not in err and "free memory" in err
    monkeypatch.setattr("lema.training.train", lambda args: (_ for _ in ()).throw(
        RuntimeError("DefaultCPUAllocator: can't allocate memory")))
    run_yaml = tmp_path / "run.yaml"  # the budget given in --config, not on the command line: not advised again
    run_yaml.write_text("model: m\ndata: d.jsonl\noutput: o\nmax_vram: 4GB\n")
    assert cli.main(["train", "--config", str(run_yaml)]) == 1
    err = capsys.readouterr().err
    assert "out of memory" in err and err.rstrip().endswith("lower --batch-size or --seq-len")
    monkeypatch.setattr("lema.commands.plan.run", a_bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # not a user's error: the traceback stays
        cli.main(["plan", "--shape", "tiny-llama"])


@pytest.mark.parametrize("argv, fragment", [
    (["convert", "MODEL", "/proc/lema-x/out"], "OUT '/proc/lema-x/out': cannot write in '/proc'"),
    (["bench", "--shape", "tiny-llama", "--profile", "/proc/lema-x/t.json"],
     "--profile '/proc/lema-x/t.json': cannot write in '/proc/lema-x'"),
    (["bench", "--shape", "tiny-llama", "--gpu-memory", "16GB"], "--gpu-memory emulates a smaller card"),
    (["bench", "--shape", "tiny-llama", "--cache-dir", "FILE"], "a-file' is a file; give a folder"),
])
def test_an_output_that_cannot_be_written_is_named_before_the_work(argv, fragment, tiny_dir, tmp_path, capsys):
    """convert said "not enough disk space ... 0 bytes are free" for /proc and named its temporary folder on a
    read-only mount; bench profiled every contender and lost the trace with exit status 0."""
    from lema.cli import main

    (tmp_path / "a-file").write_text("x")
    argv = [tiny_dir("llama") if a == "MODEL" else str(tmp_path / "a-file") if a == "FILE" else a for a in argv]
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1, err
