"""The model skeleton: Transformers' own classes on the meta device, PEFT's LoRA injected.

No weight is allocated here. Parameters stay on `meta` until the engine binds streamed weights
into a decoder layer for the time of its forward, or assigns the small resident units (the input
embedding and the head) once. Buffers that no checkpoint holds (the rotary `inv_freq`) are built
for real, because `init_empty_weights(include_buffers=False)` leaves buffers out of the meta
context. Only the LoRA modules are materialised, then initialised by PEFT's own code.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..cli_errors import reason

EMBED, HEAD = "embed", "head"


def layer_unit(i: int) -> str:
    return f"layer.{i}"


class ArchitectureError(ValueError):
    """A checkpoint whose architecture LEMA cannot stream; the message names it and what is missing."""


class ConfigError(ValueError):
    """A config.json that cannot be read, or holds a value Transformers rejects; the message names the file, the
    key and value where known, and the fix."""


try:  # a config value of the wrong type (a field) or that contradicts another (a class validator)
    from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
    CONFIG_VALIDATION_ERRORS: tuple = (StrictDataclassFieldValidationError, StrictDataclassClassValidationError)
except ImportError:  # a huggingface_hub without strict dataclasses: Transformers validates with ValueError
    CONFIG_VALIDATION_ERRORS = ()

FIX_CONFIG = ("fix config.json: it must describe the model the weights came from (the original checkpoint's "
              "config.json has the right values)")


def load_hf_config(folder: str):
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if os.path.isfile(folder):
        hint = (f"run `lema convert {folder} OUT` to make one from it" if folder.endswith(".gguf") else
                f"give the folder holding it ({os.path.dirname(folder) or '.'!r}) with its config.json")
        raise ValueError(f"model {folder!r} is a file, not a Transformers checkpoint folder; {hint}")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder {folder!r} does not exist; give a Transformers checkpoint folder "
                                "(or run `lema convert SRC OUT` to make one)")
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder!r} has no config.json, so it is not a Transformers checkpoint folder; "
                                "for a .gguf or .bin model run `lema convert SRC OUT` first")
    settings = read_config_json(path)
    model_type = settings.get("model_type")
    try:
        return AutoConfig.from_pretrained(folder)
    except CONFIG_VALIDATION_ERRORS as e:
        raise ConfigError(rejected_setting(path, settings, e)) from None
    except ArithmeticError as e:  # a validator dividing by a 0 of the file (num_attention_heads: 0)
        raise ConfigError(f"{path!r} holds a value Transformers cannot use ({type(e).__name__}: {reason(e)}; a "
                          f"size of 0?); {FIX_CONFIG}") from None
    except (ValueError, KeyError) as e:
        if isinstance(model_type, str) and model_type in CONFIG_MAPPING:  # known: it is a value that is wrong
            raise ConfigError(f"{path!r}: Transformers rejects its values ({reason(e)}); {FIX_CONFIG}") from None
        if model_type is None:
            raise ArchitectureError(f"{path!r} has no \"model_type\" ({reason(e)}); add the architecture's "
                                    "model_type (e.g. \"llama\") from the original checkpoint's config.json") from None
        raise ArchitectureError(f"{path!r} names model_type={model_type!r}, which this Transformers version does "
                                f"not know ({reason(e)}); upgrade transformers or use a supported "
                                "architecture") from None


def read_config_json(path: str) -> dict:
    """config.json's settings, as the file holds them; ConfigError naming the file unless it is a UTF-8 JSON object."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path!r} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); "
                          "config.json must be JSON saved as UTF-8: restore it from the original checkpoint") from None
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path!r} is not valid JSON ({e})") from None
    if not isinstance(settings, dict):
        kind = {"NoneType": "null", "str": "string", "int": "number", "float": "number"}.get(
            type(settings).__name__, type(settings).__name__)
        raise ConfigError(f"{path!r} holds a JSON {kind} ({text.strip()[:40]!r}), not an "
                          "object of settings; restore config.json from the original checkpoint")
    key = "dtype" if settings.get("dtype") is not None else "torch_dtype"  # Transformers keeps `dtype` if both
    dtype = settings.get(key)
    if isinstance(dtype, str) and not isinstance(getattr(torch, dtype, None), torch.dtype):  # Transformers: getattr
        raise ConfigError(f"{path!r}: {key}={dtype!r} is not a torch dtype; write e.g. \"bfloat16\", \"float16\" "
                          "or \"float32\"")
    return settings


