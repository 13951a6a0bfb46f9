"""LemaTrainer: one explicit training step — forward, backward, and every n-th call an optimizer step."""

from __future__ import annotations

import math
from typing import Optional

import torch


class DivergedStepError(FloatingPointError):
    """An optimizer step that was not applied because the run has diverged (weights and optimizer state are as
    before it; its gradients were dropped). `loss` and `grad_norm` are the step's values."""

    def __init__(self, message: str, loss: float, grad_norm: float):
        self.loss, self.grad_norm = loss, grad_norm
        super().__init__(message)


class NonFiniteStepError(DivergedStepError):
    """A step whose loss or gradient norm is not finite (inf or NaN)."""

    def __init__(self, loss: float, grad_norm: float):
        values = (("loss", loss), ("gradient norm", grad_norm))
        bad = " and ".join(f"the {name} is {value}" for name, value in values if not math.isfinite(value))
        super().__init__(bad + "".join(f" ({name} {value:.4g})" for name, value in values if math.isfinite(value)),
                         loss, grad_norm)


class CollapsedStepError(DivergedStepError):
    """A step whose outputs are flat: its loss is ln(vocabulary size), a uniform guess, and its gradient norm
    exactly 0, so no LoRA weight reaches the loss any more. It is how a learning rate far too high ends: the
    adapters push the hidden states past float32's range, the final norm divides them by inf, every logit is 0,
    and there the run stays, finite. (A zero gradient alone is no sign of it: a float16 step whose gradients
    underflow, or attention's q/k over one-token contexts, have one.)"""

    def __init__(self, loss: float):
        super().__init__(f"the loss is {loss:.4f}, ln(vocabulary size): the outputs are flat, and the gradient norm "
                         "is 0: no LoRA weight changes the loss any more (the weights it ran with have collapsed)",
                         loss, 0.0)


def flat_outputs_loss(model) -> Optional[float]:
    """ln(V), the loss of uniform logits over the head's V outputs (None without a head)."""
    head = model.base_model.get_output_embeddings() if hasattr(model, "base_model") else None
    return math.log(head.weight.shape[0]) if head is not None else None


