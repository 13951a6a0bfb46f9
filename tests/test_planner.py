"""The memory planner's arithmetic and decisions on tiny configs; `lema plan` end to end."""

from __future__ import annotations

import mmap
import os

import pytest
import torch

from lema.cli import main
from lema.plan_bytes import head_work_bytes, layer_work_terms
from lema.plan_table import human, spread
from lema.planner import PlanError, pinned_slot_bytes, plan, plan_for_config
from tiny_models import make_config, save_tiny

B, T = 2, 16


def real_param_bytes(cfg, dtype):
    """Unit bytes counted on a real (materialised) model, independently of the planner's meta model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    embed = layers = head = 0
    for name, p in model.named_parameters():  # deduplicated: a tied lm_head counts once
        n = p.numel() * p.element_size()
        if ".layers." in name:
            layers += n
        elif "embed_tokens" in name:
            embed += n
        else:
            head += n
    return embed, layers, head


def lora_param_count(cfg, rank):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_config(cfg),
                           LoraConfig(r=rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                              "gate_proj", "up_proj", "down_proj"]))
    return sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plan_arithmetic(dtype):
    cfg = make_config("llama")
    p = plan(cfg, dtype, lora_rank=4, batch_size=B, seq_len=T, device_type="cuda", num_buffers=3, zero_copy=False)
    s = dtype.itemsize
    embed, layers, head = real_param_bytes(cfg, dtype)
    L, H, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    assert p.unit_bytes["embed"] == embed and p.unit_bytes["head"] == head
    assert sum(b for u, b in p.unit_bytes.items() if u.startswith("layer.")) == layers
    assert p.layer_bytes == layers // L
    assert p.slot_bytes >= p.layer_bytes and p.slot_bytes % 64 == 0

    assert p.lora_params == lora_param_count(cfg, 4)
    assert p.lora_bytes == 4 * p.lora_params  # fp32 adapters
    assert p.grad_bytes == p.lora_bytes
    assert p.optimizer_bytes == 2 * p.lora_bytes  # AdamW: exp_avg + exp_avg_sq
    assert p.boundary_bytes == L * B * T * H * s
    assert p.logits_bytes == B * T * V * s
    assert p.head_work_bytes == head_work_bytes(B * T, V, s)
    assert p.layer_work_bytes == sum(layer_work_terms(cfg, B * T, s, 4, 7).values())
    assert p.ring_depth == 3 and p.ring_device_bytes == 3 * p.slot_bytes
    assert p.ring_host_bytes == 3 * pinned_slot_bytes(p.slot_bytes)  # page-locked at their size, in whole pages

    fixed = embed + head + p.ring_device_bytes + 4 * p.lora_bytes
    assert p.peak_bytes == max(fixed + p.boundary_bytes + p.head_work_bytes,
                               fixed + p.boundary_bytes + p.logits_bytes + p.layer_work_bytes,
                               fixed + p.logits_bytes + p.lora_bytes)  # AdamW step: one fp32 temporary


def test_activation_terms_scale_with_tokens():
    cfg = make_config("llama")
    one = plan(cfg, "float32", batch_size=1, seq_len=T)
    four = plan(cfg, "float32", batch_size=4, seq_len=T)
    for name in ("boundary_bytes", "logits_bytes", "head_work_bytes", "layer_work_bytes"):
        assert getattr(four, name) == 4 * getattr(one, name), name
    assert four.lora_bytes == one.lora_bytes and four.unit_bytes == one.unit_bytes


def test_cpu_zero_copy_ring_costs_no_memory_and_resident_holds_every_layer():
    cfg = make_config("llama")
    streaming = plan(cfg, "float32", batch_size=B, seq_len=T, device_type="cpu")
    assert streaming.ring_device_bytes == 0 and streaming.ring_host_bytes == 0
    resident = plan(cfg, "float32", batch_size=B, seq_len=T, device_type="cpu", strategy="resident")
    layers = sum(b for u, b in resident.unit_bytes.items() if u.startswith("layer."))
    assert resident.peak_bytes - streaming.peak_bytes == layers


def test_cpu_plans_count_the_allocators_cache_of_one_layers_work(monkeypatch):
    """On the CPU LEMA's CPU allocator keeps up to one layer's transient of freed blocks (cpu_allocator.py), with a
    budget or without: a row of the plan and part of every phase's peak. No row for a process without it
    (Transformers + PEFT in lema bench, $LEMA_CPU_ALLOCATOR=0) or on a GPU."""
    monkeypatch.delenv("LEMA_CPU_ALLOCATOR", raising=False)
    cfg = make_config("llama")
    bare = plan(cfg, "float32", batch_size=B, seq_len=T, device_type="cpu", keep_activations=0, host_allocator=False)
    free = plan(cfg, "float32", batch_size=B, seq_len=T, device_type="cpu", keep_activations=0)
    budget = plan(cfg, "float32", batch_size=B, seq_len=T, device_type="cpu", keep_activations=0,
                  max_vram_bytes=free.peak_bytes * 4)
    for p in (free, budget):
        assert p.allocator_cache_bytes == p.layer_work_bytes > 0
        assert p.peak_bytes - bare.peak_bytes == p.layer_work_bytes
        assert [r.nbytes for r in p.rows() if r.item == "allocator cache"] == [p.layer_work_bytes]
    assert bare.allocator_cache_bytes == 0 and not [r for r in bare.rows() if r.item == "allocator cache"]
    monkeypatch.setenv("LEMA_CPU_ALLOCATOR", "0")
    off = plan(cfg, "float32", batch_size=B, seq_len=T, device_type="cpu", keep_activations=0)
    assert off.allocator_cache_bytes == 0 and off.peak_bytes == bare.peak_bytes
    gpu = plan(cfg, "float32", batch_size=B, seq_len=T, device_type="cuda", max_vram_bytes=free.peak_bytes * 4)
    assert gpu.allocator_cache_bytes == 0


def test_weights_mapped_resident_plan_has_no_frozen_anonymous_bytes():
    """Transformers' loader maps a weights file already in the compute dtype (lema bench's PEFT contender):
    its plan counts no frozen weights in anonymous memory, and only on the CPU."""
    cfg = make_config("llama")
    copied = plan(cfg, "float32", batch_size=B, seq_len=T, device_type="cpu", strategy="resident")
    mapped = plan(cfg, "float32", batch_size=B, seq_len=T, device_type="cpu", strategy="resident", weights_mapped=True)
    assert copied.frozen_device_bytes > 0 and mapped.frozen_device_bytes == 0
    assert copied.peak_bytes - mapped.peak_bytes == copied.frozen_device_bytes
    gpu = dict(batch_size=B, seq_len=T, device_type="cuda", strategy="resident")
    assert plan(cfg, "float32", weights_mapped=True, **gpu).peak_bytes == plan(cfg, "float32", **gpu).peak_bytes


def test_cpu_page_cache_window_and_disk_reads_per_step():
    """A pager window of C of the L layers reads L - C layers each way per training step; a window holding
    every layer reads nothing; 'off' leaves the cache to the kernel (no pager window)."""
    cfg = make_config("llama", num_layers=6)
    full = plan(cfg, "float32", batch_size=B, seq_len=T, device_type="cpu", page_cache=10**12)
    layer = full.layer_bytes
    assert full.page_cache_layers == 6 and full.disk_read_bytes == 0
    three = plan(cfg, "float32", batch_size=B, seq_len=T, device_type="cpu", page_cache=3 * layer + layer // 2)
    assert three.page_cache_layers == 3 and three.disk_read_bytes == 2 * 3 * layer
    assert three.page_cache_window == 3 * layer + layer // 2
    assert "page cache: 3 of 6 layers fit; the pager holds a window of 3 layers" in three.table()
    tiny = plan(cfg, "float32", batch_size=B, seq_len=T, device_type="cpu", page_cache=1)
    assert tiny.page_cache_layers == 2  # the pager always holds the layer in use and the next
    assert f"--page-cache 1 B is less than two layers ({human(2 * layer)}): the pager holds two" in tiny.table()
    assert "less than two layers" not in three.table()
    off = plan(cfg, "float32", batch_size=B, seq_len=T, device_type="cpu", page_cache="off")
    assert off.page_cache_window == 0
    # a GPU's pinned staging reads the page cache as the CPU's views do; zero-copy locks every page in RAM instead
    staged = plan(cfg, "bfloat16", batch_size=B, seq_len=T, device_type="cuda", page_cache=3 * (layer // 2) + 1)
    assert staged.page_cache_layers == 3 and staged.disk_read_bytes == 2 * 3 * (layer // 2)
    assert plan(cfg, "bfloat16", batch_size=B, seq_len=T, device_type="cuda", zero_copy=True).page_cache_layers is None


def test_page_cache_holds_the_files_bytes_where_layers_are_converted_on_load(tmp_path):
    """A float32 file trained in bfloat16 (copied into slots, converted): the page cache holds float32 layers,
    twice the slots' bytes, so a window fits half as many of them and each misses twice the bytes."""
    folder = save_tiny("llama", str(tmp_path / "m"), num_layers=6)
    fp32 = plan(folder, "float32", batch_size=B, seq_len=T, device_type="cpu", page_cache=10**12)
    file_layer = fp32.layer_bytes
    bf16 = plan(folder, "bfloat16", batch_size=B, seq_len=T, device_type="cpu", page_cache=3 * file_layer + 1)
    assert bf16.layer_bytes * 2 == file_layer
    assert bf16.page_cache_layers == 3 and bf16.disk_read_bytes == 2 * 3 * file_layer
    # converted at every load: the plan names the one-off conversion that makes them views
    advice = [a for a in bf16.advice if "lema convert" in a]
    assert advice == [f"the layers are stored in float32: every load converts them, in the loader thread (up to 12 loads a "
                      f"step, CPU time beside the compute); `lema convert {folder} OUT --dtype bfloat16` stores them "
                      "as used, once"]
    assert not [a for a in fp32.advice if "lema convert" in a]
    mixtral = save_tiny("mixtral", str(tmp_path / "x"), num_layers=2)
    assert [a for a in plan(mixtral, "float32", batch_size=B, seq_len=T, device_type="cpu").advice
            if a.startswith("the layers are built on load from several tensors (experts stacked): ")]


