"""The optimizer over what a method trains: AdamW, its parameter groups and their learning-rate scales."""

from __future__ import annotations

import torch

from peftcli.errors import UserError
from peftcli.methods import METHODS
from peftcli.recipe import Recipe


def make_optimizer(model, recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: one group per (weight decay, learning-rate scale).

    No weight decay on 1-D parameters (biases, norms; virtual-token rows stay 2-D and do decay). The scale
    (``lr_scale``, which train_step multiplies the schedule's rate by) is the method's
    ``learning_rate_scales`` where it has one (LoRA+), else 1. Decayed groups come first, so a run without
    scales has the two groups it always had.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise UserError(f"method {recipe.method.name}: nothing to train on this model")
    scales_of = getattr(METHODS[recipe.method.name], "learning_rate_scales", None)
    scales = scales_of(model, recipe.method) if scales_of else {}
    groups: dict[tuple[bool, float], list] = {}
    for decayed in (True, False):
        for name, p in named:
            if (p.ndim >= 2) == decayed:
                groups.setdefault((decayed, scales.get(name, 1.0)), []).append(p)
    param_groups = [
        {"params": params, "weight_decay": recipe.train.weight_decay if decayed else 0.0, "lr_scale": scale}
        for (decayed, scale), params in groups.items()
    ]
    return torch.optim.AdamW(param_groups, lr=recipe.train.learning_rate, betas=tuple(recipe.train.betas))
