"""The data pipeline's edge cases: loss masks against Transformers' own assistant mask, the EOS a tokenizer appends
itself, messages the loader must name precisely, and the sampler's resumption everywhere in a run."""

from __future__ import annotations

import json

import pytest

from lema.batching import BatchSampler, collate
from lema.data import IGNORE_INDEX, DataError, TokenizedDataset, load_jsonl, tokenize_example
from test_data import _SlowProxy, supervised_runs, tok, tokenizer_dir  # noqa: F401 (fixtures)

# SmolLM2's ChatML template with the assistant turns marked by {% generation %}, so that Transformers'
# apply_chat_template(return_assistant_tokens_mask=True) gives the mask to compare with.
CHATML_GENERATION = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "How?"}, {"role": "assistant", "content": "Fine."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": " Hello! "}],
    [{"role": "user", "content": "What is 6*7?"}, {"role": "assistant", "content": "call calc"},
     {"role": "tool", "content": "42"}, {"role": "assistant", "content": "It is 42.\n\nDone"}],
    [{"role": "assistant", "content": "SmolLM"}, {"role": "user", "content": "x"}],
    # replies that are part of the end marker "<|im_end|>": a multiple-choice answer "d", a word "end"
    [{"role": "user", "content": "a, b, c or d?"}, {"role": "assistant", "content": "d"}],
    [{"role": "user", "content": "Last word?"}, {"role": "assistant", "content": "end"},
     {"role": "user", "content": "Again"}, {"role": "assistant", "content": "m"}],
    # a reply that starts with whitespace: the token holding it is the reply's
    [{"role": "user", "content": "Indent"}, {"role": "assistant", "content": "  spaced\n"}],
]


@pytest.fixture
def gen_tok(tokenizer_dir):  # noqa: F811
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tokenizer_dir)
    t.chat_template = CHATML_GENERATION
    return t


