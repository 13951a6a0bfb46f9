"""A run that diverges stops at its first non-finite step without saving it, and keeps every finite checkpoint;
non-finite settings are refused by flag; --epochs smaller than one optimizer step is refused.

The recipe tests train a tiny random Llama with a word-level tokenizer (milliseconds a step); the non-finite
gradient is made by a hook on a LoRA weight, the non-finite loss by a NaN in the base weights."""

from __future__ import annotations

import json
import math
import os
import shutil
import typing

import pytest
import torch

from lema.cli import build_parser, main
from lema.commands.train import args_from_namespace
from lema.training import TrainArgs, train

WORDS = ["<eos>", "<unk>", "the", "cat", "sat", "on", "a", "mat", "dog", "ran"]


def save_tokenizer(folder: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="<eos>", unk_token="<unk>").save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tiny_models import save_tiny

    folder = save_tiny("llama", str(tmp_path_factory.mktemp("tiny") / "model"), num_layers=2)
    save_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory):
    """The tiny model with one NaN in a decoder weight: every loss is NaN (weights to check, as the error says)."""
    from safetensors.torch import load_file, save_file
    from tiny_models import save_tiny

    folder = save_tiny("llama", str(tmp_path_factory.mktemp("nan") / "model"), num_layers=2)
    save_tokenizer(folder)
    path = os.path.join(folder, "model.safetensors")
    weights = load_file(path)
    weights["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, path, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    texts = [" ".join(WORDS[2 + (i + j) % 8] for j in range(6 + i % 5)) for i in range(12)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def args(model, data, out, **settings):
    base = dict(model=model, data=data, output=str(out), batch_size=2, seq_len=32, lora_rank=4, lora_alpha=8,
                save_steps=1, lr=1e-2, quiet=True)
    return {**base, **settings}


def flags(settings: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')}={v}"
            for k, v in settings.items() if v is not False]


def checkpoints(out) -> list[str]:
    return sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))


def inf_gradient_from(monkeypatch, call: int) -> dict:
    """From the `call`-th backward of this process on (until `["on"]` is set False), the first LoRA weight's
    gradient is +inf while the loss stays finite: a real backward through the streamed layers, with a gradient
    no loss check would catch."""
    from lema import LemaModel

    initialize = LemaModel.initialize_lora
    state = {"calls": 0, "on": True}

    def inf_after(grad):
        state["calls"] += 1
        return grad + math.inf if state["on"] and state["calls"] >= call else grad

    def with_hook(self, *a, **kw):
        initialize(self, *a, **kw)
        first = self.get_trainable_parameters()[0]
        if not getattr(first, "_inf_hooked", False):  # once per model: a new model initialises in its constructor too
            first.register_hook(inf_after)
            first._inf_hooked = True

    monkeypatch.setattr(LemaModel, "initialize_lora", with_hook)
    return state


def adapter_bytes(folder) -> bytes:
    return open(os.path.join(folder, "adapter", "adapter_model.safetensors"), "rb").read()


def test_a_non_finite_gradient_stops_the_run_and_keeps_the_finite_checkpoints(tiny_model, data, tmp_path,
                                                                               monkeypatch, capsys):
    """The reviewer's case: a finished run resumed with more steps diverges. The step whose gradient is inf is not
    applied or saved, so --save-total-limit's rotation cannot push the finite checkpoints out; the command fails
    with one line naming the step, the value and the checkpoint to resume from. Clipping off: the gradient norm is
    checked without it."""
    out = tmp_path / "out"
    train(TrainArgs(**args(tiny_model, data, out, steps=2, save_total_limit=2)))
    finished = adapter_bytes(out)
    inf_gradient_from(monkeypatch, call=2)  # the resumed run's second step: step 4
    rc = main(["train", *flags(args(tiny_model, data, out, steps=6, save_total_limit=2, max_grad_norm=0.0,
                                    resume=True))])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("lema train: error: step 4 (lr ") and ": the gradient norm is inf (loss " in err
    assert f"the checkpoints are kept, the newest {out / 'checkpoint-3'} (step 3)" in err
    assert "lower --lr (now 0.01), set --max-grad-norm (e.g. 1.0; clipping is off)" in err and "--resume" in err
    # 3 is finite; 1, which its rotation would remove, stays until a step from 3's weights has been applied; no 4
    assert checkpoints(out) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert adapter_bytes(out) == finished  # the final adapter is the finished run's, not overwritten
    from safetensors.torch import load_file

    saved = load_file(os.path.join(out, "checkpoint-3", "adapter", "adapter_model.safetensors"))
    assert all(t.isfinite().all() for t in saved.values())
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1, 2, 3]  # no line for step 4


