"""`lema convert`: a Transformers checkpoint or a GGUF file -> one layer-packed `model.safetensors`.

The output file is plain safetensors, so Transformers loads the folder as it is:

  u64 header_len | JSON header, padded | embed | layer.0 | layer.1 | … | layer.{L-1} | head
                   with spaces so the    one contiguous byte range per streaming unit, in step
                   data section starts   order, tensors back to back (safetensors forbids holes
                   at a multiple of 4096 between tensors, so units are not padded)

- Persistent buffers the source holds (DeepSeek-V3's router biases) are written too, in no unit: those at
  least as wide as the dtype before `embed`, narrower ones after `head` (plan_tensors), so that every tensor
  stays aligned to its dtype; LemaModel loads them once.
- Tensors carry the MODEL's parameter names, as `store.keymap.map_checkpoint` gives them (so
  Mixtral's per-expert legacy tensors come out fused, as Transformers 5 models hold them), in the
  chosen dtype. A tied lm_head is written once, as the embedding.
- `__metadata__` holds `lema.format` = PACKED_FORMAT and `lema.units` = JSON {unit: [start, end]}
  with ABSOLUTE file byte offsets (8 + header_len + data offset), which `WeightStore` reads. Padding
  the JSON header with spaces (the format allows it) puts the data section on a 4096-byte boundary,
  so every unit starts page-aligned relative to the section and tensor views stay dtype-aligned.

Memory: the header is computed from the meta model's shapes before any weight is read; then each
tensor is read through a WeightStore mmap view, cast if the dtype changes, and written, one at a
time, and the source pages are unmapped after each unit. Peak memory is about the largest tensor
(or fused group) plus a constant, whatever the model size.

Safety: everything is written into `OUT.tmp-XXXX` beside OUT and renamed onto OUT at the end; on
any error the temporary folder is removed, so a failed or killed conversion never leaves a
complete-looking OUT.

Sources: `model.safetensors`, sharded safetensors (+ index), legacy `pytorch_model*.bin` (each shard
`torch.load`-ed with mmap=True), or a `.gguf` file, dequantised tensor by tensor into a staging
folder inside the temporary folder by Transformers' own GGUF tensor processors (which undo
llama.cpp's q/k permutation; gguf_source.py), then converted like a sharded safetensors checkpoint.
"""

from __future__ import annotations

import glob
import json
import mmap
import os
import shutil
import struct
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch

from .config import parse_dtype
from .fsutil import check_writable, existing_ancestor, make_temp_folder, replace_folder
from .store import PACKED_FORMAT, WeightStore
from .store.safetensors_file import DTYPE_NAMES
from .stream.layout import Placement

if TYPE_CHECKING:
    from .engine.skeleton import UnitMap

ALIGN = 4096          # the data section starts on a page boundary
MARGIN = 16 * 2**20   # bytes of headroom asked for beyond the weights (config, tokenizer, header)
SIDECAR_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                 "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                 "generation_config.json")
"""Files copied verbatim from a source folder: the tokenizer with its chat template, generation settings."""


class ConvertError(ValueError):
    """A source that cannot be converted, or an output that cannot be written; the message says why and what to do."""


@dataclass(frozen=True)
class Wording:
    """How the messages and the progress bar name things: `lema convert`'s by default, `lema merge`'s flags there."""

    src: str = "SRC"
    out: str = "OUT"
    overwrite: str = "--overwrite (overwrite=True)"
    verb: str = "convert"         # the progress bar: "convert NAME"
    result: str = "conversion"    # "write the conversion to a separate folder"


def free_bytes(path: str) -> int:
    """Free bytes on the filesystem holding `path` (a function so tests can pretend the disk is full)."""
    return shutil.disk_usage(path).free


