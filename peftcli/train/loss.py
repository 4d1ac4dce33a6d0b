"""The training losses, as sums, so the caller normalises once over the whole global batch, and the
targets' log-probabilities the preference objectives compare.

The plain form: the model's logits, then cross-entropy or log-softmax. (peftcli/fast/chunked_loss.py computes
both without the full-vocabulary logits; its tests hold it to these.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftcli.data.batches import IGNORE_INDEX


def causal_lm_loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed token cross-entropy. logits (batch, seq', vocab) with seq' >= seq (virtual tokens first);
    labels (batch, seq), which the model would shift: position t predicts label t + 1."""
    logits = logits[:, -labels.shape[1] :][:, :-1]
    return F.cross_entropy(
        logits.float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(labels[:, t + 1] | tokens up to t) at each position t, 0 where the label is -100.

    logits (batch, seq', vocab) with seq' >= seq (virtual tokens first); labels (batch, seq), which the model
    would shift. -> (batch, seq - 1) float32. Only the target positions' logits are normalised.
    """
    logits = logits[:, -labels.shape[1] :][:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    picked = logits[keep].float().log_softmax(-1).gather(1, targets[keep][:, None]).squeeze(1)
    return torch.zeros(targets.shape, dtype=torch.float32, device=logits.device).masked_scatter(keep, picked)


def model_token_logprobs(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """`token_logprobs` of the model's logits on `batch`."""
    return token_logprobs(logits_of(model, batch), batch["labels"])


def classification_loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed cross-entropy over examples: logits (batch, num_labels), labels (batch,)."""
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def logits_of(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def loss_sum(model: nn.Module, batch: dict[str, Tensor], task: str) -> Tensor:
    """The summed loss over the batch's targets (tokens for causal LM, examples for classification)."""
    if task == "sequence-classification":
        return classification_loss_sum(logits_of(model, batch), batch["labels"])
    return causal_lm_loss_sum(logits_of(model, batch), batch["labels"])


def num_targets(batch: dict[str, Tensor], task: str) -> int:
    """What the loss sums over: the examples (classification) or the tokens that have a next-token label."""
    labels = batch["labels"]
    if task == "sequence-classification":
        return labels.shape[0]
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
