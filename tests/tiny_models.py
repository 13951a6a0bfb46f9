"""Tiny random Transformers models of each architecture, built and saved locally (no hub)."""

from __future__ import annotations

import os
from typing import Optional

import torch

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def make_config(arch: str, num_layers: Optional[int] = None):
    """The tiny config of `arch`; `num_layers` overrides the default of 3 decoder layers."""
    from transformers import (Gemma2Config, GPT2Config, LlamaConfig, MistralConfig, MixtralConfig, OPTConfig,
                              Qwen2Config)

    common = dict(COMMON, num_hidden_layers=num_layers or COMMON["num_hidden_layers"])
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "llama-tied":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "mixtral":
        return MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    if arch == "gpt2":
        return GPT2Config(vocab_size=96, n_embd=32, n_layer=common["num_hidden_layers"], n_head=4, n_positions=64,
                          bos_token_id=0, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if arch == "opt":  # dropout 0.1 in the base layers, learned positions (an nn.Embedding with an offset)
        return OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=common["num_hidden_layers"],
                         num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64)
    if arch == "gemma2":  # no SDPA attention in Transformers (soft-capping): runs with eager attention
        return Gemma2Config(**common, head_dim=8)
    if arch == "deepseek_v3":  # a stored buffer (the router's e_score_correction_bias); LoRA on fused experts
        from transformers import DeepseekV3Config

        return DeepseekV3Config(**dict(common, num_key_value_heads=4), moe_intermediate_size=16, n_shared_experts=1,
                                n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, kv_lora_rank=16,
                                q_lora_rank=16, qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=4,
                                first_k_dense_replace=1)
    if arch == "recurrent_gemma":  # its own logit soft-cap (logits_soft_cap) in the head
        from transformers import RecurrentGemmaConfig

        return RecurrentGemmaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=common["num_hidden_layers"], num_attention_heads=4,
                                    num_key_value_heads=1, lru_width=32, attention_window_size=4)
    if arch == "gemma3n_text":  # writes a weight in place each forward (AltUp's coefficient clamp); lists per layer
        from transformers import Gemma3nTextConfig

        L = common["num_hidden_layers"]
        return Gemma3nTextConfig(**dict(common, intermediate_size=[64] * L), head_dim=8, sliding_window=4,
                                 layer_types=(["sliding_attention", "full_attention"] * L)[:L],
                                 hidden_size_per_layer_input=8, vocab_size_per_layer_input=96,
                                 num_kv_shared_layers=0, laurel_rank=4, activation_sparsity_pattern=[0.0] * L)
    if arch == "phimoe":  # its router is an nn.Linear subclass returning a tuple
        from transformers import PhimoeConfig

        return PhimoeConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    if arch == "ernie4_5_moe":  # its router's weight and correction bias are parameters kept in float32 in bf16
        from transformers import Ernie4_5_MoeConfig

        return Ernie4_5_MoeConfig(**common, moe_intermediate_size=16, moe_num_experts=8, moe_k=2,
                                  moe_layer_start_index=1, moe_num_shared_experts=1)
    if arch == "falcon":  # FalconLinear: an nn.Linear subclass with its own forward, a default LoRA target
        from transformers import FalconConfig

        return FalconConfig(vocab_size=96, hidden_size=32, num_hidden_layers=common["num_hidden_layers"],
                            num_attention_heads=4, max_position_embeddings=64, multi_query=True, parallel_attn=True,
                            bias=False)
    if arch == "gptj":  # sinusoidal positions, a buffer computed in __init__
        from transformers import GPTJConfig

        return GPTJConfig(vocab_size=96, n_embd=32, n_layer=common["num_hidden_layers"], n_head=4, n_positions=64,
                          rotary_dim=4, n_inner=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                          eos_token_id=1)
    if arch == "olmo_hybrid":  # linear attention's A_log, a parameter its __init__ makes in float32
        from transformers import AutoConfig

        return AutoConfig.for_model("olmo_hybrid", **common, linear_num_key_heads=2, linear_num_value_heads=2,
                                    linear_key_head_dim=8, linear_value_head_dim=16,
                                    layer_types=["linear_attention", "full_attention", "linear_attention"],
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "mamba":  # its residual stream stays float32 in bf16 (residual_in_fp32)
        from transformers import MambaConfig

        return MambaConfig(vocab_size=96, hidden_size=32, state_size=4, num_hidden_layers=common["num_hidden_layers"],
                           expand=2, conv_kernel=4)
    if arch == "zamba":  # one transformer block shared by layers 2 and 5 (attn_layer_period 3)
        from transformers import ZambaConfig

        return ZambaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                           num_attention_heads=4, num_key_value_heads=4, n_mamba_heads=2, mamba_d_state=8,
                           mamba_expand=2, mamba_dt_rank=4, attn_layer_period=3, attn_layer_offset=2,
                           use_mamba_kernels=False, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2)
    if arch == "rwkv":  # a recurrence in a Python loop whose last state update no output uses (a dead branch);
        # eval mode rescales every rescale_every blocks (here from the third)
        from transformers import RwkvConfig

        return RwkvConfig(vocab_size=96, hidden_size=32, num_hidden_layers=common["num_hidden_layers"],
                          attention_hidden_size=32, intermediate_size=64, context_length=64, rescale_every=2,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
    raise KeyError(arch)


ARCHS = ["llama", "mistral", "qwen2", "gpt2", "mixtral"]


def save_tiny(arch: str, folder: str, seed: int = 0, dtype=torch.float32, num_layers: Optional[int] = None,
              **save_kwargs) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(arch, num_layers), dtype=dtype)
    with torch.no_grad():  # random init is small; scale up so layers matter in the parity checks
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
        stored = set(model.state_dict())
        for name, b in model.named_buffers():  # persistent float buffers are trained values in real checkpoints
            if name in stored and b.is_floating_point():
                b.normal_(0, 0.5)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, **save_kwargs)
    return folder
