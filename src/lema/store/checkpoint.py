"""A Transformers checkpoint folder opened for streaming: config, and every weight as a mmap view.

Accepts `model.safetensors`, sharded `model-0000x-of-0000y.safetensors` with their index, or a
layer-packed file written by `lema convert` (named by `gbi_path`, or the folder's own
`model.safetensors` when its metadata says it is packed). Legacy `pytorch_model*.bin` folders are
not streamed (pickles cannot be memory-mapped safely); `lema convert` turns them into safetensors.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Optional

import torch

from .safetensors_file import SafetensorsFile, TensorEntry, WeightsFileError

PACKED_FORMAT = "lema-packed-v1"
"""Value of the `lema.format` metadata key in a layer-packed file."""


class WeightStore:
    """Every tensor of a checkpoint by key, as zero-copy CPU views, plus its byte ranges.

    `units` is filled from the packed file's metadata: unit name -> (file, start, end), the one
    contiguous byte range holding that unit's tensors, so a unit moves with one read.
    """

    def __init__(self, folder: str, gbi_path: Optional[str] = None, private: bool = False):
        self.folder = folder
        self.files: list[SafetensorsFile] = []
        self.where: dict[str, tuple[SafetensorsFile, TensorEntry]] = {}
        self.units: dict[str, tuple[SafetensorsFile, int, int]] = {}
        for path in weight_files(folder, gbi_path):
            f = SafetensorsFile(path, private)  # copy-on-write views (SafetensorsFile)
            self.files.append(f)
            for key, entry in f.entries.items():
                self.where[key] = (f, entry)
            if f.metadata.get("lema.format") == PACKED_FORMAT:
                for unit, (start, end) in json.loads(f.metadata["lema.units"]).items():
                    self.units[unit] = (f, int(start), int(end))

    def keys(self) -> list[str]:
        return list(self.where)

    def entry(self, key: str) -> TensorEntry:
        return self.where[key][1]

    def view(self, key: str) -> torch.Tensor:
        f, _ = self.where[key]
        return f.view(key)

    def file_of(self, key: str) -> SafetensorsFile:
        return self.where[key][0]

    def close(self) -> None:
        for f in self.files:
            f.close()


def weight_files(folder: str, gbi_path: Optional[str] = None) -> list[str]:
    """The weight files of a checkpoint folder (or `gbi_path`), as WeightStore opens them; WeightsFileError if none."""
    if gbi_path is not None:
        if not os.path.isfile(gbi_path):
            raise WeightsFileError(f"gbi_path={gbi_path!r} does not exist; write it with "
                                   "`lema convert SRC OUT` (it is OUT/model.safetensors) or pass gbi_path=None")
        return [gbi_path]
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise WeightsFileError(f"{index!r} is not a valid safetensors index ({e})") from None
        paths = sorted({os.path.join(folder, name) for name in weight_map.values()})
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise WeightsFileError(f"{index!r} names shard(s) that are missing: {missing}; "
                                   "download the whole checkpoint again")
        return paths
    shards = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if shards:
        return shards
    if glob.glob(os.path.join(folder, "pytorch_model*.bin")) or glob.glob(os.path.join(folder, "*.gguf")):
        raise WeightsFileError(f"{folder!r} holds .bin or .gguf weights, which cannot be streamed; "
                               f"convert them first: `lema convert {folder} OUT`")
    raise WeightsFileError(f"no weights in {folder!r}: expected model.safetensors or sharded "
                           "*.safetensors with model.safetensors.index.json")


FINGERPRINT = "tensors-v1"  # the scheme, in the fingerprint: checkpoints compare fingerprints of one scheme only
SAMPLE = 64  # bytes read at the start, middle and end of each tensor


def weights_fingerprint(store: WeightStore) -> str:
    """A digest that tells one model's weights from another's without reading them all: each weight file's name and
    size, every tensor's name, dtype, shape and place (the headers WeightStore parsed), and SAMPLE bytes at the
    start, middle and end of every tensor's data. Fine-tuning, or merging an adapter into some projections only,
    changes every element of the tensors it touches, so every changed tensor changes the digest. A copy elsewhere
    has the same fingerprint."""
    digest = hashlib.sha256()
    sample = torch.empty(SAMPLE, dtype=torch.uint8)
    for f in store.files:
        digest.update(f"{os.path.basename(f.path)}:{os.path.getsize(f.path)}:".encode())
        for key in sorted(f.entries):
            e = f.entries[key]
            digest.update(f"{key}:{e.dtype}:{tuple(e.shape)}:{e.start}:{e.end};".encode())
            for at in sorted({e.start, e.start + e.nbytes // 2, max(e.start, e.end - SAMPLE)}) if e.nbytes else ():
                n = min(SAMPLE, e.end - at)
                f.read_into(at, at + n, sample[:n])
                digest.update(sample[:n].numpy().tobytes())
    return f"{FINGERPRINT}:{digest.hexdigest()}"


def weights_bytes(folder: str) -> Optional[int]:
    """Bytes of a checkpoint folder's weight files (sizes only, nothing read); None where it has none."""
    try:
        return sum(os.path.getsize(p) for p in weight_files(folder))
    except (WeightsFileError, OSError):
        return None