def test_cpu_auto_window_is_the_available_memory_less_the_reserve_and_says_it_adapts(monkeypatch):
    import lema.host_memory
    from lema.stream.pager import RESERVE_BYTES

    cfg = make_config("llama", num_layers=6)
    full = plan(cfg, "float32", batch_size=B, seq_len=T, device_type="cpu", page_cache=10**12)
    fixed = full.frozen_device_bytes + full.lora_bytes + full.grad_bytes + full.optimizer_bytes
    monkeypatch.setattr(lema.host_memory, "memory_available", lambda: fixed + RESERVE_BYTES + 4 * full.layer_bytes)
    auto = plan(cfg, "float32", batch_size=B, seq_len=T, device_type="cpu")
    assert auto.page_cache_layers == 4 and auto.disk_read_bytes == 2 * 2 * full.layer_bytes
    assert auto.page_cache_adaptive and "a window of up to 4 layers" in auto.table()
    assert "less what the kernel evicts of it" in auto.table()


def test_too_small_budget_is_refused_naming_the_setting():
    cfg = make_config("llama")
    fits = plan(cfg, "float32", batch_size=B, seq_len=T)
    with pytest.raises(PlanError) as e:
        plan(cfg, "float32", batch_size=B, seq_len=T, max_vram_bytes=fits.peak_bytes - 1, offload_activations=False)
    msg = str(e.value)
    assert "--batch-size" in msg and "--seq-len" in msg and "--max-vram" in msg
    assert "--offload-activations on" in msg  # the boundary on the host would fit here
    assert isinstance(e.value, ValueError)
    three = plan(cfg, "float32", batch_size=B, seq_len=T, keep_activations=0, offload_activations=False)
    two = plan(cfg, "float32", batch_size=B, seq_len=T, keep_activations=0, offload_activations=False, num_buffers=2)
    with pytest.raises(PlanError, match="With --num-buffers 2 it needs"):
        plan(cfg, "float32", batch_size=B, seq_len=T, keep_activations=0, offload_activations=False,
             max_vram_bytes=(two.peak_bytes + three.peak_bytes) // 2)
    # weights alone over the budget: raising the budget is the fix
    with pytest.raises(PlanError, match="raise --max-vram"):
        plan(cfg, "float32", batch_size=B, seq_len=T, max_vram_bytes=fits.unit_bytes["embed"])


def test_budget_decides_resident_layers_spread_through_the_stack():
    cfg = make_config("llama")
    base = plan(cfg, "float32", batch_size=B, seq_len=T)
    p = plan(cfg, "float32", batch_size=B, seq_len=T, max_vram_bytes=base.peak_bytes + 2 * base.layer_bytes,
             keep_activations=0)  # the room is not spent on kept layers first
    assert p.resident_layers_fit == 2 and p.resident_layers == 0 and p.resident_layer_indices == []
    assert "resident layers: 0 (applied: --resident-layers)" in p.table()
    assert f"2 would fit the budget, spread as layers {spread(2, cfg.num_hidden_layers)}" in p.table()
    assert spread(4, 32) == [4, 12, 20, 28]
    assert spread(40, 32) == list(range(32))


def test_plan_from_folder_and_from_lema_config(tmp_path):
    from lema import LemaConfig

    folder = save_tiny("llama", str(tmp_path / "m"))
    from_cfg = plan(make_config("llama"), "float32", batch_size=B, seq_len=T, device_type="cpu")
    from_folder = plan(folder, "float32", batch_size=B, seq_len=T, device_type="cpu")
    assert from_folder.peak_bytes == from_cfg.peak_bytes
    p = plan_for_config(LemaConfig(model_name_or_path=folder, lora_rank=4, max_vram="1GB"), B, T)
    assert p.max_vram_bytes == 10**9 and p.lora_rank == 4


def test_lema_plan_prints_the_table(tmp_path, capsys):
    folder = save_tiny("llama", str(tmp_path / "m"))
    rc = main(["plan", "--model", folder, "--device", "cpu", "--dtype", "float32",
               "--batch-size", "2", "--seq-len", "16", "--max-vram", "1GB"])
    out = capsys.readouterr().out
    assert rc == 0
    for text in ("embedding", "boundary activations", "optimizer state", "predicted peak", "ring depth: 3"):
        assert text in out


def test_lema_plan_refuses_with_status_1(tmp_path, capsys):
    folder = save_tiny("llama", str(tmp_path / "m"))
    rc = main(["plan", "--model", folder, "--device", "cpu", "--batch-size", "2", "--seq-len", "16",
               "--max-vram", "10KB"])
    assert rc == 1
    assert "--max-vram" in capsys.readouterr().err


def test_resident_layers_count_in_the_peak_spread_through_the_stack():
    """Each resident layer adds a layer's bytes to the frozen weights and the peak; they are spread
    (not the first n); the budget says how many would fit; over the budget the refusal names the setting."""
    cfg = make_config("llama", num_layers=6)
    base = plan(cfg, "float32", batch_size=B, seq_len=T)
    two = plan(cfg, "float32", batch_size=B, seq_len=T, resident_layers=2)
    assert two.peak_bytes - base.peak_bytes == 2 * base.slot_bytes
    assert two.frozen_device_bytes - base.frozen_device_bytes == 2 * base.slot_bytes
    assert two.resident_layers == 2 and two.resident_layer_indices == [1, 4]
    assert "resident layers: 2 (applied: --resident-layers; layers [1, 4])" in two.table()
    budget = base.peak_bytes + 3 * base.slot_bytes + base.slot_bytes // 2
    roomy = plan(cfg, "float32", batch_size=B, seq_len=T, max_vram_bytes=budget, keep_activations=0)
    assert roomy.resident_layers_fit == 3 and "3 would fit the budget" in roomy.table()
    # 4 resident leave 2 layers to stream, and a ring of 2 for them: 3 slots' bytes more, which fit; 5 do not
    assert plan(cfg, "float32", batch_size=B, seq_len=T, max_vram_bytes=budget, keep_activations=0,
                resident_layers=4).ring_depth == 2
    with pytest.raises(PlanError, match="lower --resident-layers"):
        plan(cfg, "float32", batch_size=B, seq_len=T, max_vram_bytes=budget, keep_activations=0, resident_layers=5)
    assert plan(cfg, "float32", batch_size=B, seq_len=T, strategy="resident", resident_layers=2).resident_layers == 0
    every = plan(cfg, "float32", batch_size=B, seq_len=T, resident_layers=6, device_type="cuda")  # no ring then
    assert every.ring_device_bytes == every.ring_host_bytes == 0
    assert every.peak_bytes - base.peak_bytes == 6 * base.slot_bytes - base.ring_device_bytes
    # On the CPU with views, resident layers are copies: the pager's window serves the 4 streamed layers only
    paged = plan(cfg, "float32", batch_size=B, seq_len=T, device_type="cpu", page_cache=3 * base.layer_bytes,
                 resident_layers=2)
    assert paged.page_cache_layers == 3 and paged.disk_read_bytes == 2 * (4 - 3) * base.layer_bytes


def test_boundary_goes_to_host_memory_when_only_that_fits():
    """On a GPU, a budget the step misses with its boundary activations on the device but makes with them in
    pinned host memory: the plan offloads them (and keeps no layer's activations), its peak drops by the
    boundary; on the CPU, or with offload_activations=False, the same budget is refused."""
    cfg = make_config("llama")
    on_device = plan(cfg, "float32", batch_size=B, seq_len=T, keep_activations=0)
    assert on_device.activations_on == "device"
    budget = on_device.peak_bytes - 1
    p = plan(cfg, "float32", batch_size=B, seq_len=T, max_vram_bytes=budget)
    assert p.activations_on == "host" and p.kept_layers == 0 and p.peak_bytes <= budget
    assert "boundary activations: in pinned host memory" in p.table()
    forced = plan(cfg, "float32", batch_size=B, seq_len=T, keep_activations=0, offload_activations=True)
    assert forced.activations_on == "host" and forced.peak_bytes <= on_device.peak_bytes
    if forced.peak_phase == "the first layer's recompute in backward":  # with the next input copied back early
        H = cfg.hidden_size
        assert forced.peak_bytes - on_device.peak_bytes == (1 - forced.num_layers) * B * T * H * 4
    cpu = plan(cfg, "float32", batch_size=B, seq_len=T, device_type="cpu", keep_activations=0)
    with pytest.raises(PlanError):
        plan(cfg, "float32", batch_size=B, seq_len=T, max_vram_bytes=cpu.peak_bytes - 1, device_type="cpu")
    with pytest.raises(PlanError):
        plan(cfg, "float32", batch_size=B, seq_len=T, max_vram_bytes=budget, offload_activations=False)
    assert plan(cfg, "float32", batch_size=B, seq_len=T, device_type="cpu",
                offload_activations=True).activations_on == "device"  # the host is the device


@pytest.mark.parametrize("arch, dtype", [("llama", torch.float32), ("llama", torch.bfloat16), ("gpt2", torch.float32),
                                         ("gpt2", torch.bfloat16), ("opt", torch.float32), ("mixtral", torch.float32),
                                         ("gemma2", torch.float32), ("gemma2", torch.bfloat16), ("qwen3", torch.float32),
                                         ("qwen3", torch.bfloat16), ("gemma4_text", torch.float32)])
def test_kept_layer_terms_match_what_autograd_saves(arch, dtype, tmp_path, make_lema):
    """The plan's per-layer saved terms against the bytes a kept layer's saved tensors hold in a real step
    (LEMA's kept-layer hooks count them, weights excluded): in bf16 PEFT saves a float32 copy of each
    adapted linear's input (on a GPU the 7B b1 x 4096 default plan ran out of memory without that term);
    GPT-2 (no gate, gelu_new made of several ops, dropout 0.1 on attention and on each sublayer's output, so the
    CPU's attention takes SDPA's math path and keeps the T x T probabilities) saved 1.8x the Llama terms; OPT
    (ReLU, whose backward needs its output alone, and dropout 0.1 on each sublayer's output) 0.77x the terms
    of an ungated MLP; Mixtral (attention adapted only, frozen experts: no input saved for a weight gradient)
    0.89x the Llama terms; Gemma 2 (eager attention for its soft-capping: the T x T softmax, its cast and the
    tanh kept, k and v repeated to every head; four norms a layer) 1.65x the Llama terms; Qwen3 (q_norm and
    k_norm keep the float32 q and k) 1.08x, Gemma 4 (v_norm too; its full-attention layers' head_dim twice the
    sliding ones') 1.16x the terms without them."""
    from transformers import AutoConfig, Gemma2Config, GPT2Config, LlamaConfig, MixtralConfig, OPTConfig

    if arch in ("qwen3", "gemma4_text"):
        more = dict(global_head_dim=64, sliding_window=64, layer_types=["sliding_attention", "full_attention"],
                    hidden_size_per_layer_input=0, num_kv_shared_layers=0, final_logit_softcapping=None,
                    pad_token_id=0) if arch == "gemma4_text" else {}
        cfg = AutoConfig.for_model(arch, vocab_size=96, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                                   max_position_embeddings=256, **more)
    elif arch == "gemma2":
        cfg = Gemma2Config(vocab_size=96, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                           num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=256)
    elif arch == "mixtral":
        cfg = MixtralConfig(vocab_size=96, hidden_size=256, intermediate_size=352, num_hidden_layers=2,
                            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                            num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    elif arch == "opt":
        cfg = OPTConfig(vocab_size=96, hidden_size=256, ffn_dim=1024, num_hidden_layers=2, num_attention_heads=8,
                        word_embed_proj_dim=256, max_position_embeddings=256)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=96, n_embd=256, n_layer=2, n_head=8, n_positions=256, bos_token_id=0,
                         eos_token_id=0)
    else:
        cfg = LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                          num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=False)
    model, p, per_layer = _kept_layer_against_plan(cfg, dtype, tmp_path, make_lema)
    assert p.kept_layers == 2 and model.streamed.keep == frozenset({0, 1})
    assert per_layer == pytest.approx(p.kept_extra_bytes, rel=0.05)


