"""`lema merge` against PEFT, adapter by adapter: the merged folder, loaded by plain Transformers, gives the logits of
the unmerged PeftModel (and of PEFT's merge_and_unload) for adapters LEMA writes and adapters PEFT makes directly;
what merge cannot fold is refused with one line saying why, before anything is written."""

from __future__ import annotations

import os
from typing import Optional

import pytest
import torch

ARCHS = ["llama", "llama-tied", "gpt2", "mixtral", "gemma2", "opt"]
LINEAR = {"gpt2": ["c_attn", "c_proj", "c_fc"], "opt": ["q_proj", "v_proj", "fc1"], "mixtral": ["q_proj", "o_proj"]}


def randomize_lora(peft_model, seed: int = 1) -> None:
    """LoRA weights far from their initial (zero) update, so that a wrongly folded one shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def peft_adapter(base_dir: str, folder: str, save: Optional[dict] = None, randomize: bool = True, **lora) -> str:
    """A PEFT adapter of the model in `base_dir`, made by PEFT itself (not by LEMA); `save`: save_pretrained's
    keyword arguments."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(**{"r": 4, "lora_alpha": 8, **lora}))
    if randomize:
        randomize_lora(peft_model)
    peft_model.save_pretrained(folder, **(save or {}))
    return folder


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def references(base_dir: str, adapter: str, ids):
    """(unmerged PeftModel logits, PEFT merge_and_unload's model), both from the float32 base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    unmerged = logits(peft_model, ids)
    return unmerged, peft_model.merge_and_unload()


def merged_model(out: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()


def ids_for(seed: int = 0):
    return torch.randint(2, 96, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_lema_adapter_merges_as_peft_does(arch, tiny_dir, tmp_path):
    """An adapter written by LemaModel.save_adapter (every linear layer of the decoder: GPT-2's Conv1D with
    fan_in_fan_out, Mixtral's attention beside its fused experts, Gemma 2, a tied head)."""
    from lema import LemaConfig, LemaModel
    from lema.merge import merge

    base_dir = tiny_dir(arch)
    adapter = str(tmp_path / "adapter")
    model = LemaModel(LemaConfig(model_name_or_path=base_dir, lora_rank=4, lora_alpha=8))
    model.initialize_lora(0)
    randomize_lora(model.peft_model)
    model.save_adapter(adapter)
    model.close()

    ids = ids_for()
    unmerged, peft_merged = references(base_dir, adapter, ids)
    out = merge(base_dir, adapter, str(tmp_path / "merged"), progress=False)
    got = logits(merged_model(out), ids)
    assert (unmerged - logits(merged_model(base_dir), ids)).abs().max() > 0.1  # the adapter does change the model
    torch.testing.assert_close(got, unmerged, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, logits(peft_merged, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch, lora", [
    ("gpt2", {"target_modules": ["c_attn", "c_proj"], "lora_dropout": 0.1}),
    ("llama", {"target_modules": ["q_proj", "down_proj"], "use_rslora": True}),
    ("llama", {"target_modules": ["v_proj"], "layers_to_transform": [1]}),
    ("llama", {"target_modules": ["q_proj", "lm_head"]}),  # an untied head: a linear layer like the others
    # lora_B with a bias, which PEFT's merge adds (scaled) to the base bias; it used to be stored over lora_B's
    # weight (both keys are "lora_B"), and the merged model was silently wrong
    ("qwen2", {"target_modules": ["q_proj", "k_proj"], "lora_bias": True}),
])
def test_peft_adapter_merges_as_peft_does(arch, lora, tiny_dir, tmp_path):
    from lema.merge import merge

    base_dir = tiny_dir(arch)
    # with lm_head among the targets, PEFT's "auto" saves the whole head as well (a full weight: refused below)
    save = {"save_embedding_layers": False} if "lm_head" in lora["target_modules"] else {}
    adapter = peft_adapter(base_dir, str(tmp_path / "adapter"), save, **lora)
    ids = ids_for()
    unmerged, peft_merged = references(base_dir, adapter, ids)
    got = logits(merged_model(merge(base_dir, adapter, str(tmp_path / "merged"), progress=False)), ids)
    torch.testing.assert_close(got, unmerged, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, logits(peft_merged, ids), rtol=1e-4, atol=1e-4)


def test_bfloat16_base_merged_to_float32_keeps_the_whole_update(tiny_dir, tmp_path):
    """Most checkpoints are bfloat16 and --dtype is float32 by default: the sum must not be rounded to the
    source's bfloat16 on the way (that lost most of a small update: logits off by ~0.1)."""
    from lema.merge import merge

    base_dir = tiny_dir("llama", dtype=torch.bfloat16)
    adapter = peft_adapter(base_dir, str(tmp_path / "adapter"), target_modules=["q_proj", "v_proj", "down_proj"])
    ids = ids_for()
    unmerged, peft_merged = references(base_dir, adapter, ids)  # the bfloat16 base read as float32
    out = merge(base_dir, adapter, str(tmp_path / "merged"), dtype="float32", progress=False)
    torch.testing.assert_close(logits(merged_model(out), ids), unmerged, rtol=1e-4, atol=1e-4)
    want = {k: v for k, v in peft_merged.state_dict().items()}
    for name, tensor in merged_model(out).state_dict().items():
        torch.testing.assert_close(tensor, want[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch, dtype", [("llama", torch.bfloat16), ("gpt2", torch.float16)])
def test_half_precision_output_is_peft_merge_rounded_once(arch, dtype, tiny_dir, tmp_path):
    from lema.merge import merge

    base_dir = tiny_dir(arch)
    adapter = peft_adapter(base_dir, str(tmp_path / "adapter"), target_modules=LINEAR.get(arch, ["q_proj", "o_proj"]))
    _, peft_merged = references(base_dir, adapter, ids_for())
    out = merge(base_dir, adapter, str(tmp_path / "merged"), dtype=str(dtype).split(".")[-1], progress=False)
    got = merged_model(out, dtype=dtype).state_dict()
    for name, tensor in peft_merged.state_dict().items():
        assert got[name].dtype == dtype
        torch.testing.assert_close(got[name].float(), tensor.to(dtype).float(), msg=name)


@pytest.mark.parametrize("arch, lora, save, words", [
    ("mixtral", {"target_modules": ["q_proj"], "target_parameters": ["mlp.experts.gate_up_proj"]}, {},
     "target_parameters"),  # was: "the config does not belong to these weights: copy the adapter folder again"
    ("llama", {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, {}, "modules_to_save"),
    ("qwen2", {"target_modules": ["q_proj"], "bias": "all"}, {}, "trained biases"),
    ("llama", {"target_modules": ["q_proj", "lm_head"]}, {}, "saved embedding layers"),
    ("llama-tied", {"target_modules": ["q_proj", "lm_head"]}, {"save_embedding_layers": False},
     "ties to its input embedding"),  # was: "adapts weights this model does not have ... made for another model"
    ("llama", {"target_modules": ["q_proj"], "lora_bias": True}, {},
     "has no bias to fold lora_B's bias into"),  # Llama's q_proj has no bias; was: "... made for another model"
    ("zamba", {"target_modules": ["q_proj"]}, {},  # one block shared by layers 2 and 5, PEFT's LoRA at each
     "which the model shares with 'model.layers.2.shared_transf.self_attn.q_proj.weight'"),  # was: "another model"
])
def test_what_merge_cannot_fold_is_refused_in_one_line(arch, lora, save, words, tiny_dir, tmp_path, capsys):
    from lema.cli import main

    base_dir = tiny_dir(arch)
    adapter = peft_adapter(base_dir, str(tmp_path / "adapter"), save, randomize=False, **lora)
    capsys.readouterr()  # what building the tiny model printed (Transformers' notes), not the command's
    out = tmp_path / "merged"
    rc = main(["merge", "--model", base_dir, "--adapter", adapter, "--output", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == 1 and "Traceback" not in err, err
    assert lines[-1].startswith("lema merge: error: ") and words in lines[-1], err
    assert "copy the adapter folder again" not in lines[-1] and "another model" not in lines[-1]
    assert not os.path.exists(out) and not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_a_tied_head_adapter_is_refused_before_anything_is_written(tiny_dir, tmp_path, monkeypatch):
    """It was found only when the merged weights had all been written (and then thrown away)."""
    import lema.convert as conv
    from lema.merge import merge

    base_dir = tiny_dir("llama-tied")
    adapter = peft_adapter(base_dir, str(tmp_path / "adapter"), {"save_embedding_layers": False}, randomize=False,
                           target_modules=["q_proj", "lm_head"])
    monkeypatch.setattr(conv, "write_packed", lambda *a, **kw: pytest.fail("the merged model was written"))
    with pytest.raises(ValueError, match="adapts lm_head, which this model ties to its input embedding"):
        merge(base_dir, adapter, str(tmp_path / "merged"), progress=False)
