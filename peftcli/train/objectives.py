"""What a training step minimises and an eval reports, for each train.objective; loop.py calls only this.

An objective answers four questions about a micro-batch:
- ``counts(batch)``: what its loss is normalised by (target tokens for SFT, pairs for DPO ...); the loop sums
  them over the whole global batch (every micro-batch, every process) before any forward runs;
- ``loss(model, batch, totals)``: the micro-batch's share of the step's loss, its sum divided by those global
  totals, so that one process at batch 8 and two at batch 4 compute the same loss and the same update;
- ``eval_sums(model, batch)``: a fixed-length vector of sums, added over an eval pass and its processes;
- ``eval_metrics(sums)``: the eval record (loss, and perplexity, accuracy, reward margin ...).

The preference objectives read each row's log-probability of its target tokens (the answer's, the prompt
masked exactly as in SFT) through one ``token_logprobs(model, batch)``: the chunked one of peftcli/fast where
installed, else the plain one (train/loss.py). Their math is in preference.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from peftcli.data.batches import IGNORE_INDEX
from peftcli.recipe import Recipe
from peftcli.train import loss
from peftcli.train.preference import dpo_losses, kto_losses, orpo_log_odds_ratio, simpo_losses

Batch = dict[str, Tensor]
TokenLogProbs = Callable[[nn.Module, Batch], Tensor]  # -> (rows, seq - 1), 0 off the targets
Reduce = Callable[[Tensor], Tensor]  # sums a tensor over the processes


class Objective:
    """The interface loop.py uses; `EVAL_SUMS` names the entries of `eval_sums`."""

    EVAL_SUMS: tuple[str, ...] = ()
    needs_reference = False  # whether batches must carry the reference policy's log-probs
    eval_collective = False  # whether eval_sums communicates with the other processes

    def counts(self, batch: Batch) -> Tensor:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch, totals: Tensor) -> Tensor:
        raise NotImplementedError

    def eval_sums(self, model: nn.Module, batch: Batch) -> Tensor:
        raise NotImplementedError

    def eval_stand_in(self, model: nn.Module, batch: Batch) -> None:
        """An eval round in which this process has no rows left, while others have (loop.evaluate): it joins
        the round's collectives on a stand-in `batch` whose sums count nowhere."""
        self.eval_sums(model, batch)

    def eval_metrics(self, sums: Tensor) -> dict[str, float]:
        raise NotImplementedError

    def sums(self, values: list) -> Tensor:
        return torch.tensor([float(v) for v in values], dtype=torch.float64)


def _ratio(total: Tensor, count: Tensor) -> float:
    return float(total / count) if count > 0 else float("nan")


class Supervised(Objective):
    """sft: summed cross-entropy over the target tokens (causal LM) or the examples (classification)."""

    EVAL_SUMS = ("loss", "targets", "correct")

    def __init__(self, task: str, loss_sum: Callable[[nn.Module, Batch], Tensor]):
        self.task, self.loss_sum = task, loss_sum

    def counts(self, batch: Batch) -> Tensor:
        return self.sums([loss.num_targets(batch, self.task)])

    def loss(self, model: nn.Module, batch: Batch, totals: Tensor) -> Tensor:
        return self.loss_sum(model, batch) / max(float(totals[0]), 1.0)

    def eval_sums(self, model: nn.Module, batch: Batch) -> Tensor:
        if self.task == "sequence-classification":  # one forward gives both the loss and the predictions
            logits = loss.logits_of(model, batch)
            correct = int((logits.argmax(-1) == batch["labels"]).sum())
            return self.sums([loss.classification_loss_sum(logits, batch["labels"]), len(logits), correct])
        return self.sums([self.loss_sum(model, batch), loss.num_targets(batch, self.task), 0])

    def eval_metrics(self, sums: Tensor) -> dict[str, float]:
        mean = float(sums[0] / max(float(sums[1]), 1.0))
        if self.task == "sequence-classification":
            return {"loss": mean, "accuracy": float(sums[2] / max(float(sums[1]), 1.0))}
        return {"loss": mean, "perplexity": float(torch.tensor(min(mean, 50.0)).exp())}


def _answer_logps(token_logprobs: TokenLogProbs, model: nn.Module, batch: Batch, prefix: str = "") -> tuple:
    """(summed log-prob of each row's targets, their number of tokens)."""
    rows = {k: batch[prefix + k] for k in ("input_ids", "attention_mask", "labels")}
    per_token = token_logprobs(model, rows)
    return per_token.sum(-1), (rows["labels"][:, 1:] != IGNORE_INDEX).sum(-1)