def _kept_layer_against_plan(cfg, dtype, tmp_path, make_lema, pad: int = 0):
    """One AdamW step of a random `cfg` model (b2 x 128, LoRA r8, both layers kept; `pad` tokens of padding in
    its second row): (the model, its plan, the bytes a kept layer saved beyond its input)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    batch, seq = 2, 128
    model = make_lema(str(tmp_path / "m"), dtype=str(dtype).split(".")[-1], keep_activations=2, lora_rank=8)
    ids = torch.randint(0, 96, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, seq - pad:] = 0 if pad else 1
    model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-3)).train_step(
        ids, attention_mask=mask)
    p = plan(cfg, dtype, lora_rank=8, batch_size=batch, seq_len=seq, keep_activations=2, device_type="cpu",
             padded=bool(pad))
    a, s = batch * seq, dtype.itemsize
    # in float32 the first norm saves the layer's input itself (the boundary's term); in bf16 its fp32 upcast
    return model, p, model.streamed.kept_bytes / 2 - (a * cfg.hidden_size * s if s == 4 else 0)


@pytest.mark.parametrize("arch, dtype, pad, head_dim", [
    ("llama", torch.float32, 5, 32), ("llama", torch.bfloat16, 5, 32), ("gemma3_text", torch.float32, 0, 32),
    ("gemma3_text", torch.bfloat16, 0, 32), ("llama", torch.float32, 0, 288), ("llama", torch.bfloat16, 0, 288)])
def test_a_masked_attention_s_saved_tensors_are_planned(arch, dtype, pad, head_dim, tmp_path, make_lema):
    """Attention given a mask: Transformers repeats k and v to every head (use_gqa_in_sdpa: only without one)
    and SDPA keeps the mask, as a bias in the dtype, in each layer. A padded batch masks every layer (Llama,
    8 heads / 2: a kept layer saved 1.13x the plan in float32, 1.07x in bf16); Gemma 3's sliding-window layer
    masks once the sequence reaches its window (1.12x in float32). A head_dim over 256 (Gemma 4's global layers)
    has k and v repeated without a mask too (1.42x in float32). Within 5% now, as the other terms."""
    from transformers import AutoConfig

    more = dict(sliding_window=64, layer_types=["sliding_attention", "full_attention"], pad_token_id=0) \
        if arch == "gemma3_text" else {}
    cfg = AutoConfig.for_model(arch, vocab_size=96, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                               num_attention_heads=8, num_key_value_heads=2, head_dim=head_dim,
                               max_position_embeddings=256, tie_word_embeddings=False, **more)
    _, p, per_layer = _kept_layer_against_plan(cfg, dtype, tmp_path, make_lema, pad)
    a, seq, s = 2 * 128, 128, dtype.itemsize
    assert p.layer_terms.get("attention mask") == (a * seq * s if head_dim <= 256 else None)
    assert per_layer == pytest.approx(p.kept_extra_bytes, rel=0.05)


def _layers_apart(arch, **over):
    """Tiny configs whose decoder layers are not all alike: Gemma 4 (its full-attention layers' head_dim, a
    per-layer config), Gemma 3n (intermediate_size, a list per layer), Mamba (no attention heads)."""
    from transformers import AutoConfig

    common = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    attention = dict(common, num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                     sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                     vocab_size_per_layer_input=96, num_kv_shared_layers=0)
    kw = {"gemma4_text": dict(attention, intermediate_size=64, global_head_dim=16, hidden_size_per_layer_input=0,
                              final_logit_softcapping=None),
          "gemma3n_text": dict(attention, intermediate_size=[64, 128, 64], hidden_size_per_layer_input=8,
                               laurel_rank=4, activation_sparsity_pattern=[0.0] * 3),
          "mamba": dict(common, state_size=4, expand=2, conv_kernel=4)}[arch]
    return AutoConfig.for_model(arch, **dict(kw, **over))


def test_layers_that_differ_are_planned_at_the_largest_and_no_heads_no_attention(tmp_path, make_lema):
    """The layer terms are the largest layer's where layers differ (each term as for a model of that layer's
    settings throughout), a model without attention heads has no attention terms (but its mixer's, counted
    conservatively), and a training step runs: LemaModel plans at the first one (ActivationBudget), where these
    configs raised (Gemma 4's global config refuses to give a head_dim, Gemma 3n's is a list, Mamba has none)."""
    from transformers import AutoModelForCausalLM

    a, seq = B * T, T
    unmasked = dict(sliding_window=64)  # no window the sequence reaches: a masked layer has more terms of its own
    largest = {"gemma4_text": _layers_apart("gemma4_text", head_dim=16, **unmasked),
               "gemma3n_text": _layers_apart("gemma3n_text", intermediate_size=[128] * 3, **unmasked)}
    for arch, wide in largest.items():
        cfg = _layers_apart(arch, **unmasked)
        assert arch != "gemma4_text" or ("head_dim" in cfg.per_layer_attributes and not wide.per_layer_attributes)
        for s in (4, 2):
            terms = layer_work_terms(cfg, a, s, 4, 7, 512, seq, "cpu")
            assert terms == layer_work_terms(wide, a, s, 4, 7, 512, seq, "cpu"), (arch, s)
        assert plan(cfg, "float32", lora_rank=4, batch_size=B, seq_len=T, device_type="cpu").layer_work_bytes > 0
    mamba = _layers_apart("mamba")
    terms = layer_work_terms(mamba, a, 4, 4, 2, 96, seq, "cpu", mlp_gated=False)
    assert terms["attention in"] == terms["attention out"] == 0 and terms["mlp"] > 0 and terms["recurrence"] > 0
    for arch, targets in (("gemma4_text", None), ("mamba", ["in_proj", "x_proj"])):  # PEFT refuses Mamba's out_proj
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(_layers_apart(arch)).save_pretrained(tmp_path / arch)
        model = make_lema(str(tmp_path / arch), keep_activations=0, lora_target_modules=targets)
        ids = torch.randint(0, 96, (B, T), generator=torch.Generator().manual_seed(0))
        trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-3))
        _, loss = trainer.train_step(ids, labels=ids)
        assert torch.isfinite(loss), arch


@pytest.mark.parametrize("arch", ["llama", "gemma3n_text"])
def test_the_boundary_is_what_a_step_keeps_of_each_layer_input(arch, tiny_dir, make_lema):
    """The boundary term against the layer inputs a step keeps for the recompute: Gemma 3n's layers take its four
    AltUp streams stacked (4 x B x T x H), which the plan counted as one hidden state (a quarter of the bytes)."""
    path = tiny_dir(arch)
    model = make_lema(path, keep_activations=0, lora_target_modules=["q_proj", "v_proj"])
    ids = torch.randint(0, 96, (B, T), generator=torch.Generator().manual_seed(0))
    model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-3)).train_step(ids, labels=ids)
    p = plan(path, "float32", lora_rank=4, targets=["q_proj", "v_proj"], batch_size=B, seq_len=T,
             device_type="cpu", keep_activations=0)
    assert p.boundary_bytes == model.streamed.boundary_bytes > 0
    streams = 4 if arch == "gemma3n_text" else 1
    assert p.boundary_bytes == p.num_layers * B * T * model.hf_config.hidden_size * 4 * streams
    assert (f"x {streams} streams" in p.table()) == (streams > 1)


def test_a_block_layers_share_is_planned_resident_in_a_row_of_its_own(tiny_dir):
    """Zamba's one transformer block, run by layers 2 and 5, is loaded once with the head (in no layer's unit); the
    table named it "head (norm + lm_head)"."""
    p = plan(tiny_dir("zamba"), "float32", batch_size=B, seq_len=T, device_type="cpu")
    shared = [r for r in p.rows() if r.item == "blocks shared by layers"]
    assert shared and shared[0].nbytes == p.shared_layer_bytes > 0
    head = [r for r in p.rows() if r.item.startswith("head (")][0]
    assert head.nbytes == p.unit_bytes["head"] - p.shared_layer_bytes and "tied to the embedding" in head.note


def test_planning_gpt2_warns_of_nothing(tmp_path):
    """The plan's PEFT model says fan_in_fan_out for GPT-2's Conv1D linears, as LemaModel's does: PEFT warned on
    every `lema plan` of a GPT-2 folder that it set it itself (a folder of its own: a folder planned before with
    the same settings is not measured again, and would warn of nothing either way)."""
    import warnings

    path = save_tiny("gpt2", str(tmp_path / "gpt2"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = plan(path, "float32", batch_size=B, seq_len=T, device_type="cpu")
    assert p.lora_params > 0
    assert not [str(w.message) for w in caught if "fan_in_fan_out" in str(w.message)]


def test_pinned_slots_take_their_size_in_whole_pages():
    """The ring's pinned slots are page-locked at their exact size (host_memory.PinnedBuffer), not through torch's
    pinned allocator, which rounds a 7B bf16 layer's 386 MiB up to 512 MiB (three slots: 1.5 GiB, not 1.13)."""
    page = mmap.PAGESIZE
    assert pinned_slot_bytes(386 * 2**20) == 386 * 2**20
    assert pinned_slot_bytes(page + 1) == 2 * page and pinned_slot_bytes(1) == page and pinned_slot_bytes(0) == 0


