"""Training checkpoints that are never lost: written to a temporary folder, then renamed.

Layout of `OUT/checkpoint-STEP/`:
    adapter/                 PEFT adapter (adapter_model.safetensors + adapter_config.json)
    optimizer.pt             optimizer state_dict
    scheduler.pt             LR scheduler state_dict
    rng.pt                   torch CPU (+ CUDA) RNG states and Python's
    trainer_state.json       step, data position (sampler state), what the run was made for
                             (model and a fingerprint of its weights, LoRA rank/alpha/targets, the
                             data file's sha256, seq_len, grad_accum), checked on resume
                             (check_run_identity), the settings a resumed run may change (named when it
                             does), the sha256 of every other file, and its own

A folder named `checkpoint-STEP` exists only once complete: `os.replace` of a finished
temporary folder is atomic, so a run killed at any moment (SIGKILL included) leaves either the
previous checkpoints or the new one, never half of one. Every file and the folders are fsynced
before the rename and before older checkpoints are pruned, so a power cut does not leave a
"complete" checkpoint with empty files either. Temporary folders left by a killed run start with
`.tmp-` and are ignored (and cleaned up by the next save); a save that fails (a full disk) removes
its own and names the checkpoint still intact. A `checkpoint-STEP` folder that later lost its
trainer_state.json is still listed: found damaged on resume, refused by a new run, never overwritten.

A checkpoint that cannot be read on resume (a disk error, a file cut short, damaged or edited by hand:
each file is checked against the sha256 recorded when it was written, so a flipped bit in a tensor is
found too, not trained on) is not the end of the run: `newest_readable` reads the checkpoints newest first, and
`set_aside` renames the damaged ones to `damaged-checkpoint-STEP` (kept for inspection, out of the
rotation: a later save's pruning would otherwise keep a damaged newest folder and delete good
ones). Every file of a checkpoint is read before any of it is applied, so a damaged one leaves
the model and optimizer as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
from typing import Optional

import torch
from safetensors import SafetensorError

from .adapter_files import AdapterFileError
from .cli_errors import reason
from .fsutil import make_temp_folder, replace_folder

_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed here; the message says why and what to do."""


class CheckpointUnreadable(CheckpointError):
    """A checkpoint whose files cannot be read (damaged or cut short): an older one may still resume the run."""

    def __init__(self, message: str, path: str, why: str):
        super().__init__(message)
        self.path, self.why = path, why