# ----- sources ------------------------------------------------------------------------------------
@dataclass
class Source:
    """Where the weights come from: a checkpoint folder, or one GGUF file inside `folder`."""

    folder: str
    kind: str                          # "safetensors" | "bin" | "gguf"
    gguf_file: Optional[str] = None    # the GGUF file name inside `folder`

    @property
    def name(self) -> str:
        return self.gguf_file or os.path.basename(os.path.normpath(self.folder))


def resolve_source(src: str, words: Wording = Wording()) -> Source:
    """Classify SRC, refusing anything that is not a model with a message naming what is missing."""
    if not os.path.exists(src):
        raise FileNotFoundError(f"{words.src} {src!r} does not exist; give a Transformers checkpoint folder or a "
                                ".gguf file")
    if os.path.isfile(src):
        if not src.endswith(".gguf"):
            raise ConvertError(f"{words.src} {src!r} is a file but not a .gguf; give a .gguf file or a checkpoint "
                               "folder (config.json + *.safetensors or pytorch_model*.bin)")
        return Source(os.path.dirname(os.path.abspath(src)), "gguf", os.path.basename(src))
    has_config = os.path.isfile(os.path.join(src, "config.json"))
    ggufs = sorted(glob.glob(os.path.join(src, "*.gguf")))
    if not has_config and len(ggufs) == 1:
        return Source(src, "gguf", os.path.basename(ggufs[0]))
    if not has_config:
        raise ConvertError(f"{words.src} {src!r} has no config.json, so it is not a Transformers checkpoint folder"
                           + (f"; it holds several .gguf files {[os.path.basename(g) for g in ggufs]}: name one"
                              if ggufs else "; give a checkpoint folder or a .gguf file"))
    if glob.glob(os.path.join(src, "*.safetensors")):
        return Source(src, "safetensors")
    if glob.glob(os.path.join(src, "pytorch_model*.bin")):
        return Source(src, "bin")
    raise ConvertError(f"{words.src} {src!r} has a config.json but no weights (no *.safetensors, no "
                       "pytorch_model*.bin); download the weight files too")


