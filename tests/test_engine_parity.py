"""The streaming engine against Transformers + PEFT resident (the reference), fp32 on the CPU.

Every test goes through the production path (LemaModel -> get_trainer -> train_step, or
`model(...)`), on tiny random checkpoints of each architecture (tests/tiny_models.py), both
strategies. LoRA tensors are compared by name (PEFT's adapter-file names), never by order.
"""

from __future__ import annotations

import hashlib
import os
import warnings

import pytest
import torch

from lema import LemaConfig, LemaModel, MemoryStrategy
from tiny_models import ARCHS

STRATEGIES = [MemoryStrategy.STREAMING, MemoryStrategy.RESIDENT]
VOCAB = 96
LR = 1e-2


# ----------------------------------------------------------------------------- helpers
def lora_params(peft_model) -> dict[str, torch.nn.Parameter]:
    """LoRA parameters by their adapter-file name (`...q_proj.lora_A.weight`, adapter name dropped)."""
    return {n.replace(".default.", "."): p for n, p in peft_model.named_parameters() if ".lora_" in n}


def snapshot(peft_model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lora_params(peft_model).items()}


def reference(path: str, adapter_dir: str = None, train: bool = True):
    """Transformers' model, all weights resident, with the adapter loaded by PEFT itself."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from lema.engine.skeleton import attention_implementation

    # Gemma 2: eager, as LEMA (Transformers < 5.23 would build it with SDPA and drop the attention soft-capping)
    attn = attention_implementation(AutoConfig.from_pretrained(path))
    try:
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    except ValueError:  # no SDPA for this architecture; LEMA falls back to eager as well
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    if adapter_dir is None:
        return ref.eval()
    with warnings.catch_warnings():  # PEFT asks the model about a deprecated gradient-checkpointing flag
        warnings.simplefilter("ignore", FutureWarning)
        pm = PeftModel.from_pretrained(ref, adapter_dir, is_trainable=True)
    return pm.train() if train else pm.eval()


def reference_step(pm, batches, attention_masks=None):
    """One AdamW step on the reference over `batches` concatenated; returns (loss, logits)."""
    ids = torch.cat(batches)
    mask = None if attention_masks is None else torch.cat(attention_masks)
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(list(lora_params(pm).values()), lr=LR, weight_decay=0.0)
    out = pm(input_ids=ids, labels=labels, attention_mask=mask, use_cache=False)
    out.loss.backward()
    opt.step()
    return out.loss.detach(), out.logits.detach()


def assert_lora_equal(got: dict, want: dict, atol: float, what: str) -> None:
    assert got.keys() == want.keys(), f"{what}: LoRA names differ: {sorted(got.keys() ^ want.keys())[:4]}"
    bad = {n: float((got[n] - want[n]).abs().max()) for n in want if not torch.allclose(got[n], want[n], atol=atol,
                                                                                          rtol=0)}
    assert not bad, f"{what}: {len(bad)} of {len(want)} LoRA tensors differ, e.g. {list(bad.items())[:3]}"


def assert_all_moved(before: dict, after: dict, what: str) -> None:
    still = [n for n in before if torch.equal(before[n], after[n])]
    assert not still, f"{what}: {len(still)} of {len(before)} LoRA tensors did not move, e.g. {still[:3]}"


def batch(rows: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(seed))


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ------------------------------------------------------------------ one AdamW step = reference
@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.value)
@pytest.mark.parametrize("arch", ARCHS)
def test_adamw_step_matches_peft(arch, strategy, tiny_dir, make_lema, tmp_path):
    """Every layer recomputed in backward (keep_activations=0); kept layers: test_kept_activations_*."""
    check_adamw_step(tiny_dir(arch), strategy, make_lema, tmp_path, keep_activations=0)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.value)
@pytest.mark.parametrize("arch", ["opt", "gemma2", "deepseek_v3", "phimoe", "gemma3n_text", "falcon", "zamba",
                                  "recurrent_gemma", "rwkv"])
def test_more_architectures_match_peft(arch, strategy, tiny_dir, make_lema, tmp_path):
    """OPT: dropout 0.1 inside the base layers, which the recompute must draw again (seeded alike);
    Gemma 2: no SDPA attention in Transformers, so the skeleton falls back to eager attention;
    DeepSeek-V3: its routers' `e_score_correction_bias`, a persistent buffer the checkpoint holds (it kept its
    __init__ zeros), and PEFT's LoRA on the fused experts' parameters (ParamWrapper, as `down_proj` is a default
    target: it parametrizes the bound weight for each forward, and the second forward failed);
    PhiMoE: its router, an nn.Linear subclass returning a tuple, is no default LoRA target (LoRA's sum failed);
    Falcon: FalconLinear, an nn.Linear subclass whose forward is a linear's, is one (no target was left);
    Zamba: one transformer block shared by two layers, whose weights the first layer's unbinding took from the
    second ("not on the expected device meta"): resident, in no layer's unit;
    Gemma 3n: clamps a weight in place in each training forward, which on the CPU's read-only views of the file
    ended the process (SIGSEGV; the views are copy-on-write now), and plans per-layer MLP widths;
    RecurrentGemma: a state its RG-LRU keeps on itself, detached after each layer (test_graph_kept_on_a_module_*);
    RWKV: a time loop in Python, eval mode not rescaled (test_rwkv_evaluates_with_its_train_mode_forward)."""
    # Gemma 3n's AltUp and per-layer-input linears get no gradient from one step in PEFT either: Llama's seven
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] \
        if arch == "gemma3n_text" else None
    model = check_adamw_step(tiny_dir(arch), strategy, make_lema, tmp_path, keep_activations=0,
                             lora_target_modules=targets)
    if arch == "deepseek_v3":
        bias = model.base_model.model.layers[1].mlp.gate.e_score_correction_bias
        assert float(bias.abs().max()) > 0  # the file's values (tiny_models draws them), not __init__'s zeros
        ids = batch()
        with torch.no_grad():  # the bound weights are let go of after each forward: a second one runs the same
            torch.testing.assert_close(model(ids).logits, model(ids).logits, atol=0, rtol=0)
    if arch == "phimoe":
        assert "router" not in model.lora_targets and "q_proj" in model.lora_targets
    if arch == "falcon":
        assert {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"} <= set(model.lora_targets)


@pytest.mark.parametrize("arch", ["gptj", "olmo_hybrid"])
def test_half_precision_holds_what_transformers_holds(arch, tiny_dir, make_lema):
    """In bf16, as from_pretrained: GPT-J's sinusoidal positions (a buffer its __init__ computes) in float32,
    where the skeleton built them in bf16 (logits 0.03 apart; at position 2048 the sines were 0.86 off);
    OLMo-Hybrid's A_log, a parameter its __init__ makes in float32, held in float32, where LEMA held and streamed
    it in bf16 (logits 0.07 apart)."""
    from transformers import AutoModelForCausalLM

    path = tiny_dir(arch)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        want = ref(batch(), use_cache=False).logits
    for strategy in STRATEGIES:
        model = make_lema(path, lora_seed=None, strategy=strategy, dtype="bfloat16")  # B = 0: the base model
        with torch.no_grad():
            torch.testing.assert_close(model(batch()).logits, want, atol=0, rtol=0)
        for name, buf in ref.named_buffers():
            assert model.base_model.get_buffer(name).dtype == buf.dtype, name
        if arch == "olmo_hybrid":
            assert model.dtype_of("model.layers.0.linear_attn.A_log") == torch.float32


def test_fused_experts_get_peft_s_doubled_rank_without_its_false_warning(tiny_dir, make_lema):
    """PEFT fuses the gate_proj and up_proj targets into an MoE's experts.gate_up_proj parameter with rank 2 r, and
    then warns that its own rank_pattern matched no module ("ignored"): the rank is applied, so LEMA silences it
    in its own PEFT calls, and only there (a user's own mistyped pattern still gets PEFT's warning)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = tiny_dir("ernie4_5_moe")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = make_lema(path, lora_rank=4)
    assert not [str(w.message) for w in caught if "pattern keys did not match" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir("llama")),
                       LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_porj": 8}))
    assert [str(w.message) for w in caught if "pattern keys did not match" in str(w.message)]
    experts = model.base_model.get_submodule("model.layers.1.mlp.experts")
    gate_up = experts.base_layer.lora_A["default"].weight  # PEFT's ParamWrapper for gate_up_proj: r per expert
    assert gate_up.shape[0] == 2 * 4 * model.hf_config.moe_num_experts


def test_a_float32_residual_stream_meets_a_bf16_head_in_the_chunked_loss(tiny_dir, make_lema):
    """Mamba keeps its residual stream in float32; its forward casts the hidden states to the head's dtype, and the
    chunked loss (LEMA's default once the float32 logits pass 64 MiB) did not: a bf16 step raised."""
    from transformers import AutoModelForCausalLM

    path = tiny_dir("mamba")
    targets = ["in_proj", "x_proj", "dt_proj"]  # PEFT refuses Mamba's out_proj and conv1d as LoRA targets
    model = make_lema(path, lora_seed=None, dtype="bfloat16", chunked_loss=True, lora_target_modules=targets)
    ids = batch()
    _, loss = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=LR)).train_step(ids)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    with torch.no_grad():
        want = ref(ids, labels=ids, use_cache=False).loss
    torch.testing.assert_close(loss.float(), want.float(), atol=1e-3, rtol=1e-3)


