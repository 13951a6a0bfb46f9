"""`lema train`'s settings and bookkeeping without a model: flags and YAML values, checkpoint writes that
fail, a damaged checkpoint, the log and the learning rate of a resumed run."""

from __future__ import annotations

import io
import json
import os
import types

import pytest
import torch

from lema.checkpointing import (CheckpointError, CheckpointUnreadable, list_checkpoints, load_checkpoint,
                                newest_readable, prune_checkpoints, save_checkpoint, set_aside)
from lema.cli import build_parser
from lema.commands.train import args_from_namespace
from lema.run_folder import lock_output, truncate_log, unlock_output
from lema.training import TrainArgs, lr_lambda, resume_schedule, train
from test_nonfinite import data, tiny_model  # noqa: F401  (fixtures)

REQUIRED = dict(model="m", data="d.jsonl")


def parse(tmp_path, *flags, config: str | None = None):
    argv = ["train", *flags]
    if config is not None:
        path = tmp_path / "run.yaml"
        path.write_text(config)
        argv += ["--config", str(path)]
    return args_from_namespace(build_parser().parse_args(argv))


def test_yaml_values_take_the_flags_types(tmp_path):
    """YAML 1.1 reads `1e-4` as a string and a quoted number stays one: both become the field's type."""
    args = parse(tmp_path, config=f"model: m\ndata: d.jsonl\noutput: {tmp_path / 'o'}\nlr: 1e-4\nbatch_size: '2'\n"
                                  "target_modules: q_proj\noffload_activations: auto\nquiet: true\n")
    assert args.lr == 1e-4 and isinstance(args.lr, float)
    assert args.batch_size == 2 and isinstance(args.batch_size, int)
    assert args.target_modules == ["q_proj"] and args.offload_activations is None and args.quiet is True


@pytest.mark.parametrize("text, message", [
    ("lr: fast", "lr='fast' is not a number"),
    ("batch_size: 2.5", "batch_size=2.5 must be a whole number"),
    ("quiet: maybe", "quiet='maybe' must be one of"),
    ("lr: [1", "is not valid YAML"),
    ("seq_len:", "seq_len is empty"),
])
def test_bad_yaml_values_are_named(tmp_path, text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        parse(tmp_path, config=f"model: m\ndata: d.jsonl\noutput: o\n{text}\n")


def test_steps_on_the_command_line_replace_the_files_epochs(tmp_path):
    args = parse(tmp_path, "--steps", "7", config=f"model: m\ndata: d.jsonl\noutput: {tmp_path / 'o'}\nepochs: 2\n")
    assert args.steps == 7 and args.epochs is None


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, "--steps=0 must be >= 1"),
    ("epochs", 0.0, "--epochs=0.0 must be > 0"),
    ("seq_len", 1, "--seq-len=1 must be >= 2"),
    ("warmup_steps", -5, "--warmup-steps=-5 must be >= 0"),
    ("save_total_limit", -1, "--save-total-limit=-1 must be >= 0"),
    ("max_grad_norm", -1.0, "--max-grad-norm=-1.0 must be >= 0"),
    ("lora_alpha", 0, "--lora-alpha=0 must be > 0"),
    ("eval_steps", 0, "--eval-steps=0 must be >= 1"),
    ("weight_decay", -0.1, "--weight-decay=-0.1 must be >= 0"),
    ("seed", 10**20, r"--seed=100000000000000000000 must be >= 0 and < 2\*\*63"),  # torch said "Overflow when
    ("seed", -1, r"--seed=-1 must be >= 0"),                                          # unpacking long long"
])
def test_bad_numbers_are_refused_with_the_flag(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainArgs(**REQUIRED, output=str(tmp_path / "o"), **{field: value})


def test_an_output_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "taken"
    path.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        TrainArgs(**REQUIRED, output=str(path))


class _FailingAdapter:
    def save_pretrained(self, folder):
        os.makedirs(folder)
        with open(os.path.join(folder, "adapter_model.safetensors"), "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")


def _optimizer():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1e-3)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def test_a_failed_save_removes_its_folder_and_names_the_intact_checkpoint(tmp_path):
    intact = tmp_path / "checkpoint-2"
    intact.mkdir()
    (intact / "trainer_state.json").write_text("{}")
    opt, sched = _optimizer()
    model = types.SimpleNamespace(peft_model=_FailingAdapter())
    with pytest.raises(CheckpointError, match=r"could not write checkpoint-4 .*No space left.*checkpoint-2 is intact"):
        save_checkpoint(str(tmp_path), 4, model, opt, sched, {}, {})
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]  # no half-written folder, the old one kept
    assert list_checkpoints(str(tmp_path)) == [(2, str(intact))]


def test_a_damaged_checkpoint_names_the_older_one(tmp_path):
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text('{"step": 4, "samp')  # cut by a crash
    opt, sched = _optimizer()
    with pytest.raises(CheckpointError, match=r"checkpoint-4' cannot be read .*resume from .*checkpoint-2"):
        load_checkpoint(str(tmp_path / "checkpoint-4"), None, opt, sched, {})