def test_gpu_zero_copy_plans_no_pinned_host_slots(tmp_path, monkeypatch):
    """Zero-copy, asked for or (None) chosen as the engine chooses it, plans no pinned host slots; staging plans
    them, and the table says which and why."""
    import lema.host_memory

    cfg = make_config("llama")
    kw = dict(batch_size=B, seq_len=T, device_type="cuda", num_buffers=3)
    staged = plan(cfg, "float32", zero_copy=False, **kw)
    direct = plan(cfg, "float32", zero_copy=True, **kw)
    assert staged.ring_host_bytes == 3 * pinned_slot_bytes(staged.slot_bytes) > 0 and direct.ring_host_bytes == 0
    assert direct.ring_device_bytes == staged.ring_device_bytes and direct.peak_bytes == staged.peak_bytes
    assert "host to device: zero-copy" in direct.table() and "(--zero-copy off)" in staged.table()

    folder = str(tmp_path / "m")
    save_tiny("llama", folder)  # a float32 file
    auto = plan(folder, "float32", **kw)
    assert auto.gpu_copies == "zero-copy" and auto.ring_host_bytes == 0
    converted = plan(folder, "bfloat16", **kw)  # each load converts: through the pinned slots
    assert converted.ring_host_bytes > 0 and "the file holds the layers in float32" in converted.table()
    paged = plan(folder, "float32", page_cache=10**6, **kw)
    assert paged.ring_host_bytes > 0 and "--page-cache sets the pager's window" in paged.table()
    monkeypatch.setattr(lema.host_memory, "memory_available", lambda: 2**30)  # less than the reserve
    small = plan(folder, "float32", **kw)
    assert small.ring_host_bytes > 0 and "do not fit in the RAM" in small.table()
    assert plan(folder, "float32", zero_copy=True, **kw).ring_host_bytes == 0  # asked for: the engine decides