def test_eval_mode_outside_train_steps(tiny_dir, make_lema):
    """Like `from_pretrained`, a new model has no dropout (OPT has 0.1 in its base layers); a train
    step turns dropout on for itself only, so an evaluation between steps is deterministic."""
    path = tiny_dir("opt")
    model = make_lema(path, lora_seed=None, lora_dropout=0.1)
    assert not model.training and not model.peft_model.training
    ids = batch()
    with torch.no_grad():
        first, second = model(ids).logits, model(ids).logits
        want = reference(path)(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    torch.testing.assert_close(first, want, atol=1e-5, rtol=1e-5)

    trainer = model.get_trainer(torch.optim.SGD(model.get_trainable_parameters(), lr=0.0))
    torch.manual_seed(0)
    _, loss_a = trainer.train_step(ids)
    torch.manual_seed(1)
    _, loss_b = trainer.train_step(ids)
    assert loss_a.item() != loss_b.item(), "no dropout inside the train step"
    assert not model.training and not any(m.training for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, first, atol=0, rtol=0)
    model.train()  # a caller's own mode is kept too
    trainer.train_step(ids)
    assert model.training


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.value)
def test_rwkv_evaluates_with_its_train_mode_forward(strategy, tiny_dir, make_lema):
    """RWKV in eval mode divides two weights of each block in place by 2^(block // rescale_every) and halves the
    hidden states as often: on LEMA's meta parameters the division did nothing, the halving still happened (logits
    1.6 off at 8 layers, greedy generation another text, the validation loss 5.199 for 5.176). Eval runs the
    train-mode forward now: Transformers' own, rescaled, is within rounding of it with no adapter."""
    path = tiny_dir("rwkv")
    model = make_lema(path, strategy=strategy, lora_seed=None)
    ref = reference(path)
    ids = batch()
    with torch.no_grad():
        got = model(ids).logits
        want = ref(input_ids=ids, use_cache=False).logits  # eval mode: rescaled
        ref.train()
        trained = ref(input_ids=ids, use_cache=False).logits
        ref.eval()
    torch.testing.assert_close(got, trained, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    prompt = ids[:1, :4]
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert model.generate(prompt, **kwargs).tolist() == ref.generate(prompt, **kwargs).tolist()


@pytest.mark.parametrize("keep", [0, 99], ids=["recomputed", "kept"])
def test_graph_kept_on_a_module_is_let_go(keep, tiny_dir, make_lema):
    """RecurrentGemma's RG-LRU keeps its final scan state on itself (recurrent_states) until its block's next
    call resets it. After the recompute in backward that state's graph is the recompute's, which no backward runs,
    and each layer's recompute outlived its backward until the layer's next forward (the step's peak
    15.5 MiB instead of 7.5 at b2 x 128 with 4 recurrent layers). After each layer's call the state is detached:
    the same values, no graph, and the step still equals Transformers + PEFT's."""
    path = tiny_dir("recurrent_gemma")
    model = make_lema(path, keep_activations=keep)
    trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-3))
    ids = batch()
    trainer.train_step(ids, labels=ids)
    held = [(type(m).__name__, k) for m in model.base_model.modules() for k, v in vars(m).items()
            if torch.is_tensor(v) and v.grad_fn is not None]
    states = [m.recurrent_states for m in model.base_model.modules() if hasattr(m, "recurrent_states")]
    assert states and all(torch.is_tensor(s) for s in states)  # it keeps them, detached
    assert held == []


