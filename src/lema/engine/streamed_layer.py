"""A decoder layer whose frozen weights are bound only while it runs.

Each decoder layer of the skeleton gets, on the instance, a `forward` that
- under grad: calls `torch.utils.checkpoint.checkpoint(run, ..., use_reentrant=False)`, which
  keeps only the layer's inputs (and the RNG state, so LoRA dropout draws the same mask again)
  and calls `run` a second time in backward, in the order B(L-1) ... B0;
- under no_grad: calls `run` directly (nothing is kept).

`run` acquires the layer's weights from the source (the ring, or the resident store), binds them
into the layer's modules, calls Transformers' own forward, and unbinds them in a `finally`.

Release timing: in forward the weights are released as soon as `run` returns. In the backward
recompute, autograd runs the layer's backward *after* `run` returned, still reading the bound
weight tensors; so a layer acquired in backward is released when the next layer is acquired, or
when the backward pass ends (a callback queued on the autograd engine). See NOTE [ring protocol]
in stream/ring.py.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class WeightSource(Protocol):
    def acquire(self, unit: int) -> dict[str, torch.Tensor]: ...
    def release(self, unit: int) -> None: ...


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class LayerBinder:
    """Binds and unbinds one decoder layer's frozen parameters (names relative to the layer)."""

    def __init__(self, layer: nn.Module, prefix: str, names: list[str]):
        # full name in the *base* model (without PEFT's `.base_layer`) -> (module, attribute)
        self.targets: list[tuple[nn.Module, str, str]] = []
        modules = dict(layer.named_modules())
        for name, _ in layer.named_parameters():
            if ".lora_" in name:
                continue
            owner, attr = name.rsplit(".", 1) if "." in name else ("", name)
            plain = prefix + (owner.replace(".base_layer", "") + "." + attr).lstrip(".")
            if plain in names:
                self.targets.append((modules[owner], attr, plain))
        missing = set(names) - {t[2] for t in self.targets}
        assert not missing, f"layer parameters not found in the skeleton: {sorted(missing)}"

    def bind(self, weights: dict[str, torch.Tensor]) -> None:
        for module, attr, plain in self.targets:
            # A plain tensor in _parameters: frozen (requires_grad False), never an autograd leaf.
            module._parameters[attr] = weights[plain]

    def unbind(self, meta: dict[str, torch.Tensor]) -> None:
        for module, attr, plain in self.targets:
            module._parameters[attr] = meta[plain]


class StreamedLayers:
    """Installs the streaming forward on every decoder layer and tracks backward releases."""

    def __init__(self, layers: nn.ModuleList, prefix: str, names_per_layer: list[list[str]],
                 source: WeightSource, recompute: bool = True):
        self.source = source
        self.recompute = recompute
        self.held_in_backward: list[int] = []
        self.boundary_bytes = 0  # inputs kept for the recompute in the current pass (NOTE: shared tensors
        #                          such as rotary cos/sin and the mask are counted once per model, not here)
        self.bound_now = 0
        self.peak_bound = 0
        for i, layer in enumerate(layers):
            binder = LayerBinder(layer, f"{prefix}.{i}.", names_per_layer[i])
            meta = {plain: module._parameters[attr] for module, attr, plain in binder.targets}
            layer.forward = self._make_forward(i, layer.forward, binder, meta)

    def release_backward_holds(self) -> None:
        while self.held_in_backward:
            self.source.release(self.held_in_backward.pop())

    def _make_forward(self, index: int, original, binder: LayerBinder, meta):
        def run(*args, **kwargs):
            backward = _in_backward()
            if backward:
                self.release_backward_holds()  # the previous layer's backward has finished
            weights = self.source.acquire(index)
            binder.bind(weights)
            self.bound_now += 1
            self.peak_bound = max(self.peak_bound, self.bound_now)
            try:
                return original(*args, **kwargs)
            finally:
                binder.unbind(meta)
                self.bound_now -= 1
                if backward:
                    if not self.held_in_backward:
                        torch.autograd.Variable._execution_engine.queue_callback(self.release_backward_holds)
                    self.held_in_backward.append(index)
                else:
                    self.source.release(index)

        def forward(*args, **kwargs):
            if self.recompute and torch.is_grad_enabled():
                hidden = args[0] if args else kwargs.get("hidden_states")
                if torch.is_tensor(hidden):  # what checkpoint keeps of this layer: its input
                    self.boundary_bytes += hidden.numel() * hidden.element_size()
                return checkpoint(run, *args, use_reentrant=False, **kwargs)
            return run(*args, **kwargs)

        return forward