class BinStore:
    """Legacy `pytorch_model*.bin` shards behind WeightStore's `keys()`/`view()`; tensors are mmap-backed."""

    def __init__(self, folder: str):
        self.files: list = []
        self.tensors: dict[str, torch.Tensor] = {}
        for path in sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin"))):
            try:
                state = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
            except Exception as e:  # pickle, zip and torch errors all mean the same thing to the user
                raise ConvertError(f"{path!r} cannot be read as a PyTorch state dict ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''}); it is truncated or not "
                                   "a checkpoint, download it again") from None
            self.tensors.update({k: v for k, v in state.items() if torch.is_tensor(v)})

    def keys(self) -> list[str]:
        return list(self.tensors)

    def view(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def close(self) -> None:
        self.tensors.clear()


# ----- the packed file ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Planned(Placement):
    """One tensor of the output file: a Placement whose offset is relative to the data section."""

    unit: str = ""


def plan_tensors(units: dict[str, list[str]], model, dtype: torch.dtype, buffers: tuple[str, ...] = ()
                 ) -> tuple[list[Planned], dict[str, tuple[int, int]]]:
    """Every unit's tensors back to back in step order, floating ones in `dtype`, or in float32 where
    from_pretrained keeps them so (Ernie 4.5's router weight; keymap.held_dtype), each unit's widest first (so
    that they stay aligned: a unit's other tensors are whole multiples of their itemsize; where a unit ends off
    float32's alignment the next unit is filled tensor by tensor, UnitLayout.build); returns the
    tensors and each unit's range relative to the data section. `buffers`: the
    model's persistent buffers the source holds (DeepSeek-V3's router correction biases), in the dtype the model
    holds them (float32 where from_pretrained keeps them so), in no unit (LemaModel loads them once): those at
    least as wide as `dtype` before the first unit, the narrower ones after the last, each group widest first, so
    that every tensor starts aligned to its dtype
    (safetensors allows no padding)."""
    from .store.keymap import held_dtype

    params = dict(model.named_parameters())
    held_as = held_dtype(model, dtype)  # as from_pretrained holds them (DeepSeek-V3's router bias in float32)
    held = dict(model.named_buffers())
    kind = {n: held_as(n) for n in buffers}
    order = sorted(buffers, key=lambda n: -kind[n].itemsize)
    planned, ranges, offset = [], {}, 0

    def place(names):
        nonlocal offset
        for name in names:
            planned.append(Planned(name, kind[name], tuple(held[name].shape), offset, ""))
            offset += planned[-1].nbytes

    place([n for n in order if kind[n].itemsize >= dtype.itemsize])
    for unit, names in units.items():
        start = offset
        out = {n: held_as(n) for n in names}
        for name in sorted(names, key=lambda n: -out[n].itemsize):  # stable: step order within a width
            p = params[name]
            planned.append(Planned(name, out[name], tuple(p.shape), offset, unit))
            offset += planned[-1].nbytes
        ranges[unit] = (start, offset)
    place([n for n in order if kind[n].itemsize < dtype.itemsize])
    return planned, ranges


def packed_header(planned: list[Planned], ranges: dict[str, tuple[int, int]], extra_meta: dict) -> bytes:
    """The JSON header, padded with spaces so that 8 + len(header) is a multiple of ALIGN."""
    entries = {p.name: {"dtype": DTYPE_NAMES[p.dtype], "shape": list(p.shape),
                        "data_offsets": [p.offset, p.offset + p.nbytes]} for p in planned}
    data_start = ALIGN
    while True:  # the unit offsets are absolute, so they depend on the header length they sit in
        units = {u: [data_start + a, data_start + b] for u, (a, b) in ranges.items()}
        meta = {"format": "pt", "lema.format": PACKED_FORMAT, "lema.units": json.dumps(units), **extra_meta}
        text = json.dumps({"__metadata__": meta, **entries}, separators=(",", ":")).encode()
        if 8 + len(text) <= data_start:
            return text + b" " * (data_start - 8 - len(text))
        data_start += ALIGN


def release_pages(store) -> None:
    """Unmap the source pages read so far (they stay in the page cache); keeps RSS at one unit.

    Uses SafetensorsFile's private mmap: a public `advise_dontneed(start, end)` there would be cleaner.
    """
    for f in getattr(store, "files", []):
        m = getattr(f, "_mmap", None)
        if m is not None and hasattr(m, "madvise"):
            m.madvise(mmap.MADV_DONTNEED)


def write_packed(path: str, planned: list[Planned], header: bytes, read, store, progress: bool, desc: str) -> None:
    """Header, then each tensor's bytes in plan order; one source tensor (cast) in memory at a time."""
    from tqdm.auto import tqdm

    total = sum(p.nbytes for p in planned)
    with open(path, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                                     disable=not progress) as bar:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for i, p in enumerate(planned):
            src = read(p.name)
            if tuple(src.shape) != p.shape:
                raise ConvertError(f"weight {p.name!r} has shape {tuple(src.shape)} in the source but its config.json "
                                   f"implies {p.shape}; the weights do not belong to this config")
            tensor = src.to(p.dtype).contiguous()  # no copy when the dtype already matches
            if tensor.numel():
                f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            del src, tensor
            bar.update(p.nbytes)
            if i + 1 == len(planned) or planned[i + 1].unit != p.unit:
                release_pages(store)
        f.flush()
        os.fsync(f.fileno())


def verify_packed(folder: str, planned: list[Planned], read, store) -> None:
    """Re-read every written tensor and compare with the source (exact after casting to the output dtype)."""
    out = WeightStore(folder)
    try:
        missing = [p.unit for p in planned if p.unit and p.unit not in out.units]  # buffers: in no unit
        if missing:
            raise ConvertError(f"verify: the written file lists no byte range for unit(s) {sorted(set(missing))}")
        for p in planned:
            want = read(p.name).to(p.dtype)
            if not torch.equal(out.view(p.name), want):
                raise ConvertError(f"verify: tensor {p.name!r} differs from the source after writing; "
                                   "the disk or the source changed during conversion, convert again")
            release_pages(store)
    finally:
        out.close()


# ----- the conversion -----------------------------------------------------------------------------
def overlap(a: str, b: str) -> bool:
    """Whether paths `a` and `b` are the same, or one lies inside the other."""
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep)


