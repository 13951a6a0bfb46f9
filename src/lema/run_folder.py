"""A run's output folder: a lock against a second run writing to it, and its log.jsonl kept in step with the
checkpoints (the checkpoints themselves: checkpointing.py)."""

from __future__ import annotations

import json
import os

from .cli_errors import reason

_LOCKS: dict = {}  # output folder -> the descriptor holding its lock, in this process


def lock_output(folder: str) -> None:
    """An exclusive lock on the output folder (flock: let go when the process ends, however it ends); a second
    run writing to the same folder, which would prune and overwrite the first one's checkpoints, is refused,
    in another process or in this one (`lema.training.train` lets go of its lock however it ends)."""
    import fcntl

    key = os.path.realpath(folder)
    if key in _LOCKS:
        raise ValueError(f"another `lema train` in this process is writing to {folder!r}; wait for it to end or "
                         "choose another --output")
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"another `lema train` is writing to {folder!r}; wait for it to end or choose another "
                         "--output") from None
    _LOCKS[key] = fd


def unlock_output(folder: str) -> None:
    fd = _LOCKS.pop(os.path.realpath(folder), None)
    if fd is not None:
        os.close(fd)


def truncate_log(path: str, step: int) -> None:
    """Drop log records of steps after `step` (a resumed run writes them again)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) > step:
                continue
        except (json.JSONDecodeError, AttributeError):  # a line cut by a kill: dropped too
            continue
        kept.append(line)
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        try:
            with open(tmp, "w") as f:
                f.writelines(kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise OSError(f"could not rewrite {path!r} without the steps after {step} ({reason(e)}); "
                          "free disk space and run the same command again") from None
