"""Folders written so that a kill or a power cut leaves the old one or the new one, never half of either."""

from __future__ import annotations

import os
import shutil
import tempfile


def default_cache() -> str:
    """LEMA's cache folder: $LEMA_CACHE_DIR or ~/.cache/lema (bench shapes, the compiled CPU allocator)."""
    return os.environ.get("LEMA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lema")


def existing_ancestor(path: str) -> str:
    """`path` itself if it exists, else its nearest parent that does (what a run would create its folders in)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_writable(folder: str, what: str) -> None:
    """A file can be made in `folder` (an existing folder), tried with one: a read-only mount, a folder of another
    user or /proc are named before a run loads its model, not when its first write fails."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".lema-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{what}: cannot write in {folder!r} ({e.strerror or e}); choose a folder you can "
                         "write to") from None


def fsync_path(path: str) -> None:
    """A file's or a folder's (its entries') written state to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str) -> None:
    """Every file under `folder`, then the folders themselves, to the disk."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def make_temp_folder(parent: str, prefix: str) -> str:
    """A new folder in `parent` with the permissions of any other (mkdtemp makes it private)."""
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)
    return tmp


def replace_folder(tmp: str, final: str) -> None:
    """Put the finished folder `tmp` (fsynced here) at `final`. An existing `final` is first renamed aside
    and deleted only after the new one is in place, so at every moment one complete folder is there."""
    fsync_tree(tmp)
    parent = os.path.dirname(os.path.abspath(final))
    old = None
    if os.path.isdir(final):
        old = tempfile.mkdtemp(prefix=".tmp-old-", dir=parent)
        try:
            os.replace(final, os.path.join(old, "folder"))
        except OSError:  # a mount point, say: nothing moved; leave no empty folder behind
            os.rmdir(old)
            raise
    os.replace(tmp, final)
    fsync_path(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