def check_out(out: str, src: str, overwrite: bool, words: Wording = Wording()) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConvertError(f"{words.out} {out!r} exists and is a file; give a folder path")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ConvertError(f"{words.out} {out!r} exists and is not empty; choose another folder or pass "
                           f"{words.overwrite} to replace it")
    if overwrite and os.path.isdir(out) and os.listdir(out):
        # replaced whole: only a model folder (config.json, its files, no folder inside), never e.g. a project's
        folders = sorted(e.name for e in os.scandir(out) if e.is_dir())
        if folders or not os.path.isfile(os.path.join(out, "config.json")):
            why = f"it holds folders ({', '.join(folders[:3])})" if folders else "it has no config.json"
            raise ConvertError(f"{words.out} {out!r} is not a model folder ({why}), and {words.overwrite} would "
                               "delete it whole; choose another folder, or empty that one first")
    if overlap(src, out):
        raise ConvertError(f"{words.out} {out!r} and {words.src} {src!r} overlap; write the {words.result} to a "
                           "separate folder")


def convert(src: str, out: str, dtype: str = "float32", overwrite: bool = False, verify: bool = False,
            progress: bool = True, transform: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None,
            before_commit: Optional[Callable[[], None]] = None, words: Wording = Wording()) -> str:
    """Convert SRC (checkpoint folder or .gguf) into OUT, a layer-packed Transformers folder; returns OUT.

    `transform(name, tensor)` rewrites each source tensor on its way to the file (`lema merge`
    adds the LoRA update there); `before_commit()` runs before OUT is put in place and may raise; `words` names
    SRC and OUT in messages as the calling command does.

    See the module docstring for the layout. Raises ConvertError (a ValueError) or FileNotFoundError
    with the reason, leaving neither OUT nor a temporary folder behind.
    """
    from .engine.skeleton import build_meta_model, load_hf_config, unit_map
    from .gguf_source import gguf_config, stage_gguf  # here, not at the top: it imports ConvertError from here

    torch_dtype = parse_dtype(dtype)
    source = resolve_source(src, words)
    check_out(out, src, overwrite, words)
    if source.kind == "gguf":
        hf_config = gguf_config(source)
    else:
        hf_config = load_hf_config(source.folder)
    use_cache = getattr(hf_config, "use_cache", True)  # the meta model turns it off; OUT keeps the source's
    model = build_meta_model(hf_config, torch_dtype)
    unit_info = unit_map(model)
    units = unit_info.units
    planned, ranges = plan_tensors(units, model, torch_dtype)
    weight_bytes = sum(p.nbytes for p in planned)
    staging_bytes = sum(p.numel() * 4 for p in model.parameters()) if source.kind == "gguf" else 0
    needed = weight_bytes + staging_bytes + MARGIN
    parent = os.path.dirname(os.path.abspath(out))
    above = existing_ancestor(parent)
    check_writable(above, f"{words.out} {out!r}")  # a read-only mount, /proc: named before the space
    free = free_bytes(above)
    if free < needed:
        raise ConvertError(f"not enough disk space for {out!r}: the conversion needs {needed:,} bytes "
                           f"({needed / 2**30:.2f} GiB) but {free:,} bytes are free; free space or choose "
                           f"another {words.out}")

    os.makedirs(parent, exist_ok=True)
    tmp = make_temp_folder(parent, os.path.basename(os.path.normpath(out)) + ".tmp-")  # permissions as any folder
    store = None
    try:
        if source.kind == "gguf":
            staging = os.path.join(tmp, ".gguf-staging")
            stage_gguf(os.path.join(source.folder, source.gguf_file), model, staging, progress)
            store = WeightStore(staging)
        elif source.kind == "bin":
            store = BinStore(source.folder)
        else:
            store = WeightStore(source.folder)
        read, buffers = map_sources(model, store, unit_info, source)
        if buffers:  # a few bytes more than the space check counted (MARGIN covers them)
            planned, ranges = plan_tensors(units, model, torch_dtype, buffers)
        if transform is not None:
            read = _transformed(read, transform)
        header = packed_header(planned, ranges, {"lema.dtype": str(torch_dtype).replace("torch.", ""),
                                                 "lema.source": source.name})
        write_packed(os.path.join(tmp, "model.safetensors"), planned, header, read, store, progress,
                     f"{words.verb} {source.name}")
        write_sidecars(source, model, torch_dtype, use_cache, tmp)
        if verify:
            verify_packed(tmp, planned, read, store)
        else:
            written = WeightStore(tmp)  # cheap: parses the header and checks every unit is listed
            if set(written.units) != set(units):
                raise ConvertError(f"the written file lists units {sorted(written.units)}, expected {list(units)}")
            written.close()
        store.close()
        store = None
        shutil.rmtree(os.path.join(tmp, ".gguf-staging"), ignore_errors=True)
        if before_commit is not None:
            before_commit()
        replace_folder(tmp, out)
    except BaseException:
        if store is not None:
            store.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _transformed(read, transform):
    return lambda name: transform(name, read(name))


