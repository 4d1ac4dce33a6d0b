"""The preference losses, one value per pair (or KTO example), from sequence log-probabilities.

Notation: x a prompt, y an answer, log pi(y|x) the policy's summed log-probability of y's target tokens,
log pi_ref(y|x) the reference policy's (the model training starts from, computed once and cached),
y_w / y_l the chosen / rejected answers of a pair, |y| the number of y's target tokens, sigma the logistic
function. Every function is elementwise over the batch; objectives.py feeds them and averages.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def dpo_losses(
    chosen_ratio: Tensor,
    rejected_ratio: Tensor,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
) -> Tensor:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290) and its variants, per pair. The ratios are
    log pi(y|x) - log pi_ref(y|x) of the chosen and rejected answers, d = chosen_ratio - rejected_ratio:

        sigmoid  -(1 - e) log sigma(beta d) - e log sigma(-beta d)   (e = label_smoothing: conservative DPO)
        robust   (-(1 - e) log sigma(beta d) + e log sigma(-beta d)) / (1 - 2e)
                 rDPO (Chowdhury et al. 2024, arXiv:2403.00409): unbiased when a share e of pairs is flipped
        hinge    max(0, 1 - beta d): SLiC (Zhao et al. 2023, arXiv:2305.10425)
        ipo      (d' - 1 / (2 beta))^2, d' the difference of the ratios per target token: IPO (Azar et al.
                 2023, arXiv:2310.12036) on log-probs normalised by length, as its authors report it
    """
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(
            -beta * delta
        )
    if loss_type == "robust":
        clean, flipped = F.logsigmoid(beta * delta), F.logsigmoid(-beta * delta)
        return (-(1 - label_smoothing) * clean + label_smoothing * flipped) / (1 - 2 * label_smoothing)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        return (per_token - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss_type {loss_type!r}")


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x < 0, accurate on both sides of -log 2 (Maechler 2012, "Accurately computing
    log(1 - exp(-|a|))")."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds_ratio(chosen_mean: Tensor, rejected_mean: Tensor) -> Tensor:
    """log sigma(log odds(y_w) - log odds(y_l)), odds(y) = P(y) / (1 - P(y)) with P(y) = exp of the mean
    per-token log-prob: ORPO's preference term (Hong et al. 2024, arXiv:2403.07691, eqs. 4 and 7). Its loss is
    the chosen answer's NLL minus lambda times this."""
    chosen_mean, rejected_mean = chosen_mean.float(), rejected_mean.float()
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    return F.logsigmoid(log_odds)


def simpo_losses(chosen_mean: Tensor, rejected_mean: Tensor, beta: float, gamma: float) -> Tensor:
    """-log sigma(beta (log pi(y_w|x) / |y_w| - log pi(y_l|x) / |y_l|) - gamma): SimPO (Meng et al. 2024,
    arXiv:2405.14734, eq. 6); the means are the length-normalised log-probs."""
    return -F.logsigmoid(beta * (chosen_mean - rejected_mean) - gamma)


def kto_losses(
    ratio: Tensor,
    desirable: Tensor,
    kl: Tensor,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> Tensor:
    """KTO (Ethayarajh et al. 2024, arXiv:2402.01306, eq. 7), per example, with
    r = log pi(y|x) - log pi_ref(y|x) and z the reference point (the KL estimate, >= 0, no gradient):

        desirable y     desirable_weight   * (1 - sigma(beta (r - z)))
        undesirable y   undesirable_weight * (1 - sigma(beta (z - r)))
    """
    desirable_loss = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    undesirable_loss = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable, desirable_loss, undesirable_loss)
