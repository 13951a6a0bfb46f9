"""A decoder layer whose frozen weights are bound only while it runs.

Each decoder layer of the skeleton gets, on the instance, a `forward` that
- under grad, recomputed (the default): calls `torch.utils.checkpoint.checkpoint(run, ...,
  use_reentrant=False)`, which keeps only the layer's inputs (and the RNG state, so LoRA dropout
  draws the same mask again) and calls `run` a second time in backward, in the order B(L-1) ... B0;
- under grad, for a layer in `keep` (activations kept, no recompute): calls `run` under
  `saved_tensors_hooks` that replace every saved tensor viewing the layer's streamed weights by a
  `WeightRef` (layer, name, size, stride, offset) and keep everything else (on the CPU, copied out
  of the heap into `KeptChunks`, so freed work does not fragment around it). In backward the
  layer's weights are acquired again from the source (B order, as for the recompute) and the
  views rebuilt from the reference: the activations stay, the weights' slots do not;
- under no_grad: calls `run` directly (nothing is kept).

With `offload` (LemaConfig.offload_activations), a recomputed layer's checkpoint saves its input
through saved-tensor hooks that copy it into pinned host memory and back to the device when the
recompute unpacks it, both on a stream of their own, the copy back of the next layer's input issued
while this one recomputes (HostOffload): the checkpoint saves its inputs outside its own hooks, so
only the inputs move, and the gradient still flows through the original graph (nothing crosses the
bus in backward but the input itself).

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
from typing import Optional, Protocol

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


KEPT_COPY_MIN_BYTES = 64 * 2**10
KEPT_CHUNK_BYTES = 64 * 2**20


def _views_of(chunk: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(chunk.untyped_storage()._cdata)


class KeptChunks:
    """On the CPU, the kept layers' saved activations are copied out of the heap into chunks of their own.

    Left where autograd made them, each kept tensor sits in glibc's heap between the blocks of its layer's
    transient work; when the layer ends, the transient blocks are freed around it, and the next layer's
    (kept and transient) blocks of other sizes fit those holes badly, so the heap grows by about one more
    layer's worth of work per layer. Measured on SmolLM2 (b4 x 256, 30 layers kept): after the forward 1.2
    GiB in use and 1.2 GiB free in the heap, which the process keeps. Copied into chunks of
    KEPT_CHUNK_BYTES, the heap holds one layer's transient work at a time. (Not where a CPU budget bounds the
    heap: StreamedLayers.copy_kept.)

    The chunks are reused from pass to pass: fresh ones each pass cost their page faults (a step 10-14%
    slower on that shape, measured). A chunk is reused only when no tensor views it any more (its storage's
    use count is back to its own), i.e. when the graph that saved into it is gone; one a live graph still
    holds is left to that graph (freed with it) and a new one is made."""

    def __init__(self):
        self.chunks: list[tuple[torch.Tensor, int]] = []  # (chunk, its storage's use count with no view)
        self.next = 0        # chunks[:next] are this pass's
        self.chunk = None
        self.used = 0

    def new_pass(self, training: bool = True) -> None:
        """A pass starts: keep the chunks no graph holds (all of them, once the last backward has run), or
        none when the pass keeps nothing (a forward without grad: generation need not hold them)."""
        self.chunks = [(c, rest) for c, rest in self.chunks if training and _views_of(c) <= rest]
        self.next, self.chunk, self.used = 0, None, 0

    def place(self, storage) -> tuple:
        """A copy of `storage`'s bytes in the current chunk: (chunk storage, byte offset)."""
        n = storage.nbytes()
        if self.chunk is None or self.used + n > self.chunk.numel():
            self.chunk, self.used = self._next_chunk(n), 0
        offset = self.used
        self.chunk[offset:offset + n].copy_(torch.empty(0, dtype=torch.uint8).set_(storage))
        self.used += -(-n // 64) * 64
        return self.chunk.untyped_storage(), offset

    def _next_chunk(self, n: int) -> torch.Tensor:
        while self.next < len(self.chunks):
            chunk, rest = self.chunks[self.next]
            self.next += 1
            if chunk.numel() >= n and _views_of(chunk) <= rest:
                return chunk
        chunk = torch.empty(max(KEPT_CHUNK_BYTES, n), dtype=torch.uint8)
        self.chunks.append((chunk, _views_of(chunk)))
        self.next = len(self.chunks)
        return chunk


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
            # PEFT's LoRA on a parameter (ParamWrapper: fused MoE experts) parametrizes it for each forward; taking
            # the parametrization off registers the bound tensor, not a Parameter, as a buffer of that name, which
            # would hold the slot and refuse the next parametrization
            module._buffers.pop(attr, None)
            module._parameters[attr] = meta[plain]


class _Offloaded:
    """A recomputed layer's input held in host memory (HostOffload)."""

    __slots__ = ("device", "host", "ready", "on_device", "prev")

    def __init__(self, device: torch.device, host: torch.Tensor, prev: "Optional[_Offloaded]"):
        self.device = device
        self.host = host
        self.ready = None      # CUDA event: the copy back to the device has landed
        self.on_device = None  # that copy
        self.prev = prev       # the input offloaded before this one: backward needs it next


class HostOffload:
    """The recomputed layers' inputs in host memory until their recompute (LemaConfig.offload_activations).

    On a GPU both copies run on a stream of their own, so the layers' kernels do not wait for them: the copy
    to pinned host memory is queued after the compute stream's work that wrote the input, and its device block
    is not reused until the copy has read it (record_stream); in backward, when the recompute of a layer takes
    its input back, the input of the layer before it (the next the backward needs) is copied to the device at
    once, so it lands while this layer recomputes and runs its backward. One input beyond the layer's own is on
    the device at a time (the planner counts it). `prefetched` counts the copies back issued ahead of need."""

    def __init__(self):
        self.stream = None  # created at the first CUDA input
        self.last: Optional[_Offloaded] = None
        self.prefetched = 0

    def new_pass(self) -> None:
        self.last = None

    def pack(self, t: torch.Tensor) -> _Offloaded:
        if not t.is_cuda:  # the host is the device: a copy, so the mechanism is the same as on a GPU
            return _Offloaded(t.device, t.detach().clone(), None)
        if self.stream is None or self.stream.device != t.device:
            self.stream = torch.cuda.Stream(t.device)
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(t.device))  # t is written by the compute stream
        with torch.cuda.stream(self.stream):
            host.copy_(t.detach(), non_blocking=True)  # torch records the host block's use on this stream
        t.record_stream(self.stream)  # t's device block is not handed out again before the copy has read it
        entry = _Offloaded(t.device, host, self.last)
        self.last = entry
        return entry

    def _fetch(self, entry: _Offloaded) -> None:
        if entry.on_device is not None:
            return
        with torch.cuda.stream(self.stream):  # after the copy to the host on the same stream
            entry.on_device = torch.empty(entry.host.shape, dtype=entry.host.dtype, device=entry.device)
            entry.on_device.copy_(entry.host, non_blocking=True)
            entry.ready = torch.cuda.Event()
            entry.ready.record(self.stream)

    def unpack(self, entry: _Offloaded) -> torch.Tensor:
        if entry.device.type != "cuda":
            return entry.host
        self._fetch(entry)  # not prefetched: the first input backward needs
        current = torch.cuda.current_stream(entry.device)
        current.wait_event(entry.ready)
        entry.on_device.record_stream(current)  # made on the offload stream, used and freed on this one
        previous, entry.prev = entry.prev, None
        if self.last is entry:  # the graph alone holds it (and its device copy) from now on
            self.last = None
        if previous is not None and previous.on_device is None:
            self._fetch(previous)  # lands while this layer recomputes
            self.prefetched += 1
        return entry.on_device


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
        self.host_offload = HostOffload()
        self.kept_chunks = KeptChunks()  # CPU: where the kept layers' activations are copied
        self.copy_kept = False   # copy them there (LemaModel: on the CPU, unless a budget bounds the heap)
        self.bound_now = 0
        self.peak_bound = 0
        for i, layer in enumerate(layers):
            binder = LayerBinder(layer, f"{prefix}.{i}.", names_per_layer[i])
            meta = {plain: module._parameters[attr] for module, attr, plain in binder.targets}
            layer.forward = self._make_forward(i, layer.forward, binder, meta, layer)

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

    def _pack(self, index: _WeightIndex, seen: dict, shared: set, t: torch.Tensor):
        ref = index.find(t)
        if ref is not None:
            return ref
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in seen:  # `seen` holds the storage until the layer returns: its address names it till then
            self.kept_bytes += storage.nbytes()
            seen[ptr] = (storage, self.kept_chunks.place(storage)
                         if self.copy_kept and ptr not in shared and not (t.is_leaf and t.requires_grad)
                         and storage.nbytes() >= KEPT_COPY_MIN_BYTES else None)
        placed = seen[ptr][1]
        if placed is None:
            # Not `t` itself: a tensor the node saves of its own outputs (exp, sigmoid) has that node as its
            # grad_fn, and handing it back makes node -> packed tensor -> node, a cycle only backward breaks
            # (by running the node). A node no backward runs (RWKV's last state update, which no output
            # uses) then kept the layer's graph forever. Unpacking restores the grad_fn from the node.
            return t.detach()
        chunk, offset = placed
        return torch.empty(0, dtype=t.dtype).set_(chunk, offset // t.element_size() + t.storage_offset(),
                                                  t.size(), t.stride())

    @staticmethod
    def _shared_inputs(args, kwargs) -> set:
        """Storages of a layer's inputs other than the hidden states: every layer's (the rotary cos/sin, the
        mask), alive through the pass anyway, so not copied per layer."""
        tensors = [a for a in (*args[1:], *kwargs.values()) if torch.is_tensor(a)]
        tensors += [a for v in kwargs.values() if isinstance(v, tuple) for a in v if torch.is_tensor(a)]
        return {a.untyped_storage().data_ptr() for a in tensors}

    def _to_host(self, hidden: tuple, t: torch.Tensor):
        """Pack a checkpoint's input: the layer's hidden states, known by `hidden` = (data_ptr, shape), go to
        host memory (HostOffload); its other inputs (a mask GPT-2 passes positionally, the rotary cos/sin) stay
        where they are. Not the tensor itself: autograd keeps a saved tensor's pack hook until that tensor is
        released in backward, so a hook holding the hidden states kept every layer's input on the device."""
        if t.numel() == 0 or (t.data_ptr(), t.shape) != hidden:
            return t
        self.offloaded_bytes += t.numel() * t.element_size()
        return self.host_offload.pack(t)

    def _from_host(self, packed) -> torch.Tensor:
        return self.host_offload.unpack(packed) if isinstance(packed, _Offloaded) else packed

    def _unpack(self, x):
        if isinstance(x, WeightRef):
            w = self._weights_for_backward(x.layer)[x.name]
            return w.as_strided(x.size, x.stride, w.storage_offset() + x.offset)
        return x

    def _make_forward(self, index: int, original, binder: LayerBinder, meta, layer: nn.Module):
        state: Optional[list] = None  # (module, attribute): the graph's tensors the layer's modules keep

        def let_go_of_the_graph() -> None:
            """Detach what the layer's modules keep of the graph on themselves past the call (found at the first
            forward under grad; in a `finally`: the recompute stops early, by an exception, once it has what
            backward needs). RecurrentGemma's RG-LRU keeps its final scan state (self.recurrent_states) until
            its block's next call resets it: after the recompute in backward, that is the recompute's state, whose
            graph no backward runs, and each layer's recompute (with every tensor it saved) outlived its backward
            until the layer's next forward: the step's peak 15.5 MiB instead of 7.5 at b2 x 128 (Transformers +
            PEFT with gradient checkpointing hold the same). The values stay."""
            nonlocal state
            if torch.is_grad_enabled():
                if state is None:
                    state = [(m, k) for m in layer.modules() for k, v in vars(m).items()
                             if torch.is_tensor(v) and v.grad_fn is not None]
                for module, name in state:
                    value = vars(module).get(name)
                    if torch.is_tensor(value) and value.grad_fn is not None:
                        vars(module)[name] = value.detach()

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
                let_go_of_the_graph()
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
            shared = self._shared_inputs(args, kwargs) if self.copy_kept else set()
            seen: dict = {}
            pack = functools.partial(self._pack, _WeightIndex(index, weights), seen, shared)
            try:
                with torch.autograd.graph.saved_tensors_hooks(pack, self._unpack):
                    return original(*args, **kwargs)
            finally:
                let_go_of_the_graph()
                seen.clear()  # the originals of what was copied may go now
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
                if self.offload and torch.is_tensor(hidden):  # the checkpoint saves its positional inputs here
                    pack = functools.partial(self._to_host, (hidden.data_ptr(), hidden.shape))
                    with torch.autograd.graph.saved_tensors_hooks(pack, self._from_host):
                        return checkpoint(run, *args, use_reentrant=False, **kwargs)
                return checkpoint(run, *args, use_reentrant=False, **kwargs)
            return run(*args, **kwargs)

        return forward
