"""LemaTrainer: one explicit training step — forward, backward, and every n-th call an optimizer step."""

from __future__ import annotations

from typing import Optional

import torch


class LemaTrainer:
    """`train_step(ids, labels=…) -> (logits, loss)`.

    With `gradient_accumulation_steps = n`, each call runs forward and backward on its micro-batch
    with the loss divided by n, so gradients add up to the mean over the n micro-batches (or, given
    `num_items_in_batch`, the supervised targets of all n micro-batches of the optimizer step, weighted by
    its own targets over that count: the mean over every target of the step, Transformers Trainer's rule,
    so a micro-batch with few targets weighs less); the
    optimizer steps (after clipping to `max_grad_norm`, if set) on every n-th call and then zeroes
    the gradients. Every call returns that micro-batch's logits (detached) and its *undivided*
    loss (a detached scalar); `last_step_applied` says whether this call stepped the optimizer.
    A call runs in train mode (dropout on) and leaves the model in the mode it found it in, so an
    evaluation between steps runs without dropout.
    """

    def __init__(self, model, optimizer, gradient_accumulation_steps: int = 1,
                 max_grad_norm: Optional[float] = None):
        if gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps={gradient_accumulation_steps} must be >= 1")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm={max_grad_norm} must be > 0, or None for no clipping")
        self.model = model
        self.optimizer = optimizer
        self.accum = gradient_accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.micro_step = 0
        self.last_step_applied = False
        self.last_grad_norm: Optional[float] = None

    def train_step(self, input_ids, labels=None, attention_mask=None, num_items_in_batch: Optional[int] = None):
        if labels is None:  # predict the inputs themselves, but not the padding
            labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)
        if num_items_in_batch is not None and num_items_in_batch < 1:
            raise ValueError(f"num_items_in_batch={num_items_in_batch} must be >= 1: the supervised targets "
                             "(labels[:, 1:] != -100) of the optimizer step's micro-batches")
        was_training = self.model.training
        self.model.train()  # dropout on for this step only: an evaluation between steps runs in eval mode
        try:
            out = self.model(input_ids, labels=labels, attention_mask=attention_mask)
            if num_items_in_batch is None:
                weight = 1.0 / self.accum
            else:  # this micro-batch's share of the step's targets (a tensor: no host sync on a GPU)
                weight = (labels[..., 1:] != -100).sum().to(out.loss.device) / num_items_in_batch
            (out.loss * weight).backward()  # streams B(L-1) .. B0 (NOTE [ring protocol])
        finally:
            self.model.train(was_training)
        self.micro_step += 1
        self.last_step_applied = self.micro_step % self.accum == 0
        if self.last_step_applied:
            params = self.model.get_trainable_parameters()
            if self.max_grad_norm is not None:
                self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))  # host sync
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        logits = out.logits.detach() if out.logits is not None else None
        return logits, out.loss.detach()
