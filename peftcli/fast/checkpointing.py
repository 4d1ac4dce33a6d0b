"""Whole-layer activation checkpointing: each layer's activations recomputed in backward instead of kept.

The least memory of the recompute modes, at ~1.3x the step time (transformers' own implementation).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def enable(model: nn.Module) -> Callable[[], None]:
    """Turn it on for `model` (after a method is injected, so that one that cannot run with it, prefix
    tuning, refuses); returns the undo."""
    kwargs = {"use_reentrant": False}  # the reentrant variant needs inputs that require grad
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    use_cache = model.config.use_cache
    model.config.use_cache = False

    def undo() -> None:
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
        model.config.use_cache = use_cache

    return undo