def test_a_checkpoint_with_a_damaged_file_changes_nothing(tmp_path):
    """Every file is read before any is applied: rng.pt cut short leaves the optimizer's state and the
    scheduler as they were (a fallback to an older checkpoint starts from a clean slate)."""
    opt, sched = _optimizer()
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    opt.step()
    sched.step()
    folder = tmp_path / "checkpoint-3"
    (folder / "adapter").mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": 3, "sampler": {"epoch": 0, "position": 3},
                                                           "run": {}}))
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    torch.save(sched.state_dict(), folder / "scheduler.pt")
    (folder / "rng.pt").write_bytes(b"PK\x03\x04 cut")
    fresh_opt, fresh_sched = _optimizer()
    model = types.SimpleNamespace(load_adapter=lambda path: pytest.fail("applied before every file was read"))
    with pytest.raises(CheckpointUnreadable, match=r"checkpoint-3' cannot be read") as e:
        load_checkpoint(str(folder), model, fresh_opt, fresh_sched, {})
    assert e.value.path == str(folder) and e.value.why
    assert fresh_opt.state_dict()["state"] == {} and fresh_sched.last_epoch == 0


def test_the_newest_readable_checkpoint_resumes(tmp_path):
    paths = {s: str(tmp_path / f"checkpoint-{s}") for s in (2, 4, 6)}

    def load(path):
        if path != paths[2]:
            raise CheckpointUnreadable(f"checkpoint {path!r} cannot be read", path, f"cut {path[-1]}")
        return {"step": 2}

    assert newest_readable(sorted(paths.items()), load) == (paths[2], {"step": 2},
                                                             [(paths[6], "cut 6"), (paths[4], "cut 4")])
    with pytest.raises(CheckpointError, match=r"no checkpoint can be read: .*checkpoint-4' \(cut 4\); .*--output"):
        newest_readable([(4, paths[4])], load)

    def other_settings(path):
        raise CheckpointError("was made with lora_rank=4")

    with pytest.raises(CheckpointError, match="lora_rank=4"):  # not damage: no fallback past it
        newest_readable(sorted(paths.items()), other_settings)


def test_a_damaged_checkpoint_is_set_aside_not_deleted(tmp_path):
    for name in ("checkpoint-4", "damaged-checkpoint-4"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text("{")
    assert set_aside(str(tmp_path / "checkpoint-4")) == str(tmp_path / "damaged-checkpoint-4-2")
    assert sorted(os.listdir(tmp_path)) == ["damaged-checkpoint-4", "damaged-checkpoint-4-2"]
    assert list_checkpoints(str(tmp_path)) == []


def test_a_resumed_log_drops_the_steps_that_run_again(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    truncate_log(str(log), 2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]


def test_a_resumed_run_with_more_steps_uses_its_own_schedule():
    """Trained 2 of 2 cosine steps (rate 0 at the end), resumed with --steps 4: the next step's rate is the new
    schedule's at step 2, not the finished schedule's 0."""
    def run(total):
        opt, _ = _optimizer()
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, 0, total, "cosine"))
        return opt, sched

    opt, sched = run(2)
    for _ in range(2):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()

    opt, sched = run(4)
    opt.load_state_dict(saved_opt)
    sched.load_state_dict(saved_sched)
    assert opt.param_groups[0]["lr"] == 0.0  # what the checkpoint holds
    resume_schedule(opt, sched, 1e-3, lambda s: lr_lambda(s, 0, 4, "cosine"))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_lambda(2, 0, 4, "cosine")) and sched.last_epoch == 2
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_lambda(3, 0, 4, "cosine"))


def test_auto_is_taken_where_plan_and_bench_take_it(tmp_path):
    out = str(tmp_path / "o")
    args = parse(tmp_path, "--model", "m", "--data", "d.jsonl", "--output", out, "--resident-layers", "auto",
                 "--keep-activations", "3", "--page-cache", "auto")
    assert args.resident_layers is None and args.keep_activations == 3 and args.page_cache is None
    args = parse(tmp_path, config=f"model: m\ndata: d.jsonl\noutput: {out}\nresident_layers: auto\npage_cache: off\n")
    assert args.resident_layers is None and args.page_cache == "off"
    # `auto` typed on the command line wins over the file's value, as every flag given does
    config = (f"model: m\ndata: d.jsonl\noutput: {out}\nzero_copy: off\noffload_activations: on\n"
              "resident_layers: 4\npage_cache: 2GB\nkeep_activations: 2\n")
    args = parse(tmp_path, "--zero-copy", "auto", "--offload-activations", "auto", "--resident-layers", "auto",
                 "--page-cache", "auto", "--keep-activations", "auto", config=config)
    assert (args.zero_copy, args.offload_activations, args.resident_layers, args.page_cache,
            args.keep_activations) == (None, None, None, None, None)
    args = parse(tmp_path, config=config)  # and without them, the file's
    assert (args.zero_copy, args.offload_activations, args.resident_layers, args.page_cache,
            args.keep_activations) == (False, True, 4, "2GB", 2)


