"""End-to-end runs of the command line on the real default model (SmolLM2-135M, converted once).

Each `lema` invocation is a subprocess, as a user would run it. The data is a small slice of the
shipped LEMA_REPLY dataset so that a run takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "data", "lema_reply", "train.jsonl")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TRANSFORMERS_VERBOSITY": "error"}


def lema(*args, check=True, **kw):
    proc = subprocess.run([sys.executable, "-m", "lema", *map(str, args)], capture_output=True, text=True,
                          env=ENV, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"lema {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def smol(smollm2_dir):
    return smollm2_dir  # `lema convert --default`, once per session (conftest.py)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    with open(TRAIN) as f:
        lines = f.readlines()[:24]
    path = folder / "train.jsonl"
    path.write_text("".join(lines))
    return str(path)


TRAIN_ARGS = ["--steps", 4, "--batch-size", 2, "--seq-len", 96, "--lr", 2e-3, "--save-steps", 2,
              "--lora-rank", 4, "--lora-alpha", 8, "--quiet"]


@pytest.fixture(scope="session")
def trained(smol, small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    proc = lema("train", "--model", smol, "--data", small_data, "--output", out, *TRAIN_ARGS)
    return str(out), proc.stdout


def read_adapter(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def test_train_lowers_loss_and_writes_layout(trained):
    out, stdout = trained
    assert "parameters:" in stdout and "steps: 0 -> 4" in stdout  # the plan printed before the first step
    assert "predicted peak:" in stdout and "kept activations:" in stdout and "loss: " in stdout
    log = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert log[-1]["loss"] < log[0]["loss"]
    assert all(r["tokens_per_s"] > 0 and r["memory_bytes"] > 0 for r in log)
    adapter = os.path.join(out, "adapter")
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert cfg["r"] == 4 and os.path.abspath(cfg["base_model_name_or_path"]).startswith("/")
    ckpts = sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))
    assert ckpts == ["checkpoint-2", "checkpoint-4"]
    for name in ("adapter/adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt",
                 "trainer_state.json"):
        assert os.path.isfile(os.path.join(out, "checkpoint-4", name)), name
    state = json.load(open(os.path.join(out, "checkpoint-4", "trainer_state.json")))
    assert state["step"] == 4 and state["sampler"]["position"] == 4
    final, ckpt = read_adapter(adapter), read_adapter(os.path.join(out, "checkpoint-4", "adapter"))
    assert all(torch.equal(final[k], ckpt[k]) for k in final)


def test_sigkill_then_resume_equals_uninterrupted(smol, small_data, trained, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lema", "train", "--model", smol, "--data", small_data, "--output", str(out),
           *map(str, TRAIN_ARGS)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 300
    while not (out / "checkpoint-2" / "trainer_state.json").exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter").exists()
    lema("train", "--model", smol, "--data", small_data, "--output", out, *TRAIN_ARGS, "--resume")
    resumed, reference = read_adapter(out / "adapter"), read_adapter(os.path.join(trained[0], "adapter"))
    assert resumed.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(resumed[k], reference[k], rtol=0, atol=1e-6)
    logged = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]  # the steps after the checkpoint, logged before the kill, are not doubled


def test_resume_of_a_finished_run_rewrites_the_adapter_and_says_so(smol, small_data, trained, tmp_path):
    out = tmp_path / "finished"
    shutil.copytree(trained[0], out)
    shutil.rmtree(out / "adapter")  # as if the run died while writing it
    proc = lema("train", "--model", smol, "--data", small_data, "--output", out, *TRAIN_ARGS, "--resume")
    assert "nothing to train" in proc.stdout and "Traceback" not in proc.stderr
    saved, reference = read_adapter(out / "adapter"), read_adapter(os.path.join(trained[0], "adapter"))
    assert all(torch.equal(saved[k], reference[k]) for k in reference)


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_older_one_resumes(smol, small_data, trained, tmp_path):
    """checkpoint-4's optimizer state cut short (a disk error): the run warns, renames it damaged-checkpoint-4
    (kept, out of the rotation), resumes from checkpoint-2 and ends where the uninterrupted run did."""
    out = tmp_path / "damaged"
    shutil.copytree(trained[0], out)
    shutil.rmtree(out / "adapter")
    newest = out / "checkpoint-4" / "optimizer.pt"
    cut = newest.read_bytes()[:100]
    newest.write_bytes(cut)
    proc = lema("train", "--model", smol, "--data", small_data, "--output", out, *TRAIN_ARGS, "--resume")
    assert f"{out / 'checkpoint-4'} cannot be read" in proc.stdout
    assert f"moved to {out / 'damaged-checkpoint-4'}, resuming from {out / 'checkpoint-2'} (step 2)" in proc.stdout
    assert (out / "damaged-checkpoint-4" / "optimizer.pt").read_bytes() == cut  # kept as it was
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-4"]
    resumed, reference = read_adapter(out / "adapter"), read_adapter(os.path.join(trained[0], "adapter"))
    for k in reference:
        torch.testing.assert_close(resumed[k], reference[k], rtol=0, atol=1e-6)


def test_a_resumed_run_applies_and_names_the_settings_it_changes(smol, small_data, trained, tmp_path):
    """Resumed with another --weight-decay and --steps: the run says so, and the new weight decay is the one the
    optimizer uses (the loaded optimizer state carried the checkpoint's, and the flag was ignored)."""
    out = tmp_path / "changed"
    shutil.copytree(trained[0], out)
    shutil.rmtree(out / "adapter")
    args = list(map(str, TRAIN_ARGS))
    args[args.index("--steps") + 1] = "5"
    proc = lema("train", "--model", smol, "--data", small_data, "--output", out, *args, "--weight-decay", "0.5",
                "--resume")
    assert (f"note: resuming {out / 'checkpoint-4'} with settings changed from its run's: --weight-decay 0.0 -> 0.5, "
            "--steps (the run's total) 4 -> 5 (they apply from this step on)") in proc.stdout
    groups = torch.load(out / "checkpoint-5" / "optimizer.pt", weights_only=True)["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5] * len(groups)
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_ctrl_c_in_the_last_step_finishes_the_run_and_a_new_run_starts_its_log(smol, small_data, tmp_path,
                                                                                 monkeypatch):
    """An interrupt that arrives during the last step: every step is done, so the run ends as a finished one
    (final adapter written, not "stopped"); and the folder's stale log (a run killed before its first checkpoint)
    is started afresh, not appended to."""
    import io

    import lema.training as training

    class Requested:  # Ctrl-C already pressed when the first (and last) step ends
        requested = True
        signum = 2

        def __init__(self, output):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(training, "_Interrupt", Requested)
    out = tmp_path / "last"
    out.mkdir()
    (out / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (1, 2, 3)))
    printed = io.StringIO()
    summary = training.train(training.TrainArgs(model=smol, data=small_data, output=str(out), steps=1, batch_size=2,
                                                seq_len=32, lora_rank=4, lora_alpha=8, quiet=True), out=printed)
    assert summary["interrupted"] is False and summary["steps"] == 1
    assert (out / "adapter" / "adapter_model.safetensors").exists() and "done: 1 steps" in printed.getvalue()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1] and log[0]["loss"] != 9.0