@pytest.mark.parametrize("msgs", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
def test_messages_mask_equals_transformers_assistant_mask(gen_tok, msgs):
    hf = gen_tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, labels, _ = tokenize_example({"messages": msgs}, gen_tok, 4096)
    assert ids == list(hf["input_ids"])
    assert [int(l != IGNORE_INDEX) for l in labels] == list(hf["assistant_masks"])
    slow = tokenize_example({"messages": msgs}, _SlowProxy(gen_tok), 4096)
    assert slow[:2] == (ids, labels)


@pytest.mark.parametrize("reply", ["d", "end", "m", "e", "|>"])
def test_a_reply_found_in_the_end_marker_is_supervised(tok, reply):  # noqa: F811
    """SmolLM2's own template (no {% generation %}): the reply's tokens are supervised, not only <|im_end|>."""
    msgs = [{"role": "user", "content": "Answer?"}, {"role": "assistant", "content": reply}]
    ids, labels, _ = tokenize_example({"messages": msgs}, tok, 256)
    assert [tok.decode(r) for r in supervised_runs(ids, labels)] == [reply + "<|im_end|>"]


def test_a_template_that_refuses_the_sentinel_content_falls_back_to_the_words(tokenizer_dir):  # noqa: F811
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tokenizer_dir)
    t.chat_template = ("{% for m in messages %}{% if m['content'] is not string or '\ue000' in m['content'] %}"
                       "{{ raise_exception('odd content') }}{% endif %}<|im_start|>{{ m['role'] }}\n"
                       "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                       "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    ids, labels, _ = tokenize_example({"messages": msgs}, t, 64)
    assert [t.decode(r) for r in supervised_runs(ids, labels)] == ["Hello there<|im_end|>"]


def test_prompt_completion_supervises_the_eos_the_tokenizer_appends_itself(tokenizer_dir):  # noqa: F811
    """A tokenizer that appends EOS itself (add_eos_token=True): that EOS ends the completion and is supervised,
    by the fast path as by the slow one."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = t.eos_token_id
    t._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {t.eos_token}", pair=f"$A $B {t.eos_token}", special_tokens=[(t.eos_token, eos)])
    assert t("hi")["input_ids"][-1] == eos
    ex = {"prompt": "Q: hi\nA:", "completion": " Yes"}
    fast = tokenize_example(ex, t, 64)
    assert fast[0].count(eos) == 1
    assert [t.decode(r) for r in supervised_runs(*fast[:2])] == [" Yes" + t.eos_token]
    assert tokenize_example(ex, _SlowProxy(t), 64) == fast


def test_prompt_completion_leaves_a_bos_unsupervised(tokenizer_dir):  # noqa: F811
    from tokenizers import processors
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tokenizer_dir)
    bos = t.convert_tokens_to_ids("<|endoftext|>")
    t._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", bos)])
    for ex in ({"prompt": "Q: hi\nA:", "completion": " Yes"}, {"prompt": "", "completion": "Yes"}):
        ids, labels, _ = tokenize_example(ex, t, 64)
        assert ids[0] == bos and labels[0] == IGNORE_INDEX
        assert [t.decode(r) for r in supervised_runs(ids, labels)] == [ex["completion"] + t.eos_token]
        slow_ids, slow_labels, _ = tokenize_example(ex, _SlowProxy(t), 64)
        assert slow_ids == ids and slow_labels[1:] == labels[1:]  # the first label is no position's target


# ----------------------------------------------------------------------- loading


def _error(tmp_path, line: str) -> str:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_jsonl(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:2: ") and "\n" not in msg
    return msg


@pytest.mark.parametrize("message, fragment", [
    ({"role": "user", "content": "hi", "name": "bob"}, "(it has ['name'] too)"),
    ({"role": "assistant", "content": None, "tool_calls": []}, "(it has ['tool_calls'] too)"),
    ({"content": "hi"}, "(it lacks ['role'])"),
    ("hi", "got str"),
    ({"role": "user", "content": [{"type": "text", "text": "hi"}]}, "got list (a list of content parts? give the "
                                                                     "text as one string)"),
])
def test_a_bad_message_is_named_with_what_is_wrong(tmp_path, message, fragment):
    line = json.dumps({"messages": [message, {"role": "assistant", "content": "x"}]})
    assert fragment in _error(tmp_path, line)


@pytest.mark.parametrize("line", [
    '{"text": "cut emoji \\ud83d"}',
    '{"prompt": "p", "completion": "\\ude00 after"}',
    '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a\\uD83D"}]}',
])
def test_a_lone_surrogate_is_named_at_load_not_as_a_tokenizer_error(tmp_path, line):
    assert "half of a UTF-16 surrogate pair" in _error(tmp_path, line)


def test_whole_surrogate_pairs_and_surrogates_in_metadata_load(tmp_path):
    p = tmp_path / "ok.jsonl"
    p.write_text('{"text": "smile \\ud83d\\ude00", "id": "\\ud83d"}\n', encoding="utf-8")
    assert load_jsonl(p)[0]["text"] == "smile \U0001F600"


def test_bom_crlf_lone_cr_and_trailing_blank_lines_load(tmp_path):
    p = tmp_path / "win.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"text": "a b"}\r\n{"text": "c d"}\r{"text": "e f"}\r\n\r\n  \n')
    ex = load_jsonl(p)
    assert [e["text"] for e in ex] == ["a b", "c d", "e f"]
    assert ex.locations == [f"{p}:1", f"{p}:2", f"{p}:3"]


def test_dropped_and_kept_examples_with_truncation(tok):  # noqa: F811
    """The supervised part cut away: dropped (and counted); cut partway: kept with the start."""
    exs = [{"prompt": "word " * 40, "completion": " yes"}, {"prompt": "a b", "completion": " c d e f g h i j k"}]
    ds = TokenizedDataset(exs, tok, seq_len=6)
    assert (len(ds), ds.num_truncated, ds.num_dropped) == (1, 2, 1)
    assert ds[0]["input_ids"] == tok("a b c d e f g h i j k")["input_ids"][:6]


# ----------------------------------------------------------------------- batching


@pytest.mark.parametrize("n, bs", [(10, 3), (9, 3), (1, 4), (7, 1), (5, 5)])
def test_resuming_anywhere_gives_the_uninterrupted_batches(n, bs):
    ref_sampler = BatchSampler(n, bs, seed=3)
    ref = [ref_sampler.next_batch() for _ in range(3 * len(ref_sampler) + 1)]
    for cut in range(len(ref)):  # mid-epoch and at every epoch boundary
        first = BatchSampler(n, bs, seed=3)
        for _ in range(cut):
            first.next_batch()
        resumed = BatchSampler(n, bs, seed=3)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as saved with a checkpoint
        assert [resumed.next_batch() for _ in range(len(ref) - cut)] == ref[cut:]
    for e in range(3):  # each epoch visits every example once, its last partial batch kept
        epoch = ref[e * len(ref_sampler):(e + 1) * len(ref_sampler)]
        assert sorted(i for b in epoch for i in b) == list(range(n))
        assert len(epoch[-1]) == (n % bs or bs)
    assert ref[:len(ref_sampler)] != ref[len(ref_sampler):2 * len(ref_sampler)] or n == 1


def test_collate_pads_unequal_lengths_out_of_attention_and_loss():
    b = collate([{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [8], "labels": [8]}],
                pad_id=2)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert b["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