def test_a_second_run_on_the_same_output_is_refused(tmp_path):
    import fcntl

    other = os.open(tmp_path, os.O_RDONLY)  # another run's lock (flock: per open file, as another process)
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(ValueError, match="another `lema train` is writing to"):
            lock_output(str(tmp_path))
    finally:
        os.close(other)
    lock_output(str(tmp_path))  # free again once the other lets go
    with pytest.raises(ValueError, match="another `lema train` in this process is writing to"):
        lock_output(str(tmp_path))  # a run of this process holds it: refused too (train() lets go however it ends)
    unlock_output(str(tmp_path))
    lock_output(str(tmp_path))
    unlock_output(str(tmp_path))


def test_resume_refuses_other_data_seq_len_or_accumulation(tmp_path):
    """A checkpoint records its data file's hash, seq_len and grad_accum; another value is named with the fix. A
    checkpoint from before these were recorded is checked on what it has."""
    from lema.checkpointing import check_run_identity, data_identity

    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n{"text": "b"}\n')
    shape = {"model": "/m", "lora_rank": 8, "lora_alpha": 16, "lora_target_modules": ["q_proj"]}
    saved = {**shape, "data": data_identity(str(data)), "seq_len": 256, "grad_accum": 2}
    check_run_identity("ck", saved, dict(saved))  # the same run: no error
    check_run_identity("ck", shape, dict(saved))  # an older checkpoint without them
    with pytest.raises(CheckpointError, match=r"seq_len=256 but this run has seq_len=128.*--seq-len 256"):
        check_run_identity("ck", saved, {**saved, "seq_len": 128})
    with pytest.raises(CheckpointError, match=r"grad_accum=2 but this run has grad_accum=4.*--grad-accum 2"):
        check_run_identity("ck", saved, {**saved, "grad_accum": 4})
    data.write_text('{"text": "a"}\n{"text": "c"}\n')  # same size, same number of examples, other content
    with pytest.raises(CheckpointError, match=r"other training data: .*train.jsonl' has sha256"):
        check_run_identity("ck", saved, {**saved, "data": data_identity(str(data))})
    with pytest.raises(CheckpointError, match=r"lora_rank=8 but this run has lora_rank=4"):
        check_run_identity("ck", shape, {**saved, "lora_rank": 4})


class _Adapter:
    """What save_checkpoint needs of a model: a PEFT model that writes its adapter folder."""

    def __init__(self):
        self.peft_model = self

    def save_pretrained(self, folder):
        os.makedirs(folder)
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump({"r": 4}, f)
        with open(os.path.join(folder, "adapter_model.safetensors"), "wb") as f:
            f.write(bytes(range(256)) * 64)


def _saved(tmp_path, step=3):
    opt, sched = _optimizer()
    sampler = {"epoch": 0, "position": step}
    return save_checkpoint(str(tmp_path), step, _Adapter(), opt, sched, sampler, {"model": "/m"})