@pytest.mark.parametrize("variant", ["llama-tied", "sharded"])
def test_tied_or_sharded_checkpoint_matches_peft(variant, tiny_dir, make_lema, tmp_path):
    """Tied embedding/lm_head (one resident tensor), and a checkpoint in 4 shards with an index."""
    if variant == "sharded":
        path = tiny_dir("llama", max_shard_size="40KB")
        assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    else:
        path = tiny_dir(variant)
    model = check_adamw_step(path, MemoryStrategy.STREAMING, make_lema, tmp_path)
    if variant == "llama-tied":
        base = model.base_model
        assert base.get_output_embeddings().weight is base.get_input_embeddings().weight


def check_adamw_step(path, strategy, make_lema, tmp_path, **config):
    arch = os.path.basename(path)
    model = make_lema(path, strategy=strategy, **config)
    model.save_adapter(str(tmp_path / "start"))
    before = snapshot(model.peft_model)
    ids = batch()

    opt = torch.optim.AdamW(model.get_trainable_parameters(), lr=LR, weight_decay=0.0)
    torch.manual_seed(0)  # the same dropout masks, for architectures with dropout in the base layers
    logits, loss = model.get_trainer(opt).train_step(ids, labels=ids)

    pm = reference(path, str(tmp_path / "start"))
    assert_lora_equal(snapshot(pm), before, 0.0, "adapter as loaded by PEFT")
    torch.manual_seed(0)
    ref_loss, ref_logits = reference_step(pm, [ids])
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    after = snapshot(model.peft_model)
    assert_all_moved(before, after, f"{arch}/{strategy.value}")
    assert_all_moved(before, snapshot(pm), f"{arch} reference")
    assert_lora_equal(after, snapshot(pm), 1e-4, f"{arch}/{strategy.value} after one AdamW step")
    return model


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batch_matches_peft(arch, side, tiny_dir, make_lema, tmp_path):
    """Rows of different lengths padded on one side; labels -100 at the pads."""
    path = tiny_dir(arch)
    model = make_lema(path, strategy=MemoryStrategy.STREAMING)
    model.save_adapter(str(tmp_path / "start"))
    before = snapshot(model.peft_model)
    ids = batch(3, 12, seed=2)
    mask = torch.ones_like(ids)
    for row, pad in ((1, 4), (2, 7)):
        if side == "left":
            mask[row, :pad] = 0
        else:
            mask[row, -pad:] = 0
    ids = ids.masked_fill(mask == 0, 0)  # pad token id
    labels = ids.masked_fill(mask == 0, -100)

    opt = torch.optim.AdamW(model.get_trainable_parameters(), lr=LR, weight_decay=0.0)
    logits, loss = model.get_trainer(opt).train_step(ids, labels=labels, attention_mask=mask)

    pm = reference(path, str(tmp_path / "start"))
    ref_loss, ref_logits = reference_step(pm, [ids], [mask])
    assert torch.isfinite(loss)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    real = mask.bool()
    torch.testing.assert_close(logits[real], ref_logits[real], atol=1e-4, rtol=1e-4)
    after = snapshot(model.peft_model)
    assert_all_moved(before, after, f"{arch} padded {side}")
    assert_lora_equal(after, snapshot(pm), 1e-4, f"{arch} padded {side}")


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.value)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_gradient_accumulation_equals_one_big_batch(arch, strategy, tiny_dir, make_lema, tmp_path):
    """Two micro-batches with gradient_accumulation_steps=2 == one reference step on both together
    (equal-length rows without padding, so the mean of the micro-batch means is the batch mean)."""
    path = tiny_dir(arch)
    model = make_lema(path, strategy=strategy)
    model.save_adapter(str(tmp_path / "start"))
    before = snapshot(model.peft_model)
    first, second = batch(2, 10, seed=4), batch(2, 10, seed=5)

    opt = torch.optim.AdamW(model.get_trainable_parameters(), lr=LR, weight_decay=0.0)
    trainer = model.get_trainer(opt, gradient_accumulation_steps=2)
    _, loss1 = trainer.train_step(first, labels=first)
    assert not trainer.last_step_applied
    assert_lora_equal(snapshot(model.peft_model), before, 0.0, "after the first micro-batch (no step yet)")
    _, loss2 = trainer.train_step(second, labels=second)
    assert trainer.last_step_applied

    pm = reference(path, str(tmp_path / "start"))
    ref_loss, _ = reference_step(pm, [first, second])
    mean = (loss1.item() + loss2.item()) / 2
    assert abs(mean - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    after = snapshot(model.peft_model)
    assert_all_moved(before, after, f"{arch} accumulated")
    assert_lora_equal(after, snapshot(pm), 1e-4, f"{arch}/{strategy.value} accumulated step")


def test_accumulation_with_num_items_weighs_every_target_alike(tiny_dir, make_lema, tmp_path):
    """Micro-batches with unequal supervised targets, num_items_in_batch = all the step's targets: the step
    equals one reference step on both together (the mean over every target), unlike 1/n per micro-batch."""
    path = tiny_dir("llama")
    model = make_lema(path)
    model.save_adapter(str(tmp_path / "start"))
    first, second = batch(2, 10, seed=4), batch(2, 10, seed=5)
    labels1 = first.clone()
    labels1[:, :8] = -100  # 2 x 2 targets
    labels2 = second.clone()
    labels2[:, :2] = -100  # 2 x 8 targets
    n = int((labels1[:, 1:] != -100).sum() + (labels2[:, 1:] != -100).sum())
    assert n == 20

    opt = torch.optim.AdamW(model.get_trainable_parameters(), lr=LR, weight_decay=0.0)
    trainer = model.get_trainer(opt, gradient_accumulation_steps=2)
    trainer.train_step(first, labels=labels1, num_items_in_batch=n)
    trainer.train_step(second, labels=labels2, num_items_in_batch=n)
    assert trainer.last_step_applied

    pm = reference(path, str(tmp_path / "start"))
    ref_opt = torch.optim.AdamW(list(lora_params(pm).values()), lr=LR, weight_decay=0.0)
    pm(input_ids=torch.cat([first, second]), labels=torch.cat([labels1, labels2]), use_cache=False).loss.backward()
    grads = {k: p.grad.clone() for k, p in lora_params(pm).items()}
    ref_opt.step()
    assert_lora_equal(snapshot(model.peft_model), snapshot(pm), 1e-4, "num_items_in_batch step")

    # the 1/n rule (the mean of the micro-batch means) gives another gradient here, so the check above can fail
    pm2 = reference(path, str(tmp_path / "start"))
    for ids, labels in ((first, labels1), (second, labels2)):
        (pm2(input_ids=ids, labels=labels, use_cache=False).loss / 2).backward()
    differs = [k for k, p in lora_params(pm2).items() if not torch.allclose(p.grad, grads[k], atol=1e-6)]
    assert differs, "the two micro-batches' targets were too alike for the weighting to matter"


def test_gradient_clipping_matches_peft(tiny_dir, make_lema, tmp_path):
    """max_grad_norm clips the LoRA gradients' global norm before the step, as torch's clip_grad_norm_."""
    path = tiny_dir("qwen2")
    model = make_lema(path)
    model.save_adapter(str(tmp_path / "start"))
    ids = batch()
    trainer = model.get_trainer(torch.optim.SGD(model.get_trainable_parameters(), lr=1.0), max_grad_norm=0.05)
    trainer.train_step(ids)

    pm = reference(path, str(tmp_path / "start"))
    params = lora_params(pm)
    pm(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), 0.05))
    torch.optim.SGD(list(params.values()), lr=1.0).step()
    assert norm > 0.05, "the gradients were not large enough for the clip to matter"
    assert trainer.last_grad_norm == pytest.approx(norm, rel=1e-5)
    assert_lora_equal(snapshot(model.peft_model), snapshot(pm), 1e-5, "clipped SGD step")


