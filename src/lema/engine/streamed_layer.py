"""A decoder layer whose frozen weights are bound only while it runs.

Each decoder layer of the skeleton gets, on the instance, a `forward` that
- under grad, recomputed (the default): calls `torch.utils.checkpoint.checkpoint(run, ...,
  use_reentrant=False)`, which keeps only the layer's inputs (and the RNG state, so LoRA dropout
  draws the same mask again) and calls `run` a second time in backward, in the order B(L-1) ... B0;
- under grad, for a layer in `keep` (activations kept, no recompute): calls `run` under
  `saved_tensors_hooks` that replace every saved tensor viewing the layer's streamed weights by a
  `WeightRef` (layer, name, size, stride, offset) and keep everything else. In backward the
  layer's weights are acquired again from the source (B order, as for the recompute) and the
  views rebuilt from the reference: the activations stay, the weights' slots do not;
- under no_grad: calls `run` directly (nothing is kept).

With `offload` (LemaConfig.offload_activations), a recomputed layer's checkpoint saves its input
through saved-tensor hooks that copy it into pinned host memory (non-blocking, on the compute
stream) and back to the device when the recompute unpacks it: the checkpoint saves its inputs
outside its own hooks, so only the inputs move, and the gradient still flows through the
original graph (nothing crosses the bus in backward but the input itself).

`run` acquires the layer's weights from the source (the ring, or the resident store), binds them
into the layer's modules, calls Transformers' own forward, and unbinds them in a `finally`.

Release timing: in forward the weights are released as soon as `run` returns. In the backward
recompute, autograd runs the layer's backward *after* `run` returned, still reading the bound
weight tensors; so a layer acquired in backward is released when the next layer is acquired, or
when the backward pass ends (a callback queued on the autograd engine). See NOTE [ring protocol]
in stream/ring.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class WeightSource(Protocol):
    def acquire(self, unit: int) -> dict[str, torch.Tensor]: ...
    def release(self, unit: int) -> None: ...


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


@dataclass(frozen=True)
class WeightRef:
    """A saved tensor that views streamed weight `name` of layer `layer`: rebuilt in backward."""

    layer: int
    name: str
    size: tuple
    stride: tuple
    offset: int  # elements from the weight's first element


class _WeightIndex:
    """Which bound weight (if any) a tensor views, by storage and address range. Holds no tensor: the
    autograd graph keeps the pack hook (and so this index) alive until backward."""

    def __init__(self, layer: int, weights: dict[str, torch.Tensor]):
        self.layer = layer
        self.storages = {w.untyped_storage().data_ptr() for w in weights.values()}
        self.ranges = [(w.data_ptr(), w.data_ptr() + w.numel() * w.element_size(), name, w.dtype, w.element_size())
                       for name, w in weights.items()]

    def find(self, t: torch.Tensor):
        """A WeightRef for `t` when it views a bound weight, None when it is unrelated to them."""
        if t.device.type == "meta" or t.untyped_storage().data_ptr() not in self.storages:
            return None
        ptr = t.data_ptr()
        for lo, hi, name, dtype, itemsize in self.ranges:
            if lo <= ptr < hi and t.dtype == dtype:
                return WeightRef(self.layer, name, tuple(t.shape), tuple(t.stride()), (ptr - lo) // itemsize)
        # It shares the slot's storage but is none of the weights: keeping it would read whatever the slot
        # holds in backward. Refuse rather than compute a wrong gradient.
        raise RuntimeError(f"layer {self.layer} saves a tensor ({tuple(t.shape)}, {t.dtype}) inside its streamed "
                           "weights' buffer that is not a view of one weight; LEMA cannot keep this layer's "
                           "activations: set keep_activations=0 (recompute every layer)")


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
        self.recompute = recompute  # under grad: checkpoint the layers, except those in `keep`
        self.keep: frozenset[int] = frozenset()  # layers that keep their activations (no recompute)
        self.held_in_backward: list[int] = []
        self.backward_weights: dict[int, dict[str, torch.Tensor]] = {}  # kept layers' weights, re-acquired
        self.boundary_bytes = 0  # inputs kept for the recompute in the current pass (NOTE: shared tensors
        #                          such as rotary cos/sin and the mask are counted once per model, not here)
        self.kept_bytes = 0      # tensors saved by the kept layers in the current pass (weights excluded)
        self.offload = False     # recomputed layers' inputs to (pinned) host memory until their recompute
        self.offloaded_bytes = 0  # of the boundary, in host memory, in the current pass
        self.bound_now = 0
        self.peak_bound = 0
        for i, layer in enumerate(layers):
            binder = LayerBinder(layer, f"{prefix}.{i}.", names_per_layer[i])
            meta = {plain: module._parameters[attr] for module, attr, plain in binder.targets}
            layer.forward = self._make_forward(i, layer.forward, binder, meta)

    def release_backward_holds(self) -> None:
        self.backward_weights.clear()
        while self.held_in_backward:
            self.source.release(self.held_in_backward.pop())

    def _hold_in_backward(self, index: int) -> None:
        if not self.held_in_backward:
            torch.autograd.Variable._execution_engine.queue_callback(self.release_backward_holds)
        self.held_in_backward.append(index)

    def _weights_for_backward(self, index: int) -> dict[str, torch.Tensor]:
        """A kept layer's weights, acquired again when its backward first needs them (NOTE [ring protocol])."""
        weights = self.backward_weights.get(index)
        if weights is None:
            self.release_backward_holds()  # the previous layer's backward has finished
            weights = self.source.acquire(index)
            self.backward_weights[index] = weights
            self._hold_in_backward(index)
        return weights

    def _pack(self, index: _WeightIndex, seen: set, t: torch.Tensor):
        ref = index.find(t)
        if ref is not None:
            return ref
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            self.kept_bytes += storage.nbytes()
        return t

    def _to_host(self, t: torch.Tensor):
        """Pack a checkpoint's input: a copy in host memory (pinned from a GPU, so the copy runs async)."""
        if t.numel() == 0:  # nothing to move (Transformers passes empty tensors to some layers)
            return None, t
        pinned = t.is_cuda
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned)
        host.copy_(t, non_blocking=pinned)
        self.offloaded_bytes += host.numel() * host.element_size()
        return t.device, host

    @staticmethod
    def _from_host(packed) -> torch.Tensor:
        device, host = packed
        return host if device is None else host.to(device, non_blocking=host.is_pinned())

    def _unpack(self, x):
        if isinstance(x, WeightRef):
            w = self._weights_for_backward(x.layer)[x.name]
            return w.as_strided(x.size, x.stride, w.storage_offset() + x.offset)
        return x

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
                    self._hold_in_backward(index)
                else:
                    self.source.release(index)

        def run_kept(*args, **kwargs):
            weights = self.source.acquire(index)
            binder.bind(weights)
            self.bound_now += 1
            self.peak_bound = max(self.peak_bound, self.bound_now)
            pack = functools.partial(self._pack, _WeightIndex(index, weights), set())
            try:
                with torch.autograd.graph.saved_tensors_hooks(pack, self._unpack):
                    return original(*args, **kwargs)
            finally:
                binder.unbind(meta)
                self.bound_now -= 1
                self.source.release(index)

        def forward(*args, **kwargs):
            if self.recompute and torch.is_grad_enabled() and index in self.keep:
                return run_kept(*args, **kwargs)
            if self.recompute and torch.is_grad_enabled():
                hidden = args[0] if args else kwargs.get("hidden_states")
                if torch.is_tensor(hidden):  # what checkpoint keeps of this layer: its input
                    self.boundary_bytes += hidden.numel() * hidden.element_size()
                if self.offload:  # the checkpoint saves its (positional) inputs through these hooks
                    with torch.autograd.graph.saved_tensors_hooks(self._to_host, self._from_host):
                        return checkpoint(run, *args, use_reentrant=False, **kwargs)
                return checkpoint(run, *args, use_reentrant=False, **kwargs)
            return run(*args, **kwargs)

        return forward
