"""Checker for the strict LEMA reply format taught by ``data/lema_reply``::

    [LEMA_REPLY]
    Answer: <short answer>
    Explanation: <one sentence>
    Confidence: High|Medium|Low
    [/LEMA_REPLY]

Used to measure whether a fine-tuned model reliably produces the *complete*
format (a common failure is stopping early or looping back into a new block).
"""

from __future__ import annotations

import re

OPEN_TAG = "[LEMA_REPLY]"
CLOSE_TAG = "[/LEMA_REPLY]"
FIELDS = ("Answer", "Explanation", "Confidence")
CONFIDENCE_LEVELS = ("High", "Medium", "Low")

# Generation often ends with the end-of-turn token rendered as text
# (<|im_end|>, <|eot_id|>, </s>, ...) plus whitespace; that is not a defect.
_TRAILING_END_TOKENS = re.compile(r"(?:\s|<\|[^<>|\s]+\|>|</s>|<eos>|<end_of_turn>)+\Z")
_FIELD_LINE = re.compile(r"^(%s):(.*)$" % "|".join(FIELDS))


def check_reply(text: str) -> dict:
    """Parse ``text`` and report whether it is one complete, well-formed reply.

    Returns a dict with ``answer``, ``explanation``, ``confidence`` (str or
    None when missing), ``complete`` (bool) and ``problems`` (human-readable
    list, empty exactly when ``complete`` is True).
    """
    body = _TRAILING_END_TOKENS.sub("", text).strip()
    problems: list[str] = []
    values: dict[str, str] = {}
    order: list[str] = []

    for tag in (OPEN_TAG, CLOSE_TAG):
        n = body.count(tag)
        if n > 1:
            problems.append(f"{tag} appears {n} times")
    if not body.startswith(OPEN_TAG):
        problems.append(f"does not start with {OPEN_TAG}")
    if not body.endswith(CLOSE_TAG):
        problems.append(f"does not end with {CLOSE_TAG}")

    for line in body.splitlines():
        line = line.strip()
        if not line or line in (OPEN_TAG, CLOSE_TAG):
            continue
        m = _FIELD_LINE.match(line)
        if not m:
            problems.append(f"unexpected line: {line[:60]!r}")
            continue
        name, value = m.group(1), m.group(2).strip()
        if name in values:
            problems.append(f"{name}: appears more than once")
            continue
        values[name] = value
        order.append(name)

    for name in FIELDS:
        if name not in values:
            problems.append(f"missing {name}: line")
        elif not values[name]:
            problems.append(f"{name}: is empty")
    if order != [f for f in FIELDS if f in order]:
        problems.append(f"fields out of order: {', '.join(order)} (expected {', '.join(FIELDS)})")
    conf = values.get("Confidence")
    if conf and conf not in CONFIDENCE_LEVELS:
        problems.append(f"Confidence must be one of {'/'.join(CONFIDENCE_LEVELS)}, got {conf!r}")

    return {
        "answer": values.get("Answer"),
        "explanation": values.get("Explanation"),
        "confidence": conf,
        "complete": not problems,
        "problems": problems,
    }