def lora_grads(model, ids, seed: int) -> dict[str, torch.Tensor]:
    """Gradients of one forward/backward in train mode (the trainer's path), RNG seeded first."""
    model.peft_model.train()
    for p in model.get_trainable_parameters():
        p.grad = None
    torch.manual_seed(seed)
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in lora_params(model.peft_model).items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_lora_dropout_same_masks_streaming_resident_peft(arch, tiny_dir, make_lema, tmp_path):
    """lora_dropout=0.1: the recompute in backward draws the forward's masks again, so STREAMING,
    RESIDENT and PEFT resident give the same gradients under the same seed."""
    path = tiny_dir(arch)
    ids = batch()
    streaming = make_lema(path, strategy=MemoryStrategy.STREAMING, lora_dropout=0.1)
    resident = make_lema(path, strategy=MemoryStrategy.RESIDENT, lora_dropout=0.1)
    streaming.save_adapter(str(tmp_path / "start"))

    g_stream = lora_grads(streaming, ids, seed=11)
    g_res = lora_grads(resident, ids, seed=11)
    assert_lora_equal(g_stream, g_res, 1e-6, "streaming vs resident gradients, dropout 0.1")
    g_other = lora_grads(streaming, ids, seed=12)
    assert any(not torch.allclose(g_other[n], g_stream[n]) for n in g_stream), "dropout had no effect"

    pm = reference(path, str(tmp_path / "start"))
    assert pm.peft_config["default"].lora_dropout == 0.1
    torch.manual_seed(11)
    pm(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    g_ref = {n: p.grad for n, p in lora_params(pm).items()}
    assert_lora_equal(g_stream, g_ref, 1e-5, "streaming vs PEFT gradients, dropout 0.1")


# --------------------------------------------------------------------------- LoRA invariants
@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.value)
@pytest.mark.parametrize("arch", ARCHS)
def test_zero_b_gives_the_base_model(arch, strategy, tiny_dir, make_lema):
    path = tiny_dir(arch)
    model = make_lema(path, lora_seed=None, strategy=strategy)  # PEFT init: B = 0
    assert all(float(p.detach().abs().max()) == 0 for n, p in lora_params(model.peft_model).items() if ".lora_B." in n)
    ids = batch()
    with torch.no_grad():
        got = model(ids).logits
        want = reference(path)(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.value)
def test_base_weights_untouched_by_a_step(strategy, tiny_dir, make_lema):
    path = tiny_dir("llama")
    weights = os.path.join(path, "model.safetensors")
    digest = sha256(weights)
    model = make_lema(path, strategy=strategy)
    opt = torch.optim.AdamW(model.get_trainable_parameters(), lr=LR)
    trainer = model.get_trainer(opt)
    for seed in (1, 2):
        trainer.train_step(batch(seed=seed))

    assert sha256(weights) == digest
    want = dict(reference(path).named_parameters())
    base = model.base_model
    for name in model.units.units["embed"] + model.units.units["head"]:
        torch.testing.assert_close(base.get_parameter(name), want[name], atol=0, rtol=0)
    for i in range(model.units.num_layers):
        weights_i = model.source.acquire(i)
        try:
            assert weights_i.keys() == {n for n in want if n.startswith(f"model.layers.{i}.")}
            for name, t in weights_i.items():
                torch.testing.assert_close(t, want[name], atol=0, rtol=0, msg=name)
        finally:
            model.source.release(i)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.value)
def test_no_grad_forward_keeps_nothing(strategy, tiny_dir, make_lema):
    model = make_lema(tiny_dir("llama"), strategy=strategy)
    with torch.no_grad():
        out = model(batch(), labels=batch())
    assert out.logits.grad_fn is None and out.loss.grad_fn is None
    assert model.streamed.bound_now == 0 and not model.streamed.held_in_backward
    if strategy == MemoryStrategy.STREAMING:
        assert not any(s.in_use for s in model.source.slots), "a slot is still in use after the pass"
    # ... and after a training step (the backward holds are released at the end of backward)
    opt = torch.optim.AdamW(model.get_trainable_parameters(), lr=LR)
    model.get_trainer(opt).train_step(batch())
    assert model.streamed.bound_now == 0 and not model.streamed.held_in_backward
    if strategy == MemoryStrategy.STREAMING:
        assert not any(s.in_use for s in model.source.slots)