def test_a_collapsed_run_stops_and_sets_its_dead_checkpoint_aside(tiny_model, data, tmp_path, capsys):
    """--lr 1000 on the tiny model: step 2's update saturates it (the loss goes to ln(96) = 4.564, a flat guess
    over the vocabulary, and stays there, finite), so step 3's gradient is exactly 0. The run stops there with one
    line; checkpoint-2, saved from the dead weights, is set aside, and checkpoint-1 is still there although
    --save-total-limit is 1 (pruned only once a later checkpoint's weights have run an applied step), so --resume
    with a sane rate goes on from it."""
    out = tmp_path / "out"
    rc = main(["train", *flags(args(tiny_model, data, out, steps=6, lr=1000, save_total_limit=1))])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("lema train: error: step 3 (lr ") and \
        ": the loss is 4.5643, ln(vocabulary size): the outputs are flat, and the gradient norm is 0" in err
    assert (f"{out / 'checkpoint-2'} holds those weights: moved to {out / 'collapsed-checkpoint-2'}; the checkpoints "
            f"are kept, the newest {out / 'checkpoint-1'} (step 1); lower --lr (now 1000), then run again with "
            "--resume") in err
    assert sorted(os.listdir(out)) == ["checkpoint-1", "collapsed-checkpoint-2", "log.jsonl"]
    rc = main(["train", *flags(args(tiny_model, data, out, steps=3, lr=1e-2, save_total_limit=1, resume=True))])
    assert rc == 0
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3] and log[-1]["grad_norm"] > 0 and abs(log[-1]["loss"] - math.log(96)) > 0.1
    # the finished run keeps the one before its last: no step has run from checkpoint-3's weights
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-3"]


def test_resumed_runs_killed_in_their_second_step_keep_the_checkpoints_bounded(tiny_model, data, tmp_path,
                                                                              monkeypatch):
    """A preemption loop: each resumed run saves one checkpoint, then dies in its next step. The resumed checkpoint's
    weights run each resumed run's first step, so the older ones are pruned then: limit + 1 at most, not one
    more per kill."""
    from lema.trainer import LemaTrainer

    out = tmp_path / "out"
    train(TrainArgs(**args(tiny_model, data, out, steps=2, save_total_limit=1)))
    step = LemaTrainer.train_step
    for _ in range(3):
        calls = {"n": 0}

        def dies_at_the_second(self, *a, **kw):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("killed")
            return step(self, *a, **kw)

        monkeypatch.setattr(LemaTrainer, "train_step", dies_at_the_second)
        with pytest.raises(RuntimeError, match="killed"):
            train(TrainArgs(**args(tiny_model, data, out, steps=20, save_total_limit=1, resume=True)))
        assert len(checkpoints(out)) <= 2, checkpoints(out)
    assert checkpoints(out) == ["checkpoint-4", "checkpoint-5"]


def test_a_stopped_run_keeps_the_checkpoint_before_its_last(tiny_model, data, tmp_path, monkeypatch):
    """SIGTERM in step 2: the run saves checkpoint-2 and stops; checkpoint-1 stays (limit 1) until a step from
    checkpoint-2's weights is applied, in the resumed run, which then prunes it."""
    import signal

    from lema.trainer import LemaTrainer

    step, calls = LemaTrainer.train_step, {"n": 0}

    def terminated_in_the_second(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler's preemption: the flag, the step finishes
        return step(self, *a, **kw)

    monkeypatch.setattr(LemaTrainer, "train_step", terminated_in_the_second)
    out = tmp_path / "out"
    summary = train(TrainArgs(**args(tiny_model, data, out, steps=6, save_total_limit=1)))
    assert summary["interrupted"] and summary["steps"] == 2
    assert checkpoints(out) == ["checkpoint-1", "checkpoint-2"]
    monkeypatch.setattr(LemaTrainer, "train_step", step)
    train(TrainArgs(**args(tiny_model, data, out, steps=4, save_total_limit=1, resume=True)))
    assert checkpoints(out) == ["checkpoint-3", "checkpoint-4"]  # 3 proven by step 4; 4 not yet by any step


def test_a_finished_run_keeps_the_checkpoint_before_its_last_for_a_collapse_found_later(tiny_model, data,
                                                                                        tmp_path, capsys):
    """The reviewer's case: a resumed run at --lr 1000 finishes ("done"): its last update collapsed the weights,
    which only the next step can show. It used to prune to the limit at the end, so the resumed run that found
    the collapse had no checkpoint left and said none had been saved."""
    out = tmp_path / "out"
    train(TrainArgs(**args(tiny_model, data, out, steps=1, save_total_limit=1)))
    train(TrainArgs(**args(tiny_model, data, out, steps=2, lr=1000, save_total_limit=1, resume=True)))
    assert checkpoints(out) == ["checkpoint-1", "checkpoint-2"]
    capsys.readouterr()
    rc = main(["train", *flags(args(tiny_model, data, out, steps=3, save_total_limit=1, resume=True))])
    err = capsys.readouterr().err
    assert rc == 1 and "the outputs are flat" in err, err
    assert (f"{out / 'checkpoint-2'} holds those weights: moved to {out / 'collapsed-checkpoint-2'}; the checkpoints "
            f"are kept, the newest {out / 'checkpoint-1'} (step 1)") in err
    assert checkpoints(out) == ["checkpoint-1"]


def test_with_no_checkpoint_left_beside_a_finished_runs_adapter_the_advice_is_another_output(tmp_path):
    """`lema train` refuses to start afresh where an earlier run's adapter/ is: the advice says so."""
    from lema.trainer import CollapsedStepError
    from lema.training import _diverged

    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    said = _diverged(TrainArgs(model="m", data="d.jsonl", output=str(out), lr=1000.0), 3, CollapsedStepError(4.56),
                     900.0)
    assert said.endswith("no checkpoint was saved before it; lower --lr (now 1000), then run again with another "
                         "--output (or move its adapter/ away first)")


def test_the_run_names_why_examples_were_dropped(tiny_model, tmp_path):
    """It printed only their count; now each cause, its first line and the fix (as when all are dropped)."""
    import io

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["the cat sat", "a dog ran", "", "on a mat"]))
    said = io.StringIO()
    train(TrainArgs(**args(tiny_model, str(path), tmp_path / "out", steps=1)), out=said)
    assert (f'3 examples, 12 tokens, 0 truncated to 32, 1 dropped (nothing to learn: 1 example with an empty "text" '
            f"(e.g. {path}:3): put the text in it or remove the line)\n") in said.getvalue()


