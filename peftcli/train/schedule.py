"""What each optimizer step sees, as pure functions of the step: resuming at step N is exact."""

from __future__ import annotations

import functools
import math

import torch

from peftcli.recipe import TrainSection


def global_batch_indices(n_examples: int, global_batch: int, step: int, seed: int) -> list[int]:
    """The example indices of optimizer step `step` (0-based).

    Epoch e is a permutation seeded by seed + e; the last, partial global batch of an epoch wraps
    around to the start of the same permutation so every step sees a full global batch.
    """
    steps_per_epoch = math.ceil(n_examples / global_batch)
    epoch, position = divmod(step, steps_per_epoch)
    order = _epoch_order(n_examples, seed + epoch)
    start = position * global_batch
    return [order[(start + i) % n_examples] for i in range(global_batch)]


@functools.lru_cache(maxsize=2)
def _epoch_order(n_examples: int, seed: int) -> tuple[int, ...]:
    """One epoch's permutation, made once per epoch rather than once per step."""
    return tuple(torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed)).tolist())


def learning_rate(train: TrainSection, step: int, total_steps: int) -> float:
    """Linear warmup reaching the peak on the last warmup step, then constant / linear / cosine decay to 0."""
    if step < train.warmup_steps:
        return train.learning_rate * (step + 1) / train.warmup_steps
    if train.scheduler == "constant":
        return train.learning_rate
    progress = (step - train.warmup_steps) / max(1, total_steps - train.warmup_steps)
    if train.scheduler == "linear":
        return train.learning_rate * max(0.0, 1.0 - progress)
    return train.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
