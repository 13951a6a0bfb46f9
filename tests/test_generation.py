"""`lema generate` reviewed: greedy text token for token Transformers + PEFT's, stopping where Transformers stops
(generation_config.json's eos ids) and, with --chat, at the chat template's end-of-turn token; sampling from
--top-p alone (no hidden top-k), reproducible with --seed; bad settings refused in one line naming the flag."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from test_adapter_and_gguf_errors import lema, refused

CHARS = "abcdefghijklmnopqrstuvwxyz ."
END = "<|im_end|>"  # id 30, after <s>, </s> and the 28 characters
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}" + END + "{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.fixture(autouse=True)
def _cli_leaves_the_environment(monkeypatch):
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", os.environ.get("THP_MEM_ALLOC_ENABLE", "1"))


def save_tokenizer(folder: str, chat: bool = False) -> None:
    """One token per character (ids 2..29, <s> 0, </s> 1); with `chat`, a template ending each turn with <|im_end|>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    inner.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>")
    if chat:
        tok.add_special_tokens({"additional_special_tokens": [END]})
        assert tok.convert_tokens_to_ids(END) == 30
        tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)


def model_copy(tiny_dir, tmp_path, arch="llama", chat=False) -> str:
    folder = str(tmp_path / f"{arch}-model")
    shutil.copytree(tiny_dir(arch), folder)  # the session's folders are shared: never written into
    save_tokenizer(folder, chat)
    return folder