def test_a_nan_loss_at_the_first_step_saves_nothing(nan_model, data, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["train", *flags(args(nan_model, data, out, steps=3))])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1
    assert err.startswith("lema train: error: step 1 (lr 0.01): the loss is nan and the gradient norm is nan; "
                          "stopped without saving it: no checkpoint was saved before it; lower --lr (now 0.01) or "
                          "check the data and the model's weights, then run again")
    assert checkpoints(out) == [] and not (out / "adapter").exists()
    assert (out / "log.jsonl").read_text() == ""


def test_the_trainer_does_not_apply_a_step_with_a_non_finite_gradient(tiny_model, monkeypatch):
    """Library level: the weights, AdamW's state and the gradients are as before the refused step, and the next
    finite step runs as usual."""
    from lema import LemaConfig, LemaModel
    from lema.trainer import NonFiniteStepError

    injected = inf_gradient_from(monkeypatch, call=1)
    model = LemaModel(LemaConfig(model_name_or_path=tiny_model, lora_rank=4, lora_alpha=8))
    try:
        model.initialize_lora(0)
        params = model.get_trainable_parameters()
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        trainer = model.get_trainer(optimizer, gradient_accumulation_steps=2)
        before = [p.detach().clone() for p in params]
        ids = torch.randint(2, len(WORDS), (2, 12), generator=torch.Generator().manual_seed(0))
        trainer.train_step(ids)  # the first micro-batch: accumulates, no step yet
        with pytest.raises(NonFiniteStepError, match=r"^the gradient norm is inf \(loss \d") as info:
            trainer.train_step(ids)
        assert math.isfinite(info.value.loss) and info.value.grad_norm == math.inf
        assert not trainer.last_step_applied and trainer.last_grad_norm == math.inf
        assert all(torch.equal(a, b) for a, b in zip(before, params))
        assert not optimizer.state and all(p.grad is None for p in params)
        injected["on"] = False
        trainer.train_step(ids)
        trainer.train_step(ids)
        assert trainer.last_step_applied and math.isfinite(trainer.last_grad_norm)
        assert not all(torch.equal(a, b) for a, b in zip(before, params))
    finally:
        model.close()


def test_the_trainer_does_not_apply_a_step_whose_outputs_are_flat(tiny_model, tmp_path):
    """A head of zeros: every logit 0, the loss ln(96) and no gradient reaches a LoRA weight (the state a far too
    high learning rate leaves); the step is refused like a non-finite one (AdamW would otherwise still move the
    weights by its momentum and weight decay)."""
    from safetensors.torch import load_file, save_file

    from lema import LemaConfig, LemaModel
    from lema.trainer import CollapsedStepError, DivergedStepError

    flat = shutil.copytree(tiny_model, tmp_path / "flat")
    state = load_file(flat / "model.safetensors")
    state["lm_head.weight"].zero_()
    save_file(state, flat / "model.safetensors", metadata={"format": "pt"})
    with LemaModel(LemaConfig(model_name_or_path=str(flat), lora_rank=4, lora_alpha=8)) as model:
        params = model.get_trainable_parameters()
        before = [p.detach().clone() for p in params]
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        trainer = model.get_trainer(optimizer)
        ids = torch.randint(2, len(WORDS), (2, 12), generator=torch.Generator().manual_seed(0))
        with pytest.raises(CollapsedStepError, match=r"^the loss is 4.5643, ln\(vocabulary size\)") as info:
            trainer.train_step(ids)
        assert isinstance(info.value, DivergedStepError) and info.value.grad_norm == 0
        assert not trainer.last_step_applied and not optimizer.state and all(p.grad is None for p in params)
        assert all(torch.equal(a, b) for a, b in zip(before, params))


