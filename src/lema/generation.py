"""Text generation through the streamed model: KV cache on, each new token one pass over the layers."""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import torch

# A bound with room to spare: far below it (about 1e-38) the logits / temperature overflow float32 and the softmax
# gives nan; no temperature this small samples differently from greedy decoding.
MIN_TEMPERATURE = 1e-5


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
        # an empty --system is a system turn all the same: it replaces the template's default system message
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": prompt}]
        from jinja2.exceptions import TemplateError, TemplateSyntaxError

        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateSyntaxError as e:  # the template itself does not parse: nothing the flags can change
            raise ValueError(f"--chat: this model's chat template is not valid Jinja ({e}); fix the tokenizer's "
                             "chat_template, or drop --chat") from None
        except TemplateError as e:  # a template's own refusal (raise_exception), e.g. Gemma's of a system turn
            fix = ("leave out --system (this template takes no system message)" if system is not None
                   else "drop --chat and write the prompt as the model expects it")
            raise ValueError(f"--chat: this model's chat template refused the messages ({e}); {fix}") from None
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.numel() == 0:  # an empty prompt and a tokenizer without BOS: nothing to continue from
        raise ValueError("--prompt is empty and this tokenizer adds no BOS token; give a prompt (or --chat)")
    return ids


def fit_to_positions(hf_config, prompt_tokens: int, max_new_tokens: int, chat: bool = False) -> int:
    """How many new tokens to generate: `max_new_tokens`, or fewer where the prompt and they would pass the model's
    positions (a note on stderr says so); a prompt that leaves no room is refused. With `chat`, the prompt is the
    templated one (system turn, markers and generation prompt around --prompt), and the messages say so.

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
    what = "the chat template's prompt (--prompt in its turn markers)" if chat else "--prompt"
    if prompt_tokens >= limit:
        raise ValueError(f"{what} is {prompt_tokens} tokens but this model holds {limit} positions, prompt and "
                         "new tokens together; shorten the prompt")
    room = limit - prompt_tokens
    print(f"note: --max-new-tokens {max_new_tokens} capped to {room}: {what} is {prompt_tokens} tokens and this "
          f"model holds {limit} positions", file=sys.stderr)
    return room


def check_settings(max_new_tokens: int, temperature: float, top_p: float, chat: bool, system: Optional[str]) -> None:
    """The generation settings, checked before anything loads (`lema generate`) and at each call."""
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={max_new_tokens} must be >= 1")
    if not 0 <= temperature < float("inf"):  # nan fails the comparison
        raise ValueError(f"--temperature={temperature} must be a finite number >= 0 (0 is greedy)")
    if 0 < temperature < MIN_TEMPERATURE:  # the logits divided by it overflow float32: sampling from inf/nan
        raise ValueError(f"--temperature={temperature} is too small to sample with (below {MIN_TEMPERATURE:g}); "
                         "give --temperature 0 for greedy decoding")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top-p={top_p} in (0, 1] is required: the probability mass sampled from (1 keeps every "
                         "token)")
    if system is not None and not chat:
        raise ValueError("--system is a message of the chat template: add --chat (or leave --system out)")


def stop_token_ids(model, tokenizer, chat: bool) -> Optional[list[int]]:
    """The ids that end generation: the model folder's generation_config.json `eos_token_id` (what
    Transformers' from_pretrained stops at; the model built from config.json alone only knows config.json's),
    else config.json's; with --chat also the token that ends a turn in the chat template (e.g. <|im_end|>,
    <end_of_turn>, <|eot_id|>), which a model answering in that template writes when it is done."""
    ids: list[int] = []

    def add(value) -> None:
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)

    folder = getattr(getattr(model, "config", None), "model_name_or_path", None)
    path = os.path.join(folder, "generation_config.json") if isinstance(folder, str) else None
    saved = None
    if path and os.path.isfile(path):
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            saved = None  # unreadable: Transformers' own defaults below
    if isinstance(saved, dict) and saved.get("eos_token_id") is not None:
        add(saved["eos_token_id"])
    else:
        add(getattr(model.peft_model.generation_config, "eos_token_id", None))
    if chat:
        add(end_of_turn_id(tokenizer))
    return ids or None


def end_of_turn_id(tokenizer) -> Optional[int]:
    """The special token the chat template writes right after an assistant message, or None."""
    marker = "LEMA-END-OF-TURN-PROBE"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # a template that renders no such conversation: no end-of-turn token to add
        return None
    if not isinstance(text, str) or marker not in text:
        return None
    after = text[text.rindex(marker) + len(marker):]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    if not ids:
        return None
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return ids[0] if ids[0] in special else None


def generate_text(model, tokenizer, prompt: str, chat: bool = False, system: Optional[str] = None,
                  max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                  stream: bool = False, seed: Optional[int] = None) -> str:
    """Greedy at temperature 0; prints tokens as they come when `stream`. Sampling draws from torch's global
    generator: `seed` seeds it first, so that the same seed gives the same text."""
    check_settings(max_new_tokens, temperature, top_p, chat, system)
    ids = encode_prompt(tokenizer, prompt, chat, system)
    vocab = model.base_model.get_input_embeddings().num_embeddings
    if int(ids.max()) >= vocab:  # the folder's tokenizer is not the model's: say so, not "tokenize with ..."
        raise ValueError(f"the prompt's token id {int(ids.max())} (from the tokenizer beside the model, "
                         f"{type(tokenizer).__name__} of {len(tokenizer)} tokens) is past the model's vocabulary of "
                         f"{vocab}: the folder's tokenizer files belong to another model; put the model's own there")
    max_new_tokens = fit_to_positions(model.hf_config, ids.shape[1], max_new_tokens, chat)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": pad,
              "eos_token_id": stop_token_ids(model, tokenizer, chat)}
    if temperature > 0:
        # top_k=0: no top-k cut (Transformers' default keeps the 50 likeliest): --top-p alone decides the mass
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        if seed is not None:
            torch.manual_seed(seed)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if stream:
        from transformers import TextStreamer

        kwargs["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
