"""Batching: tokenized examples (lema.data) right-padded into tensors, and a resumable stream of index batches.

`collate` masks the padding out of attention and loss; `BatchSampler` hands out each epoch's seeded
permutation in batches, its state (epoch, position) saved with a checkpoint so that a resumed run
gets exactly the batches not yet seen.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .data import IGNORE_INDEX


def collate(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of ``{"input_ids", "labels"}`` items to the longest one.

    Padding gets ``attention_mask`` 0 and label IGNORE_INDEX, so the pad id
    value itself never matters (it can safely equal EOS).
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    width = max(len(it["input_ids"]) for it in batch)
    n = len(batch)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    for row, it in enumerate(batch):
        k = len(it["input_ids"])
        input_ids[row, :k] = torch.tensor(it["input_ids"], dtype=torch.long)
        labels[row, :k] = torch.tensor(it["labels"], dtype=torch.long)
        attention_mask[row, :k] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


ORDER = 2  # BatchSampler's epoch orders: 2 seeds epoch e with seed * 1_000_003 + e (1: seed + e, before)


class BatchSampler:
    """Endless, deterministic, resumable stream of index batches.

    Epoch ``e`` visits ``torch.randperm(num_examples)`` drawn from a generator
    seeded with ``(seed * 1_000_003 + e) mod 2**64``, cut into batches of ``batch_size`` (the last,
    partial batch is kept). (Until 2026-11-27 the seed was ``seed + e``, so seed 1's
    first epoch was seed 0's second: a state saved then, without ``"order"``, resumes
    with those orders.)  Because each epoch's order depends only on
    ``(seed, epoch)``, the state is just ``(epoch, position)`` where
    ``position`` is the number of batches of that epoch already handed out.
    Save ``state_dict()`` together with a checkpoint taken after a step and
    ``load_state_dict()`` it on resume to get exactly the batches not yet seen.

    Usage::

        sampler = BatchSampler(len(ds), batch_size=8, seed=0)
        for step in range(max_steps):
            batch = collate([ds[i] for i in sampler.next_batch()], pad_id)
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int = 0):
        if num_examples < 1:
            raise ValueError("cannot sample batches from an empty dataset")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self.order = ORDER  # how an epoch's generator is seeded (state_dict's "order")
        self._perm_epoch: int | None = None
        self._perm: list[int] = []

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-self.num_examples // self.batch_size)

    def _order(self, epoch: int) -> list[int]:
        if self._perm_epoch != epoch:
            seed = (self.seed * 1_000_003 + epoch) % 2**64 if self.order >= 2 else self.seed + epoch  # the generator's range
            g = torch.Generator().manual_seed(seed)
            self._perm = torch.randperm(self.num_examples, generator=g).tolist()
            self._perm_epoch = epoch
        return self._perm

    def next_batch(self) -> list[int]:
        """Return the next batch of indices and advance the state past it."""
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position * self.batch_size
        batch = self._order(self.epoch)[start : start + self.batch_size]
        self.position += 1
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_examples": self.num_examples,
            "batch_size": self.batch_size,
            "order": self.order,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore ``(epoch, position)``; refuse if the batch layout would differ."""
        for key in ("seed", "num_examples", "batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume sampler: {key} was {state[key]} when saved but is "
                    f"{getattr(self, key)} now, so the remaining batches would differ"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        if "num_examples" in state:  # a saved state: its orders, those of before "order" was saved included
            self.order = int(state.get("order", 1))
            self._perm_epoch = None


def batches(
    num_examples: int, batch_size: int, seed: int = 0, start_epoch: int = 0, start_batch: int = 0
) -> Iterator[list[int]]:
    """Functional form of :class:`BatchSampler` starting at ``(start_epoch, start_batch)``."""
    sampler = BatchSampler(num_examples, batch_size, seed)
    sampler.load_state_dict({"epoch": start_epoch, "position": start_batch})
    return iter(sampler)