def test_a_zero_gradient_alone_is_applied(tiny_model):
    """LoRA weights all 0 (A and B): no gradient reaches them, but the outputs are the base model's, not flat (a
    float16 step whose gradients underflow, or q/k LoRA over one-token contexts, give such steps too): applied."""
    from lema import LemaConfig, LemaModel

    with LemaModel(LemaConfig(model_name_or_path=tiny_model, lora_rank=4, lora_alpha=8)) as model:
        params = model.get_trainable_parameters()
        with torch.no_grad():
            for p in params:
                p.zero_()
        trainer = model.get_trainer(torch.optim.AdamW(params, lr=1e-2))
        _, loss = trainer.train_step(torch.randint(2, len(WORDS), (2, 12), generator=torch.Generator().manual_seed(0)))
        assert trainer.last_step_applied and trainer.last_grad_norm == 0 and abs(float(loss) - math.log(96)) > 0.1


FLOATS = [name for name, kind in typing.get_type_hints(TrainArgs).items() if float in (kind, *typing.get_args(kind))]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", FLOATS)
def test_every_non_finite_float_setting_is_refused_with_its_flag(tmp_path, field, value):
    assert set(FLOATS) >= {"lr", "weight_decay", "max_grad_norm", "lora_alpha", "lora_dropout", "epochs"}
    with pytest.raises(ValueError, match=f"^--{field.replace('_', '-')}={value} must be a finite number$"):
        TrainArgs(model="m", data="d.jsonl", output=str(tmp_path / "o"), **{field: value})


@pytest.mark.parametrize("argv, message", [
    (["--lr", "nan"], "--lr=nan must be a finite number"),
    (["--lr", "4e37"], r"--lr=4e\+37 is past what AdamW can step in float32 \(its first step scales by lr / \(1 - "
                       r"0.9\) = 4e\+38, above 3.4e\+38\); LoRA trains at about 1e-4"),
    (["--epochs", "inf"], "--epochs=inf must be a finite number"),
    (["--lora-dropout", "1"], "--lora-dropout=1.0 must be >= 0 and < 1"),
])
def test_non_finite_flags_are_refused_on_the_command_line(tmp_path, argv, message):
    parsed = build_parser().parse_args(["train", "--model", "m", "--data", "d", "--output", str(tmp_path / "o"),
                                        *argv])
    with pytest.raises(ValueError, match=message):
        args_from_namespace(parsed)


def test_an_infinite_yaml_count_is_named_not_a_traceback(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"model: m\ndata: d.jsonl\noutput: {tmp_path / 'o'}\nwarmup_steps: .inf\n")
    with pytest.raises(ValueError, match="warmup_steps=inf is not a whole number"):
        args_from_namespace(build_parser().parse_args(["train", "--config", str(path)]))


def test_an_epoch_shorter_than_one_step_is_refused_before_anything_is_written(tiny_model, data, tmp_path):
    """12 examples in batches of 2 are 6 micro-batches an epoch; one step of --grad-accum 100 would train 17
    epochs for --epochs 1."""
    out = tmp_path / "out"
    with pytest.raises(ValueError) as info:
        train(TrainArgs(**args(tiny_model, data, out, epochs=1.0, grad_accum=100)))
    assert str(info.value) == ("--epochs 1 is 6 micro-batches (12 examples in batches of --batch-size 2), fewer "
                               "than one optimizer step of --grad-accum 100, which would train 16.7 epochs; use "
                               "--grad-accum 6 or less, or --steps to train that many steps of 100 micro-batches")
    assert not out.exists()


def test_epochs_round_up_to_whole_steps(tiny_model, data, tmp_path):
    """6 micro-batches an epoch, 4 a step: one epoch is 2 steps (the second takes 2 micro-batches of the next
    epoch), the rounding --epochs' help states."""
    out = tmp_path / "out"
    summary = train(TrainArgs(**args(tiny_model, data, out, epochs=1.0, grad_accum=4, save_steps=10)))
    assert summary["steps"] == 2
    state = json.load(open(out / "checkpoint-2" / "trainer_state.json"))
    assert (state["sampler"]["epoch"], state["sampler"]["position"]) == (1, 2)