@pytest.mark.parametrize("damage", ["optimizer.pt", "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                                    "trainer_state.json", "rng.pt missing"])
def test_a_checkpoint_file_that_differs_from_its_sha256_is_unreadable(tmp_path, damage):
    """Every file of a checkpoint is checked against the sha256 recorded when it was written, so a flipped bit
    that leaves the file's structure readable (a tensor's value, an optimizer moment, the step) is found and the
    checkpoint set aside, not trained on; an untouched checkpoint loads."""
    path = _saved(tmp_path)
    state = json.load(open(os.path.join(path, "trainer_state.json")))
    assert set(state["files"]) == {"optimizer.pt", "scheduler.pt", "rng.pt", "adapter/adapter_config.json",
                                   "adapter/adapter_model.safetensors"} and len(state["sha256"]) == 64
    loaded = []
    model = types.SimpleNamespace(load_adapter=loaded.append)
    opt, sched = _optimizer()
    assert load_checkpoint(path, model, opt, sched, {"model": "/m"})["step"] == 3 and len(loaded) == 1
    name = damage.split()[0]
    file = os.path.join(path, *name.split("/"))
    if damage.endswith("missing"):
        os.remove(file)
        expected = "rng.pt is missing"
    elif name == "trainer_state.json":  # edited by hand, still valid JSON
        text = open(file).read()
        assert '"step": 3' in text
        open(file, "w").write(text.replace('"step": 3', '"step": 30'))
        expected = "trainer_state.json does not match its sha256"
    else:
        data = bytearray(open(file, "rb").read())
        data[len(data) // 2] ^= 0x40  # one bit, mid-file
        open(file, "wb").write(bytes(data))
        expected = f"{name} does not match the sha256 recorded when it was written"
    opt, sched = _optimizer()
    with pytest.raises(CheckpointUnreadable, match=f"checkpoint-3' cannot be read .*{expected}") as e:
        load_checkpoint(path, model, opt, sched, {"model": "/m"})
    assert expected in e.value.why and len(loaded) == 1 and opt.state_dict()["state"] == {}


def test_a_damaged_adapter_config_without_digests_falls_back(tmp_path):
    """A checkpoint written before the digests: an adapter_config.json that is not JSON is damage (the run
    resumes from an older checkpoint), not an error that ends the run."""
    from lema.adapter_files import read_adapter

    path = _saved(tmp_path)
    state = json.load(open(os.path.join(path, "trainer_state.json")))
    del state["files"], state["sha256"]
    json.dump(state, open(os.path.join(path, "trainer_state.json"), "w"))
    open(os.path.join(path, "adapter", "adapter_config.json"), "w").write('{"r": ')
    model = types.SimpleNamespace(load_adapter=read_adapter)
    opt, sched = _optimizer()
    with pytest.raises(CheckpointUnreadable, match=r"adapter_config.json' is not valid JSON"):
        load_checkpoint(path, model, opt, sched, {"model": "/m"})


def test_pruning_moves_a_checkpoint_out_of_the_listing_before_deleting_it(tmp_path, monkeypatch):
    """A kill while an old checkpoint is being deleted leaves a `.tmp-` folder, which the next save removes; never
    a `checkpoint-STEP` without its trainer_state.json, which nothing would list, resume or prune again."""
    import shutil

    import lema.checkpointing as checkpointing

    real_rmtree = shutil.rmtree
    monkeypatch.setattr(checkpointing.shutil, "rmtree", lambda path, **kw: None)  # killed before deleting a byte
    for step in (1, 2):
        opt, sched = _optimizer()
        save_checkpoint(str(tmp_path), step, _Adapter(), opt, sched, {"epoch": 0, "position": step}, {})
        prune_checkpoints(str(tmp_path), 1)
    pruned, kept = sorted(os.listdir(tmp_path))
    assert kept == "checkpoint-2" and pruned.startswith(".tmp-pruned-")
    assert sorted(os.listdir(tmp_path / pruned / "folder")) == sorted(os.listdir(tmp_path / kept))  # checkpoint-1
    monkeypatch.setattr(checkpointing.shutil, "rmtree", real_rmtree)
    opt, sched = _optimizer()
    save_checkpoint(str(tmp_path), 3, _Adapter(), opt, sched, {"epoch": 0, "position": 3}, {})
    prune_checkpoints(str(tmp_path), 1)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3"]


def test_a_new_runs_log_starts_empty(tmp_path):
    """A run killed before its first checkpoint leaves log records no checkpoint holds: a new run in that folder
    (no --resume) starts its log afresh instead of appending step 1 after them."""
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    truncate_log(str(log), 0)
    assert log.read_text() == ""


def test_the_model_is_known_by_its_weights_not_its_path(tmp_path):
    """A checkpoint records a fingerprint of the model's weights: the same model copied elsewhere resumes; other
    weights in the run's folder are refused, down to one small tensor changed among large ones (a fine-tune
    merged into a few projections); a checkpoint from before (no fingerprint, or another scheme) is judged by
    its path, as it was."""
    import shutil

    from safetensors.torch import save_file

    from lema.checkpointing import check_run_identity
    from lema.store import WeightStore, weights_fingerprint

    g = torch.Generator().manual_seed(0)
    tensors = {"embed": torch.randn(4096, 256, generator=g), **{f"layers.{i}.v_proj": torch.randn(8, 32, generator=g)
                                                                for i in range(3)}}
    first, copy = tmp_path / "m", tmp_path / "copy"
    first.mkdir()
    save_file(tensors, str(first / "model.safetensors"))
    shutil.copytree(first, copy)
    shape = {"lora_rank": 8, "lora_alpha": 16, "lora_target_modules": ["q_proj"]}

    def identity(folder):
        store = WeightStore(str(folder))
        try:
            return {**shape, "model": str(folder), "model_weights": weights_fingerprint(store)}
        finally:
            store.close()

    saved = identity(first)
    assert saved["model_weights"].startswith("tensors-v1:")
    check_run_identity("ck", saved, identity(copy))  # the same weights elsewhere
    tensors["layers.1.v_proj"] = tensors["layers.1.v_proj"] + 1e-3  # 1 KiB of 4 MiB, every element changed
    save_file(tensors, str(first / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"other model weights than those in .*m'.*resume with that model"):
        check_run_identity("ck", saved, identity(first))
    for old in ({k: v for k, v in saved.items() if k != "model_weights"}, {**saved, "model_weights": "abc123"}):
        check_run_identity("ck", old, identity(first))  # from before: the path decides
        with pytest.raises(CheckpointError, match=r"was made with model="):
            check_run_identity("ck", old, identity(copy))


def test_a_resumed_run_names_the_settings_it_changes():
    from lema.checkpointing import changed_settings

    saved = {"settings": {"lr": 1e-3, "weight_decay": 0.0, "max_grad_norm": 1.0, "dtype": "float32"}}
    now = {"settings": {"lr": 1e-3, "weight_decay": 0.5, "max_grad_norm": 1.0, "dtype": "bfloat16"}}
    assert changed_settings(saved, now) == ["--weight-decay 0.0 -> 0.5", "--dtype float32 -> bfloat16"]
    assert changed_settings(saved, saved) == [] and changed_settings({}, now) == []


def test_an_output_that_would_mix_with_other_files_is_refused(tmp_path):
    """--output under a file, the model folder itself, or a folder holding an earlier run's final adapter (and no
    checkpoint to resume): refused before anything loads, each with the fix; a folder to be made is fine."""
    from lema.training import train

    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"lies under .*afile', which is a file; give a folder"):
        parse(tmp_path, "--model", str(model), "--data", "d.jsonl", "--output", str(tmp_path / "afile" / "sub"))
    with pytest.raises(ValueError, match=r"is the model folder; .*choose another --output"):
        parse(tmp_path, "--model", str(model), "--data", "d.jsonl", "--output", str(model))
    args = parse(tmp_path, "--model", str(model), "--data", "d.jsonl", "--output", str(tmp_path / "new" / "out"))
    assert args.output.endswith("out")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a"}\n')
    out = tmp_path / "done"
    (out / "adapter").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"holds the adapter of an earlier run \(adapter/\) and no checkpoint"):
        train(parse(tmp_path, "--model", str(model), "--data", str(data), "--output", str(out)))
    assert os.listdir(out) == ["adapter"]


def test_zero_copy_reaches_the_engine(tiny_model, data, tmp_path):
    """--zero-copy off: on the CPU the ring reads each layer into its slots, no views of the mmap, as the plan
    printed at the start says; auto (None) keeps the views. As a flag and in YAML."""
    from test_nonfinite import args as run_args

    out = str(tmp_path / "o")
    assert parse(tmp_path, "--model", "m", "--data", "d.jsonl", "--output", out, "--zero-copy", "off").zero_copy is False
    assert parse(tmp_path, config=f"model: m\ndata: d.jsonl\noutput: {out}\nzero_copy: on\n").zero_copy is True
    rows = {}
    for setting in (False, None):
        printed = io.StringIO()
        train(TrainArgs(**run_args(tiny_model, data, tmp_path / str(setting), steps=1, zero_copy=setting)), printed)
        rows[setting] = [line for line in printed.getvalue().splitlines() if line.strip().startswith("ring (")]
    assert rows[False] and all(" cpu " in r and "views" not in r for r in rows[False]), rows[False]
    assert rows[None] and all("views of the mmap" in r for r in rows[None]), rows[None]


def test_a_checkpoint_without_its_trainer_state_is_set_aside_not_overwritten(tiny_model, data, tmp_path):
    """A checkpoint-STEP folder that lost its trainer_state.json was left out of the listing without a word: --resume
    went on from an older one and the next save replaced the folder; a new run did not see it."""
    from test_nonfinite import args as run_args

    out = tmp_path / "out"
    train(TrainArgs(**run_args(tiny_model, data, out, steps=3, save_total_limit=0)))
    os.remove(out / "checkpoint-3" / "trainer_state.json")
    assert [s for s, _ in list_checkpoints(str(out))] == [1, 2, 3]
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train(TrainArgs(**run_args(tiny_model, data, out, steps=3)))
    printed = io.StringIO()
    train(TrainArgs(**run_args(tiny_model, data, out, steps=3, save_total_limit=0, resume=True)), printed)
    assert f"warning: {out / 'checkpoint-3'} cannot be read" in printed.getvalue()
    assert "trainer_state.json" in printed.getvalue() and (out / "damaged-checkpoint-3").is_dir()
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-1", "checkpoint-2", "checkpoint-3",
                                                                       "damaged-checkpoint-3"]


def test_a_trainer_state_that_is_not_json_is_named(tmp_path):
    path = _saved(tmp_path)
    with open(os.path.join(path, "trainer_state.json"), "w") as f:
        f.write('{"step": 3, "sampler": {"epo')
    opt, sched = _optimizer()
    with pytest.raises(CheckpointUnreadable, match=r"cannot be read \(trainer_state.json: Unterminated string"):
        load_checkpoint(path, types.SimpleNamespace(load_adapter=None), opt, sched, {"model": "/m"})


def test_the_same_data_at_another_path_resumes(tiny_model, data, tmp_path):
    """The data is known by its bytes: a copy (a moved project, a link) resumed with the message "other training
    data" over two equal hashes."""
    import shutil

    from test_nonfinite import args as run_args

    out = tmp_path / "out"
    train(TrainArgs(**run_args(tiny_model, data, out, steps=1)))
    moved = shutil.copy(data, tmp_path / "moved.jsonl")
    summary = train(TrainArgs(**run_args(tiny_model, moved, out, steps=2, resume=True)))
    assert summary["steps"] == 2 and not summary["interrupted"]


def test_another_batch_size_on_resume_names_the_flag(tiny_model, data, tmp_path):
    from test_nonfinite import args as run_args

    out = tmp_path / "out"
    train(TrainArgs(**run_args(tiny_model, data, out, steps=1)))
    with pytest.raises(CheckpointError, match=r"batch_size was 2 when saved but is 3 now.*\(--batch-size 2\)"):
        train(TrainArgs(**run_args(tiny_model, data, out, steps=2, batch_size=3, resume=True)))
    with pytest.raises(CheckpointError, match=r"seed was 0 when saved but is 5 now.*\(--seed 0\)"):
        train(TrainArgs(**run_args(tiny_model, data, out, steps=2, seed=5, resume=True)))


def test_progress_to_a_file_is_lines_not_carriage_returns(tiny_model, data, tmp_path):
    """Piped to a file, tqdm's redraws made one line of every update; a log to grep or `tail -f` needs lines."""
    from test_nonfinite import args as run_args

    printed = io.StringIO()
    train(TrainArgs(**run_args(tiny_model, data, tmp_path / "out", steps=3, save_steps=2, quiet=False)), printed)
    text = printed.getvalue()
    steps = [line for line in text.splitlines() if line.startswith("step ")]
    assert "\r" not in text
    # the first step, the checkpoint at 2 and the last; each with loss, rate, speed and memory
    assert [line.split()[1] for line in steps] == ["1/3", "2/3", "3/3"], steps
    assert all(" loss " in line and " lr " in line and " tok/s " in line and " mem " in line for line in steps)


def test_progress_shows_a_slow_rate_in_significant_digits():
    """A 7B step on the CPU runs ~4 tokens/s and a 70B's well under 1: whole numbers showed 4 or 0."""
    from lema.training import rate

    assert [rate(x) for x in (0.0432, 0.96, 4.414, 99.94, 213.4, 12345.4)] == \
        ["0.0432", "0.96", "4.41", "99.9", "213", "12345"]


def test_a_notebooks_output_gets_the_bar_a_file_gets_lines():
    """Jupyter's output stream is not a TTY but renders tqdm's redraws: a notebook got a line every 30 s."""
    from lema.training import redraws

    OutStream = type("OutStream", (io.TextIOBase,), {"__module__": "ipykernel.iostream"})  # Jupyter's class
    assert redraws(OutStream()) and not redraws(io.StringIO())


def test_a_run_stopped_by_sigterm_exits_143_naming_its_checkpoint(tiny_model, data, tmp_path, monkeypatch, capsys):
    import signal

    from lema.cli import main
    from lema.trainer import LemaTrainer
    from test_nonfinite import args as run_args, flags

    step = LemaTrainer.train_step

    def terminated(self, *a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        return step(self, *a, **kw)

    monkeypatch.setattr(LemaTrainer, "train_step", terminated)
    out = tmp_path / "out"
    assert main(["train", *flags(run_args(tiny_model, data, out, steps=4, save_steps=10))]) == 143
    said = capsys.readouterr()
    assert "SIGTERM received" in said.err
    assert f"stopped at step 1; checkpoint {out / 'checkpoint-1'} saved" in said.out


def test_a_second_ctrl_c_names_the_checkpoint_to_resume_from(tmp_path, capsys):
    import signal

    from lema.training import _Interrupt

    _saved(tmp_path, step=3)
    interrupt = _Interrupt(str(tmp_path))
    interrupt._handle(signal.SIGINT, None)
    assert interrupt.requested and interrupt.signum == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        interrupt._handle(signal.SIGINT, None)
    err = capsys.readouterr().err
    assert f"stopping now, without saving the step in flight; --resume goes on from {tmp_path / 'checkpoint-3'} " \
           "(step 3)" in err


def test_a_second_sigterm_stops_at_once_and_exits_143(tiny_model, data, tmp_path, monkeypatch, capsys):
    import signal

    from lema.cli import main
    from lema.trainer import LemaTrainer
    from test_nonfinite import args as run_args, flags

    step = LemaTrainer.train_step

    def terminated_twice(self, *a, **kw):  # a scheduler that sends SIGTERM again before the step ends
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        return step(self, *a, **kw)

    monkeypatch.setattr(LemaTrainer, "train_step", terminated_twice)
    out = tmp_path / "out"
    assert main(["train", *flags(run_args(tiny_model, data, out, steps=4, save_steps=10))]) == 143
    err = capsys.readouterr().err
    assert "stopping now, without saving the step in flight; no checkpoint was saved yet" in err
    assert not os.path.exists(out / "checkpoint-1")


def test_an_output_locked_by_another_run_is_refused_before_the_model_loads(tiny_model, data, tmp_path, monkeypatch):
    import fcntl

    from lema import training
    from test_nonfinite import args as run_args

    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(training, "load_hf_config", lambda *a: pytest.fail("the model was read first"))
    other = os.open(out, os.O_RDONLY)
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(ValueError, match="another `lema train` is writing to"):
            train(TrainArgs(**run_args(tiny_model, data, out, steps=1)))
    finally:
        os.close(other)
        unlock_output(str(out))


def test_the_log_gives_the_rate_each_step_ran_at(tiny_model, data, tmp_path):
    """It gave the rate of the step after (a 1-step cosine run logged 0 for a step run at the full rate)."""
    from test_nonfinite import args as run_args

    out = tmp_path / "out"
    train(TrainArgs(**run_args(tiny_model, data, out, steps=3, lr=1e-2, warmup_steps=1)))
    logged = [json.loads(line)["lr"] for line in open(out / "log.jsonl")]
    assert logged == pytest.approx([1e-2 * lr_lambda(s, 1, 3, "cosine") for s in range(3)]) and logged[0] > 0


def test_a_run_bigger_than_the_free_memory_is_refused_before_it_starts(tiny_model, data, tmp_path, monkeypatch):
    """Without --max-vram nothing bounded the run: past the RAM it started, then died in the allocator with a
    traceback (or by the kernel's OOM killer)."""
    from lema import planner
    from lema.planner import PlanError
    from test_nonfinite import args as run_args

    monkeypatch.setattr("lema.training.free_memory_bytes", lambda device: 1000)
    with pytest.raises(PlanError, match=r"of host memory at its peak .* but 1000 B is free now; .*--lora-rank 4"):
        train(TrainArgs(**run_args(tiny_model, data, tmp_path / "out", steps=1)))
    assert not (tmp_path / "out").exists()


def test_an_output_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path):
    """/proc (or a read-only mount): the run loaded its model and printed its plan, then failed on a bare [Errno]."""
    with pytest.raises(ValueError, match=r"--output '/proc/lema-out': cannot write in '/proc' \(.*\); choose a folder"):
        TrainArgs(**REQUIRED, output="/proc/lema-out")
    TrainArgs(**REQUIRED, output=str(tmp_path / "new" / "out"))  # a folder to be made under a writable one
    assert os.listdir(tmp_path) == []  # the probe left nothing


@pytest.mark.parametrize("text, message", [
    ("1: 2\nfoo: 3\n", r"unknown setting\(s\) \['1', 'foo'\]"),  # sorted() met an int and a str: TypeError
    (b"model: \xe9\n", r"is not valid YAML \('utf-8' codec"),
])
def test_a_config_file_with_odd_keys_or_bytes_is_named(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=message):
        args_from_namespace(build_parser().parse_args(["train", "--config", str(path)]))
    with pytest.raises(ValueError, match=r"--config '.*nope.yaml' cannot be read"):
        args_from_namespace(build_parser().parse_args(["train", "--config", str(tmp_path / "nope.yaml")]))


def test_eval_steps_without_eval_data_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"--eval-steps=5 needs --eval-data"):
        TrainArgs(**REQUIRED, output=str(tmp_path / "o"), eval_steps=5)


