"""Losses as sums, so the caller normalises once over the whole global batch.

The causal-LM loss has two paths:
- plain: full logits (batch, seq, vocab) in fp32, then cross-entropy;
- chunked: the model returns its final hidden states (the output head is swapped for an identity),
  only the positions that carry a label are kept, and cross-entropy against the frozen head's weight
  is computed a chunk of rows at a time with its gradient, so the (tokens, vocab) fp32 logits never
  exist at once and the prompt positions (label -100) never cost a vocabulary projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftcli import frozen_linear

IGNORE_INDEX = -100
CHUNK_ROWS = 256  # (256, vocab) fp32 logits: ~50 MB for a 49k vocabulary


def causal_lm_loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed token cross-entropy. logits (batch, seq', vocab) with seq' >= seq; labels (batch, seq)."""
    logits = logits[:, -labels.shape[1] :][:, :-1]
    return F.cross_entropy(
        logits.float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def classification_loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def _chunked_cross_entropy(rows: Tensor, weight: Tensor, targets: Tensor, with_grad: bool):
    """sum_i CE(rows_i @ W^T, y_i), CHUNK_ROWS rows at a time, and optionally d/d rows.

    The gradient is (softmax(z) - onehot(y)) @ W, formed chunk by chunk, so memory stays
    O(rows x hidden + chunk x vocab) instead of O(rows x vocab).
    """
    total = rows.new_zeros((), dtype=torch.float32)
    grad_rows = torch.empty_like(rows) if with_grad else None
    w32 = weight.float()
    for start in range(0, rows.shape[0], CHUNK_ROWS):
        y = targets[start : start + CHUNK_ROWS]
        logits = frozen_linear.linear(rows[start : start + CHUNK_ROWS].float(), w32)  # (chunk, vocab)
        picked = logits.gather(1, y[:, None])  # (chunk, 1): the target's logit
        # log-sum-exp and softmax in place on the chunk's logits: no second (chunk, vocab) buffer
        peak = logits.amax(dim=-1, keepdim=True)
        exp = logits.sub_(peak).exp_()
        norm = exp.sum(dim=-1, keepdim=True)
        total += (norm.log() + peak - picked).sum()
        if with_grad:
            probs = exp.div_(norm)
            probs[torch.arange(len(y), device=y.device), y] -= 1.0
            grad_rows[start : start + CHUNK_ROWS] = (probs @ w32).to(rows.dtype)
    return total, grad_rows


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Autograd wrapper: the gradient is computed in forward, backward only scales it. W is frozen."""

    @staticmethod
    def forward(ctx, rows: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
        total, grad_rows = _chunked_cross_entropy(rows, weight, targets, with_grad=True)
        ctx.save_for_backward(grad_rows)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad_rows,) = ctx.saved_tensors
        return grad_rows * grad_output.to(grad_rows.dtype), None, None


def chunked_causal_lm_loss_sum(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor) -> Tensor:
    """Same value and gradients as `causal_lm_loss_sum(hidden @ weight.T + bias, labels)`.

    hidden (batch, seq', hidden) are the final hidden states; weight (vocab, hidden) the frozen head.
    """
    hidden = hidden[:, -labels.shape[1] :][:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    rows, y = hidden[keep], targets[keep]  # (n_tokens, hidden), (n_tokens,)
    if bias is not None:  # fold a head bias in as an extra input column of ones
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        weight = torch.cat([weight, bias[:, None].to(weight.dtype)], dim=1)
    if torch.is_grad_enabled() and rows.requires_grad:
        return _ChunkedLinearCrossEntropy.apply(rows, weight, y)
    return _chunked_cross_entropy(rows, weight, y, with_grad=False)[0]


# Architectures whose causal-LM logits are exactly `lm_head(final hidden)`, with no scaling or soft-capping
# after it: there the output head may be swapped for an identity and the loss chunked.
CHUNKABLE_MODEL_TYPES = {
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "gpt2",
    "opt",
    "gpt_neo",
    "gpt_neox",
    "gptj",
    "phi",
    "phi3",
    "stablelm",
    "starcoder2",
    "olmo",
    "olmo2",
    "smollm3",
    "gemma",
}


class HiddenStatesHead(nn.Module):
    """Stands in for the output head so the model returns final hidden states as its "logits"."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.head = head

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model that owns the output head: `model` itself (LoRA, adapters and BitFit
    change it in place) or the one a virtual-token wrapper holds as `.base_model`. Not a transformers
    model's own `.base_model`, which is its headless backbone."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model
    inner = getattr(model, "base_model", None)
    return inner if isinstance(inner, PreTrainedModel) else model


def enable_chunked_loss(model: nn.Module) -> nn.Linear | None:
    """Swap the causal LM's output head for HiddenStatesHead if that is exact and the head is frozen.

    Returns the real head (to compute the loss with), or None when the plain path must be used.
    """
    base = _causal_lm(model)
    if getattr(base.config, "model_type", None) not in CHUNKABLE_MODEL_TYPES:
        return None
    if getattr(base.config, "final_logit_softcapping", None) or getattr(base.config, "logit_scale", None):
        return None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or any(p.requires_grad for p in head.parameters()):
        return None
    for name, module in base.named_modules():
        if module is head:
            parent_name, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent_name) if parent_name else base, child, HiddenStatesHead(head))
            return head
    return None


def disable_chunked_loss(model: nn.Module) -> None:
    """Put the real output head back (before saving, merging or generating)."""
    base = _causal_lm(model)
    for name, module in list(base.named_modules()):
        if isinstance(module, HiddenStatesHead):
            parent_name, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent_name) if parent_name else base, child, module.head)
