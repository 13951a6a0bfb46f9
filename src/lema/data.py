"""Training-data pipeline: JSONL loading, tokenization with loss masks (batching: lema.batching).

A dataset is a JSONL file whose non-blank lines each hold one example in one
of three shapes::

    {"text": "..."}                                     # plain language modelling
    {"prompt": "...", "completion": "..."}              # loss on the completion only
    {"messages": [{"role": "user", "content": "..."},   # chat; loss on assistant
                  {"role": "assistant", "content": "..."}]}  # turns only

Tokenization produces ``labels`` aligned with ``input_ids`` where positions
that should not contribute to the loss hold ``IGNORE_INDEX`` (-100, the value
``torch.nn.functional.cross_entropy`` ignores by default).  The shift between
inputs and targets is left to the model/loss, as in Hugging Face models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from .cli_errors import reason

IGNORE_INDEX = -100
VALID_ROLES = ("system", "user", "assistant", "tool")

# Shown in every format error so the user can fix the file without docs.
_VALID_SHAPES = (
    'valid lines look like {"text": "..."} or {"prompt": "...", "completion": "..."} '
    'or {"messages": [{"role": "user", "content": "..."}, '
    '{"role": "assistant", "content": "..."}]}'
)


class DataError(ValueError):
    """A dataset file or example cannot be used; the message says how to fix it."""


class Examples(list):
    """The examples of a JSONL file (`path`), with each one's "path:line" (`locations`) for the errors found later."""

    def __init__(self, examples=(), locations=None, path=None):
        super().__init__(examples)
        self.locations: list[str] = list(locations) if locations is not None else []
        self.path = path


# --------------------------------------------------------------------------- loading


FORMATS = (("text",), ("prompt", "completion"), ("messages",))
FORMAT_KEYS = [k for keys in FORMATS for k in keys]


def _validate(obj: Any) -> str | None:
    """Return what is wrong with one parsed line, or None if it is a valid example.

    Keys beside one format's are ignored, not refused: datasets often carry an "id", a "source" or other
    metadata next to each example, and refusing them would make every such file need a rewrite first. A
    misspelt format key still fails (the line then holds no format, or a prompt without its completion), and
    the message names the keys that are not the format's.
    """
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    found = tuple(k for k in FORMAT_KEYS if k in obj)
    others = sorted(k for k in obj if k not in FORMAT_KEYS)
    if not found:
        return f"unrecognised keys {others}" if others else "empty object"
    if found == ("prompt",):
        return f'"prompt" without "completion" (the reply to learn){f", other keys {others}" if others else ""}'
    if found == ("completion",):
        return f'"completion" without "prompt"{f", other keys {others}" if others else ""}'
    if found not in FORMATS:
        return f"keys {list(found)} mix formats; give each line one format"
    if found == ("text",):
        if not isinstance(obj["text"], str):
            return '"text" must be a string'
        return None
    if found == ("prompt", "completion"):
        for k in ("prompt", "completion"):
            if not isinstance(obj[k], str):
                return f'"{k}" must be a string'
        return None
    msgs = obj["messages"]  # the one format left
    if not isinstance(msgs, list) or not msgs:
        return '"messages" must be a non-empty list'
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            return f'messages[{i}] must be an object with exactly "role" and "content", got {type(m).__name__}'
        if set(m) != {"role", "content"}:
            missing = [k for k in ("role", "content") if k not in m]
            extra = sorted(set(m) - {"role", "content"})
            wrong = "; ".join(([f"it lacks {missing}"] if missing else []) + ([f"it has {extra} too"] if extra else []))
            return f'messages[{i}] must be an object with exactly "role" and "content" ({wrong})'
        if m["role"] not in VALID_ROLES:
            return f"messages[{i}] has unknown role {m['role']!r} (expected one of {', '.join(VALID_ROLES)})"
        if not isinstance(m["content"], str):
            parts = " (a list of content parts? give the text as one string)" if isinstance(m["content"], list) else ""
            return f'messages[{i}]["content"] must be a string, got {type(m["content"]).__name__}{parts}'
    return None