def test_a_warmup_as_long_as_the_run_is_said(tiny_model, data, tmp_path):
    """--warmup-steps 1000 --steps 2 trained at 2e-7 of a 1e-4 rate without a word."""
    from test_nonfinite import args as run_args

    printed = io.StringIO()
    train(TrainArgs(**run_args(tiny_model, data, tmp_path / "out", steps=2, lr=1e-2, warmup_steps=1000)), printed)
    assert "note: --warmup-steps 1000 is longer than the run's 2 steps: the rate rises to 2e-05 at most, never " \
           "to --lr 0.01" in printed.getvalue()


def test_kept_layers_never_take_a_run_past_the_free_memory(tiny_model, data, tmp_path, monkeypatch):
    """The reviewer's case: half the free memory was given to kept layers on top of the run's own peak, so a run
    whose peak was 0.75 of the free memory was refused (and would have kept layers past it). Kept layers now have
    what the run leaves of the free memory, at most half of it."""
    from lema import LemaConfig, planner

    config = LemaConfig(model_name_or_path=tiny_model, lora_rank=4, device="cpu")
    base = planner.plan_for_config(config, 2, 32, free_bytes=0).peak_bytes
    for share in (0.55, 0.75, 0.95):
        free = int(base / share)
        p = planner.plan_for_config(config, 2, 32, free_now=free)
        assert p.peak_bytes <= free, (share, p.peak_bytes, free)
    roomy = planner.plan_for_config(config, 2, 32, free_now=100 * base)
    assert roomy.kept_layers == 2  # with room, the layers keep their activations as before
    from test_nonfinite import args as run_args

    monkeypatch.setattr("lema.training.free_memory_bytes", lambda device: int(base / 0.75))
    summary = train(TrainArgs(**run_args(tiny_model, data, tmp_path / "out", steps=1)))
    assert summary["steps"] == 1