def _seven_b(dtype="bfloat16"):
    from lema.plan_bytes import model_facts
    from lema.shapes import shape_config

    cfg = shape_config("llama-2-7b")
    return cfg, model_facts(cfg, dtype, 16)


def test_gpu_auto_resident_layers_share_the_room_by_the_step_time_each_saves():
    """On a GPU, resident_layers=None shares the room a budget leaves between resident and kept layers:
    resident first while streaming is what the step waits on, then kept layers; never over the budget less the
    allocator slack; never slower (in the plan's time model) than streaming every layer."""
    from lema.plan_time import step_time_model
    from lema.planner import ALLOCATOR_SLACK

    cfg, facts = _seven_b()
    budget = 16 * 10**9
    for b, t in ((1, 512), (1, 4096), (8, 512)):
        auto = plan(cfg, "bfloat16", batch_size=b, seq_len=t, max_vram_bytes=budget, device_type="cuda",
                    resident_layers=None, facts=facts, zero_copy=False)
        none = plan(cfg, "bfloat16", batch_size=b, seq_len=t, max_vram_bytes=budget, device_type="cuda",
                    resident_layers=0, facts=facts, zero_copy=False)
        assert auto.resident_auto and not none.resident_auto
        assert 0 < auto.resident_layers < 32 and auto.resident_layer_indices == spread(auto.resident_layers, 32)
        assert auto.peak_bytes <= budget * (1 - ALLOCATOR_SLACK)
        t_auto = max(step_time_model(facts, b, t, 2, auto.resident_layers, auto.kept_layers, False))
        t_none = max(step_time_model(facts, b, t, 2, 0, none.kept_layers, False))
        assert t_auto < 0.75 * t_none  # 7B bf16 streams ~2 x 12.6 GiB a step: resident layers cut that
        # it stops adding resident layers once streaming hides behind the compute, or when no more fit
        stream, compute = step_time_model(facts, b, t, 2, auto.resident_layers, auto.kept_layers, False)
        assert stream <= compute or auto.peak_bytes + auto.slot_bytes > budget * (1 - ALLOCATOR_SLACK)
        assert f"resident layers: {auto.resident_layers} (auto:" in auto.table()
        assert auto.modelled_s == (stream, compute) and f"streaming {stream:.2f} s, compute {compute:.2f} s" in auto.table()
    # b1 x 512 at 16 GB: both kinds get room (the activations are small)
    small = plan(cfg, "bfloat16", batch_size=1, seq_len=512, max_vram_bytes=budget, device_type="cuda",
                 resident_layers=None, facts=facts, zero_copy=False)
    assert small.resident_layers >= 16 and small.kept_layers >= 8


def test_auto_resident_layers_none_without_room_on_the_cpu_or_when_given():
    cfg, facts = _seven_b()
    tight = plan(cfg, "bfloat16", batch_size=8, seq_len=512, max_vram_bytes=4 * 10**9, device_type="cuda",
                 resident_layers=None, facts=facts)  # target 3's budget: nothing to spare
    assert tight.resident_layers == 0 and tight.kept_layers == 0
    cpu = plan(cfg, "bfloat16", batch_size=1, seq_len=512, max_vram_bytes=16 * 10**9, device_type="cpu",
               resident_layers=None, facts=facts)
    assert cpu.resident_layers == 0 and "resident layers: 0 (auto: none on the CPU" in cpu.table()
    assert cpu.modelled_s is None and "time model" not in cpu.table()
    # kept layers given: the resident layers take the room they leave
    fixed = plan(cfg, "bfloat16", batch_size=1, seq_len=4096, max_vram_bytes=16 * 10**9, device_type="cuda",
                 resident_layers=None, keep_activations=0, facts=facts)
    assert fixed.kept_layers == 0 and fixed.resident_layers > 0
    given = plan(cfg, "bfloat16", batch_size=1, seq_len=512, max_vram_bytes=16 * 10**9, device_type="cuda",
                 resident_layers=3, facts=facts)
    assert given.resident_layers == 3 and not given.resident_auto


