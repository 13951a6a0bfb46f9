"""LemaModel: a Transformers causal LM with PEFT LoRA whose decoder layers stream from disk.

Setup, in data-path order:
  config.json ──▶ meta skeleton (engine/skeleton.py) ──▶ PEFT LoRA injected, LoRA materialised
  *.safetensors ──mmap──▶ WeightStore (store/) ──keymap──▶ each parameter's source
  embed + head units ──▶ loaded once, resident on the device
  decoder layers ──▶ WeightRing or ResidentLayers (stream/ring.py) ──▶ bound per layer run
                                                                      (engine/streamed_layer.py)
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import cpu_allocator
from .config import LemaConfig, MemoryStrategy
from .engine.skeleton import (EMBED, HEAD, build_meta_model, check_lora_targets, default_lora_targets,
                              find_decoder_layers, inject_lora, layer_unit, load_hf_config, model_positions,
                              parameter_aliases, reset_lora, unit_map)
from .engine import cpu_linear
from .engine.chunked_loss import CHUNK_BYTES, causal_lm_loss, final_softcap, fused_head_supported
from .engine.streamed_layer import StreamedLayers
from .host_memory import memory_available, return_freed_memory_to_os, trim_heap
from .store import WeightStore, WeightsFileError
from .store.keymap import (check_complete, check_shapes, check_unused, first_not_held, held_dtype, map_checkpoint,
                           reader_for, stored_buffers)
from .stream.layout import UnitLayout, registration_spans
from .stream.pager import RESERVE_BYTES, PageCachePager
from .stream.ring import ResidentLayers, WeightRing

FILL_THREADS = 8  # on a GPU: reader threads per slot fill (pieces of one layer read at once)


class LemaModel(nn.Module):
    """See the module docstring; `forward` takes Transformers' arguments and returns its output."""

    def __init__(self, config: LemaConfig):
        super().__init__()
        self.config = config
        self.device = config.torch_device
        self.dtype = config.torch_dtype
        if self.device.type == "cpu" and config.max_vram_bytes is not None:
            # a CPU budget bounds anonymous memory: large freed tensors must leave the heap (host_memory.py)
            self.host_heap_bounded = return_freed_memory_to_os()
        if self.device.type == "cpu":
            # large tensors reuse freed blocks of their size: no fresh pages (a budget's mmap threshold), no
            # fragmented heap (glibc's, without one); cpu_allocator.py. The cap is the plan's, set at the first
            # training step, when its size is known
            self.host_allocator_cached = cpu_allocator.install(cpu_allocator.DEFAULT_CAP_BYTES)
        self.hf_config = load_hf_config(config.model_name_or_path)
        base = build_meta_model(self.hf_config, self.dtype)
        self.units = unit_map(base)
        # on the CPU the layers compute on views of the file's pages: copy-on-write, so a model writing a weight in
        # place (Gemma 3n) writes its own copy (SafetensorsFile)
        self.store = WeightStore(config.model_name_or_path, config.gbi_path, private=self.device.type == "cpu")
        self.sources, unexpected = map_checkpoint(base, self.store)
        self._read = reader_for(self.sources, self.store, base)
        self._check_checkpoint(base, unexpected)
        # the dtype each parameter and stored buffer is held in, as from_pretrained holds it (keymap.held_dtype)
        self.dtype_of = held_dtype(base, self.dtype)
        self._load_stored_buffers(base)

        shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}  # before PEFT renames them
        prefix, layers = find_decoder_layers(base)
        self.lora_targets = list(config.lora_target_modules or default_lora_targets(layers))
        check_lora_targets(base, prefix, self.lora_targets, config.lora_rank)
        self.peft_model = inject_lora(base, config.lora_rank, config.lora_alpha, config.lora_dropout,
                                      self.lora_targets, self.device)
        self.peft_model.peft_config["default"].base_model_name_or_path = config.model_name_or_path
        self.base_model = base
        base.requires_grad_(False)
        for p in self.get_trainable_parameters():
            p.requires_grad_(True)
        self._load_resident_units(base)
        self._move_buffers(base)

        direct = {n: s.key for n, s in self.sources.items()}
        built_from = {n: [k for k, _ in s.group.sources] for n, s in self.sources.items() if s.group is not None}
        layer_names = [self.units.units[layer_unit(i)] for i in range(self.units.num_layers)]
        self.layouts = [UnitLayout.build(layer_unit(i), names, shapes, self.dtype_of, self.store, direct, built_from)
                        for i, names in enumerate(layer_names)]
        # Reader threads per slot fill: on a GPU the host cores are free while the layers compute, and one
        # thread's copy out of the page cache (a few GB/s) is slower than the link it feeds.
        self._fill_threads = min(FILL_THREADS, os.cpu_count() or 1) if self.device.type == "cuda" else 1
        if config.strategy == MemoryStrategy.STREAMING:
            not_held = first_not_held(self._layer_file_keys(), self.store, self.dtype_of)
            same_dtype = not_held is None
            cpu = self.device.type == "cpu"
            # views only of tensors stored as the model uses them: a tensor built on load (Mixtral's experts,
            # stacked from per-expert ones) would be a new allocation at every load; it goes through the slots
            views_ok = cpu and same_dtype and self._layers_stored_as_used() and config.zero_copy is not False
            zero_copy = self._zero_copy if views_ok else None
            from .plan_table import ring_depth, spread

            # LemaConfig.resident_layers; as many as the layers or more: every one (the plan's auto split may ask so)
            resident_ids = spread(config.resident_layers, self.units.num_layers)
            streamed_ids = [i for i in range(self.units.num_layers) if i not in set(resident_ids)]
            # before any page is registered: a resident layer's first or last bytes can share a page with a streamed
            # layer's registered span, and CUDA refuses a copy from a range only partly registered
            resident = {i: self._load_resident(self.layouts[i]) for i in resident_ids}
            # CUDA zero-copy: asked for, or (auto) wherever it applies, unless a page-cache size asks for the pager
            auto = config.zero_copy is None and config.page_cache_bytes is None
            host_views = (self._register_page_cache(not_held, streamed_ids, required=config.zero_copy is True)
                          if not cpu and (config.zero_copy or auto) else None)
            try:
                # the page cache of every path but CUDA zero-copy's (its pages stay locked, and fit the RAM)
                pager = self._pager(streamed_ids) if host_views is None and config.prefetch else None
                slots = ring_depth(config.num_buffers, self.units.num_layers - len(resident))
                self.source = WeightRing(self.layouts, self._fill, zero_copy, self._hint, self.device,
                                         slots, prefetch=config.prefetch, pager=pager, resident=resident,
                                         host_views=host_views)
            except BaseException:  # out of device memory loading the resident layers or the slots, ...
                self._unregister_page_cache()  # ... must not leave the page cache locked behind a failed init
                raise
        else:
            self.source = ResidentLayers(self.layouts, self._load_resident)
        recompute = config.strategy == MemoryStrategy.STREAMING or config.gradient_checkpointing
        self.streamed = StreamedLayers(layers, prefix, layer_names, self.source, recompute=recompute)
        # Kept activations out of glibc's heap (KeptChunks): on the CPU only, and not with a CPU budget, where each
        # freed tensor of 1 MiB or more already leaves the heap and the copies only add memory (7B b1 x 128: 0.17
        # GiB more at the peak). CUDA's caching allocator has no such heap.
        self.streamed.copy_kept = self.device.type == "cpu" and not getattr(self, "host_heap_bounded", False)
        # the frozen linears' products in the orientation MKL runs faster for each shape (engine/cpu_linear.py)
        self.linear_orientations = cpu_linear.Orientations() if self.device.type == "cpu" else None
        if self.linear_orientations is not None:  # the layers, the head (and the chunked loss's products below)
            cpu_linear.install(self.linear_orientations, layers, base.get_output_embeddings())
        owner = base.get_submodule(prefix.rsplit(".", 1)[0]) if "." in prefix else base
        owner.register_forward_pre_hook(self._begin_pass)
        self.decoder = base.base_model  # the stack without the head (LlamaModel, GPT2Model, ...)
        self._budget = None  # planner.ActivationBudget, made at the first training forward
        self.chunked_loss_unsupported = fused_head_supported(base)
        self._softcap = final_softcap(self.hf_config)
        self.initialize_lora()  # the LoRA weights were materialised empty: PEFT's initialisation until replaced
        self._closed = False
        self.eval()  # as `from_pretrained` leaves a model: no dropout until a trainer calls .train()

    # ----- setup --------------------------------------------------------------------------
    def _check_checkpoint(self, base, unexpected: list[str]) -> None:
        """Every parameter present, with the right shape, and every file tensor used, before any compute."""
        check_complete(base, self.sources, self.config.gbi_path or self.config.model_name_or_path)
        check_unused(base, self.store, unexpected, self.units.layers_prefix, self.units.num_layers)
        check_shapes(base, self.sources, self.store)
        params = dict(base.named_parameters())
        # Converted parameters (e.g. Mixtral's fused experts) have no file tensor of their own: build
        # the first layer's and compare. Every load checks again (`_read_checked`), at no cost.
        first = set(self.units.units.get(layer_unit(0), []))
        for name, src in self.sources.items():
            if src.key is None and name in params and (name in first or self.units.unit_of(name) in (EMBED, HEAD)):
                self._read_checked(name, tuple(params[name].shape))

    def _read_checked(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The parameter `name` from the store, refused unless it has the model's `shape`."""
        t = self._read(name)
        if tuple(t.shape) != tuple(shape):
            keys = self.sources[name].file_keys
            raise WeightsFileError(f"weight {name!r} (from {keys[:2]}{' ...' if len(keys) > 2 else ''}) has shape "
                                   f"{tuple(t.shape)} in {self.config.model_name_or_path!r} but config.json implies "
                                   f"{tuple(shape)}; the weights do not belong to this config.json")
        return t

    def _load_resident_units(self, base) -> None:
        """The embedding and the head: loaded once, frozen, tied weights kept tied.

        On the CPU an embedding that the file holds in the compute dtype, and that is not also the head,
        stays a view of the mmap (as the ring's layers): a lookup reads only its rows, so the page cache holds
        those and the kernel may evict the rest, where a copy would take its whole size in anonymous memory
        (500 MiB for the 7B shape in fp32, room the pager's window then has). The head is always a copy: each
        step reads all of it, and a view would compete with the window for the page cache."""
        by_id = parameter_aliases(base)
        views_ok = self.device.type == "cpu" and self.config.zero_copy is not False
        self.embedding_view_bytes = 0
        for unit in (EMBED, HEAD):
            for name in self.units.units[unit]:
                tensor = self._read(name)
                aliases = by_id[id(base.get_parameter(name))]
                if (views_ok and unit == EMBED and len(aliases) == 1 and self.sources[name].key is not None
                        and tensor.dtype == self.dtype_of(name)):
                    self.embedding_view_bytes += tensor.numel() * tensor.element_size()
                else:
                    tensor = tensor.to(device=self.device, dtype=self.dtype_of(name), copy=True)
                param = nn.Parameter(tensor, requires_grad=False)
                for alias in aliases:
                    owner, attr = alias.rsplit(".", 1)
                    base.get_submodule(owner)._parameters[attr] = param

    def _load_stored_buffers(self, base) -> None:
        """The persistent buffers the weights hold (keymap.stored_buffers), copied into the skeleton's once, in
        the dtype from_pretrained holds them in (dtype_of: their own, or float32 where the class keeps them so); a
        few bytes each, resident with the layer."""
        held = dict(base.named_buffers())
        for name in stored_buffers(base, self.sources):
            value = self._read(name)
            if tuple(value.shape) != tuple(held[name].shape):
                raise WeightsFileError(f"tensor {name!r} has shape {tuple(value.shape)} in "
                                       f"{self.config.model_name_or_path!r} but config.json implies "
                                       f"{tuple(held[name].shape)}; the weights do not belong to this config.json")
            if self.dtype_of(name) != held[name].dtype:  # kept in float32 whatever the compute dtype
                owner, attr = name.rsplit(".", 1)
                base.get_submodule(owner)._buffers[attr] = value.to(self.dtype_of(name), copy=True)
                continue
            with torch.no_grad():
                held[name].copy_(value)

    def _move_buffers(self, base) -> None:
        for name, buf in list(base.named_buffers()):
            owner, attr = name.rsplit(".", 1)
            module = base.get_submodule(owner)
            if buf.device != self.device:
                module._buffers[attr] = buf.to(self.device)

    def _fill(self, layout: UnitLayout, dst: torch.Tensor) -> None:
        layout.fill(dst, self._read, self.store, self._fill_threads)

    def _layer_file_keys(self) -> list[tuple[str, str]]:
        """(parameter name, file key) of every layer tensor. The ring serves the file's bytes as they are (CPU mmap
        views, CUDA copies from the page cache) only where each is stored in the dtype it is held in (dtype_of,
        keymap.first_not_held); otherwise it converts into its preallocated slot buffers (no allocation per layer
        load)."""
        return [(p.name, k) for layout in self.layouts for p in layout.placements
                for k in self.sources[p.name].file_keys]

    def _layers_stored_as_used(self) -> bool:
        """Every layer tensor lies in the file as one range (no tensor built on load from several)."""
        return all(l.stored_as_used for l in self.layouts)

    def _register_page_cache(self, not_held: Optional[str], streamed: list[int], required: bool):
        """CUDA zero-copy (LemaConfig.zero_copy True or None): page-lock the streamed layers' file ranges for the
        copy engine (SafetensorsFile.register_with_cuda), so each layer's host-to-device copy reads the page cache
        itself, with no pinned staging slot and no host copy; returns the ring's `host_views`. Resident layers
        (read once, at load) are left pageable. Where it cannot apply (another dtype in the file, tensors built
        on load, the layers past the RAM, a failed registration): refused when `required`, else None (the
        pinned staging). `not_held`: the first layer tensor stored in another dtype than held, said (None: none)."""
        why = None
        if not_held is not None:
            # in the compute dtype, yet not as held: a tensor Transformers holds in float32 (Ernie 4.5's router)
            in_dtype = all(self.store.entry(k).dtype == self.dtype for _, k in self._layer_file_keys())
            why = (f"the layer weights are not stored as held ({not_held})" if in_dtype else
                   f"the layer weights are not stored in {self.dtype}") + " (the copy engine cannot convert)"
        elif not self._layers_stored_as_used():
            why = "some layer weights are built on load (converted tensors such as fused experts)"
        else:
            # asked for: the streamed layers must fit, the ones it locks; auto: every layer, as the plan decides
            # it before it knows which stay resident (planner.cuda_zero_copy), so the plan printed is what runs
            counted = streamed if required else range(len(self.layouts))
            need, available = sum(self.layouts[i].nbytes for i in counted), memory_available()
            if need > available - RESERVE_BYTES:
                why = (f"the streamed layers ({need / 2**30:.1f} GiB) would stay locked in RAM, but only "
                       f"{available / 2**30:.1f} GiB is available")
        if why is None:
            for f, spans in registration_spans(self.layouts, streamed).items():
                for lo, hi in spans:
                    err = f.register_with_cuda(lo, hi)
                    if err is not None:
                        why = f"registering {f.path!r} with CUDA failed ({err})"
                        break
                if why is not None:
                    break
        if why is not None:
            for f in self.store.files:  # a file registered before another one failed
                f.unregister_cuda()
            if not required:
                return None
            raise ValueError(f"zero_copy=True on {self.device}: {why}; use zero_copy=None (--zero-copy auto) "
                             "to stage each layer through pinned host slots")
        self._pieces = {}
        return self._host_pieces

    def _host_pieces(self, layout: UnitLayout) -> list[tuple[int, torch.Tensor]]:
        """A unit's registered file bytes as (offset in its slot, uint8 view of the mmap) pieces; made at the
        unit's first load and kept, so a load allocates no views."""
        pieces = self._pieces.get(layout.unit)
        if pieces is None:
            if layout.packed is not None:
                f, start, end = layout.packed
                pieces = [(0, f.bytes_view(start, end))]
            else:
                pieces = [(p.offset, f.bytes_view(lo, hi))
                          for p, (f, lo, hi) in zip(layout.placements, layout.ranges)]
            self._pieces[layout.unit] = pieces
        return pieces

    def _zero_copy(self, layout: UnitLayout) -> dict:
        return {p.name: self._read_checked(p.name, p.shape).to(p.dtype) for p in layout.placements}

    def _pager(self, streamed: list[int]) -> Optional[PageCachePager]:
        """The page-cache pager (stream/pager.py) when the streamed layers' file bytes do not all fit in the
        page cache, or when `page_cache` gives its size; None leaves the page cache to the kernel. Whatever
        reads the pages: the CPU's views, the loader thread converting into CPU slots (another dtype, Mixtral's
        experts stacked on load), or the pinned staging of a GPU's copies."""
        if self.config.page_cache == "off":
            return None
        if self.config.page_cache_bytes is not None:
            return PageCachePager(self.layouts, self.config.page_cache_bytes)
        layers = sum(end - start for i in streamed for _, start, end in self.layouts[i].ranges)
        return PageCachePager(self.layouts) if layers > memory_available() - RESERVE_BYTES else None

    def _hint(self, layout: UnitLayout) -> None:
        for f, start, end in layout.ranges:
            f.advise_willneed(start, end)

    def _load_resident(self, layout: UnitLayout) -> dict:
        return {p.name: self._read_checked(p.name, p.shape).to(device=self.device, dtype=p.dtype, copy=True)
                for p in layout.placements}

    def _begin_pass(self, module, args) -> None:
        """Tell the ring the order of the coming pass: F0..F(L-1), then B(L-1)..B0 when training."""
        self.streamed.release_backward_holds()  # left over if the last backward raised
        if getattr(self, "host_heap_bounded", False):  # a CPU budget: what the last step freed leaves the heap
            trim_heap()
        self.streamed.boundary_bytes = 0
        self.streamed.offloaded_bytes = 0
        self.streamed.host_offload.new_pass()
        self.streamed.kept_bytes = 0
        self.streamed.kept_chunks.new_pass(training=torch.is_grad_enabled())
        L = self.units.num_layers
        schedule = list(range(L))
        if torch.is_grad_enabled() and self.streamed.recompute:
            schedule += list(reversed(range(L)))
        self.source.begin(schedule)

    # ----- public API ---------------------------------------------------------------------
    def initialize_lora(self, seed: int = 0) -> None:
        """PEFT's initialisation: A Kaiming-uniform from `seed`, B zero (so the model starts as the base). A new
        LemaModel starts so (seed 0); call it to draw A from another seed."""
        reset_lora(self.peft_model, seed)

    def get_trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.peft_model.named_parameters() if ".lora_" in n]

    def get_trainer(self, optimizer, gradient_accumulation_steps: int = 1, max_grad_norm: Optional[float] = None):
        from .trainer import LemaTrainer

        return LemaTrainer(self, optimizer, gradient_accumulation_steps, max_grad_norm)

    def _check_inputs(self, input_ids, labels, attention_mask):
        if self._closed:
            raise ValueError("this LemaModel was closed (close() let go of its weights); make a new one to run it")
        if not torch.is_tensor(input_ids) or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor of token ids, got "
                             f"{getattr(input_ids, 'dtype', type(input_ids))}")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2 or 0 in input_ids.shape:
            raise ValueError(f"input_ids must have shape (batch, seq) with at least one token, got "
                             f"{tuple(input_ids.shape)}")
        vocab = self.base_model.get_input_embeddings().num_embeddings
        if input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())  # host sync
            if hi >= vocab or lo < 0:
                raise ValueError(f"input_ids holds token id {hi if hi >= vocab else lo}, outside the vocabulary of "
                                 f"{vocab} entries (ids 0..{vocab - 1}); tokenize with this model's tokenizer")
        if labels is not None:
            if not torch.is_tensor(labels) or labels.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"labels must be an integer tensor of token ids (-100 where ignored), got "
                                 f"{getattr(labels, 'dtype', type(labels))}")
            bad = labels[(labels != -100) & ((labels < 0) | (labels >= vocab))]
            if bad.numel():  # host sync
                raise ValueError(f"labels hold {int(bad[0])}, which is neither a token id (0..{vocab - 1}) nor "
                                 "-100 (ignored position)")
        limit = model_positions(self.hf_config)
        if limit and input_ids.shape[1] > limit:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds the model's {limit} positions; "
                             f"truncate inputs to at most {limit} tokens")
        for name, t in (("labels", labels), ("attention_mask", attention_mask)):
            if t is not None:
                t = t.unsqueeze(0) if t.dim() == 1 else t
                if tuple(t.shape) != tuple(input_ids.shape):
                    raise ValueError(f"{name} has shape {tuple(t.shape)} but input_ids has "
                                     f"{tuple(input_ids.shape)}; they must match")
        return self._to_device(input_ids), self._to_device(labels), self._to_device(attention_mask)

    def _to_device(self, t):
        if t is None:
            return None
        t = t.unsqueeze(0) if t.dim() == 1 else t
        if self.device.type == "cuda" and t.device.type == "cpu":
            # through a pinned copy: a copy from pageable memory would first wait for all queued GPU work
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def forward(self, input_ids, labels=None, attention_mask=None, **kwargs):
        """Transformers' causal-LM forward; `.loss` (labels shifted inside, -100 ignored) and `.logits`.

        With labels, when `uses_chunked_loss` (LemaConfig.chunked_loss: by default when the float32
        logits would exceed 64 MiB), the head and the loss run chunk by chunk (engine/chunked_loss.py)
        and `.logits` is None: the full logits are never built."""
        given_mask = attention_mask
        input_ids, labels, attention_mask = self._check_inputs(input_ids, labels, attention_mask)
        kwargs.setdefault("use_cache", False)
        tokens, seq_len = input_ids.numel(), input_ids.shape[1]
        # padding: attention takes a mask, and a layer saves more (planner.plan's `padded`); read from the mask as
        # given: a host sync only where a caller passes it on the GPU (a trainer's batches come on the host)
        padded = given_mask is not None and torch.is_grad_enabled() and not bool(given_mask.all())
        self.streamed.keep = frozenset(self.kept_layers(tokens, seq_len, padded)) if torch.is_grad_enabled() \
            else frozenset()
        self.streamed.offload = torch.is_grad_enabled() and self.offloads_activations(tokens, seq_len, padded)
        pager = getattr(self.source, "pager", None)
        if pager is not None and torch.is_grad_enabled() and self.streamed.recompute:
            pager.expect_step(self._activation_budget().step_growth(tokens, seq_len, padded))
        if getattr(self, "host_allocator_cached", False) and torch.is_grad_enabled():
            cpu_allocator.install(self._activation_budget().allocator_cache(tokens, seq_len, padded))
        if labels is not None and self.uses_chunked_loss(labels.numel()) and set(kwargs) <= {"use_cache"} \
                and not kwargs.get("use_cache"):
            # engine/chunked_loss.py: the head and the loss chunk by chunk; the full logits are never built
            hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
            head = self.base_model.get_output_embeddings()
            # in the head's dtype, as Transformers' forward casts it (Mamba keeps its residual stream in float32)
            loss = causal_lm_loss(hidden.to(head.weight.dtype), head, labels, self._softcap,
                                  orientations=self.linear_orientations)
            return CausalLMOutputWithPast(loss=loss, logits=None)
        return self.peft_model(input_ids=input_ids, labels=labels, attention_mask=attention_mask, **kwargs)

    def kept_layers(self, tokens: int, seq_len: Optional[int] = None, padded: bool = False) -> list[int]:
        """The decoder layers that keep their activations (no recompute) in a training step of `tokens` tokens
        (rows of `seq_len`, where known; `padded`: with padding, which attention masks).

        LemaConfig.keep_activations, or (None) as many as fit the budget beside the step's planned peak
        (planner.ActivationBudget.keepable_layers), spread through the stack."""
        from .plan_table import spread

        L = self.units.num_layers
        if not self.streamed.recompute:
            return []
        n = self.config.keep_activations
        if n is None:
            n = self._activation_budget().keepable_layers(tokens, seq_len, padded)
        return spread(min(n, L), L)

    def offloads_activations(self, tokens: int, seq_len: Optional[int] = None, padded: bool = False) -> bool:
        """Whether a training step of `tokens` tokens keeps the recomputed layers' inputs in host memory
        (LemaConfig.offload_activations; None: the plan's decision, on a GPU when the budget needs it)."""
        if not self.streamed.recompute or self.config.offload_activations is False:
            return False
        if self.config.offload_activations:
            return True
        return self.device.type == "cuda" and self._activation_budget().offloads(tokens, seq_len, padded)

    def _activation_budget(self, held_bytes: int = 0):
        """The run-time planner, made once (at the first training step). `held_bytes`: memory the plan counts
        that is already taken when it is made (a resumed optimizer's state; LemaTrainer passes it), added back
        to the free memory it measures so that it is not counted twice."""
        if self._budget is None:
            from .planner import ActivationBudget

            with torch.random.fork_rng(devices=[]):  # building PEFT's meta skeleton must not move the CPU RNG
                self._budget = ActivationBudget(self.config, held_bytes=held_bytes)
        return self._budget

    def uses_chunked_loss(self, tokens: int) -> bool:
        """Whether a forward with labels over `tokens` tokens takes the chunked loss (LemaConfig.chunked_loss)."""
        if self.config.chunked_loss is False or self.chunked_loss_unsupported:
            return False
        vocab = self.base_model.get_output_embeddings().out_features
        return bool(self.config.chunked_loss) or tokens * vocab * 4 > CHUNK_BYTES

    @torch.no_grad()
    def generate(self, input_ids, **kwargs):
        """Transformers' `generate` (KV cache on): each new token is one streamed pass over the layers."""
        input_ids, _, attention_mask = self._check_inputs(input_ids, None, kwargs.pop("attention_mask", None))
        kwargs.setdefault("use_cache", True)
        was_training = self.training
        self.eval()
        try:
            return self.peft_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            self.train(was_training)

    def save_adapter(self, path: str) -> None:
        """PEFT format (adapter_model.safetensors + adapter_config.json), written atomically. An adapter folder
        already at `path` is replaced; a folder holding anything else is refused (it would be replaced whole)."""
        from .adapter_files import save_adapter

        save_adapter(self.peft_model, path)

    def load_adapter(self, path: str) -> None:
        """Load a PEFT adapter made for this model and rank; anything else is refused with the reason (a damaged
        adapter folder as an AdapterFileError, which `lema train --resume` takes for a damaged checkpoint)."""
        from .adapter_files import load_adapter

        load_adapter(self, path)

    def memory_stats(self, optimizer=None) -> dict[str, int]:
        """Bytes: frozen weights in device memory now and at peak (an embedding kept as a view of the mmap is
        page cache, not counted), activations, adapters, optimizer state."""
        def nbytes(ts):
            return sum(t.numel() * t.element_size() for t in ts)

        resident = nbytes(self.base_model.get_input_embeddings().parameters()) + sum(
            nbytes([self.base_model.get_parameter(n)]) for n in self.units.units[HEAD]
            if self.base_model.get_parameter(n) is not self.base_model.get_input_embeddings().weight)
        if isinstance(self.source, WeightRing):
            slots = self.source.bytes_on_device()  # preallocated slot buffers; 0 for zero-copy views of the mmap
            per_layer = max(l.nbytes for l in self.layouts)
            layers_now = slots or per_layer * sum(s.occupant is not None for s in self.source.slots)
            layers_peak = slots or per_layer * self.source.stats.peak_occupied
        else:
            layers_now = layers_peak = self.source.nbytes
        stats = {
            "frozen_weights_now": resident - self.embedding_view_bytes + layers_now,
            "frozen_weights_peak": resident - self.embedding_view_bytes + layers_peak,
            # layer inputs kept for the recompute + everything the kept layers saved, last pass (on the device)
            "activations": self.streamed.boundary_bytes - self.streamed.offloaded_bytes + self.streamed.kept_bytes,
            "activations_on_host": self.streamed.offloaded_bytes,
            "adapters": nbytes(self.get_trainable_parameters()),
            "optimizer_state": 0,
        }
        if optimizer is not None:
            stats["optimizer_state"] = nbytes(t for s in optimizer.state.values() for t in s.values()
                                              if torch.is_tensor(t))
        if self.device.type == "cuda":
            stats["device_allocated"] = torch.cuda.memory_allocated(self.device)
            stats["device_peak"] = torch.cuda.max_memory_allocated(self.device)
        return stats

    def close(self) -> None:
        """Let go of the weights: the ring's thread and slots, CUDA registrations, the weight files (a view still
        held elsewhere keeps its pages mapped). The model cannot run afterwards; its adapter can still be saved."""
        self.source.close()  # a ring copying from registered pages finishes its copies first
        self._unregister_page_cache()
        self.store.close()
        self._closed = True

    def __enter__(self) -> "LemaModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _unregister_page_cache(self) -> None:
        for f in self.store.files:  # page-locked ranges (CUDA zero-copy) go back to the page cache
            f.unregister_cuda()

    def __del__(self):
        try:
            self.source.close()
            self._unregister_page_cache()  # after the ring's copies: a model dropped without close()
        except Exception:
            pass
