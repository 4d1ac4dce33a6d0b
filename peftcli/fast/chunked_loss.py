"""The targets' log-probs, and the causal-LM loss, without the full-vocabulary logits: the same values and
gradients, far less memory.

The plain path (peftcli/train/loss.py) takes the model's logits, (batch, seq, vocab) in fp32, and their
log-softmax. Here the model runs with its output head swapped for an identity for that one call, so it
returns its final hidden states; only the positions that carry a label are kept, and each one's log-prob
against the frozen head's weight is computed a chunk of rows at a time with its gradient. The (tokens,
vocab) logits never exist at once, and prompt positions (label -100) never cost a vocabulary projection.
The cross-entropy loss is minus their sum; the preference objectives sum them per sequence. Outside the call
the model is untouched: its ``logits`` are always logits.
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


def _chunked_logprobs(rows: Tensor, weight: Tensor, targets: Tensor, with_grad: bool, linear: Linear):
    """log softmax(rows_i @ W^T)[y_i] per row, CHUNK_ROWS rows at a time, and optionally its gradient with
    respect to rows_i: W[y_i] - softmax(z_i) @ W.

    The gradient is formed chunk by chunk, so memory stays O(rows x hidden + chunk x vocab) instead of
    O(rows x vocab). -> ((rows,) float32 log-probs, (rows, hidden) gradients or None)
    """
    logprobs = rows.new_empty(rows.shape[0], dtype=torch.float32)
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
        logprobs[start : start + CHUNK_ROWS] = (picked - peak - norm.log()).squeeze(1)
        if with_grad:
            probs = exp.div_(norm)
            probs[torch.arange(len(y), device=y.device), y] -= 1.0
            grad_rows[start : start + CHUNK_ROWS] = torch.mm(probs, w32).neg_().to(rows.dtype)
    return logprobs, grad_rows


class _ChunkedTokenLogProbs(torch.autograd.Function):
    """Autograd wrapper: the gradient is computed in forward, backward only scales each row's. W is frozen."""

    @staticmethod
    def forward(ctx, rows: Tensor, weight: Tensor, targets: Tensor, linear: Linear) -> Tensor:
        logprobs, grad_rows = _chunked_logprobs(rows, weight, targets, True, linear)
        ctx.save_for_backward(grad_rows)
        return logprobs

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad_rows,) = ctx.saved_tensors
        return grad_rows * grad_output[:, None].to(grad_rows.dtype), None, None, None


def chunked_token_logprobs(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, linear: Linear = frozen_linear.linear
) -> Tensor:
    """Same values and gradients as `loss.token_logprobs` on the logits `hidden @ weight.T + bias`.

    hidden (batch, seq', hidden) are the final hidden states (seq' >= seq: virtual tokens come first);
    weight (vocab, hidden) the frozen head; labels (batch, seq), -100 where not a target. -> (batch, seq - 1)
    float32: at position t the log-prob of labels[:, t + 1], 0 where that is -100.
    """
    hidden = hidden[:, -labels.shape[1] :][:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    rows, y = hidden[keep], targets[keep]  # (n_tokens, hidden), (n_tokens,)
    if bias is not None:  # fold a head bias in as an extra input column of ones
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        weight = torch.cat([weight, bias[:, None].to(weight.dtype)], dim=1)
    if torch.is_grad_enabled() and rows.requires_grad:
        picked = _ChunkedTokenLogProbs.apply(rows, weight, y, linear)
    else:
        picked = _chunked_logprobs(rows, weight, y, False, linear)[0]
    return torch.zeros(targets.shape, dtype=torch.float32, device=picked.device).masked_scatter(keep, picked)


def chunked_causal_lm_loss_sum(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, linear: Linear = frozen_linear.linear
) -> Tensor:
    """Same value and gradients as `causal_lm_loss_sum(hidden @ weight.T + bias, labels)`: minus the summed
    log-probs of the targets."""
    return -chunked_token_logprobs(hidden, weight, bias, labels, linear).sum()


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
        return -self.token_logprobs(model, batch).sum()

    def token_logprobs(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """(batch, seq - 1) log-probs of the targets, 0 elsewhere, as `loss.token_logprobs` gives them."""
        setattr(self.parent, self.child, nn.Identity())  # the model now returns final hidden states
        try:
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        finally:
            setattr(self.parent, self.child, self.head)
        # A quantized head is dequantized for the loss call only (its chunks all read the whole weight).
        return chunked_token_logprobs(
            hidden, dense_weight(self.head), self.head.bias, batch["labels"], self.linear
        )


def _plain_linear(x: Tensor, weight: Tensor) -> Tensor:
    return torch.nn.functional.linear(x, weight)