# ------------------------------------------------------------------------------------ adapter
@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_saved_adapter_loads_in_peft_with_same_logits(arch, tiny_dir, make_lema, tmp_path):
    path = tiny_dir(arch)
    model = make_lema(path)
    model.save_adapter(str(tmp_path / "adapter"))
    assert sorted(os.listdir(tmp_path / "adapter")) == ["README.md", "adapter_config.json",
                                                        "adapter_model.safetensors"] or \
        {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "adapter"))
    ids = batch()
    with torch.no_grad():
        got = model(ids).logits
        want = reference(path, str(tmp_path / "adapter"), train=False)(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    base = reference(path)(input_ids=ids, use_cache=False).logits
    assert (got - base).abs().max() > 1e-3, "the adapter does not change the output; the check would be vacuous"


def test_load_adapter_round_trip(tiny_dir, make_lema, tmp_path):
    path = tiny_dir("llama")
    src = make_lema(path, lora_seed=5)
    src.save_adapter(str(tmp_path / "adapter"))
    dst = make_lema(path, lora_seed=None, strategy=MemoryStrategy.RESIDENT)
    dst.load_adapter(str(tmp_path / "adapter"))
    assert_lora_equal(snapshot(dst.peft_model), snapshot(src.peft_model), 0.0, "after load_adapter")
    ids = batch()
    with torch.no_grad():
        torch.testing.assert_close(dst(ids).logits, src(ids).logits, atol=1e-5, rtol=1e-5)
    src.save_adapter(str(tmp_path / "adapter"))  # overwriting an adapter folder is fine
    dst.load_adapter(str(tmp_path / "adapter"))


def test_load_adapter_refuses_other_model_or_rank(tiny_dir, make_lema, tmp_path):
    llama = make_lema(tiny_dir("llama"), lora_rank=4)
    make_lema(tiny_dir("gpt2"), lora_rank=4).save_adapter(str(tmp_path / "gpt2"))
    make_lema(tiny_dir("llama"), lora_rank=8).save_adapter(str(tmp_path / "rank8"))
    make_lema(tiny_dir("llama"), lora_rank=4, lora_target_modules=["q_proj"]).save_adapter(str(tmp_path / "q"))
    make_lema(tiny_dir("llama"), lora_rank=4, lora_alpha=16).save_adapter(str(tmp_path / "alpha16"))
    before = snapshot(llama.peft_model)
    with pytest.raises(ValueError, match="another model"):
        llama.load_adapter(str(tmp_path / "gpt2"))
    with pytest.raises(ValueError, match=r"r=8.*lora_rank=4"):
        llama.load_adapter(str(tmp_path / "rank8"))
    with pytest.raises(ValueError, match=r"lora_alpha=16.*lora_alpha=8"):  # alpha / r scales the update
        llama.load_adapter(str(tmp_path / "alpha16"))
    with pytest.raises(ValueError, match="target modules"):
        llama.load_adapter(str(tmp_path / "q"))
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        llama.load_adapter(str(tmp_path / "nothing-here"))
    assert_lora_equal(snapshot(llama.peft_model), before, 0.0, "a refused adapter changed the model")


def test_train_step_without_labels_ignores_padding(tiny_dir, make_lema):
    """labels=None trains on the inputs themselves, with the padded positions left out (-100)."""
    model = make_lema(tiny_dir("llama"), strategy=MemoryStrategy.RESIDENT)
    ids = batch(2, 10)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    opt = torch.optim.SGD(model.get_trainable_parameters(), lr=0.0)
    _, loss = model.get_trainer(opt).train_step(ids, attention_mask=mask)
    with torch.no_grad():
        want = model(ids, labels=ids.masked_fill(mask == 0, -100), attention_mask=mask).loss
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


# ------------------------------------------------------------------------ the seed's example
def test_seed_example_runs_as_written(tiny_dir):
    config = LemaConfig(
        model_name_or_path=tiny_dir("llama"),
        gbi_path=None,
        strategy=MemoryStrategy.STREAMING,
        lora_rank=16,
        gradient_checkpointing=True,
    )
    model = LemaModel(config)
    try:
        model.initialize_lora()
        optimizer = torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-4)
        trainer = model.get_trainer(optimizer)
        input_ids = torch.randint(0, VOCAB, (2, 16))
        logits, loss = trainer.train_step(input_ids, labels=input_ids)
        assert logits.shape == (2, 16, VOCAB)
        assert loss.dim() == 0 and torch.isfinite(loss)
        assert logits.grad_fn is None and loss.grad_fn is None
    finally:
        model.close()


# ------------------------------------------------------------------------------ memory_stats
def test_memory_stats(tiny_dir, make_lema):
    path = tiny_dir("llama", num_layers=5)
    ref = reference(path)
    total = sum(p.numel() * 4 for p in ref.parameters())  # fp32, tied weights counted once
    per_layer = sum(p.numel() * 4 for n, p in ref.named_parameters() if n.startswith("model.layers.0."))
    stats = {}
    for strategy in STRATEGIES:
        model = make_lema(path, strategy=strategy, num_buffers=2, keep_activations=0)
        opt = torch.optim.AdamW(model.get_trainable_parameters(), lr=LR)
        model.get_trainer(opt).train_step(batch())
        s = model.memory_stats(opt)
        assert {"frozen_weights_now", "frozen_weights_peak", "activations", "adapters", "optimizer_state"} <= s.keys()
        # the recompute keeps each layer's input: 5 layers x (B, T, hidden) fp32
        assert s["activations"] == 5 * batch().numel() * ref.config.hidden_size * 4
        assert all(isinstance(v, int) and v >= 0 for v in s.values()), s
        adapters = sum(p.numel() * 4 for p in model.get_trainable_parameters())
        assert s["adapters"] == adapters
        assert 2 * adapters <= s["optimizer_state"] <= 2 * adapters + 8 * len(opt.state)  # exp_avg(_sq) + step
        assert model.memory_stats()["optimizer_state"] == 0
        assert s["frozen_weights_now"] <= s["frozen_weights_peak"]
        stats[strategy] = s
    resident, streaming = stats[MemoryStrategy.RESIDENT], stats[MemoryStrategy.STREAMING]
    # the untied fp32 embedding stays a view of the mmap on the CPU: page cache, not counted
    embedding = ref.get_input_embeddings().weight.numel() * 4
    assert model.embedding_view_bytes == embedding
    assert resident["frozen_weights_peak"] == total - embedding
    assert streaming["frozen_weights_peak"] == total - embedding - 3 * per_layer  # 2 of the 5 layers at a time
    assert streaming["frozen_weights_peak"] < resident["frozen_weights_peak"]


# ------------------------------------------------------------------------- kept activations
@pytest.mark.parametrize("keep", [1, 99], ids=["one-layer-kept", "all-kept"])
@pytest.mark.parametrize("arch", ARCHS + ["opt", "gemma2"])
def test_kept_activations_match_peft(arch, keep, tiny_dir, make_lema, tmp_path):
    """Layers that keep their activations (no recompute; weights re-acquired in backward through the
    saved-tensor hooks) give PEFT's loss and AdamW step; with one kept layer, the other layers recompute."""
    model = check_adamw_step(tiny_dir(arch), MemoryStrategy.STREAMING, make_lema, tmp_path, keep_activations=keep)
    L = model.units.num_layers
    assert model.streamed.keep == frozenset(model.kept_layers(batch().numel()))
    assert len(model.streamed.keep) == min(keep, L)
    assert model.streamed.kept_bytes > 0
    assert model.streamed.boundary_bytes == (L - min(keep, L)) * batch().numel() * model.hf_config.hidden_size * 4