def rejected_setting(path: str, settings: dict, e: Exception) -> str:
    """The one-line message for a value Transformers' strict config rejected; its cause is the reason, and the
    field (when one is named) the key."""
    cause = reason(e.__cause__) if e.__cause__ is not None else reason(e)
    field = re.search(r"field '([^']+)'", str(e))
    if field is None:  # a class validator: values that contradict one another
        return f"{path!r}: Transformers rejects its values ({cause}); {FIX_CONFIG}"
    key = field.group(1)
    value = f"={settings[key]!r}" if key in settings else ""
    return f"{path!r}: {key}{value} is rejected by Transformers ({cause}); {FIX_CONFIG}"


def config_path(hf_config) -> str:
    """The config.json a config was read from, for messages (its folder's name where there is none)."""
    folder = getattr(hf_config, "name_or_path", "") or ""
    path = os.path.join(folder, "config.json")
    return path if os.path.isfile(path) else (folder or f"the {type(hf_config).__name__}")


def setting_with_value(settings: dict, value, prefix: str = "") -> str | None:
    """The (dotted) key of the first setting, nested ones included, whose value is `value`."""
    for key, v in settings.items():
        if isinstance(v, dict):
            found = setting_with_value(v, value, f"{prefix}{key}.")
            if found:
                return found
        elif isinstance(v, str) and v == value:
            return prefix + key
    return None