class Pairs(Objective):
    """dpo, orpo, simpo: a batch holds every pair's chosen row, then every rejected row, padded together, so
    each pair costs one forward of the policy. Rewards (what accuracy and the margin compare) are DPO's
    beta x log-ratio to the reference, and for ORPO and SimPO, which have no reference, their scale times the
    mean per-token log-prob (TRL's convention). A tie counts half towards accuracy."""

    EVAL_SUMS = ("loss", "pairs", "nll", "nll_tokens", "margin", "correct", "chosen_logps", "rejected_logps")

    def __init__(self, config, token_logprobs: TokenLogProbs, nll_on_prompt: bool = False):
        self.config, self.token_logprobs = config, token_logprobs
        self.needs_reference = config.REFERENCE
        # ORPO's SFT term over the whole chosen sequence, prompt included (data.train_on_inputs; TRL's
        # choice), rather than the answer alone.
        self.nll_on_prompt = nll_on_prompt and config.name == "orpo"

    def _nll_labels(self, batch: Batch) -> Tensor:
        if self.nll_on_prompt:
            return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        return batch["labels"]

    def counts(self, batch: Batch) -> Tensor:
        pairs = len(batch["input_ids"]) // 2
        nll_tokens = (
            (self._nll_labels(batch)[:pairs, 1:] != IGNORE_INDEX).sum() if self.config.name == "orpo" else 0
        )
        return self.sums([pairs, nll_tokens])

    def _scores(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        """Per pair: the losses and rewards, the summed log-probs; the chosen rows' NLL sum (ORPO)."""
        pairs, labels = len(batch["input_ids"]) // 2, self._nll_labels(batch)
        per_token = self.token_logprobs(model, {**batch, "labels": labels})
        answer = batch["labels"][:, 1:] != IGNORE_INDEX
        logps, tokens = (per_token * answer).sum(-1), answer.sum(-1)
        chosen, rejected = logps[:pairs], logps[pairs:]
        c = self.config
        if c.name == "dpo":
            reference = batch["reference_logps"].to(logps)
            chosen_ratio, rejected_ratio = chosen - reference[:pairs], rejected - reference[pairs:]
            losses = dpo_losses(
                chosen_ratio,
                rejected_ratio,
                c.beta,
                c.loss_type,
                c.label_smoothing,
                tokens[:pairs],
                tokens[pairs:],
            )
            scale, chosen_score, rejected_score = c.beta, chosen_ratio, rejected_ratio
        else:
            mean = logps / tokens.clamp(min=1)
            chosen_score, rejected_score = mean[:pairs], mean[pairs:]
            if c.name == "orpo":
                losses, scale = -c.lambda_ * orpo_log_odds_ratio(chosen_score, rejected_score), c.lambda_
            else:
                losses, scale = simpo_losses(chosen_score, rejected_score, c.beta, c.gamma), c.beta
        nll = -per_token[:pairs].sum() if c.name == "orpo" else per_token.new_zeros(())
        return {
            "losses": losses,
            "chosen_reward": scale * chosen_score.detach(),
            "rejected_reward": scale * rejected_score.detach(),
            "chosen": chosen.detach(),
            "rejected": rejected.detach(),
            "nll": nll,
        }

    def loss(self, model: nn.Module, batch: Batch, totals: Tensor) -> Tensor:
        scores = self._scores(model, batch)
        value = scores["losses"].sum() / max(float(totals[0]), 1.0)
        if self.config.name == "orpo":
            value = value + scores["nll"] / max(float(totals[1]), 1.0)
        return value

    def eval_sums(self, model: nn.Module, batch: Batch) -> Tensor:
        s, counts = self._scores(model, batch), self.counts(batch)
        margin = s["chosen_reward"] - s["rejected_reward"]
        correct = (margin > 0).sum() + 0.5 * (margin == 0).sum()
        return self.sums(
            [
                s["losses"].sum(),
                counts[0],
                s["nll"],
                counts[1],
                margin.sum(),
                correct,
                s["chosen"].sum(),
                s["rejected"].sum(),
            ]
        )

    def eval_metrics(self, sums: Tensor) -> dict[str, float]:
        total = dict(zip(self.EVAL_SUMS, sums, strict=True))
        nll = float(total["nll"] / total["nll_tokens"]) if total["nll_tokens"] > 0 else 0.0
        pairs = total["pairs"]
        return {
            "loss": _ratio(total["loss"], pairs) + nll,
            "reward_margin": _ratio(total["margin"], pairs),
            "accuracy": _ratio(total["correct"], pairs),
            "chosen_logps": _ratio(total["chosen_logps"], pairs),
            "rejected_logps": _ratio(total["rejected_logps"], pairs),
        }


class KTO(Objective):
    """kto: each example one answer, desirable or not; the reference point is estimated per micro-batch from
    its mismatched rows (the prompt with another example's answer), averaged over the processes, as TRL does
    in training; in eval too, so N processes at eval batch b report what one process at N x b does.
    chosen_logps / rejected_logps report the desirable / undesirable answers; accuracy is the share of
    examples whose reward has the sign of its label (a zero reward counts half)."""

    EVAL_SUMS = (
        "loss",
        "examples",
        "desirable",
        "undesirable",
        "desirable_reward",
        "undesirable_reward",
        "correct",
        "desirable_logps",
        "undesirable_logps",
        "kl",
    )
    needs_reference = True
    eval_collective = True  # the reference point is reduced over the processes in eval too

    def __init__(self, config, token_logprobs: TokenLogProbs, reduce: Reduce | None):
        self.config, self.token_logprobs, self.reduce = config, token_logprobs, reduce

    def counts(self, batch: Batch) -> Tensor:
        return self.sums([len(batch["desirable"])])

    def _reference_point(
        self, model: nn.Module, batch: Batch, reduce: Reduce | None, counted: bool = True
    ) -> Tensor:
        """max(0, mean over the mismatched rows of log pi - log pi_ref), without gradient; `counted` False:
        a stand-in batch, which joins the reduction with nothing."""
        with torch.no_grad():
            mismatched, _ = _answer_logps(self.token_logprobs, model, batch, prefix="kl_")
            difference = mismatched.double() - batch["kl_reference_logps"].to(mismatched.device).double()
            stats = torch.stack([difference.sum(), difference.new_tensor(float(len(difference)))])
            if not counted:
                stats = torch.zeros_like(stats)
            if reduce is not None:
                stats = reduce(stats)
        return (stats[0] / stats[1].clamp(min=1)).clamp(min=0).float()

    def _scores(
        self, model: nn.Module, batch: Batch, reduce: Reduce | None, counted: bool = True
    ) -> dict[str, Tensor]:
        kl = self._reference_point(model, batch, reduce, counted)
        logps, _ = _answer_logps(self.token_logprobs, model, batch)
        ratio = logps - batch["reference_logps"].to(logps)
        c = self.config
        losses = kto_losses(ratio, batch["desirable"], kl, c.beta, c.desirable_weight, c.undesirable_weight)
        return {"losses": losses, "reward": c.beta * ratio.detach(), "logps": logps.detach(), "kl": kl}

    def loss(self, model: nn.Module, batch: Batch, totals: Tensor) -> Tensor:
        return self._scores(model, batch, self.reduce)["losses"].sum() / max(float(totals[0]), 1.0)

    def eval_stand_in(self, model: nn.Module, batch: Batch) -> None:
        self._scores(model, batch, self.reduce, counted=False)

    def eval_sums(self, model: nn.Module, batch: Batch) -> Tensor:
        s = self._scores(model, batch, self.reduce)
        good, reward = batch["desirable"], s["reward"]
        signed = torch.where(good, reward, -reward)
        correct = (signed > 0).sum() + 0.5 * (signed == 0).sum()
        return self.sums(
            [
                s["losses"].sum(),
                len(good),
                good.sum(),
                (~good).sum(),
                reward[good].sum(),
                reward[~good].sum(),
                correct,
                s["logps"][good].sum(),
                s["logps"][~good].sum(),
                s["kl"] * len(good),
            ]
        )

    def eval_metrics(self, sums: Tensor) -> dict[str, float]:
        """Those the validation set has the examples for: no margin without both kinds of answer."""
        t = dict(zip(self.EVAL_SUMS, sums, strict=True))
        metrics = {
            "loss": _ratio(t["loss"], t["examples"]),
            "reward_margin": _ratio(t["desirable_reward"], t["desirable"])
            - _ratio(t["undesirable_reward"], t["undesirable"]),
            "accuracy": _ratio(t["correct"], t["examples"]),
            "chosen_logps": _ratio(t["desirable_logps"], t["desirable"]),
            "rejected_logps": _ratio(t["undesirable_logps"], t["undesirable"]),
            "kl": _ratio(t["kl"], t["examples"]),
        }
        return {name: value for name, value in metrics.items() if not math.isnan(value)}


def make_objective(recipe: Recipe, speedups, reduce: Reduce | None) -> Objective:
    """The recipe's objective, computing through the speed-ups installed (a `fast.Installed`) where they
    apply; `reduce` sums a tensor over the processes (KTO's reference point)."""
    config, task = recipe.train.objective, recipe.model.task
    token_logprobs = speedups.token_logprobs or loss.model_token_logprobs
    if config.name == "sft":

        def loss_sum(model: nn.Module, batch: Batch) -> Tensor:
            if speedups.loss is not None:
                return speedups.loss(model, batch)
            return loss.loss_sum(model, batch, task)

        return Supervised(task, loss_sum)
    if config.name == "kto":
        return KTO(config, token_logprobs, reduce)
    return Pairs(config, token_logprobs, nll_on_prompt=recipe.data.train_on_inputs)
