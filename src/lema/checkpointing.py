"""Training checkpoints that are never lost: written to a temporary folder, then renamed.

Layout of `OUT/checkpoint-STEP/`:
    adapter/                 PEFT adapter (adapter_model.safetensors + adapter_config.json)
    optimizer.pt             optimizer state_dict
    scheduler.pt             LR scheduler state_dict
    rng.pt                   torch CPU (+ CUDA) RNG states and Python's
    trainer_state.json       step, data position (sampler state), and what the run was made for
                             (model, LoRA rank/alpha/targets), checked on resume

A folder named `checkpoint-STEP` exists only once complete: `os.replace` of a finished
temporary folder is atomic, so a run killed at any moment (SIGKILL included) leaves either the
previous checkpoints or the new one, never half of one. Temporary folders left by a killed run
start with `.tmp-` and are ignored (and cleaned up by the next save).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from typing import Optional

import torch

_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed here; the message says why and what to do."""


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in `out_dir`, oldest first, as (step, path)."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in os.listdir(out_dir):
        m = _NAME.match(name)
        path = os.path.join(out_dir, name)
        if m and os.path.isfile(os.path.join(path, "trainer_state.json")):
            found.append((int(m.group(1)), path))
    return sorted(found)


def save_checkpoint(out_dir: str, step: int, model, optimizer, scheduler, sampler_state: dict,
                    run_identity: dict, total_limit: Optional[int]) -> str:
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):  # leftovers of a run killed mid-save
        if name.startswith(".tmp-checkpoint-"):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-checkpoint-{step}-", dir=out_dir)
    model.peft_model.save_pretrained(os.path.join(tmp, "adapter"))
    torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, os.path.join(tmp, "rng.pt"))
    state = {"step": step, "sampler": sampler_state, "run": run_identity}
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:  # written last: marks completeness
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    final = os.path.join(out_dir, f"checkpoint-{step}")
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    if total_limit is not None and total_limit > 0:
        for _, old in list_checkpoints(out_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str, model, optimizer, scheduler, run_identity: dict) -> dict:
    """Restore everything saved by `save_checkpoint`; refuse a checkpoint of another run shape."""
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    saved = state.get("run", {})
    for key in ("model", "lora_rank", "lora_alpha", "lora_target_modules"):
        if saved.get(key) != run_identity.get(key):
            raise CheckpointError(f"checkpoint {path!r} was made with {key}={saved.get(key)!r} but this run has "
                                  f"{key}={run_identity.get(key)!r}; resume with the same settings or use "
                                  "a new --output")
    model.load_adapter(os.path.join(path, "adapter"))
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=False))
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=False))
    rng = torch.load(os.path.join(path, "rng.pt"), weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state