def known_values(key: str) -> list[str] | None:
    """The names Transformers accepts for a setting that names a function (a rope type, an activation)."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf in ("rope_type", "type"):
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        return ["default", *ROPE_INIT_FUNCTIONS]
    if leaf in ("hidden_act", "hidden_activation", "activation_function"):
        from transformers.activations import ACT2FN
        return sorted(ACT2FN)
    return None


def unknown_name(hf_config, e: KeyError) -> ConfigError | None:
    """A KeyError of Transformers looking up a name config.json gives (rope_type "bogus", hidden_act "bogus")
    as a ConfigError naming the key; None if the missing key is no value of the config (a bug: let it raise)."""
    missing = e.args[0] if e.args else None
    path = config_path(hf_config)
    spelled = {}  # the keys as the file spells them (rope_scaling, which Transformers reads as rope_parameters)
    if path.endswith("config.json"):
        try:
            spelled = read_config_json(path)
        except ConfigError:
            pass
    key = setting_with_value(spelled, missing) or setting_with_value(hf_config.to_dict(), missing)
    if key is None:
        return None
    known = known_values(key)
    return ConfigError(f"{path!r}: {key}={missing!r} is not a name this Transformers version knows"
                       f"{f' (known: {known})' if known else ''}; {FIX_CONFIG}")


def check_sizes(hf_config) -> None:
    """Sizes that must be positive whole numbers (Transformers builds a layer-less model for 0 layers)."""
    text = text_config(hf_config)
    aliases = getattr(text, "attribute_map", {}) or {}
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        value = getattr(text, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ConfigError(f"{config_path(hf_config)!r}: {aliases.get(name, name)}={value} must be a positive "
                              f"whole number; {FIX_CONFIG}")


def text_config(hf_config):
    """The language model's own config (a multimodal config's text part; a plain config itself)."""
    return hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config


def model_positions(hf_config):
    """The tokens a sequence may hold (max_position_embeddings, GPT-2's n_positions), or None where the config
    gives none. LEMA takes it as every model's limit: training, the step's inputs, `lema plan` and generation."""
    text = text_config(hf_config)
    return getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)


def attention_implementation(hf_config) -> str:
    """The attention a model is built with: "sdpa", or "eager" where the attention logits are soft-capped
    (Gemma 2). SDPA cannot apply the cap: Transformers 5.23 refuses SDPA for such a model, and earlier versions
    (5.17, on the GPU machines) build it with SDPA anyway and silently leave the cap out."""
    text = text_config(hf_config)
    return "eager" if getattr(text, "attn_logit_softcapping", None) else "sdpa"


def build_meta_model(hf_config, dtype: torch.dtype):
    """The causal-LM class for `hf_config`, parameters on meta, buffers real (on the CPU)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    check_sizes(hf_config)
    try:
        with init_empty_weights(include_buffers=False):
            try:
                model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype,
                                                         attn_implementation=attention_implementation(hf_config))
            except ValueError as e:
                if "scaled_dot_product_attention" not in str(e):
                    raise
                # no SDPA for this architecture (e.g. Gemma 2's soft-capping): Transformers' eager attention
                model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="eager")
    except KeyError as e:  # a name config.json gives that Transformers has no function for (rope_type, hidden_act)
        error = unknown_name(hf_config, e)
        if error is None:
            raise
        raise error from None
    except ValueError as e:
        raise ArchitectureError(f"architecture {getattr(hf_config, 'architectures', None) or hf_config.model_type!r} "
                                f"has no causal-LM class in Transformers ({reason(e)}); LEMA streams "
                                "models shaped embedding -> decoder layers -> norm -> lm_head") from None
    # The buffers as from_pretrained leaves them: it initialises them again after loading, outside the dtype context
    # that from_config built them in (GPT-J's and CodeGen's sinusoidal positions, computed in bf16 there: 0.86 off
    # at position 2048). post_init marked every module initialised; the parameters, on meta, stay as they are.
    for module in model.modules():
        module.__dict__.pop("_is_hf_initialized", None)
    with torch.random.fork_rng(devices=[]):
        model.initialize_weights()
    model.config.use_cache = False
    if getattr(model.config, "tie_word_embeddings", False) or getattr(
            model.config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()  # not always done on meta; makes lm_head.weight *be* the embedding
    for module in model.modules():
        if callable(getattr(module, "_rescale_layers", None)) and hasattr(module, "layers_are_rescaled"):
            # RWKV in eval mode divides two weights of each block in place by 2^(block // rescale_every) and halves
            # the hidden states as often. The division lands on meta parameters (the weights bound at run time are
            # the file's), the halving does not: eval logits were 1.6 off with 8 layers. Not rescaled, eval runs
            # the train-mode forward, the function the adapters are trained in (Transformers' own rescaled eval is
            # 4e-5 to 3e-3 from it in float32 with no adapter; with one it divides W but not the LoRA delta: 3.0).
            module._rescale_layers = lambda: None
    return model


def parameter_aliases(model) -> dict[int, list[str]]:
    """Every name of each parameter, by id: a tied weight (e.g. the embedding that is also lm_head) has several."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def find_decoder_layers(model) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers: the one whose class is in `_no_split_modules`, else the longest."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    candidates = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    preferred = [(n, m) for n, m in candidates if type(m[0]).__name__ in no_split]
    pool = preferred or [(n, m) for n, m in candidates if len(m) == n_layers] or candidates
    if not pool:
        raise ArchitectureError(f"{type(model).__name__}: no list of decoder layers found (no nn.ModuleList); "
                                "LEMA streams models shaped embedding -> decoder layers -> norm -> lm_head")
    name, layers = max(pool, key=lambda nm: len(nm[1]))
    return name, layers


@dataclass
class UnitMap:
    """Which model parameters make up each streaming unit (embed, layer.i, head)."""

    layers_prefix: str                  # e.g. "model.layers"
    units: dict[str, list[str]]         # unit name -> model parameter names, in model order
    num_layers: int

    def unit_of(self, name: str) -> str:
        for unit, names in self.units.items():
            if name in names:
                return unit
        raise KeyError(name)


def unit_map(model) -> UnitMap:
    """Partition the model's (deduplicated, so tied weights count once) parameters into units. A parameter that
    several decoder layers share (Zamba's one transformer block, run by every sixth layer) is in no layer's unit:
    it is resident with the head, loaded once (a layer's unbinding would take it from the others)."""
    prefix, layers = find_decoder_layers(model)
    units: dict[str, list[str]] = {EMBED: []}
    units.update({layer_unit(i): [] for i in range(len(layers))})
    units[HEAD] = []
    embedding_modules = {name for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    aliases = parameter_aliases(model)
    for name, p in model.named_parameters():
        m = pattern.match(name)
        shared = len({found.group(1) for found in map(pattern.match, aliases[id(p)]) if found}) > 1
        if m and not shared:
            units[layer_unit(int(m.group(1)))].append(name)
        elif name.rsplit(".", 1)[0] in embedding_modules:
            units[EMBED].append(name)
        else:
            units[HEAD].append(name)
    return UnitMap(prefix, units, len(layers))


def default_lora_targets(layers: nn.ModuleList) -> list[str]:
    """Leaf names of every linear layer inside a decoder layer (nn.Linear, or GPT-2's Conv1D); a subclass with a
    forward of its own only where that forward returns one tensor as wide as its output (Falcon's FalconLinear
    does; PhiMoE's router returns a tuple, and LoRA's sum with it fails)."""
    names: list[str] = []
    for name, module in layers[0].named_modules():
        if (isinstance(module, nn.Linear) and _acts_as_linear(module)) or type(module).__name__ == "Conv1D":
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in names:
                names.append(leaf)
    return names


def _acts_as_linear(module: nn.Linear) -> bool:
    """nn.Linear's forward, or one that maps a (1, in) input to one (1, out) tensor (run where its weight is: the
    skeleton's meta device, no compute)."""
    if type(module).forward is nn.Linear.forward:
        return True
    w = module.weight
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, module.in_features, device=w.device, dtype=w.dtype))
    except Exception:  # a forward that needs more than an input: not a plain linear
        return False
    return torch.is_tensor(out) and tuple(out.shape) == (1, module.out_features)


def _is_linear(module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _in_out(module) -> tuple[int, int]:
    """A linear layer's (in, out) widths; GPT-2's Conv1D stores its weight transposed."""
    w = module.weight
    return (w.shape[0], w.shape[1]) if type(module).__name__ == "Conv1D" else (w.shape[1], w.shape[0])


def check_lora_targets(model, prefix: str, targets: list[str], rank: Optional[int] = None) -> None:
    """Every target must match a linear layer inside the decoder layers, and nothing outside them; `rank` no more
    than the widest adapted layer's smaller side (a rank beyond every min(in, out) adds parameters, not capacity:
    --lora-rank 100000 on a 576-wide model built half a terabyte of adapters)."""
    inside, outside, not_linear, widths = set(), set(), {}, []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in targets:
            (inside if name.startswith(prefix + ".") else outside).add(leaf)
            if not _is_linear(module):
                not_linear.setdefault(leaf, type(module).__name__)
            elif name.startswith(prefix + "."):
                widths.append(min(_in_out(module)))
    unmatched = [t for t in targets if t not in inside and t not in outside]
    linears = lambda: default_lora_targets(find_decoder_layers(model)[1])  # noqa: E731
    if unmatched:
        raise ValueError(f"lora_target_modules {unmatched} match no module of {type(model).__name__}; the linear "
                         f"layers inside its decoder layers are {linears()}")
    if outside - inside:
        raise ValueError(f"lora_target_modules {sorted(outside - inside)} lie outside the decoder layers; LEMA "
                         "adapts modules inside the decoder layers only")
    if not_linear:
        named = ", ".join(f"{k} ({v})" for k, v in not_linear.items())
        raise ValueError(f"lora_target_modules name modules that are not linear layers: {named}; LoRA adapts linear "
                         f"layers, those inside the decoder layers are {linears()}")
    if rank is not None and widths and rank > max(widths):
        raise ValueError(f"lora_rank={rank} exceeds every adapted layer's smaller side (the widest is {max(widths)}): "
                         f"a rank beyond it adds parameters, not capacity; use --lora-rank {max(widths)} or less")


def uses_conv1d(model) -> bool:
    """GPT-2's Conv1D linears store their weight transposed: PEFT's LoRA needs fan_in_fan_out for them."""
    return any(type(m).__name__ == "Conv1D" for m in model.modules())


def with_lora(model, rank: int, alpha: float, targets: list[str], dropout: float = 0.0):
    """PEFT's get_peft_model with LEMA's LoRA settings (every caller: the engine, the plan, the bench's
    contenders), fan_in_fan_out for GPT-2's Conv1D, and two of PEFT's warnings that say nothing here silenced for
    this call only: the deprecated gradient-checkpointing flag it asks the model about, and the rank_pattern it
    makes for targets Transformers 5 fuses (gate_proj + up_proj -> an MoE's experts.gate_up_proj parameter: 2 r),
    which it then says "matched no module" (it matched the parameter, and the rank applies)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                        task_type="CAUSAL_LM", fan_in_fan_out=uses_conv1d(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message="The following (rank|alpha)_pattern keys did not match any "
                                "targeted module", category=RuntimeWarning)
        return get_peft_model(model, config)


def inject_lora(model, rank: int, alpha: float, dropout: float, targets: list[str], device: torch.device):
    """PEFT's LoRA into the meta skeleton; the LoRA modules alone are materialised (float32) on `device`."""
    peft_model = with_lora(model, rank, alpha, targets, dropout)
    for module in lora_modules(peft_model):
        for container in (module.lora_A, module.lora_B):
            for sub in container.values():
                sub.to_empty(device=device)
                sub.to(torch.float32)
    return peft_model


def lora_modules(peft_model):
    from peft.tuners.lora import LoraLayer

    return [m for m in peft_model.modules() if isinstance(m, LoraLayer)]


def reset_lora(peft_model, seed: int) -> None:
    """PEFT's initialisation (A Kaiming-uniform, B zero), drawn from a generator seeded with `seed`."""
    modules = lora_modules(peft_model)
    cuda = sorted({p.device.index or 0 for m in modules for p in m.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=cuda):  # the caller's RNG streams (CPU and CUDA) are left as they were
        torch.manual_seed(seed)
        for module in modules:
            for adapter in module.lora_A:
                module.reset_lora_parameters(adapter, True)
