"""Speed-ups of the training step: each computes what the plain path computes, faster or in less memory.

The core (methods, train) computes plainly: LoRA's forward reads like its formula, the model returns real
logits, the loss is cross-entropy over them. `install` puts the recipe's choices in place on a model about
to train and returns what undoes them; the training setup calls it once, and nothing else imports this
package. Each speed-up's tests use the plain path as their oracle.

- lora.py: LoRA's (and DoRA's) forward on flattened rows with the low-rank term added in place; frozen
  products on oneDNN (frozen_linear.py).
- chunked_loss.py: the causal-LM loss, and the targets' log-probs, a chunk of rows at a time against the
  frozen head.
- lean.py: Llama-family SwiGLU MLPs and RMSNorms that keep less for backward; recompute modes.
- checkpointing.py: whole-layer activation checkpointing (transformers' own).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, nn

from peftcli.errors import UserError
from peftcli.fast import checkpointing, lean
from peftcli.fast import lora as fast_lora
from peftcli.fast.chunked_loss import ChunkedLoss

# train.gradient_checkpointing -> what the lean MLP recomputes in backward (true/false: nothing)
_RECOMPUTE = {"auto": "up", "up": "up", "mlp": "mlp"}


@dataclass
class Installed:
    """What `install` put in place. `loss`: ``loss_sum(model, batch)`` to use instead of the plain one;
    `token_logprobs`: ``token_logprobs(model, batch)`` instead of the plain one (None: the plain ones)."""

    loss: Callable[[nn.Module, dict[str, Tensor]], Tensor] | None = None
    token_logprobs: Callable[[nn.Module, dict[str, Tensor]], Tensor] | None = None
    _undo: list[Callable[[], None]] = field(default_factory=list)

    def undo(self) -> None:
        """Put the plain paths back, last installed first."""
        while self._undo:
            self._undo.pop()()


def install(model: nn.Module, train, task: str, onednn: bool = True) -> Installed:
    """The step paths `train` (a TrainSection) asks for, on `model` (after its method is injected):

    - ``gradient_checkpointing``: true recomputes whole layers; mlp or up (auto: up where it applies)
      recompute parts of the lean MLPs;
    - ``lean_layers``: the lean SwiGLU MLP and RMSNorm;
    - ``chunked_loss`` (causal LM): the chunked loss and log-probs;
    - always: LoRA's (and DoRA's) in-place forward. `onednn=False` keeps every frozen product on MKL.
    """
    installed = Installed()
    mode = train.gradient_checkpointing
    if mode is True:
        installed._undo.append(checkpointing.enable(model))
    if train.lean_layers:
        mlps, _ = lean.enable_lean_layers(model, recompute=_RECOMPUTE.get(mode))
        installed._undo.append(lambda: lean.disable_lean_layers(model))
        if mode in ("up", "mlp") and not mlps:
            installed.undo()
            raise UserError(
                f"train.gradient_checkpointing: {mode} recomputes parts of Llama-family SwiGLU MLPs "
                "and this model has none; use true to recompute whole layers"
            )
    installed._undo.append(fast_lora.install(model, onednn))
    if train.chunked_loss and task == "causal-lm":
        installed.loss = ChunkedLoss.for_model(model, onednn)
        installed.token_logprobs = installed.loss.token_logprobs if installed.loss is not None else None
    return installed