@pytest.mark.parametrize("arch", ARCHS + ["opt", "gemma2"])
def test_kept_activations_copied_out_of_the_heap_match_peft(arch, tiny_dir, make_lema, tmp_path, monkeypatch):
    """On the CPU the kept layers' saved activations are copied into chunks of their own (KeptChunks: not left
    between the heap's transient blocks). The tiny models' tensors are under the size that is copied, so the
    threshold is lowered: every saved tensor but the weights, the adapters and the layers' shared inputs is
    then a copy, and the step still equals PEFT's."""
    from lema.engine import streamed_layer

    monkeypatch.setattr(streamed_layer, "KEPT_COPY_MIN_BYTES", 0)
    placed = []
    place = streamed_layer.KeptChunks.place
    monkeypatch.setattr(streamed_layer.KeptChunks, "place", lambda self, st: placed.append(st.nbytes()) or place(self, st))
    model = check_adamw_step(tiny_dir(arch), MemoryStrategy.STREAMING, make_lema, tmp_path, keep_activations=99)
    assert len(model.streamed.keep) == model.units.num_layers
    assert placed and 0 < sum(placed) <= model.streamed.kept_bytes  # copies made, of what the kept layers saved
    assert model.streamed.kept_chunks.used >= placed[-1]


@pytest.mark.parametrize("copy_kept", [True, False], ids=["copied", "as-made"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "rwkv"])
def test_a_kept_layer_s_saved_tensors_die_with_its_step(arch, copy_kept, tiny_dir, make_lema, monkeypatch):
    """Nothing a kept layer saved outlives the step. RWKV's time loop updates its state once more after the
    last output, a branch of the graph no backward runs: its nodes are freed only when nothing refers to them.
    A saved tensor the pack hook handed back as autograd gave it (one of the node's own outputs, as exp saves)
    carries that node as its grad_fn: node -> saved tensor -> node, a cycle no collector sees. Each step
    then kept the layer's graph, and on the CPU the 64 MiB chunks its copies lived in (RWKV b16 x 128: 192
    MiB more in use every step). `copy_kept` False is a GPU's (or a CPU budget's) path: nothing copied."""
    import gc
    import weakref

    from lema.engine import streamed_layer

    model = make_lema(tiny_dir(arch), keep_activations=99)
    model.streamed.copy_kept = copy_kept
    saved = []
    pack = streamed_layer.StreamedLayers._pack

    def recording(self, index, seen, shared, t):
        if not (t.is_leaf and t.requires_grad) and index.find(t) is None:  # not an adapter, not a weight
            saved.append(weakref.ref(t))
        return pack(self, index, seen, shared, t)

    monkeypatch.setattr(streamed_layer.StreamedLayers, "_pack", recording)
    ids = batch()
    optimizer = torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-3)
    trainer = model.get_trainer(optimizer)
    for _ in range(2):
        trainer.train_step(ids, labels=ids)
    gc.collect()
    assert len(model.streamed.keep) == model.units.num_layers and saved
    assert [r() for r in saved if r() is not None] == []
    if copy_kept:
        assert all(streamed_layer._views_of(c) <= rest for c, rest in model.streamed.kept_chunks.chunks)


def test_kept_activations_stay_put_when_a_cpu_budget_bounds_the_heap(tiny_dir, make_lema, monkeypatch):
    """With a CPU budget (max_vram) glibc already returns every freed tensor of 1 MiB or more: nothing is copied."""
    from lema.engine import streamed_layer

    monkeypatch.setattr(streamed_layer, "KEPT_COPY_MIN_BYTES", 0)
    model = make_lema(tiny_dir("llama"), keep_activations=99, max_vram="20GB")
    ids = batch()
    model(ids, labels=ids).loss.backward()
    assert model.host_heap_bounded and not model.streamed.copy_kept
    assert model.streamed.kept_bytes > 0 and model.streamed.kept_chunks.chunks == []


