"""The head and the causal-LM loss in chunks of tokens: the (tokens x vocab) logits are never built.

Transformers' causal-LM loss builds the full logits, upcasts them to float32 and keeps the
log-softmax for backward: for 8 x 512 tokens and a 32k vocabulary that is ~2.4 GB at the peak,
more than the rest of a streamed step. Here, for each chunk of at most `chunk_rows` tokens:

    z = h_c W^T (+ b)            compute dtype, then float32; [softcap: z = c tanh(z / c)]
    loss += sum(logsumexp(z) - z[y])
    dz = (softmax(z) - onehot(y)) / n      [softcap: dz *= 1 - tanh(z / c)^2]
    dh_c = dz W                  (only when the hidden states need a gradient)

Both the loss and the gradient of the hidden states are done in the forward (the head is frozen,
so nothing else needs a gradient); backward only scales the stored gradient by the incoming one.
Positions whose label is ignored (-100: padding, prompt tokens) are skipped, not computed.

Numerics match Transformers' `ForCausalLMLoss` (labels shifted left, -100 ignored, mean over the
counted tokens, float32 log-softmax; the logits gradient cast to the compute dtype before the
matmul, as autograd does for a bf16 head).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .skeleton import text_config

IGNORE = -100
CHUNK_BYTES = 64 * 2**20
"""Float32 logits of one chunk; the chunk's working set is twice this (the logits and logsumexp's
shifted copy; plan_bytes.chunked_head_work_bytes)."""


def chunk_rows(vocab: int, chunk_bytes: Optional[int] = None) -> int:
    """Tokens per chunk: as many as keep one chunk's float32 logits within `chunk_bytes` (CHUNK_BYTES)."""
    return max(1, (chunk_bytes or CHUNK_BYTES) // (4 * vocab))


def final_softcap(hf_config) -> Optional[float]:
    """The final logit soft-capping (Gemma 2), applied inside the chunks; None for most models."""
    return getattr(text_config(hf_config), "final_logit_softcapping", None) or None


def fused_head_supported(model: nn.Module) -> Optional[str]:
    """None when the chunked loss reproduces `model`'s head + loss (a causal LM, frozen); else why not."""
    c = text_config(model.config)
    head = model.get_output_embeddings()
    if model.base_model is model:
        return "the model has no separate decoder"
    if not isinstance(head, nn.Linear) or type(head) is not nn.Linear:
        return f"the output head is {type(head).__name__}, not a plain Linear"
    if any(p.requires_grad for p in head.parameters()):
        return "the output head is trained"
    for attr in SCALES:
        if getattr(c, attr, None) not in (None, 1, 1.0):
            return f"config.{attr} scales the logits"
    if getattr(c, "output_router_logits", False):
        return "config.output_router_logits adds an auxiliary loss"
    return head_transform(model, final_softcap(model.config))


SCALES = ("logit_scale", "logits_scaling", "output_multiplier_scale")  # neutral at 1 (checked above)


def head_transform(model: nn.Module, softcap: Optional[float]) -> Optional[str]:
    """Why the chunks would not reproduce `model.forward`'s logits: a statement that changes them past the head's
    product (`logits = self.lm_head(...)`, with `.float()` or `.contiguous()`) other than those the chunks apply
    (the final soft-capping, a neutral scale); None where there is none. A head module around the output
    Linear (RoBERTa's dense + norm + decoder) is such a statement too. Read from the forward's source, so
    that a model's own transform (RecurrentGemma's `logits_soft_cap`, Falcon-H1's `lm_head_multiplier`) is
    declined without a list of their names."""
    import ast
    import inspect
    import textwrap

    cls = type(model)
    head = model.get_output_embeddings()
    heads = {name for name, child in model.named_children() if child is head}
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return f"{cls.__name__}.forward's source cannot be read to check its head"

    def head_product(value) -> bool:  # self.<head>(...), possibly .float() / .contiguous()
        while (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute)
               and value.func.attr in ("float", "contiguous") and not value.args):
            value = value.func.value
        return (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute)
                and isinstance(value.func.value, ast.Name) and value.func.value.id == "self"
                and value.func.attr in heads)

    def calls_head(node) -> bool:
        return any(isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"
                   and n.attr in heads for n in ast.walk(node))

    softcapping = set()  # statements under `if ...final_logit_softcapping...`: the soft-capping, applied in the
    for node in ast.walk(tree):  # chunks exactly when the config sets it (final_softcap)
        if isinstance(node, ast.If) and "final_logit_softcapping" in ast.unparse(node.test):
            softcapping.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    assigns = [n for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AugAssign))]
    targets = {n: [t.id for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)]
               for n in assigns}
    logits = {"logits"} | {name for n in assigns if calls_head(n.value) for name in targets[n]}
    for n in sorted(assigns, key=lambda n: n.lineno):
        if not logits & set(targets[n]):
            continue
        text = ast.unparse(n)
        if isinstance(n, ast.Assign) and head_product(n.value):
            continue
        if any(attr in text for attr in SCALES):  # its setting is neutral here, or refused above
            continue
        if id(n) in softcapping or (softcap and "final_logit_softcapping" in text):
            continue
        return f"{cls.__name__}.forward transforms the logits (`{text}`)"
    return None


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rows, softcap, orientations):
        H = hidden.shape[-1]
        h = hidden.detach().reshape(-1, H)
        y = labels.reshape(-1)
        keep = (y != IGNORE).nonzero().squeeze(1)
        n = keep.numel()
        need_grad = ctx.needs_input_grad[0]
        grad = torch.zeros_like(h) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, n, rows):
            idx = keep[s: s + rows]
            hc, yc = h.index_select(0, idx), y.index_select(0, idx)
            timed = orientations is not None and orientations.applies(idx.numel(), weight)
            if not timed:
                z = nn.functional.linear(hc, weight, bias).float()
            else:  # the product in the orientation MKL runs faster (engine/cpu_linear.py)
                z = orientations.run("forward", hc, weight)
                z = (z if bias is None else z.add_(bias)).float()
            if softcap:
                t = torch.tanh(z / softcap)
                z = t * softcap
            lse = torch.logsumexp(z, dim=-1)
            total += (lse - z.gather(1, yc.unsqueeze(1)).squeeze(1)).sum()
            if need_grad:
                dz = z.sub_(lse.unsqueeze(1)).exp_()                  # softmax, in place of z
                dz[torch.arange(idx.numel(), device=dz.device), yc] -= 1.0
                dz.div_(n)
                if softcap:
                    dz.mul_(1.0 - t * t)
                dz = dz.to(h.dtype)
                grad.index_copy_(0, idx, orientations.run("backward", dz, weight) if timed else dz @ weight)
                del dz
            del z  # before the next chunk's logits exist: one chunk's alive at a time, not two
            if softcap:
                del t
        ctx.save_for_backward(grad if need_grad else None)
        ctx.shape = hidden.shape
        return total / n  # 0 / 0 = nan when nothing is counted, as Transformers' mean gives

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None, None, None
        return (grad * grad_out.to(grad.dtype)).view(ctx.shape), None, None, None, None, None, None


def causal_lm_loss(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor,
                   softcap: Optional[float] = None, rows: Optional[int] = None,
                   orientations=None) -> torch.Tensor:
    """Mean next-token loss of `hidden` (batch, seq, H) under `head`; `labels` unshifted, -100 ignored; the head's
    products through `orientations` (engine/cpu_linear.py) when given, else F.linear's."""
    shift = nn.functional.pad(labels, (0, 1), value=IGNORE)[..., 1:].to(hidden.device)
    rows = rows or chunk_rows(head.out_features)
    return _FusedHeadLoss.apply(hidden, head.weight, head.bias, shift, rows, softcap, orientations)