def test_an_existing_output_is_probed_itself_not_its_parent(tmp_path, monkeypatch):
    """A writable --output inside a folder the user cannot write (a bind mount, a resume) was refused."""
    out = tmp_path / "out"
    out.mkdir()
    probed = []
    monkeypatch.setattr("lema.training.check_writable", lambda folder, what: probed.append(folder))
    TrainArgs(**REQUIRED, output=str(out))
    TrainArgs(**REQUIRED, output=str(tmp_path / "new" / "deeper"))
    assert probed == [str(out), str(tmp_path)]


def test_a_failed_start_lets_go_of_the_output_folder(tiny_model, data, tmp_path):
    """The early lock stayed after a refusal (here a resume with another batch size): a terminal's `lema train
    --resume` was then refused as "another run" until the notebook that failed was restarted."""
    import fcntl

    from test_nonfinite import args as run_args

    out = tmp_path / "out"
    train(TrainArgs(**run_args(tiny_model, data, out, steps=1)))
    with pytest.raises(CheckpointError):
        train(TrainArgs(**run_args(tiny_model, data, out, steps=2, batch_size=3, resume=True)))
    other = os.open(out, os.O_RDONLY)  # as another process would
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(other)


def test_a_warmup_exactly_as_long_as_the_run_reaches_the_rate(tiny_model, data, tmp_path):
    from test_nonfinite import args as run_args

    printed = io.StringIO()
    train(TrainArgs(**run_args(tiny_model, data, tmp_path / "out", steps=2, warmup_steps=2)), printed)
    assert "--warmup-steps" not in printed.getvalue()