def list_checkpoints(out_dir: str, complete: bool = False) -> list[tuple[int, str]]:
    """The checkpoint folders in `out_dir`, oldest first, as (step, path). `save_checkpoint` names a folder so
    only once complete; one without its trainer_state.json since (a file deleted, a disk error) is listed too:
    --resume then finds it damaged and sets it aside, a new run refuses the folder, and nothing overwrites it.
    `complete`: only those with their trainer_state.json (to prune, or to name as the one to go on from)."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in os.listdir(out_dir):
        m = _NAME.match(name)
        path = os.path.join(out_dir, name)
        if m and os.path.isdir(path) and (not complete or os.path.isfile(os.path.join(path, "trainer_state.json"))):
            found.append((int(m.group(1)), path))
    return sorted(found)


def save_checkpoint(out_dir: str, step: int, model, optimizer, scheduler, sampler_state: dict,
                    run_identity: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):  # leftovers of a run killed mid-save
        if name.startswith(".tmp-"):  # a checkpoint's, or an old one set aside by replace_folder
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    tmp = make_temp_folder(out_dir, f".tmp-checkpoint-{step}-")
    try:
        model.peft_model.save_pretrained(os.path.join(tmp, "adapter"))
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, os.path.join(tmp, "rng.pt"))
        state = {"step": step, "sampler": sampler_state, "run": run_identity, "files": _file_digests(tmp)}
        state["sha256"] = _state_digest(state)
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:  # written last: marks completeness
            json.dump(state, f, indent=1)
        final = os.path.join(out_dir, f"checkpoint-{step}")
        replace_folder(tmp, final)  # fsynced, then renamed: on the disk before any older checkpoint goes
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: as they were
            raise
        intact = list_checkpoints(out_dir, complete=True)
        raise CheckpointError(f"could not write checkpoint-{step} in {out_dir!r} ({reason(e)}); "
                              + (f"{intact[-1][1]} is intact" if intact else "no earlier checkpoint exists")
                              + ": free disk space and continue with --resume") from None
    return final


def prune_checkpoints(out_dir: str, total_limit: Optional[int]) -> None:
    """Delete all but the newest `total_limit` checkpoints (None or 0: keep all). `lema train` calls it once the
    step after a save has been applied, not at the save: a run that diverges at that step (its weights collapsed)
    still has the older checkpoint to go back to."""
    if total_limit is None or total_limit <= 0:
        return
    for _, old in list_checkpoints(out_dir, complete=True)[:-total_limit]:  # a damaged one counts for none
        # renamed out of the listing first: a kill mid-delete leaves a `.tmp-` folder the next save removes,
        # not a `checkpoint-STEP` without its trainer_state.json (set aside as damaged by the next resume)
        doomed = make_temp_folder(out_dir, ".tmp-pruned-")
        os.replace(old, os.path.join(doomed, "folder"))
        shutil.rmtree(doomed, ignore_errors=True)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_digests(folder: str) -> dict[str, str]:
    """sha256 of every file under `folder`, by path relative to it ('/'-separated)."""
    digests = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            digests[os.path.relpath(path, folder).replace(os.sep, "/")] = _sha256(path)
    return dict(sorted(digests.items()))


def _state_digest(state: dict) -> str:
    """sha256 of trainer_state.json's content but its own digest (canonical JSON: sorted keys)."""
    body = {k: v for k, v in state.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def verify_files(path: str, state: dict) -> None:
    """Check a checkpoint's trainer_state.json against its own sha256 and every file it lists against theirs
    (checkpoints written before 2026-11-27 have no digests: nothing to check). Raises ValueError naming the
    first file that differs."""
    if "sha256" in state and _state_digest(state) != state["sha256"]:
        raise ValueError("trainer_state.json does not match its sha256: it was damaged or edited")
    for rel, digest in (state.get("files") or {}).items():
        file = os.path.join(path, *rel.split("/"))
        if not os.path.isfile(file):
            raise ValueError(f"{rel} is missing")
        if _sha256(file) != digest:
            raise ValueError(f"{rel} does not match the sha256 recorded when it was written: it was damaged "
                             "or edited")


def _unreadable(path: str, e: Exception) -> CheckpointUnreadable:
    """A damaged or partly written checkpoint, named, with the older one to resume from."""
    older = [p for _, p in list_checkpoints(os.path.dirname(path) or ".", complete=True) if p != path]
    return CheckpointUnreadable(f"checkpoint {path!r} cannot be read ({reason(e)}); "
                                + (f"move it away to resume from {older[-1]!r}" if older else
                                   "no older checkpoint exists: start a new run"), path, reason(e))


RUN_SHAPE = ("model", "lora_rank", "lora_alpha", "lora_target_modules")  # in every checkpoint
RUN_DATA = ("data", "seq_len", "grad_accum")  # since 2026-11-26: checked where the checkpoint has them
# a resumed run may change these (each takes effect from the checkpoint's step on); `changed_settings` names them
RUN_SETTINGS = ("lr", "weight_decay", "max_grad_norm", "lora_dropout", "dtype", "schedule", "warmup_steps",
                "total_steps")
SETTING_FLAGS = {"lr": "--lr", "weight_decay": "--weight-decay", "max_grad_norm": "--max-grad-norm",
                 "lora_dropout": "--lora-dropout", "dtype": "--dtype", "schedule": "--schedule",
                 "warmup_steps": "--warmup-steps", "total_steps": "--steps (the run's total)"}


def check_run_identity(path: str, saved: dict, run_identity: dict) -> None:
    """Refuse to resume checkpoint `path` (made by a run of identity `saved`) with other settings: another model
    or adapter shape cannot load it, and other data, sequence length or accumulation would make the remaining
    steps differ from the run it continues (its sampler position counts that run's batches)."""
    for key in RUN_SHAPE + tuple(k for k in RUN_DATA if k in saved):
        was, now = saved.get(key), run_identity.get(key)
        if key == "model" and _same_scheme(saved.get("model_weights"), run_identity.get("model_weights")):
            # since 2026-11-27 the weights themselves: the same model copied elsewhere resumes, other weights
            # in the same folder do not
            if saved["model_weights"] == run_identity["model_weights"]:
                continue
            raise CheckpointError(f"checkpoint {path!r} was made with other model weights than those in {now!r} "
                                  f"(the run's model was {was!r}; its weights' fingerprint "
                                  f"{saved['model_weights'].split(':')[-1][:12]}..., these "
                                  f"{run_identity['model_weights'].split(':')[-1][:12]}...);"
                                  " resume with that model, or use a new --output")
        if was == now or (key == "data" and isinstance(was, dict) and isinstance(now, dict)
                          and was.get("sha256") == now.get("sha256")):  # the same bytes, moved or linked: the same data
            continue
        if key == "data":
            raise CheckpointError(f"checkpoint {path!r} was made with other training data: {now['file']!r} has "
                                  f"sha256 {now['sha256'][:12]}..., the run's {was['file']!r} had "
                                  f"{was['sha256'][:12]}...; resume with that data, or use a new --output")
        flag = {"model": "--model", "lora_rank": "--lora-rank", "lora_alpha": "--lora-alpha",
                "lora_target_modules": "--target-modules", "seq_len": "--seq-len", "grad_accum": "--grad-accum"}[key]
        value = " ".join(map(str, was)) if isinstance(was, list) else was
        raise CheckpointError(f"checkpoint {path!r} was made with {key}={was!r} but this run has {key}={now!r}; "
                              f"resume with the same settings ({flag} {value}) or use a new --output")


def _same_scheme(a, b) -> bool:
    """Two weights fingerprints made the same way ("scheme:digest"), so comparable."""
    return isinstance(a, str) and isinstance(b, str) and ":" in a and a.split(":", 1)[0] == b.split(":", 1)[0]


def changed_settings(saved: dict, run_identity: dict) -> list[str]:
    """The RUN_SETTINGS this run changes from the checkpoint's, as "name was -> now" (checkpoints written before
    2026-11-27 record none)."""
    was, now = saved.get("settings") or {}, run_identity.get("settings") or {}
    return [f"{SETTING_FLAGS[k]} {was[k]} -> {now[k]}" for k in RUN_SETTINGS
            if k in was and k in now and was[k] != now[k]]


def data_identity(path: str) -> dict:
    """What a checkpoint records of its training data: the file and a hash of its bytes."""
    return {"file": os.path.abspath(path), "sha256": _sha256(path)}


_READ_ERRORS = (OSError, RuntimeError, EOFError, KeyError, TypeError, pickle.UnpicklingError, SafetensorError,
                AdapterFileError)  # the last: a damaged adapter_config.json (found here where there are no digests)


def load_checkpoint(path: str, model, optimizer, scheduler, run_identity: dict) -> dict:
    """Restore everything saved by `save_checkpoint`; refuse a checkpoint of another run shape. Every file is
    read before anything is applied: a checkpoint that cannot be read (`CheckpointUnreadable`) changes nothing."""
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            try:
                state = json.load(f)
            except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError: say which file
                raise ValueError(f"trainer_state.json: {e}") from None
        if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not (
                isinstance(state.get("sampler"), dict)
                and all(isinstance(state["sampler"].get(k), int) for k in ("epoch", "position"))):
            raise ValueError("trainer_state.json lacks the step or the data position")
        verify_files(path, state)
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise _unreadable(path, e) from None
    check_run_identity(path, state.get("run", {}), run_identity)
    try:
        # map_location: a checkpoint written on a GPU resumes on the CPU too (load_state_dict moves the state)
        optimizer_state = torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True)
        scheduler_state = torch.load(os.path.join(path, "scheduler.pt"), weights_only=False)
        rng = torch.load(os.path.join(path, "rng.pt"), map_location="cpu", weights_only=False)
        if not isinstance(rng, dict) or not {"torch", "python"} <= rng.keys():
            raise KeyError("rng.pt lacks the torch or Python RNG state")
        model.load_adapter(os.path.join(path, "adapter"))  # reads and checks every tensor, then sets them
    except _READ_ERRORS as e:
        raise _unreadable(path, e) from None
    optimizer.load_state_dict(optimizer_state)  # checked against the optimizer's groups; a mismatch is not damage
    scheduler.load_state_dict(scheduler_state)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def newest_readable(checkpoints: list[tuple[int, str]], load) -> tuple[str, dict, list[tuple[str, str]]]:
    """Resume from the newest checkpoint that `load(path) -> state` can read: returns its path, its state and
    the newer ones that could not be read, as (path, reason). Any other refusal (a run of other settings) is
    raised as it is; where none can be read, the error names each."""
    damaged = []
    for _, path in reversed(checkpoints):
        try:
            return path, load(path), damaged
        except CheckpointUnreadable as e:
            damaged.append((path, e.why))
    raise CheckpointError("no checkpoint can be read: " + "; ".join(f"{p!r} ({why})" for p, why in damaged)
                          + "; start a new run with another --output (these folders are left as they are)")


def set_aside(path: str, why: str = "damaged") -> str:
    """Rename a damaged checkpoint `checkpoint-STEP` to `damaged-checkpoint-STEP` (or `...-2`, ...; `why` names
    another reason, e.g. `collapsed-checkpoint-STEP`): kept for inspection, no longer listed, resumed or pruned."""
    folder, name = os.path.split(path)
    target, n = os.path.join(folder, f"{why}-{name}"), 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(folder, f"{why}-{name}-{n}")
    os.rename(path, target)
    return target