def test_kept_chunks_reused_only_when_no_graph_holds_them(tiny_dir, make_lema, monkeypatch):
    """The chunks the kept activations are copied into serve the next pass once its backward has freed them
    (no new chunk per step); a graph still alive keeps its chunks: a second pass run before its backward gets
    other chunks, and that backward still gives the gradients of its own batch."""
    from lema.engine import streamed_layer

    monkeypatch.setattr(streamed_layer, "KEPT_COPY_MIN_BYTES", 0)
    monkeypatch.setattr(streamed_layer, "KEPT_CHUNK_BYTES", 4096)  # several chunks per pass
    path = tiny_dir("llama")
    model, fresh = (make_lema(path, keep_activations=99) for _ in range(2))
    chunks = model.streamed.kept_chunks
    params = model.get_trainable_parameters()
    first, second = batch(seed=1), batch(seed=2)

    def grads(m, ids):
        m.zero_grad(set_to_none=True)
        m(ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in m.get_trainable_parameters()]

    grads(model, first)
    used = [c for c, _ in chunks.chunks]
    assert len(used) > 1
    grads(model, second)
    assert [c for c, _ in chunks.chunks] == used  # the same chunks again, nothing new
    model.zero_grad(set_to_none=True)
    held = model(first, labels=first).loss     # its graph, and so its chunks, stay alive
    grads(model, second)                      # before that backward: other chunks
    assert not {id(c) for c, _ in chunks.chunks} & {id(c) for c in used}
    model.zero_grad(set_to_none=True)
    held.backward()
    for got, want in zip([p.grad for p in params], grads(fresh, first)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        model(first)
    assert chunks.chunks == []  # a pass that keeps nothing lets them go


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_offloaded_boundary_matches_peft(arch, tiny_dir, make_lema, tmp_path):
    """offload_activations=True (forced here; on the CPU the host is the device, so only the mechanism is
    under test): each recomputed layer's input is saved as a host copy and unpacked for its recompute;
    PEFT's loss and AdamW step, and the copies are exactly the boundary."""
    model = check_adamw_step(tiny_dir(arch), MemoryStrategy.STREAMING, make_lema, tmp_path, keep_activations=0,
                             offload_activations=True)
    assert model.streamed.offload
    assert model.streamed.offloaded_bytes == model.streamed.boundary_bytes > 0
    stats = model.memory_stats()
    assert stats["activations_on_host"] == model.streamed.boundary_bytes and stats["activations"] == 0
    with torch.no_grad():
        model(batch())
    assert not model.streamed.offload, "nothing is saved without grad"

    # padded rows: GPT-2 passes its attention mask to each layer positionally; only the hidden states go
    ids = batch()
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    before = model.streamed.offloaded_bytes
    model(ids, labels=ids.masked_fill(mask == 0, -100), attention_mask=mask).loss.backward()
    assert model.streamed.offloaded_bytes - before == model.streamed.boundary_bytes > 0


@pytest.mark.parametrize("offload", [True, False])
def test_offloaded_inputs_leave_the_device_after_the_forward(offload, tiny_dir, make_lema):
    """With offload, nothing but the host copy holds a recomputed layer's input once the forward is past it: the
    device tensor is freed (on a GPU, 1 GiB of the 7B b8 x 512 step's peak: the pack hook's closure held each
    input until its layer's backward). Without offload the checkpoint itself keeps them, as planned."""
    import gc
    import weakref

    model = make_lema(tiny_dir("llama", num_layers=4), num_buffers=2, keep_activations=0,
                      offload_activations=offload)
    inputs = []
    for layer in model.base_model.model.layers:
        layer.register_forward_pre_hook(
            lambda _m, args, kwargs: inputs.append(weakref.ref(args[0] if args else kwargs["hidden_states"])),
            with_kwargs=True)
    ids = batch()
    loss = model(ids, labels=ids).loss
    gc.collect()
    alive = [r() is not None for r in inputs]
    assert len(alive) == 4
    if offload:
        assert not any(alive), f"layer inputs still alive after the forward: {alive}"
    else:
        assert all(alive)
    loss.backward()  # and the backward still has every input it needs
    assert all(p.grad is not None for p in model.get_trainable_parameters())


def test_kept_layers_reacquire_weights_from_reused_slots(tiny_dir, make_lema):
    """bf16 file, fp32 compute: weights live in 2 host slots that later layers overwrite. A kept layer's
    backward must read its weights re-acquired, not the slot as it was in forward: equal to RESIDENT."""
    path = tiny_dir("llama", num_layers=5, dtype=torch.bfloat16)
    streamed = make_lema(path, strategy=MemoryStrategy.STREAMING, num_buffers=2, keep_activations=99)
    resident = make_lema(path, strategy=MemoryStrategy.RESIDENT, keep_activations=0)
    assert all(s.host is not None for s in streamed.source.slots)
    for m in (streamed, resident):
        opt = torch.optim.AdamW(m.get_trainable_parameters(), lr=LR)
        m.get_trainer(opt).train_step(batch())
    assert len(streamed.streamed.keep) == 5
    assert streamed.source.stats.peak_occupied <= 2 and streamed.streamed.peak_bound == 1
    assert_lora_equal(snapshot(streamed.peft_model), snapshot(resident.peft_model), 1e-5, "kept, reused slots")


def test_keep_activations_none_follows_the_budget(tiny_dir, make_lema):
    """None: as many layers as the budget leaves room for (the planner's decision), spread; 0: none."""
    from lema.plan_table import spread
    from lema.planner import plan_for_config

    path = tiny_dir("llama", num_layers=5)
    probe = make_lema(path, keep_activations=0)
    tokens = batch().numel()
    p = plan_for_config(probe.config, 1, tokens, free_bytes=0)
    base = p.peak_bytes  # the allocator's cache (one layer's work) counts with a budget or without
    assert p.allocator_cache_bytes == p.layer_work_bytes
    budget = base + 2 * p.kept_extra_bytes + p.kept_extra_bytes // 2  # room for 2.5 layers
    model = make_lema(path, max_vram=str(budget))
    assert model.kept_layers(tokens) == spread(2, 5)
    assert make_lema(path, max_vram=str(base)).kept_layers(tokens) == []
    assert probe.kept_layers(tokens) == []
    with torch.no_grad():
        model(batch(), labels=batch())
    assert model.streamed.keep == frozenset(), "nothing is kept without grad"


def test_a_padded_step_plans_attention_s_mask(tiny_dir, make_lema):
    """Padding makes attention take a mask: Transformers then repeats k and v to every head (the tiny Llama has 4
    heads, 2 kv heads) and SDPA saves the mask in each layer, so each layer holds more (planner.plan's `padded`;
    the kept layers had 1.13x the plan in float32 at 8 heads / 2). The engine plans each step as padded or not:
    under a budget with room for 2.05 unpadded layers, a padded step keeps fewer."""
    from lema.planner import plan_for_config

    path = tiny_dir("llama", num_layers=5)
    probe = make_lema(path, keep_activations=0)
    ids = batch()
    B, T = ids.shape
    a, nh, nkv, d = B * T, 4, 2, 8
    plain, padded = (plan_for_config(probe.config, B, T, free_bytes=0, padded=p) for p in (False, True))
    assert padded.layer_terms["attention in"] - plain.layer_terms["attention in"] == 2 * a * (nh - nkv) * d * 4
    assert padded.layer_terms["attention mask"] == a * T * 4 and "attention mask" not in plain.layer_terms
    budget = plain.peak_bytes + 2 * plain.kept_extra_bytes + plain.kept_extra_bytes // 20
    model = make_lema(path, max_vram=str(budget))
    trainer = model.get_trainer(torch.optim.SGD(model.get_trainable_parameters(), lr=0.0))
    mask = torch.ones_like(ids)
    trainer.train_step(ids, attention_mask=mask)  # no padding: Transformers drops the mask
    assert len(model.streamed.keep) == 2
    mask[0, -3:] = 0
    trainer.train_step(ids, attention_mask=mask)
    want = plan_for_config(model.config, B, T, padded=True).kept_layers
    assert len(model.streamed.keep) == want < 2


# ------------------------------------------------------------------------------ chunked loss
@pytest.mark.parametrize("linear", ["auto", "transposed"])
@pytest.mark.parametrize("arch", ARCHS + ["llama-tied", "opt", "gemma2"])
def test_chunked_loss_matches_peft(arch, linear, tiny_dir, make_lema, tmp_path, monkeypatch):
    """The head + loss in chunks of 5 tokens (several chunks, ignored labels skipped) == Transformers'
    full-logits loss: the loss, the gradient of every LoRA tensor, and the eval loss; with the head's products
    (and the layers') in torch's orientation (auto, on these tiny shapes) or transposed (engine/cpu_linear.py).
    Gemma 2 checks the final logit soft-capping inside the chunks. (Gradients, not an AdamW step:
    Adam's first step divides by |g|, which turns float32 summation-order noise on the tiniest
    gradient entries into visible differences.)"""
    from lema.engine import chunked_loss

    monkeypatch.setattr(chunked_loss, "CHUNK_BYTES", 5 * 4 * VOCAB)
    monkeypatch.setenv("LEMA_CPU_LINEAR", linear)
    assert chunked_loss.chunk_rows(VOCAB) == 5
    path = tiny_dir(arch)
    model = make_lema(path, strategy=MemoryStrategy.STREAMING, chunked_loss=True)
    assert model.chunked_loss_unsupported is None
    model.save_adapter(str(tmp_path / "start"))
    ids = batch(3, 12, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row: its labels are ignored there
    labels = ids.masked_fill(mask == 0, -100)
    labels[2, :6] = -100  # a prompt whose tokens are not trained on

    opt = torch.optim.SGD(model.get_trainable_parameters(), lr=1.0)  # not stepped: zero_grad only below
    trainer = model.get_trainer(opt, gradient_accumulation_steps=2)  # no optimizer step after one call
    torch.manual_seed(0)
    logits, loss = trainer.train_step(ids, labels=labels, attention_mask=mask)
    assert logits is None, "the chunked loss never builds the logits"
    got = {n: p.grad * 2 for n, p in lora_params(model.peft_model).items()}  # the step divided the loss by 2

    pm = reference(path, str(tmp_path / "start"))
    torch.manual_seed(0)
    ref = pm(input_ids=ids, labels=labels, attention_mask=mask, use_cache=False)
    ref.loss.backward()
    want = {n: p.grad for n, p in lora_params(pm).items()}
    assert abs(loss.item() - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())
    assert all(float(g.abs().max()) > 0 for g in want.values())
    assert_lora_equal(got, want, 1e-6, f"{arch} chunked loss, LoRA gradients")
    head = {(k[0], k[2]) for k, pick in model.linear_orientations.picked.items() if k[1] == 5 and pick == 1}
    assert head == ({("forward", VOCAB), ("backward", VOCAB)} if linear == "transposed" else set())  # 5-row chunks

    model.eval(), pm.eval()
    with torch.no_grad():
        got = model(ids, labels=labels, attention_mask=mask).loss
        want = pm(input_ids=ids, labels=labels, attention_mask=mask, use_cache=False).loss
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())


def test_chunked_loss_is_automatic_for_large_logits(tiny_dir, make_lema, monkeypatch):
    """By default the full logits are built (and returned) while they are small, not past CHUNK_BYTES;
    chunked_loss=False never chunks."""
    from lema.engine import chunked_loss

    monkeypatch.setattr(chunked_loss, "CHUNK_BYTES", 100 * 4 * VOCAB)
    import lema.model

    monkeypatch.setattr(lema.model, "CHUNK_BYTES", 100 * 4 * VOCAB)
    model = make_lema(tiny_dir("llama"))
    assert model.uses_chunked_loss(100) is False and model.uses_chunked_loss(101) is True
    opt = torch.optim.AdamW(model.get_trainable_parameters(), lr=LR)
    small, large = batch(2, 12), batch(9, 12)
    assert model.get_trainer(opt).train_step(small)[0].shape == (2, 12, VOCAB)
    assert model.get_trainer(opt).train_step(large)[0] is None
    off = make_lema(tiny_dir("llama"), chunked_loss=False)
    assert off.uses_chunked_loss(10**6) is False


def test_a_head_that_transforms_the_logits_takes_the_full_logits(tiny_dir, make_lema):
    """RecurrentGemma caps its logits by a setting of its own (`logits_soft_cap`), which the chunks do not apply:
    read from its forward's code, the chunked loss is declined (it was taken, and the loss was off), also when
    asked for, so the loss is Transformers'."""
    path = tiny_dir("recurrent_gemma")
    model = make_lema(path, lora_seed=None, chunked_loss=True)  # LoRA's B = 0: the base model's loss
    assert model.chunked_loss_unsupported == ("RecurrentGemmaForCausalLM.forward transforms the logits "
                                              "(`logits = nn.functional.tanh(logits / cap) * cap`)")
    assert not model.uses_chunked_loss(10**6)
    ids = batch()
    with torch.no_grad():
        got = model(ids, labels=ids).loss
        want = reference(path)(input_ids=ids, labels=ids, use_cache=False).loss
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())


