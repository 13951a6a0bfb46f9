"""Text generation through the streamed model: KV cache on, each new token one pass over the layers."""

from __future__ import annotations

import sys
from typing import Optional

import torch


def adapter_settings(adapter: Optional[str]) -> dict:
    """LoRA settings a LemaModel needs to load `adapter` (rank, alpha, targets), read from its config."""
    if adapter is None:
        return {}
    from .adapter_files import read_adapter

    cfg, _ = read_adapter(adapter)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter {adapter!r} is a {cfg['peft_type']} adapter; LEMA loads LoRA adapters")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        raise ValueError(f"adapter {adapter!r} selects modules by a regex ({targets!r}); LEMA loads adapters "
                         "whose target_modules is a list of names")
    return {"lora_rank": cfg["r"], "lora_alpha": cfg.get("lora_alpha", cfg["r"]),
            "lora_target_modules": sorted(targets) if targets else None}


def load_for_generation(model_dir: str, adapter: Optional[str] = None, device: str = "cpu",
                        dtype: str = "float32", strategy: str = "streaming"):
    """(LemaModel with the adapter loaded — or B = 0, i.e. the base model —, tokenizer)."""
    from . import LemaConfig, LemaModel
    from .data import load_tokenizer
    from .engine.skeleton import load_hf_config

    load_hf_config(model_dir)  # a missing folder or an unknown architecture is named first
    tokenizer = load_tokenizer(model_dir)  # before the weights are mapped
    config = LemaConfig(model_name_or_path=model_dir, device=device, dtype=dtype, strategy=strategy,
                        **adapter_settings(adapter))
    model = LemaModel(config)
    model.initialize_lora(seed=0)  # B = 0: exactly the base model until an adapter is loaded
    if adapter is not None:
        model.load_adapter(adapter)
    return model, tokenizer


def encode_prompt(tokenizer, prompt: str, chat: bool, system: Optional[str] = None) -> torch.Tensor:
    if chat:
        if not tokenizer.chat_template:
            raise ValueError("--chat: this model's tokenizer has no chat template; drop --chat")
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.numel() == 0:  # an empty prompt and a tokenizer without BOS: nothing to continue from
        raise ValueError("--prompt is empty and this tokenizer adds no BOS token; give a prompt (or --chat)")
    return ids


def fit_to_positions(hf_config, prompt_tokens: int, max_new_tokens: int) -> int:
    """How many new tokens to generate: `max_new_tokens`, or fewer where the prompt and they would pass the model's
    positions (a note on stderr says so); a prompt that leaves no room is refused.

    LEMA takes `max_position_embeddings` as every model's context, as training and `forward` do
    (LemaModel._check_inputs). Past it a model with learned positions (GPT-2, OPT) has no embedding to look up
    (an IndexError deep in Transformers), and a rotary one (Llama, Qwen2, ...) computes positions it was never
    trained on and writes degraded text, which Transformers only warns about. Capping, not refusing, because
    --max-new-tokens is already an upper bound (generation also stops at end-of-text): stopping at the context
    is within what was asked, and the note tells the user it happened."""
    from .engine.skeleton import model_positions

    limit = model_positions(hf_config)
    if not limit or prompt_tokens + max_new_tokens <= limit:
        return max_new_tokens
    if prompt_tokens >= limit:
        raise ValueError(f"--prompt is {prompt_tokens} tokens but this model holds {limit} positions, prompt and "
                         "new tokens together; shorten the prompt")
    room = limit - prompt_tokens
    print(f"note: --max-new-tokens {max_new_tokens} capped to {room}: the prompt is {prompt_tokens} tokens and this "
          f"model holds {limit} positions", file=sys.stderr)
    return room


def check_settings(max_new_tokens: int, temperature: float, top_p: float, chat: bool, system: Optional[str]) -> None:
    """The generation settings, checked before anything loads (`lema generate`) and at each call."""
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={max_new_tokens} must be >= 1")
    if not 0 <= temperature < float("inf") or not 0 < top_p <= 1:  # nan fails both comparisons
        raise ValueError(f"--temperature={temperature} must be a finite number >= 0 and --top-p={top_p} in (0, 1]")
    if system is not None and not chat:
        raise ValueError("--system is a message of the chat template: add --chat (or leave --system out)")


def generate_text(model, tokenizer, prompt: str, chat: bool = False, system: Optional[str] = None,
                  max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                  stream: bool = False) -> str:
    """Greedy at temperature 0; prints tokens as they come when `stream`."""
    check_settings(max_new_tokens, temperature, top_p, chat, system)
    ids = encode_prompt(tokenizer, prompt, chat, system)
    max_new_tokens = fit_to_positions(model.hf_config, ids.shape[1], max_new_tokens)
    kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if stream:
        from transformers import TextStreamer

        kwargs["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