def load_tokenizer(model_dir: str):
    """The tokenizer saved in a local model folder (never the hub); a folder without one is named, with the fix."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"no usable tokenizer in {model_dir!r} ({reason(e)}); "
                                "convert the model with `lema convert`, which writes the tokenizer files "
                                "(tokenizer.json, tokenizer_config.json)") from None


def load_jsonl(path: str | Path) -> Examples:
    """Read and validate a JSONL dataset; every non-blank line is one example.

    Raises DataError naming the file and 1-based line number for the first bad
    line: failing early with a precise location is much cheaper than a crash
    (or silent garbage) minutes into a training run.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; give the JSONL file itself (one example per line)")
    if path.exists() and not path.is_file():  # /dev/null, a pipe (<(...)): read twice (its hash, its lines)
        raise DataError(f"{path} is not a regular file (a device or a pipe); write the examples to a JSONL file and "
                        "give that")
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    examples = Examples(path=str(path))
    try:
        with path.open(encoding="utf-8-sig") as f:  # -sig: skips the byte-order mark some editors write first
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    if "\x00" in line:
                        raise _utf16(path, lineno, line) from None
                    raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}); {_VALID_SHAPES}") from None
                except RecursionError:  # Python's parser has a nesting limit; no example nests that deep
                    raise DataError(f"{path}:{lineno}: JSON nested too deeply to read; {_VALID_SHAPES}") from None
                problem = _validate(obj) or (_lone_surrogate([obj[k] for k in FORMAT_KEYS if k in obj])
                                             if "\\u" in line else None)  # the metadata beside is never encoded
                if problem:
                    raise DataError(f"{path}:{lineno}: {problem}; {_VALID_SHAPES}")
                examples.append(obj)
                examples.locations.append(f"{path}:{lineno}")
    except UnicodeDecodeError:  # raised for a whole block read ahead: the line is found by reading again
        raise _not_utf8(path) from None
    if not examples:
        raise DataError(f"{path}: the dataset is empty (no examples); {_VALID_SHAPES}")
    return examples


def _lone_surrogate(obj: Any) -> str | None:
    """What is wrong with a valid example one of whose strings holds half a UTF-16 surrogate pair (a "\\ud83d"
    escape without its other half: an emoji cut in two by a tool that counts UTF-16 units), which no tokenizer
    can encode; None if none does."""
    if isinstance(obj, str):
        bad = next((c for c in obj if "\ud800" <= c <= "\udfff"), None)
        return None if bad is None else (f"a string holds \\u{ord(bad):04x}, half of a UTF-16 surrogate pair (a "
                                         "character cut in two, e.g. a truncated emoji); remove it or write the "
                                         "whole character")
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
    return next((p for p in map(_lone_surrogate, values) if p), None)


def _not_utf8(path: Path) -> DataError:
    """The error for a file that is not UTF-8: the line of its first bad byte, and the fix."""
    with path.open("rb") as f:
        if f.read(2) in (b"\xff\xfe", b"\xfe\xff"):
            return DataError(f"{path}:1: the file is UTF-16 (it starts with a UTF-16 byte-order mark); "
                             f"save it as UTF-8 (e.g. iconv -f utf-16 -t utf-8 {path.name} > utf8.jsonl)")
        f.seek(0)
        for lineno, raw in enumerate(f, start=1):  # "\n" is never part of a multi-byte UTF-8 character
            if b"\x00" in raw:
                return _utf16(path, lineno, raw)
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return DataError(f"{path}:{lineno}: byte {raw[e.start]:#04x} at column {e.start + 1} is not UTF-8, "
                                 "so the file is in another encoding (Latin-1 or Windows-1252?); save it as UTF-8 "
                                 f"(e.g. iconv -f latin1 -t utf-8 {path.name} > utf8.jsonl)")
    return DataError(f"{path}: the file is not UTF-8 text; save it as UTF-8")


def _utf16(path: Path, lineno: int, line) -> DataError:
    """The error for a line with NUL bytes: UTF-16 without a byte-order mark (every other byte of ASCII text is 0),
    or, with a few of them only, a stray NUL byte, named by its column."""
    nul = "\x00" if isinstance(line, str) else b"\x00"
    if line.count(nul) * 4 < len(line):
        return DataError(f"{path}:{lineno}: a NUL byte at column {line.index(nul) + 1}, which JSON text cannot hold; "
                         "remove it (or write it as \\u0000 inside a string)")
    return DataError(f"{path}:{lineno}: the line holds NUL bytes, so the file is probably UTF-16; save it as UTF-8 "
                     f"(e.g. iconv -f utf-16le -t utf-8 {path.name} > utf8.jsonl)")