def test_all_labels_ignored_gives_nan_like_transformers(tiny_dir, make_lema):
    model = make_lema(tiny_dir("llama"), chunked_loss=True)
    ids = batch()
    with torch.no_grad():
        loss = model(ids, labels=torch.full_like(ids, -100)).loss
        want = reference(tiny_dir("llama"))(input_ids=ids, labels=torch.full_like(ids, -100), use_cache=False).loss
    assert torch.isnan(loss) and torch.isnan(want)


@pytest.mark.parametrize("keep", [0, 99], ids=["recomputed", "all-kept"])
@pytest.mark.parametrize("arch", ARCHS + ["opt", "gemma2"])
def test_transposed_frozen_products_match_peft(arch, keep, tiny_dir, make_lema, tmp_path, monkeypatch):
    """Every frozen linear's forward and backward product in the transposed orientation (engine/cpu_linear.py;
    the tiny models' products are below what `auto` times, so the other tests run torch's): the same step as
    PEFT's, through the recompute and through the kept layers' saved weights (the pack hook's WeightRef)."""
    monkeypatch.setenv("LEMA_CPU_LINEAR", "transposed")
    model = check_adamw_step(tiny_dir(arch), MemoryStrategy.STREAMING, make_lema, tmp_path, keep_activations=keep)
    picked = model.linear_orientations.picked
    assert {k[0] for k in picked} == {"forward", "backward"} and set(picked.values()) == {1}
    if arch == "gpt2":  # its projections are Conv1D, not nn.Linear: only the head's products are LEMA's
        assert {k[2] for k in picked} == {VOCAB}
    else:
        assert len({k[2:4] for k in picked}) > 1


def test_soft_capped_attention_runs_eager(tiny_dir):
    """Gemma 2 soft-caps its attention logits, which SDPA cannot do: eager attention on every Transformers
    version (before 5.23 Transformers built it with SDPA without a word and left the cap out)."""
    from lema.engine.skeleton import build_meta_model, load_hf_config

    model = build_meta_model(load_hf_config(tiny_dir("gemma2")), torch.float32)
    assert model.config._attn_implementation == "eager"