def test_split_room_takes_whichever_saves_more_time_per_byte():
    """Streaming-bound: resident layers first; compute-bound (zero-copy streams at the bus's rate and a long
    step computes for longer): kept layers first, resident layers only while they still save time."""
    from lema.plan_time import split_room, step_time_model

    cfg, facts = _seven_b()
    room = 6 * 2**30
    kept_extra = 400 * 2**20
    r, k = split_room(room, facts, 1, 512, 2, kept_extra)
    assert r > 0 and r * facts.slot_bytes + k * kept_extra <= room
    stream, compute = step_time_model(facts, 1, 512, 2, 0, 0, False)
    assert stream > compute  # why resident layers came first
    r_long, k_long = split_room(room, facts, 4, 4096, 2, kept_extra, zero_copy=True)
    stream, compute = step_time_model(facts, 4, 4096, 2, 0, 0, True)
    assert compute > stream and r_long == 0 and k_long == min(32, room // kept_extra)


def test_time_model_counts_the_offloaded_inputs_on_the_link():
    """With the boundary in host memory each recomputed layer's input crosses the bus out and back (HostOffload's
    stream), beside the weights: the 7B shape at b8 x 512 in bf16 moves 32 MiB per layer each way."""
    from lema.plan_time import GPU_STREAM_BYTES_S, step_time_model

    cfg, facts = _seven_b()
    plain = step_time_model(facts, 8, 512, 2, 0, 4, False)
    offloaded = step_time_model(facts, 8, 512, 2, 0, 4, False, offload=True)
    assert offloaded[1] == plain[1]
    assert offloaded[0] - plain[0] == pytest.approx(2 * 28 * 8 * 512 * 4096 * 2 / GPU_STREAM_BYTES_S["zero_copy"])


def test_run_time_decisions_use_the_steps_rows(tmp_path):
    """The engine asks the plan per step shape: GPT-2's attention terms on the CPU grow with T x T (attention
    dropout on, as GPT-2's own 0.1), so 4 rows of 8 tokens are not 1 row of 32 (ActivationBudget keys its
    answers by tokens and row length)."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from lema import LemaConfig
    from lema.planner import ActivationBudget

    cfg = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=1)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "gpt2")
    config = LemaConfig(model_name_or_path=str(tmp_path / "gpt2"), device="cpu")
    budget = ActivationBudget(config, free_bytes=2**30)
    rows = plan_for_config(config, 4, 8, facts=budget.facts, free_bytes=2**30)
    row = plan_for_config(config, 1, 32, facts=budget.facts, free_bytes=2**30)
    assert rows.layer_terms["attention probs"] * 4 == row.layer_terms["attention probs"]
    assert budget.step_growth(32, 8) == rows.peak_bytes - rows.frozen_device_bytes - rows.lora_bytes
    assert budget.step_growth(32) == row.peak_bytes - row.frozen_device_bytes - row.lora_bytes
    assert budget.keepable_layers(32, 8) == rows.kept_layers


def test_a_70b_model_plans_onto_a_16gb_card():
    """The mission's other size: the Llama-2-70B shape (68,976,648,192 parameters, the published count) in bf16
    streams through a 16 GB card at b1 x 512: a ring of 1.6 GiB slots, LoRA on every linear with AdamW and the
    activations fit the budget, and a host with less RAM than its 138 GB pages the layers (the pager's window)."""
    from lema.plan_bytes import model_facts
    from lema.shapes import shape_config

    cfg = shape_config("llama-2-70b")
    facts = model_facts(cfg, "bfloat16", 16)
    assert sum(facts.unit_bytes.values()) == 2 * 68_976_648_192
    budget = 16 * 10**9
    p = plan(cfg, "bfloat16", batch_size=1, seq_len=512, max_vram_bytes=budget, device_type="cuda",
             resident_layers=None, facts=facts, page_cache=14 * 2**30)
    assert p.num_layers == 80 and p.peak_bytes <= budget
    per_layer = 2 * (68_976_648_192 - 2 * 32000 * 8192 - 8192) // 80  # less the embedding, the head, the norm
    assert p.slot_bytes >= per_layer and p.ring_device_bytes == 3 * p.slot_bytes
    streamed = 80 - p.resident_layers
    assert p.page_cache_layers == 14 * 2**30 // per_layer < streamed
    assert p.disk_read_bytes == 2 * (streamed - p.page_cache_layers) * per_layer
    # the time model is the bus's; with the layers over the RAM the disk must keep up with it, and the plan says how
    rate = p.disk_read_bytes / max(p.modelled_s)
    assert f"s step takes {rate / 1e9:.1f} GB/s; a slower disk sets the step time" in p.table()
    assert "disk:" not in plan(cfg, "bfloat16", batch_size=1, seq_len=512, max_vram_bytes=budget, device_type="cuda",
                               resident_layers=None, facts=facts, page_cache=10**12).table()


def test_lema_plan_refuses_what_lema_train_refuses(tmp_path, capsys):
    """The plan takes what a run takes: a sequence longer than the model's positions, a target outside the decoder
    layers and a budget that is not a finite size are refused, each named, as `lema train` refuses them."""
    folder = save_tiny("llama", str(tmp_path / "m"))
    positions = make_config("llama").max_position_embeddings
    base = ["plan", "--model", folder, "--device", "cpu", "--batch-size", "1"]
    assert main(base + ["--seq-len", str(positions)]) == 0
    capsys.readouterr()
    for flags, message in (
            (["--seq-len", str(positions + 1)],
             f"seq_len={positions + 1} exceeds the model's {positions} positions; use --seq-len {positions} or less"),
            (["--seq-len", "16", "--lora-target-modules", "lm_head"],
             "lora_target_modules ['lm_head'] lie outside the decoder layers"),
            (["--seq-len", "16", "--lora-target-modules", "self_attn"],
             "name modules that are not linear layers: self_attn (LlamaAttention); LoRA adapts linear layers"),
            (["--seq-len", "16", "--lora-rank", "33"],  # hidden 32, MLP 64: every layer's smaller side is 32
             "lora_rank=33 exceeds every adapted layer's smaller side (the widest is 32)"),
            (["--seq-len", "16", "--max-vram", "inf"], "max_vram='inf' is not a size"),
            (["--seq-len", "16", "--max-vram", "nan"], "max_vram='nan' is not a size")):
        assert main(base + flags) == 1, flags
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, flags


def test_a_file_with_layers_in_two_dtypes_is_planned_as_the_engine_runs_it(tmp_path):
    """fp32 linears with bf16 norms: not every layer tensor is in the compute dtype, so LemaModel converts into
    slots (no CPU views, no CUDA zero-copy); the plan says and counts the same (it looked at the first tensor)."""
    from safetensors.torch import load_file, save_file

    from lema import LemaConfig, LemaModel

    folder = str(tmp_path / "m")
    save_tiny("llama", folder)
    path = f"{folder}/model.safetensors"
    weights = {k: v.to(torch.bfloat16) if "layernorm" in k and ".layers." in k else v
               for k, v in load_file(path).items()}
    save_file(weights, path, metadata={"format": "pt"})
    cpu = plan(folder, "float32", batch_size=B, seq_len=T, device_type="cpu", num_buffers=3)
    assert cpu.ring_device_bytes == 3 * cpu.slot_bytes > 0  # slots, not views of the mmap
    gpu = plan(folder, "float32", batch_size=B, seq_len=T, device_type="cuda", num_buffers=3)
    assert gpu.ring_host_bytes > 0 and "the file holds the layers in bfloat16, float32" in gpu.table()
    model = LemaModel(LemaConfig(model_name_or_path=folder, num_buffers=3))
    try:
        assert model.source._zero_copy is None and all(s.host is not None for s in model.source.slots)
        assert cpu.embedding_view_bytes == model.embedding_view_bytes > 0  # the embedding is float32: a view
    finally:
        model.close()
    # --zero-copy on: on the CPU no more than auto (LemaModel's rule); on a GPU refused, as LemaModel refuses it
    assert plan(folder, "float32", batch_size=B, seq_len=T, device_type="cpu", num_buffers=3,
                zero_copy=True).ring_device_bytes == cpu.ring_device_bytes
    with pytest.raises(ValueError, match="zero_copy=True on cuda: the file holds the layers in bfloat16, float32"):
        plan(folder, "float32", batch_size=B, seq_len=T, device_type="cuda", zero_copy=True)


def test_the_layers_dtype_decides_not_the_files_first_tensor(tmp_path):
    """The head and embedding in float32, every layer tensor in bfloat16, trained in bfloat16: the layers are
    views (CPU) and zero-copy (GPU), the embedding a copy, with nothing to convert; as LemaModel does it."""
    from safetensors.torch import load_file, save_file

    from lema import LemaConfig, LemaModel

    folder = str(tmp_path / "m")
    save_tiny("llama", folder)
    path = f"{folder}/model.safetensors"
    save_file({k: v.to(torch.bfloat16) if ".layers." in k else v for k, v in load_file(path).items()}, path,
              metadata={"format": "pt"})
    cpu = plan(folder, "bfloat16", batch_size=B, seq_len=T, device_type="cpu", num_buffers=3)
    assert cpu.ring_device_bytes == 0 and cpu.embedding_view_bytes == 0 and "convert" not in " ".join(cpu.advice)
    gpu = plan(folder, "bfloat16", batch_size=B, seq_len=T, device_type="cuda", num_buffers=3)
    assert gpu.gpu_copies == "zero-copy" and gpu.ring_host_bytes == 0
    model = LemaModel(LemaConfig(model_name_or_path=folder, num_buffers=3, dtype="bfloat16"))
    try:
        assert model.source._zero_copy is not None and model.embedding_view_bytes == 0
    finally:
        model.close()


@pytest.mark.parametrize("arch,tied", [("gpt2", "transformer.wte.weight"), ("opt", "model.decoder.embed_tokens.weight")])
def test_the_embedding_view_is_decided_tensor_by_tensor(arch, tied, tmp_path):
    """The token table (tied to the head) in bfloat16, the position table in float32, trained in float32: the
    position table is mapped from the file and the token table copied, in the plan as in LemaModel."""
    from safetensors.torch import load_file, save_file

    from lema import LemaConfig, LemaModel

    folder = str(tmp_path / "m")
    save_tiny(arch, folder)
    path = f"{folder}/model.safetensors"
    save_file({k: v.to(torch.bfloat16) if k == tied else v for k, v in load_file(path).items()}, path,
              metadata={"format": "pt"})
    p = plan(folder, "float32", batch_size=B, seq_len=T, device_type="cpu", num_buffers=3)
    model = LemaModel(LemaConfig(model_name_or_path=folder, num_buffers=3))
    try:
        assert p.embedding_view_bytes == model.embedding_view_bytes > 0
    finally:
        model.close()


def test_a_folder_without_safetensors_is_planned_with_slots_and_staged(tmp_path):
    """.bin weights (LemaModel refuses them, naming `lema convert`): the plan counts slots and a copied embedding
    on the CPU, pinned staging on a GPU, and leaves the refusal to the engine, even with --zero-copy on."""
    import os

    from safetensors.torch import load_file

    folder = str(tmp_path / "bin")
    save_tiny("llama", folder)
    torch.save(load_file(f"{folder}/model.safetensors"), f"{folder}/pytorch_model.bin")
    os.remove(f"{folder}/model.safetensors")
    cpu = plan(folder, "float32", batch_size=B, seq_len=T, device_type="cpu", num_buffers=3)
    assert cpu.ring_device_bytes == 3 * cpu.slot_bytes > 0 and cpu.embedding_view_bytes == 0
    for zero_copy in (None, True):
        gpu = plan(folder, "float32", batch_size=B, seq_len=T, device_type="cuda", zero_copy=zero_copy)
        assert gpu.ring_host_bytes > 0 and "no safetensors weights in the folder" in gpu.table()
    # `lema train` refuses such a folder: the plan says so, naming the command that makes it streamable
    assert f"holds .bin weights, not safetensors: planned from its config; `lema train` streams them after " \
           f"`lema convert {folder} OUT`" in cpu.table()
    os.remove(f"{folder}/pytorch_model.bin")
    open(f"{folder}/training_args.bin", "wb").close()  # not weights: convert reads pytorch_model*.bin only
    assert "holds no weights: planned from its config alone" in plan(folder, "float32", batch_size=B, seq_len=T,
                                                                      device_type="cpu").table()
    open(f"{folder}/model-Q8_0.gguf", "wb").close()  # beside a config.json convert takes a .gguf by its name
    assert f"after `lema convert {folder}/model-Q8_0.gguf OUT`" in plan(folder, "float32", batch_size=B, seq_len=T,
                                                                         device_type="cpu").table()
    shape = plan(make_config("llama"), "float32", batch_size=B, seq_len=T, device_type="cpu")
    assert shape.ring_device_bytes == 0 and shape.embedding_view_bytes > 0  # a config alone: as if stored so
    assert "weights" not in "".join(shape.advice)  # a shape has no folder to name


def test_a_folders_facts_are_measured_once_until_its_files_change(tmp_path, monkeypatch):
    """`lema train` plans, then its model plans each step size: the meta skeleton and PEFT were built twice."""
    import json

    from lema import plan_bytes

    path = save_tiny("llama", str(tmp_path / "m"))
    calls = []
    measure = plan_bytes._measure_facts
    monkeypatch.setattr(plan_bytes, "_measure_facts", lambda *a, **k: calls.append(a) or measure(*a, **k))
    first = plan_bytes.model_facts(path, "float32", 4)
    assert plan_bytes.model_facts(path, torch.float32, 4) is first and len(calls) == 1
    assert plan_bytes.model_facts(path, "float32", 8).lora_params == 2 * first.lora_params and len(calls) == 2
    with open(os.path.join(path, "config.json")) as f:  # the same size, edited within the clock's tick
        config = json.load(f)
    config["num_hidden_layers"] = 2
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="3 decoder layers"):  # measured anew: the weights no longer match
        plan_bytes.model_facts(path, "float32", 4)


def test_the_ring_has_no_more_slots_than_layers_to_stream(tiny_dir):
    """--num-buffers 1000 on 3 layers planned (and allocated) a 1000-slot ring."""
    from lema import LemaConfig, LemaModel

    cfg = make_config("llama")
    assert plan(cfg, "float32", batch_size=B, seq_len=T, num_buffers=1000).ring_depth == 3
    assert plan(cfg, "float32", batch_size=B, seq_len=T, num_buffers=3, resident_layers=2).ring_depth == 2
    roomy = plan(cfg, "float32", batch_size=B, seq_len=T, num_buffers=3, resident_layers=1, device_type="cuda",
                 max_vram_bytes=10**12, keep_activations=0)
    assert roomy.ring_depth == roomy.ring_depth_fit == 2 and "a ring of" not in roomy.table()  # the engine's cap
    with LemaModel(LemaConfig(model_name_or_path=tiny_dir("llama"), num_buffers=1000, zero_copy=False)) as model:
        assert len(model.source.slots) == 3


def test_more_kept_or_resident_layers_than_the_model_has_are_said():
    """--keep-activations 99 and --resident-layers 99 on 3 layers were clamped without a word, and the plan said
    "page cache: all 0 layers fit"."""
    p = plan(make_config("llama"), "float32", batch_size=B, seq_len=T, device_type="cpu", keep_activations=99,
             resident_layers=99, page_cache="off")
    assert p.kept_layers == 3 and p.resident_layers == 3
    table = p.table()
    assert "--keep-activations 99 is more than the model's 3 decoder layers: all 3 apply" in table
    assert "--resident-layers 99 is more than the model's 3 decoder layers: all 3 apply" in table
    assert "all 0 layers" not in table


def test_a_loaded_optimizer_state_is_not_taken_from_the_kept_layers_room_twice(tiny_dir, make_lema, monkeypatch):
    """On --resume the optimizer's state is loaded before the first step, when the engine reads the free memory:
    the plan's peak counts that state, so the room for kept layers lost it twice (a resumed run kept fewer layers
    than a new one). The free memory here is a meter that the state's bytes take from, as an allocation would."""
    from lema import planner
    from lema.trainer import optimizer_state_bytes

    path = tiny_dir("llama")
    opts = []
    base = plan_for_config(make_lema(path, device="cpu", lora_rank=16).config, B, T, free_bytes=0)
    need = base.peak_bytes - base.frozen_device_bytes - base.lora_bytes
    free = need + 3 * base.kept_extra_bytes + base.kept_extra_bytes // 2  # room for all 3 layers, no more
    monkeypatch.setattr(planner, "free_memory_bytes",
                        lambda device: free - sum(optimizer_state_bytes(o, torch.device("cpu")) for o in opts))
    ids = torch.randint(0, 64, (B, T))
    kept = []
    state = None
    for _ in range(2):  # a new run, then one resuming from its optimizer's state
        model = make_lema(path, device="cpu", lora_rank=16)
        opts[:] = [torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-3)]
        if state is not None:
            opts[0].load_state_dict(state)
            assert optimizer_state_bytes(opts[0], model.device) > base.kept_extra_bytes  # enough to change it
        model.get_trainer(opts[0]).train_step(ids, labels=ids)
        kept.append(model.kept_layers(B * T, T))
        state = opts[0].state_dict()
    assert kept == [[0, 1, 2], [0, 1, 2]]