def test_pruning_counts_and_names_complete_checkpoints_only(tmp_path):
    """A checkpoint folder without its trainer_state.json (listed for --resume to set aside) is not the newest one
    pruning keeps, nor one it deletes."""
    for step in (1, 2, 3):
        _saved(tmp_path, step=step)
    os.remove(tmp_path / "checkpoint-3" / "trainer_state.json")
    prune_checkpoints(str(tmp_path), 1)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-3"]
    assert [s for s, _ in list_checkpoints(str(tmp_path), complete=True)] == [2]


def test_a_failed_start_leaves_another_runs_lock_alone(tiny_model, data, tmp_path):
    """A run of this process holds the folder; a second one that fails before locking (bad data) let go of the
    first one's lock on its way out, so a third process could write into the live run's folder."""
    import fcntl

    from test_nonfinite import args as run_args

    out = tmp_path / "out"
    out.mkdir()
    lock_output(str(out))  # the live run
    try:
        with pytest.raises(ValueError):
            train(TrainArgs(**run_args(tiny_model, str(tmp_path / "missing.jsonl"), out, steps=1)))
        other = os.open(out, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
        with pytest.raises(ValueError, match="in this process is writing"):
            train(TrainArgs(**run_args(tiny_model, data, out, steps=1)))
    finally:
        unlock_output(str(out))


@pytest.mark.parametrize("batch_size, padded", [(2, True), (1, False)])
def test_the_plan_of_rows_of_different_lengths_is_padded(batch_size, padded, tiny_model, data, tmp_path,
                                                         monkeypatch):
    """Rows of different lengths in a batch of several are right-padded, so attention takes a mask and each layer
    keeps more (planner.plan's `padded`): the plan `lema train` prints is made so; one row a batch has no padding."""
    from lema import training
    from test_nonfinite import args as run_args

    asked = []
    plan_for_config = training.plan_for_config
    monkeypatch.setattr(training, "plan_for_config", lambda *a, **kw: asked.append(kw["padded"]) or
                        plan_for_config(*a, **kw))
    train(TrainArgs(**run_args(tiny_model, data, tmp_path / "out", steps=1, batch_size=batch_size)))
    assert asked == [padded]


def test_the_free_memory_check_and_the_plan_read_the_memory_once(tiny_model, data, tmp_path, monkeypatch):
    """The plan filled its room with kept layers to within a layer of the free memory it read; the check read it
    again and refused the run on any drop between the two readings. Kept layers are decided again at run time."""
    from lema import LemaConfig, planner
    from test_nonfinite import args as run_args

    config = LemaConfig(model_name_or_path=tiny_model, lora_rank=4, device="cpu")
    base = planner.plan_for_config(config, 2, 32, free_bytes=0).peak_bytes
    readings = iter([int(base * 1.2)] + [int(base * 1.01)] * 100)  # the first for train, then less
    monkeypatch.setattr("lema.training.free_memory_bytes", lambda device: next(readings))
    monkeypatch.setattr(planner, "free_memory_bytes", lambda device: next(readings))
    assert train(TrainArgs(**run_args(tiny_model, data, tmp_path / "out", steps=1)))["steps"] == 1