def test_adapter_loads_in_peft_with_same_logits(smol, trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lema.generation import load_for_generation

    ids = torch.tensor([[1, 504, 3458, 314, 260, 3575, 282, 4649, 47]])
    model, _ = load_for_generation(smol, os.path.join(trained[0], "adapter"))
    with torch.no_grad():
        ours = model(ids).logits
    model.close()
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32),
                                    os.path.join(trained[0], "adapter"))
    with torch.no_grad():
        theirs = ref(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_generate_with_adapter_differs_and_matches_peft_greedy(smol, trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lema.generation import encode_prompt

    prompt = "What is the capital of Spain?"
    args = ["generate", "--model", smol, "--chat", "--prompt", prompt, "--max-new-tokens", 12]
    base = lema(*args).stdout
    tuned = lema(*args, "--adapter", os.path.join(trained[0], "adapter")).stdout
    assert base.strip() and tuned.strip() and base != tuned
    tok = AutoTokenizer.from_pretrained(smol)
    ids = encode_prompt(tok, prompt, chat=True)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32),
                                    os.path.join(trained[0], "adapter"))
    out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert tuned.strip() == expected.strip()


@pytest.mark.parametrize("case", ["malformed", "empty", "resume-none", "other-rank", "budget", "no-model",
                                  "no-tokenizer", "other-data"])