@pytest.mark.parametrize("arch, dtype, batch, seq, more", [
    ("gpt2", "float32", 1, 1024, dict(n_embd=256, n_layer=2, n_head=8, n_positions=1024)),
    ("gemma2", "bfloat16", 1, 1024, dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                                          num_attention_heads=8, num_key_value_heads=2, head_dim=32)),
    ("mixtral", "bfloat16", 8, 128, dict(hidden_size=256, intermediate_size=352, num_hidden_layers=2,
                                         num_attention_heads=8, num_key_value_heads=2, num_local_experts=4,
                                         num_experts_per_tok=2)),
    ("llama", "float32", 8, 128, dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2)),
    ("falcon", "float32", 1, 1024, dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=8,
                                        ffn_hidden_size=704, new_decoder_architecture=True, num_kv_heads=2))])
def test_a_recomputed_step_s_peak_is_planned(arch, dtype, batch, seq, more, tmp_path):
    """A step that recomputes every layer, measured by LEMA's CPU allocator in a fresh process (the most it had in
    use over two AdamW steps, above what it held before the first: the model built, its ring's slots taken; the
    allocator sees tensors of 64 KiB or more, so not this size's LoRA gradients and AdamW state), against the plan's
    boundary + one layer's work + the logits. The plan counted attention's T x T gradients on top of the MLP's
    (GPT-2's math path at 1 x 1024 and Gemma 2's eager attention in bf16: far over), though autograd frees the MLP's
    saved tensors before attention's backward runs, and the gated MLP's backward as 3 I (Llama fp32: over);
    Mixtral's routed experts hold as many bytes in bf16 as in float32 (under); Falcon's MLP width is
    `ffn_hidden_size`, its activation `activation`, and it always hands SDPA a mask (over). BENCHMARKS.md, session
    23, has the ratios."""
    import json
    import subprocess
    import sys

    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(arch, vocab_size=96, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                               pad_token_id=0, **more)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    folder = str(tmp_path / "m")
    child = f"""
import json, sys, torch
torch.set_num_threads(1)
from lema import cpu_allocator
if not cpu_allocator.install(0):
    sys.exit(3)  # no allocator to count with ($LEMA_CPU_ALLOCATOR=0, or it could not be built)
from lema import LemaConfig, LemaModel
from lema.planner import plan
model = LemaModel(LemaConfig(model_name_or_path={folder!r}, dtype={dtype!r}, device="cpu", keep_activations=0,
                             lora_rank=8))
trainer = model.get_trainer(torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-3))
ids = torch.randint(0, 96, ({batch}, {seq}), generator=torch.Generator().manual_seed(0))
before = cpu_allocator.stats()
for _ in range(2):
    trainer.train_step(ids)
after = cpu_allocator.stats()
assert after.high_water_bytes > before.high_water_bytes  # the peak is the steps', not the build's
p = plan({folder!r}, getattr(torch, {dtype!r}), lora_rank=8, batch_size={batch}, seq_len={seq}, keep_activations=0,
         device_type="cpu")
print(json.dumps([after.high_water_bytes - before.in_use_bytes,
                  p.boundary_bytes + p.layer_work_bytes + p.logits_bytes]))
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    if done.returncode == 3:
        pytest.skip("LEMA's CPU allocator is not available here")
    assert done.returncode == 0, done.stderr[-2000:]
    held, planned = json.loads(done.stdout.strip().splitlines()[-1])
    assert planned == pytest.approx(held, rel=0.08), (held, planned)


def test_the_full_logits_head_on_the_cpu_holds_what_the_plan_says(tmp_path):
    """Transformers' head + causal-LM loss, forward and backward, measured by LEMA's CPU allocator (the most it
    had in use, in a fresh process): in bf16 it holds 14 a V bytes (the plan had 20: the GPU's float32 upcast,
    which the CPU does not keep; bf16 CPU plans were 1.14-1.2x their runs), in float32 16 a V."""
    import json
    import subprocess
    import sys

    from lema.plan_bytes import head_work_bytes

    a, H, V = 1024, 64, 8192
    child = f"""
import json, torch, torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss
from lema import cpu_allocator
assert cpu_allocator.install(0)
out = {{}}
for name in ("bfloat16", "float32"):
    dt = getattr(torch, name)
    hidden = torch.randn(1, {a}, {H}, dtype=dt, requires_grad=True)
    weight, labels = torch.randn({V}, {H}, dtype=dt), torch.randint(0, {V}, (1, {a}))
    before = cpu_allocator.stats()
    logits = F.linear(hidden, weight)  # kept, as the model's output holds them until the step returns
    ForCausalLMLoss(logits, labels, vocab_size={V}).backward()
    out[name] = cpu_allocator.stats().high_water_bytes - before.in_use_bytes
    assert before.high_water_bytes == before.in_use_bytes or name != "bfloat16"  # the first: nothing before
    del hidden, weight, labels, logits
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    held = json.loads(done.stdout.strip().splitlines()[-1])
    for name, s in (("bfloat16", 2), ("float32", 4)):
        assert held[name] == pytest.approx(head_work_bytes(a, V, s, device_type="cpu"), rel=0.05), (name, held)
    assert head_work_bytes(a, V, 2, device_type="cpu") == 14 * a * V