# ---------------------------------------------------------------------- tokenization


def _ids(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _tokens_before(tokenizer, text: str, ids: list[int], pos: int, add_special_tokens: bool) -> tuple[int, bool]:
    """How many of `ids` (the tokenization of `text`) lie wholly before character `pos`, for tokenizers without
    offsets: the length of the common start of `ids` and the tokenization of `text[:pos]`; and whether a token
    straddles `pos` (then it is the first that differs: it counts as after `pos`, as with offsets)."""
    head = _ids(tokenizer, text[:pos], add_special_tokens) if pos > 0 else []
    n = 0
    for a, b in zip(head, ids):
        if a != b:
            break
        n += 1
    return n, n < len(head)


def _with_eos(ids: list[int], tokenizer) -> list[int]:
    # Ending every example with EOS teaches the model to stop; skip it if the
    # tokenizer has none or already appended one.
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    return ids


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _assistant_spans(tokenizer, messages: list[dict], full: str) -> list[tuple[int, int]]:
    """Character spans of ``full`` holding assistant content plus end-of-turn marker.

    Rather than relying on ``{% generation %}`` (which most chat templates lack),
    each assistant turn is located by rendering prefixes of the conversation:
    the text the template adds between "history + generation prompt" and
    "history + this reply" is exactly the reply as the model must produce it.
    Trailing whitespace after the turn's end marker (e.g. the newline after
    ``<|im_end|>``) is left out because the model never needs to generate it.
    """
    spans: list[tuple[int, int]] = []
    cursor = 0
    for k, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        upto = _render(tokenizer, messages[: k + 1])
        end = len(upto.rstrip())
        start = _content_start(tokenizer, messages[: k + 1], upto)
        if start is None:  # where the turn diverges from "history + generation prompt"
            start = _common_prefix_len(_render(tokenizer, messages[:k], add_generation_prompt=True), upto)
            # Some templates strip or rewrite content; prefer starting exactly at
            # the content when it can be found, otherwise at the first divergence.
            content = msg["content"].strip()
            # the last occurrence: the turn ends `upto`, and the same words may appear earlier (a system prompt
            # the template injects before a conversation that opens with an assistant turn)
            found = upto.rfind(content, start) if content else -1
            if found != -1:
                start = found
        if end <= start:
            continue
        # Templates that rewrite earlier turns (e.g. dropping reasoning) make
        # the prefix render differ from the full one, so map the span by text.
        segment = upto[start:end]
        if full[start:end] != segment:
            pos = full.find(segment, cursor)
            if pos == -1:
                raise DataError(
                    "the chat template renders an assistant turn differently depending on "
                    "what follows it, so its loss mask cannot be computed; "
                    "use prompt/completion lines instead"
                )
            start, end = pos, pos + len(segment)
        spans.append((start, end))
        cursor = end
    return spans


# Stands in for an assistant turn's content to find where the template writes it: private-use characters and no
# edge whitespace, so no template strips, rewrites or already holds it.
_SENTINEL = "\ue000lema-reply\ue001"


def _content_start(tokenizer, messages: list[dict], upto: str) -> int | None:
    """Where the last message's content starts in ``upto`` (their rendering), or None where that cannot be told.

    The turn is rendered again with a sentinel for its content: the text before the sentinel is the
    rendering's up to the content, the text after it the turn's end marker. Searching for the content's
    words instead finds them in that marker when the reply is part of it ("d" or "end" in "<|im_end|>"), and
    skips the reply's leading whitespace.
    """
    try:
        probe = _render(tokenizer, [*messages[:-1], {**messages[-1], "content": _SENTINEL}])
    except Exception:  # a template that checks the content (raise_exception): search for the words instead
        return None
    pos = probe.find(_SENTINEL)
    if pos == -1 or probe.find(_SENTINEL, pos + 1) != -1:
        return None
    tail = probe[pos + len(_SENTINEL):]
    if upto[:pos] != probe[:pos] or not upto.endswith(tail) or len(upto) - len(tail) < pos:
        return None  # the template renders this content in a way of its own
    return pos


def _tokenize_messages(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the tokenizer has no chat template, so 'messages' examples cannot be rendered; "
            'use {"text": ...} or {"prompt": ..., "completion": ...} lines instead'
        )
    full = _render(tokenizer, messages)
    spans = _assistant_spans(tokenizer, messages, full)
    # The rendered template already contains any BOS it wants, so adding
    # special tokens again would duplicate it.
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = []
        for tok, (s, e) in zip(ids, enc["offset_mapping"]):
            # A token counts as assistant output if it overlaps a span: a token
            # straddling the boundary still carries reply characters, and
            # dropping it would leave part of the reply unsupervised.
            inside = e > s and any(s < b and e > a for a, b in spans)
            labels.append(tok if inside else IGNORE_INDEX)
        return ids, labels
    # Slow tokenizers have no offsets: the same one-shot tokenization, each span's tokens found by tokenizing the
    # text up to its start and its end (a token straddling either boundary is supervised, as above).
    ids = _ids(tokenizer, full, add_special_tokens=False)
    labels = [IGNORE_INDEX] * len(ids)
    for a, b in spans:
        start, _ = _tokens_before(tokenizer, full, ids, a, add_special_tokens=False)
        end, straddled = _tokens_before(tokenizer, full, ids, b, add_special_tokens=False)
        end += straddled  # the token reaching over the span's end carries reply characters
        labels[start:end] = ids[start:end]
    return ids, labels


def tokenize_example(example: dict, tokenizer, seq_len: int) -> tuple[list[int], list[int], bool]:
    """Tokenize one validated example into ``(input_ids, labels, truncated)``.

    * text: the whole text is supervised (tokenizer's default specials, + EOS).
    * prompt/completion: tokenized as one text; the tokens reaching into the completion (+ EOS) are
      supervised, the prompt's masked.
    * messages: chat-template rendering; only assistant turns are supervised.

    Sequences longer than ``seq_len`` keep their start (the prompt), since the
    end of a cut-off reply is less harmful to lose than its context.
    """
    ids, labels = _tokenize_whole(example, tokenizer)
    truncated = len(ids) > seq_len
    return ids[:seq_len], labels[:seq_len], truncated


def _tokenize_whole(example: dict, tokenizer) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of a whole example (tokenize_example, before truncation)."""
    if "text" in example:
        ids = _with_eos(_ids(tokenizer, example["text"], add_special_tokens=True), tokenizer)
        labels = list(ids)
    elif "prompt" in example and getattr(tokenizer, "is_fast", False):
        # One text, as the model will read it: tokenizing the parts apart differs where a tokenizer treats a
        # text's start specially (SentencePiece's dummy prefix turns " Paris" alone into "▁", "▁Paris").
        # A token supervised if it reaches into the completion (one straddling the boundary included).
        boundary = len(example["prompt"])
        enc = tokenizer(example["prompt"] + example["completion"], add_special_tokens=True,
                        return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        # Special tokens have no characters: those after the text (an EOS the tokenizer appends itself, as with
        # add_eos_token=True) end the completion and are supervised; a BOS before it is not.
        text_end = max((i for i, (s, e) in enumerate(offsets) if e > s), default=-1)
        labels = [t if (e > boundary if e > s else i > text_end) else IGNORE_INDEX
                  for i, (t, (s, e)) in enumerate(zip(ids, offsets))]
        with_eos = _with_eos(ids, tokenizer)
        labels += with_eos[len(ids):]
        ids = with_eos
    elif "prompt" in example:
        # Slow tokenizers have no offsets: the same one text, the prompt's tokens those it shares with the
        # prompt tokenized alone (_tokens_before).
        text = example["prompt"] + example["completion"]
        ids = _ids(tokenizer, text, add_special_tokens=True)
        masked, _ = _tokens_before(tokenizer, text, ids, len(example["prompt"]), add_special_tokens=True)
        ids = _with_eos(ids, tokenizer)
        labels = [IGNORE_INDEX] * masked + ids[masked:]
    elif "messages" in example:
        ids, labels = _tokenize_messages(example["messages"], tokenizer)
    else:
        raise DataError(f"unrecognised example keys {sorted(example)}; {_VALID_SHAPES}")
    return ids, labels


# Why an example has no target: (what it is, the fix), by the cause _unsupervised names.
_NO_TARGET = {
    "no assistant turn": ("without an assistant turn",
                          'add the reply as a {"role": "assistant", "content": "..."} message (only assistant '
                          "turns are trained on)"),
    "empty text": ('with an empty "text"', "put the text in it or remove the line"),
    "empty completion": ('with an empty "completion"', "give each prompt its completion (only the completion is "
                                                       "trained on)"),
    "truncated": ("cut by truncation to seq_len={seq_len} before any supervised token",
                  "increase --seq-len or shorten the prompts"),
    "one token": ("of a single token (no position predicts the first)", "give the example more text"),
}


def _empty_content(example: dict) -> Optional[str]:
    """"empty text" or "empty completion" where the part trained on is blank (a _NO_TARGET key), else None."""
    for key in ("text", "completion"):
        if isinstance(example.get(key), str) and not example[key].strip():
            return f"empty {key}"
    return None


def _unsupervised(example: dict, labels: list[int]) -> str:
    """Why an example (whose untruncated `labels` are given) has no target after truncation: a key of _NO_TARGET."""
    if any(l != IGNORE_INDEX for l in labels[1:]):
        return "truncated"
    if "messages" in example and not any(isinstance(m, dict) and m.get("role") == "assistant"
                                         for m in example["messages"]):
        return "no assistant turn"
    if "text" in example and not example["text"].strip():
        return "empty text"
    if "completion" in example and not example["completion"].strip():
        return "empty completion"
    return "one token"


def dropped_causes(dropped: dict[str, list[str]], seq_len: int) -> str:
    """Each cause of the dropped examples with its count, first place and fix (TokenizedDataset.dropped)."""
    causes = []
    for cause, places in dropped.items():
        what, fix = _NO_TARGET[cause]
        count = f"{len(places)} example{'s' if len(places) > 1 else ''}"
        causes.append(f"{count} {what.format(seq_len=seq_len)} (e.g. {places[0]}): {fix}")
    return "; ".join(causes)


def _nothing_to_train_on(examples: list[dict], dropped: dict[str, list[str]], seq_len: int) -> DataError:
    """The error for a dataset all of whose examples were dropped."""
    path = getattr(examples, "path", None)
    return DataError(f"none of the {len(examples)} examples{f' in {path}' if path else ''} has a token to train "
                     f"on: {dropped_causes(dropped, seq_len)}")


class TokenizedDataset(torch.utils.data.Dataset):
    """Tokenized examples ready for :func:`lema.batching.collate`.

    Examples with no supervised target left (e.g. a reply cut off entirely by
    truncation, or whose only supervised token is the first, which no position
    predicts) are dropped: they would contribute nothing but padding.

    Attributes:
        num_truncated: examples cut to ``seq_len`` (whether later kept or dropped).
        num_dropped: examples dropped because no label survived.
        dropped: why, as a key of _NO_TARGET -> the places of the examples dropped (`dropped_causes` says it).
        num_tokens: total tokens across kept examples.
        num_supervised_tokens: tokens with a label across kept examples.
    """

    def __init__(self, examples: list[dict], tokenizer, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len = seq_len
        self.items: list[dict[str, list[int]]] = []
        self.num_truncated = 0
        self.num_dropped = 0
        locations = getattr(examples, "locations", None) or [f"example {i + 1}" for i in range(len(examples))]
        self.dropped: dict[str, list[str]] = {}
        dropped = self.dropped
        for ex, where in zip(examples, locations):
            try:
                ids, labels = _tokenize_whole(ex, tokenizer)
            except Exception as e:  # a chat template's raise_exception (jinja2), a tokenizer's ValueError ...
                raise DataError(f"{where}: this example cannot be tokenized ({reason(e)})") from None
            self.num_truncated += len(ids) > seq_len
            # nothing to learn but the end of sequence appended to it: dropped as an empty one (it taught the
            # model to answer with nothing)
            empty = _empty_content(ex)
            if empty or all(l == IGNORE_INDEX for l in labels[1:seq_len]):  # the first token is no position's target
                self.num_dropped += 1
                dropped.setdefault(empty or _unsupervised(ex, labels), []).append(where)
                continue
            self.items.append({"input_ids": ids[:seq_len], "labels": labels[:seq_len]})
        if not self.items:
            raise _nothing_to_train_on(examples, dropped, seq_len)
        self.num_tokens = sum(len(it["input_ids"]) for it in self.items)
        self.num_supervised_tokens = sum(
            sum(l != IGNORE_INDEX for l in it["labels"]) for it in self.items
        )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]