def test_bad_inputs_fail_cleanly_and_keep_checkpoints(case, smol, small_data, trained, tmp_path):
    out = tmp_path / "out"
    data = small_data
    extra = []
    if case == "malformed":
        data = tmp_path / "bad.jsonl"
        data.write_text(open(small_data).readline() + '{"messages": [{"role": "user"\n')
    elif case == "empty":
        data = tmp_path / "empty.jsonl"
        data.write_text("\n")
    elif case == "resume-none":
        extra = ["--resume"]
    elif case == "other-rank":
        shutil.copytree(trained[0], out)
        extra = ["--resume"]
    elif case == "other-data":  # the same examples in another order: the checkpoint's data hash names it
        shutil.copytree(trained[0], out)
        data = tmp_path / "changed.jsonl"
        lines = open(small_data).read().splitlines(keepends=True)
        data.write_text("".join([lines[1], lines[0], *lines[2:]]))
        assert data.read_text() != open(small_data).read()
        extra = ["--resume"]
    elif case == "budget":  # refused by the planner before anything is allocated or written
        extra = ["--max-vram", "100MB"]
    model = smol
    if case == "no-model":  # named as a missing folder, not looked up on the hub
        model = tmp_path / "missing"
    elif case == "no-tokenizer":  # weights and config but no tokenizer files
        model = tmp_path / "weights-only"
        model.mkdir()
        for name in ("config.json", "model.safetensors"):
            os.symlink(os.path.join(smol, name), model / name)
    before = sorted(os.listdir(out)) if out.exists() else []
    args = ["train", "--model", model, "--data", data, "--output", out, *TRAIN_ARGS, *extra]
    if case == "other-rank":
        args[args.index("--lora-rank") + 1] = "8"
    proc = lema(*args, check=False)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lema train: error:") and "Traceback" not in proc.stderr
    expected = {"malformed": "bad.jsonl:2", "empty": "empty", "resume-none": "no complete checkpoint",
                "other-rank": "lora_rank", "budget": "--max-vram", "no-model": "does not exist",
                "no-tokenizer": "no usable tokenizer",
                "other-data": "other training data"}[case]
    assert expected in last
    assert (sorted(os.listdir(out)) if out.exists() else []) == before


def test_usage_errors_exit_2_with_one_line():
    proc = lema("train", "--steps", "x", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    proc = lema("nonsense", check=False)
    assert proc.returncode == 2
    helptext = lema("--help").stdout
    assert "examples:" in helptext and "lema train" in helptext
    for command in ("train", "generate"):
        assert "example:" in lema(command, "--help").stdout


def test_merge_equals_peft_merge_and_unload(smol, trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    lema("merge", "--model", smol, "--adapter", os.path.join(trained[0], "adapter"), "--output", out)
    ids = torch.tensor([[1, 504, 3458, 314, 260, 3575, 282, 4649, 47]])
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32),
                                    os.path.join(trained[0], "adapter")).merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    # an adapter of another model is refused, and nothing is written
    proc = lema("merge", "--model", smol, "--adapter", os.path.join(trained[0], "adapter"), "--output",
                tmp_path / "bad", "--dtype", "int3", check=False)
    assert proc.returncode == 1 and "int3" in proc.stderr and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_saves_a_checkpoint_and_exits(sig, smol, small_data, tmp_path):
    out = tmp_path / "interrupted"
    args = list(map(str, TRAIN_ARGS))
    args[args.index("--save-steps") + 1] = "100"  # no interval checkpoint: the one found comes from Ctrl-C
    proc = subprocess.Popen([sys.executable, "-m", "lema", "train", "--model", smol, "--data", small_data,
                             "--output", str(out), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    deadline = time.time() + 300
    while not ((out / "log.jsonl").exists() and (out / "log.jsonl").read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first step"
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, stderr[-2000:]  # 130 after Ctrl-C, 143 after SIGTERM
    assert "Traceback" not in stderr and "--resume" in stdout
    steps = [int(n.split("-")[1]) for n in os.listdir(out) if n.startswith("checkpoint-")]
    assert len(steps) == 1 and 1 <= steps[0] < 4
    assert not (out / "adapter").exists()  # the run did not finish
    lema("train", "--model", smol, "--data", small_data, "--output", out, *args, "--resume")
    assert (out / "adapter" / "adapter_model.safetensors").exists()
