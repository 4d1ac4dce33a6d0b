"""The causal-LM loss without the full-vocabulary logits: the same value and gradients, far less memory.

The plain loss (peftcli/train/loss.py) takes the model's logits, (batch, seq, vocab) in fp32, and their
cross-entropy. Here the model runs with its output head swapped for an identity for that one call, so it
returns its final hidden states; only the positions that carry a label are kept, and the cross-entropy
against the frozen head's weight is computed a chunk of rows at a time with its gradient. The (tokens,
vocab) logits never exist at once, and prompt positions (label -100) never cost a vocabulary projection.
Outside the loss call the model is untouched: its ``logits`` are always logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from peftcli.data.batches import IGNORE_INDEX
from peftcli.fast import frozen_linear
from peftcli.quant.convert import dense_weight, is_quantized

CHUNK_ROWS = 256  # (256, vocab) fp32 logits: ~50 MB for a 49k vocabulary

Linear = Callable[[Tensor, Tensor], Tensor]  # (x, weight) -> x @ weight.T for a frozen weight


def _chunked_cross_entropy(rows: Tensor, weight: Tensor, targets: Tensor, with_grad: bool, linear: Linear):
    """sum_i CE(rows_i @ W^T, y_i), CHUNK_ROWS rows at a time, and optionally d/d rows.

    The gradient is (softmax(z) - onehot(y)) @ W, formed chunk by chunk, so memory stays
    O(rows x hidden + chunk x vocab) instead of O(rows x vocab).
    """
    total = rows.new_zeros((), dtype=torch.float32)
    grad_rows = torch.empty_like(rows) if with_grad else None
    w32 = weight.float()
    for start in range(0, rows.shape[0], CHUNK_ROWS):
        y = targets[start : start + CHUNK_ROWS]
        logits = linear(rows[start : start + CHUNK_ROWS].float(), w32)  # (chunk, vocab)
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
    def forward(ctx, rows: Tensor, weight: Tensor, targets: Tensor, linear: Linear) -> Tensor:
        total, grad_rows = _chunked_cross_entropy(rows, weight, targets, True, linear)
        ctx.save_for_backward(grad_rows)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad_rows,) = ctx.saved_tensors
        return grad_rows * grad_output.to(grad_rows.dtype), None, None, None


def chunked_causal_lm_loss_sum(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, linear: Linear = frozen_linear.linear
) -> Tensor:
    """Same value and gradients as `causal_lm_loss_sum(hidden @ weight.T + bias, labels)`.

    hidden (batch, seq', hidden) are the final hidden states (seq' >= seq: virtual tokens come first);
    weight (vocab, hidden) the frozen head.
    """
    hidden = hidden[:, -labels.shape[1] :][:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    rows, y = hidden[keep], targets[keep]  # (n_tokens, hidden), (n_tokens,)
    if bias is not None:  # fold a head bias in as an extra input column of ones
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        weight = torch.cat([weight, bias[:, None].to(weight.dtype)], dim=1)
    if torch.is_grad_enabled() and rows.requires_grad:
        return _ChunkedLinearCrossEntropy.apply(rows, weight, y, linear)
    return _chunked_cross_entropy(rows, weight, y, False, linear)[0]


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


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model that owns the output head: `model` itself (LoRA, adapters and BitFit
    change it in place) or the one a virtual-token wrapper holds as `.base_model`. Not a transformers
    model's own `.base_model`, which is its headless backbone."""
    if isinstance(model, PreTrainedModel):
        return model
    inner = getattr(model, "base_model", None)
    return inner if isinstance(inner, PreTrainedModel) else model


class ChunkedLoss:
    """``loss_sum(model, batch)`` of a causal LM, chunked: build it with `for_model`."""

    def __init__(self, parent: nn.Module, child: str, head: nn.Module, linear: Linear):
        self.parent, self.child, self.head, self.linear = parent, child, head, linear

    @classmethod
    def for_model(cls, model: nn.Module, onednn: bool = True) -> ChunkedLoss | None:
        """The chunked loss for `model`, where that is exact (the architecture's logits are the head's
        output, and the head is a frozen Linear, plain or quantized); else None."""
        base = _causal_lm(model)
        if getattr(base.config, "model_type", None) not in CHUNKABLE_MODEL_TYPES:
            return None
        if getattr(base.config, "final_logit_softcapping", None) or getattr(base.config, "logit_scale", None):
            return None
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if not isinstance(head, nn.Linear) and not is_quantized(head):
            return None
        if any(p.requires_grad for p in head.parameters()):
            return None
        name = next(name for name, module in base.named_modules() if module is head)
        parent_name, _, child = name.rpartition(".")
        parent = base.get_submodule(parent_name) if parent_name else base
        return cls(parent, child, head, frozen_linear.linear if onednn else _plain_linear)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Summed token cross-entropy of `batch`; `model` may be the DDP-wrapped one."""
        setattr(self.parent, self.child, nn.Identity())  # the model now returns final hidden states
        try:
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        finally:
            setattr(self.parent, self.child, self.head)
        # A quantized head is dequantized for the loss call only (its chunks all read the whole weight).
        return chunked_causal_lm_loss_sum(
            hidden, dense_weight(self.head), self.head.bias, batch["labels"], self.linear
        )


def _plain_linear(x: Tensor, weight: Tensor) -> Tensor:
    return torch.nn.functional.linear(x, weight)