def free_run(folder: str, ids: torch.Tensor, n: int) -> list[int]:
    """Transformers' greedy continuation of `ids` that stops at nothing."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                       eos_token_id=None, pad_token_id=1)
    return out[0, ids.shape[1]:].tolist()


def first_new(tokens: list[int], at_least: int) -> tuple[int, int]:
    """(step, token): the first token at step >= at_least that did not come before (a place to stop at)."""
    for k in range(at_least, len(tokens)):
        if tokens[k] not in tokens[:k]:
            return k, tokens[k]
    raise AssertionError(f"no new token in {tokens}")


# ----- parity: greedy with and without an adapter, prompts of several lengths -------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_greedy_equals_transformers_and_peft(arch, tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from conftest import randomize_lora
    from lema import LemaConfig, LemaModel

    folder = model_copy(tiny_dir, tmp_path, arch)
    adapter = str(tmp_path / "adapter")
    made = LemaModel(LemaConfig(model_name_or_path=folder, lora_rank=4, lora_alpha=8))
    made.initialize_lora(0)
    randomize_lora(made, 3)  # B != 0: the adapter changes the text
    made.save_adapter(adapter)
    made.close()
    from lema.generation import load_for_generation

    for with_adapter in (False, True):
        model, _ = load_for_generation(folder, adapter if with_adapter else None)
        ref = AutoModelForCausalLM.from_pretrained(folder).eval()
        if with_adapter:
            ref = PeftModel.from_pretrained(ref, adapter).eval()
        try:
            for length in (1, 7, 45):
                ids = torch.randint(3, 96, (1, length), generator=torch.Generator().manual_seed(length))
                n = min(12, 64 - length)
                ours = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=1)
                with torch.no_grad():
                    theirs = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                          do_sample=False, eos_token_id=None, pad_token_id=1)
                assert torch.equal(ours, theirs), (arch, with_adapter, length)
        finally:
            model.close()


# ----- stopping --------------------------------------------------------------------------------------------------
def test_generation_config_eos_ids_stop_as_in_transformers(tiny_dir, tmp_path):
    """A generation_config.json listing several eos ids (Llama 3, Gemma 2, Qwen2.5 instruct models ship one):
    Transformers stops at each, and so must `lema generate` (it built the model from config.json alone)."""
    from transformers import AutoModelForCausalLM

    from lema.generation import generate_text, load_for_generation

    folder = model_copy(tiny_dir, tmp_path)
    model, tok = load_for_generation(folder)
    ids = tok("hello", return_tensors="pt")["input_ids"]
    free = free_run(folder, ids, 20)
    step, stop = first_new(free, 2)
    if stop == 2:  # config.json's eos: take the next one
        step, stop = first_new(free, step + 1)
    json.dump({"bos_token_id": 0, "eos_token_id": [1, stop]}, open(os.path.join(folder, "generation_config.json"), "w"))
    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    theirs = out[0, ids.shape[1]:].tolist()
    assert theirs[-1] == stop and len(theirs) < 20  # Transformers stopped there
    try:
        ours = generate_text(model, tok, "hello", max_new_tokens=20)
    finally:
        model.close()
    assert ours == tok.decode(theirs, skip_special_tokens=True)


def test_chat_stops_at_the_templates_end_of_turn(tiny_dir, tmp_path, capsys):
    """--chat: the token that ends an assistant turn in the template (<|im_end|> here, not the model's eos) ends
    the answer, instead of the model writing the next turns after it."""
    from safetensors.torch import load_file, save_file

    from lema.generation import encode_prompt, load_for_generation

    folder = model_copy(tiny_dir, tmp_path, chat=True)
    model, tok = load_for_generation(folder)
    model.close()
    ids = encode_prompt(tok, "hello", chat=True)
    free = free_run(folder, ids, 16)
    step, token = first_new(free, 3)
    path = os.path.join(folder, "model.safetensors")
    weights = load_file(path)
    weights["lm_head.weight"][30] = weights["lm_head.weight"][token] * 1.5  # <|im_end|> where `token` would come
    save_file(weights, path, metadata={"format": "pt"})
    free = free_run(folder, ids, 16)
    assert 30 in free and len(free) == 16, free  # the model writes <|im_end|> and goes on past it
    expected = tok.decode(free[:free.index(30)], skip_special_tokens=True)
    rc, out, err = lema(capsys, "generate", "--model", folder, "--chat", "--prompt", "hello", "--max-new-tokens", 16)
    assert rc == 0, err
    assert out.rstrip("\n") == expected


def test_end_of_turn_of_a_real_template(smollm2_dir):
    from transformers import AutoTokenizer

    from lema.generation import end_of_turn_id

    tok = AutoTokenizer.from_pretrained(smollm2_dir)  # the embedded SmolLM2, converted once a session (conftest.py)
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")


def test_an_empty_system_message_replaces_the_templates_default(smollm2_dir):
    """--system "" is a system turn with no text (SmolLM2's template then leaves out its default system message);
    no --system keeps the default; text is put in as given."""
    from transformers import AutoTokenizer

    from lema.generation import encode_prompt

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    text = {s: tok.decode(encode_prompt(tok, "hi", chat=True, system=s)[0]) for s in (None, "", "Be brief.")}
    assert "You are a helpful AI assistant" in text[None]
    assert text[""].startswith("<|im_start|>system\n<|im_end|>") and "helpful" not in text[""]
    assert text["Be brief."].startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_with_chat_the_positions_note_names_the_templated_prompt(tiny_dir, tmp_path, capsys):
    """--chat: the prompt the positions are counted on is the template's ("user: hello<|im_end|>assistant: ", 23
    tokens here), and the note and the refusal say so, not "--prompt" (5 tokens)."""
    from transformers import AutoConfig

    folder = model_copy(tiny_dir, tmp_path, chat=True)
    limit = AutoConfig.from_pretrained(folder).max_position_embeddings
    rc, _, err = lema(capsys, "generate", "--model", folder, "--chat", "--prompt", "hello", "--max-new-tokens", 1000)
    assert rc == 0, err
    assert (f"capped to {limit - 23}: the chat template's prompt (--prompt in its turn markers) is 23 tokens and "
            f"this model holds {limit} positions") in err
    line = refused(capsys, "generate", "--model", folder, "--chat", "--prompt", "ab" * limit)
    assert "the chat template's prompt (--prompt in its turn markers) is" in line and "shorten the prompt" in line


def test_a_template_that_refuses_a_system_turn_is_named(tiny_dir, tmp_path, capsys):
    """A chat template that raises on a system message (as Gemma's does): --system, empty or not, is refused in one
    line naming --system, not a Jinja traceback; without it the chat works."""
    from transformers import AutoTokenizer

    folder = model_copy(tiny_dir, tmp_path, chat=True)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}" + TEMPLATE)
    tok.save_pretrained(folder)
    for system in ("", "Be brief."):
        line = refused(capsys, "generate", "--model", folder, "--chat", "--system", system, "--prompt", "hi")
        assert "chat template refused the messages (System role not supported)" in line and "leave out --system" in line
    rc, _, err = lema(capsys, "generate", "--model", folder, "--chat", "--prompt", "hi", "--max-new-tokens", 2)
    assert rc == 0, err
    tok.chat_template = "{% for m in messages %}{{ m['content'] }"  # does not parse: not the flags' fault
    tok.save_pretrained(folder)
    line = refused(capsys, "generate", "--model", folder, "--chat", "--system", "x", "--prompt", "hi")
    assert "chat template is not valid Jinja" in line and "--system" not in line.split("Jinja", 1)[1]


# ----- sampling --------------------------------------------------------------------------------------------------
def test_sampling_is_top_p_alone_and_seeded(tiny_dir, tmp_path, monkeypatch):
    """--top-p 1 samples every token (Transformers' default top_k=50 would cut the rest away silently)."""
    from lema.generation import generate_text, load_for_generation

    folder = model_copy(tiny_dir, tmp_path)
    model, tok = load_for_generation(folder)
    seen = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda ids, **kw: seen.append(kw) or real(ids, **kw))
    try:
        texts = [generate_text(model, tok, "hello", max_new_tokens=10, temperature=2.0, seed=s) for s in (5, 5, 6)]
    finally:
        model.close()
    assert seen[0]["top_k"] == 0 and seen[0]["top_p"] == 1.0
    assert texts[0] == texts[1] != texts[2]


def test_cli_seed_reproduces_sampled_text(tiny_dir, tmp_path, capsys):
    folder = model_copy(tiny_dir, tmp_path)
    args = ["generate", "--model", folder, "--prompt", "the cat", "--max-new-tokens", 10, "--temperature", 1.5]
    runs = [lema(capsys, *args, "--seed", s) for s in (1, 1, 2)]
    assert all(rc == 0 for rc, _, _ in runs), runs
    assert runs[0][1] == runs[1][1] != runs[2][1]


def test_sampling_flags_at_temperature_0_are_said_to_change_nothing(tiny_dir, tmp_path, capsys):
    folder = model_copy(tiny_dir, tmp_path)
    rc, greedy, err = lema(capsys, "generate", "--model", folder, "--prompt", "the cat", "--max-new-tokens", 5)
    assert rc == 0 and "note:" not in err
    rc, out, err = lema(capsys, "generate", "--model", folder, "--prompt", "the cat", "--max-new-tokens", 5,
                        "--top-p", 0.5, "--seed", 3)
    assert rc == 0 and out == greedy
    assert "note: --top-p and --seed apply to sampling (--temperature > 0); at --temperature 0 decoding is greedy and they change nothing" in err


# ----- bad settings: one line naming the flag at fault -----------------------------------------------------------
@pytest.mark.parametrize("flags, message, not_named", [
    (["--top-p", "1.5"], "--top-p=1.5 in (0, 1] is required", "--temperature"),
    (["--top-p", "nan"], "--top-p=nan in (0, 1] is required", "--temperature"),
    (["--temperature", "-0.5"], "--temperature=-0.5 must be a finite number >= 0", "--top-p"),
    (["--temperature", "1e-45"], "--temperature=1e-45 is too small to sample with", "--top-p"),
])
def test_a_bad_setting_is_named_alone(flags, message, not_named, tiny_dir, tmp_path, capsys):
    line = refused(capsys, "generate", "--model", model_copy(tiny_dir, tmp_path), "--prompt", "hi", *flags)
    assert message in line and not_named not in line


def test_stream_prints_what_generate_returns(tiny_dir, tmp_path, capsys):
    from lema.generation import generate_text, load_for_generation

    folder = model_copy(tiny_dir, tmp_path)
    model, tok = load_for_generation(folder)
    try:
        text = generate_text(model, tok, "the cat", max_new_tokens=12, stream=True)
    finally:
        model.close()
    assert capsys.readouterr().out == text + "\n"