def map_sources(model, store, units: UnitMap, source: Source):
    """(name -> source tensor reader, the persistent buffers the source holds), after checking every parameter
    of every unit has a source, and that every tensor of a checkpoint folder has a place in the model (as
    `lema train` checks it: a config.json with fewer layers than the weights would otherwise convert, or merge,
    into a smaller model)."""
    from .store.keymap import check_unused, map_checkpoint, reader_for, stored_buffers

    sources, unexpected = map_checkpoint(model, store)
    if source.kind != "gguf":  # refused but those Transformers drops on load too (old rotary inv_freq buffers)
        check_unused(model, store, unexpected, units.layers_prefix, units.num_layers,
                     where=source.folder if source.kind == "bin" else None)
    elif unexpected:  # the GGUF's tensors staged under the names Transformers' reader gave them
        warnings.warn(f"{source.name!r}: {len(unexpected)} tensor(s) have no place in {type(model).__name__} "
                      f"and are not written, e.g. {unexpected[:3]}")
    missing = [n for names in units.units.values() for n in names if n not in sources]
    if missing:
        raise ConvertError(f"{source.name!r}: the weights lack {len(missing)} tensor(s) that "
                           f"{type(model).__name__} needs, e.g. {missing[:3]}; the weights do not match "
                           "config.json (or the architecture's GGUF tensor names are not known)")
    return reader_for(sources, store, model), tuple(stored_buffers(model, sources))


def write_sidecars(source: Source, model, dtype: torch.dtype, use_cache: bool, folder: str) -> None:
    """config.json (dtype set), tokenizer files with the chat template, generation_config.json."""
    config = model.config
    config.dtype = dtype
    if not getattr(config, "architectures", None):
        config.architectures = [type(model).__name__]
    config.use_cache = use_cache
    config.save_pretrained(folder)
    if source.kind == "gguf":
        from transformers import AutoTokenizer, GenerationConfig

        try:
            tokenizer = AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file)
        except (ValueError, KeyError, OSError) as e:
            raise ConvertError(f"{source.name!r}: the tokenizer in the GGUF file cannot be read ({e})") from None
        tokenizer.save_pretrained(folder)
        GenerationConfig.from_model_config(config).save_pretrained(folder)
        return
    for name in SIDECAR_FILES:
        path = os.path.join(source.folder, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(folder, name))