class LemaTrainer:
    """`train_step(ids, labels=…) -> (logits, loss)`.

    With `gradient_accumulation_steps = n`, each call runs forward and backward on its micro-batch
    with the loss divided by n, so gradients add up to the mean over the n micro-batches (or, given
    `num_items_in_batch`, the supervised targets of all n micro-batches of the optimizer step, weighted by
    its own targets over that count: the mean over every target of the step, Transformers Trainer's rule,
    so a micro-batch with few targets weighs less); the
    optimizer steps (after clipping to `max_grad_norm`, if set) on every n-th call and then zeroes
    the gradients. Every call returns that micro-batch's logits (detached) and its *undivided*
    loss (a detached scalar); `last_step_applied` says whether this call stepped the optimizer and
    `last_grad_norm` is the gradients' global norm of the last optimizer step (before clipping).
    A step whose loss (the weighted sum over its micro-batches) or gradient norm is not finite is not
    applied: its gradients are dropped and the call raises `NonFiniteStepError`; nor is one whose outputs are flat
    (a loss of ln(vocabulary size) with a gradient norm of exactly 0: `CollapsedStepError`); both are
    `DivergedStepError`s. A micro-batch without a
    target (labels on the CPU, all -100 past the first position) contributes nothing; its returned loss is
    the model's NaN, and a step of such micro-batches only is not applied.
    A call runs in train mode (dropout on) and leaves the model in the mode it found it in, so an
    evaluation between steps runs without dropout.
    """

    def __init__(self, model, optimizer, gradient_accumulation_steps: int = 1,
                 max_grad_norm: Optional[float] = None):
        if isinstance(gradient_accumulation_steps, bool) or not isinstance(gradient_accumulation_steps, int) \
                or gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps={gradient_accumulation_steps!r} must be a whole number >= 1")
        if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
                                          or not 0 < max_grad_norm < math.inf):
            raise ValueError(f"max_grad_norm={max_grad_norm!r} must be a finite number > 0, or None for no clipping")
        trained = {id(p) for p in model.get_trainable_parameters()}
        given = {id(p) for group in getattr(optimizer, "param_groups", []) for p in group["params"]}
        if not trained & given:  # the LoRA weights would never change, and their gradients never be zeroed
            raise ValueError(f"the optimizer ({type(optimizer).__name__}) holds none of the model's LoRA parameters; "
                             "make it with model.get_trainable_parameters(), e.g. "
                             "torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-4)")
        self.model = model
        self.optimizer = optimizer
        self.accum = gradient_accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.micro_step = 0
        self.last_step_applied = False
        self.last_grad_norm: Optional[float] = None
        self._step_loss = 0.0  # the step's loss so far, a device scalar once a micro-batch ran (no host sync)
        self._flat = flat_outputs_loss(model)

    def train_step(self, input_ids, labels=None, attention_mask=None, num_items_in_batch: Optional[int] = None):
        if labels is None:  # predict the inputs themselves, but not the padding
            labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)
        if num_items_in_batch is not None and num_items_in_batch < 1:
            raise ValueError(f"num_items_in_batch={num_items_in_batch} must be >= 1: the supervised targets "
                             "(labels[:, 1:] != -100) of the optimizer step's micro-batches")
        # the first call of a trainer whose optimizer holds a loaded state (a resume): the run-time planner, not
        # made yet, would read the free memory with it taken. Only then: a fresh run's state appears after its
        # first step, and the planner is made where a step needs it
        held = optimizer_state_bytes(self.optimizer, self.model.device) \
            if self.micro_step == 0 and self.model._budget is None else 0
        if held:
            self.model._activation_budget(held_bytes=held)
        # A micro-batch without a target (every label -100 past the first position) has a NaN mean loss and would
        # make the step's gradients NaN: it contributes nothing instead, as in Transformers' Trainer. Counted where
        # the labels are on the CPU (no host sync); labels already on a GPU are not counted.
        targets = (labels[..., 1:] != -100).sum() if torch.is_tensor(labels) else None
        empty = targets is not None and labels.device.type == "cpu" and not bool(targets)
        was_training = self.model.training
        self.model.train()  # dropout on for this step only: an evaluation between steps runs in eval mode
        try:
            if empty:
                with torch.no_grad():  # the logits and the (NaN) loss are returned; no gradient, no weight
                    out = self.model(input_ids, labels=labels, attention_mask=attention_mask)
            else:
                out = self.model(input_ids, labels=labels, attention_mask=attention_mask)
                if num_items_in_batch is None:
                    weight = 1.0 / self.accum
                else:  # this micro-batch's share of the step's targets (a tensor: no host sync on a GPU)
                    weight = targets.to(out.loss.device) / num_items_in_batch
                (out.loss * weight).backward()  # streams B(L-1) .. B0 (NOTE [ring protocol])
                self._step_loss = self._step_loss + out.loss.detach().float() * weight
        finally:
            self.model.train(was_training)
        self.micro_step += 1
        self.last_step_applied = self.micro_step % self.accum == 0
        if self.last_step_applied:
            self._optimizer_step()
        logits = out.logits.detach() if out.logits is not None else None
        return logits, out.loss.detach()

    def _optimizer_step(self) -> None:
        """Clip and step; a step whose loss or gradient norm is not finite is dropped instead (a NaN gradient
        would make every LoRA weight NaN in one step: the run could not even save what it had)."""
        params = self.model.get_trainable_parameters()
        step_loss, self._step_loss = self._step_loss, 0.0
        if not torch.is_tensor(step_loss):  # no micro-batch of the step had a target: nothing to apply
            self.optimizer.zero_grad(set_to_none=True)
            self.last_step_applied, self.last_grad_norm = False, None
            return
        # the norm clip_grad_norm_ computes, also without clipping: a finite loss does not make finite gradients
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        # host sync, once per optimizer step, before the step is applied: with clipping (the default) the one that
        # always read the norm, now reading the loss with it; without clipping an added one
        loss, self.last_grad_norm = torch.stack([step_loss, norm.to(step_loss.device)]).tolist()
        if not math.isfinite(self.last_grad_norm) and all(bool(torch.isfinite(g).all()) for g in grads):
            # finite gradients whose float32 sum of squares overflows (a norm past ~1.8e19): the norm in float64,
            # which clipping then scales them by (rare: a sync per gradient tensor)
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64)
                                                         for g in grads]))
            self.last_grad_norm = float(norm)
        if not (math.isfinite(loss) and math.isfinite(self.last_grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)  # not applied: the weights and AdamW's moments stay finite
            self.last_step_applied = False
            raise NonFiniteStepError(loss, self.last_grad_norm)
        if self.last_grad_norm == 0.0 and self._flat is not None and abs(loss - self._flat) <= 1e-5 * self._flat:
            # collapsed; not applied: AdamW would still move the weights by its old momentum
            self.optimizer.zero_grad(set_to_none=True)
            self.last_step_applied = False
            raise CollapsedStepError(loss)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, norm.float())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def optimizer_state_bytes(optimizer, device) -> int:
    """The bytes of `optimizer`'s state tensors on `device`'s kind (AdamW's moments once it stepped or loaded a
    state; 0 for a new one)."""
    return sum(t.numel() * t.element_size() for state in getattr(optimizer, "state", {}).values()
               for t in state.values() if torch.is_tensor(t) and t.device.type == device.type)
