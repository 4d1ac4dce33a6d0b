"""peftcli/train/objectives.py (and preference.py's math): each preference objective's loss and gradients
equal TRL's trainer on the same model, batch and settings (DPOTrainer, CPOTrainer for SimPO, ORPOTrainer,
KTOTrainer), in fp32; pairs of different lengths give the same loss padded together or alone; the SFT
objective is the plain loss.

The batch is ours: preference rows through prepare_data (prompt masked, EOS a target), then handed to TRL as
its own tokenized inputs (prompt ids = the row before its first target, the answer = the rest). The reference
is ours too, the LoRA model with its adapter switched off, against TRL's reference model: the base model.
"""

from __future__ import annotations

import json
import tempfile

import pytest
import torch
import torch.nn.functional as F
import trl
import trl.experimental.cpo
import trl.experimental.orpo
from datasets import Dataset
from tiny import randomise, tiny_model, tiny_tokenizer

from peftcli.data.batches import IGNORE_INDEX, collate
from peftcli.data.prepare import prepare_data
from peftcli.methods import Context, disabled, lora, make_config
from peftcli.recipe import DataSection
from peftcli.recipe.schema import DPO, KTO, ORPO, SimPO
from peftcli.train import loss, reference
from peftcli.train.objectives import KTO as KTOObjective
from peftcli.train.objectives import Pairs
from peftcli.train.preference import dpo_losses

PAIRS = [
    {"prompt": "What is 2 plus 2?", "chosen": " It is 4.", "rejected": " Five, I think, or maybe six."},
    {"prompt": "Name a colour.", "chosen": " Blue.", "rejected": " A colour is hard to name."},
    {"prompt": "Say hi", "chosen": " Hi there, friend!", "rejected": " No."},
    {"prompt": "Count to three: one,", "chosen": " two, three.", "rejected": " three, two."},
]


@pytest.fixture(scope="module")
def tok():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None  # plain text: the answer's tokens are the row's tail, as TRL's are
    return tokenizer


@pytest.fixture(scope="module")
def models():
    """(the base model, the same with LoRA on every linear layer, its factors randomised)."""
    base = tiny_model("llama")
    model = lora.inject(
        tiny_model("llama"), make_config("lora", rank=4, target_modules="all-linear"), Context("causal-lm")
    )
    randomise(model, scale=0.3)
    return base, model


def _prepared(tmp_path, tok, rows, fmt):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataSection(train=str(path), format=fmt, validation=None, max_length=64)
    return prepare_data(data, tok, "causal-lm", 0, cache_dir=tmp_path / "cache")


def _with_reference(prepared, model):
    """Our reference: the model with its adapter switched off, as training computes it."""
    split = prepared.train
    with disabled(model, "lora"):
        split.reference_logps = reference.row_logprobs(
            model, split, loss.model_token_logprobs, 3, prepared.pad_id, torch.device("cpu")
        )
    return split


def _split(row: dict) -> tuple[list[int], list[int]]:
    """A tokenized row -> (the prompt's ids, the answer's: from the first target on)."""
    first = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
    return row["input_ids"][:first], row["input_ids"][first:]


def _grads(model, value) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    value.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_same(ours, theirs, model):
    """Loss and every trained parameter's gradient, to 1e-5."""
    torch.testing.assert_close(ours.detach(), theirs.detach().to(ours.dtype), rtol=1e-5, atol=1e-5)
    ours_grads, their_grads = _grads(model, ours), _grads(model, theirs)
    for name, grad in their_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def _args(config_cls, **fields):
    common = dict(
        output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=4
    )
    return config_cls(**common, **fields)


def _our_pairs_batch(split):
    return collate([split[i] for i in range(len(split))], pad_id=0)


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing"), [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2)]
)
def test_dpo_equals_trl(tmp_path, tok, models, loss_type, label_smoothing):
    base, model = models
    split = _with_reference(_prepared(tmp_path, tok, PAIRS, "preference"), model)
    config = DPO(beta=0.3, loss_type=loss_type, label_smoothing=label_smoothing)
    batch = _our_pairs_batch(split)
    ours = Pairs(config, loss.model_token_logprobs).loss(model, batch, torch.tensor([len(PAIRS), 0.0]))

    args = _args(trl.DPOConfig, beta=0.3, loss_type=[loss_type], label_smoothing=label_smoothing)
    trainer = trl.DPOTrainer(
        model=model, ref_model=base, args=args, train_dataset=_trl_strings(), processing_class=tok
    )
    examples = []
    for i in range(len(split)):
        (prompt, chosen), (_, rejected) = (_split(row) for row in split[i]["rows"])
        examples.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    theirs = trainer._compute_loss(model, trainer.data_collator(examples), return_outputs=False)
    _assert_same(ours, theirs, model)


def test_conservative_dpo_is_the_label_smoothed_formula(tmp_path, tok, models):
    """TRL 1.x has no label smoothing for `sigmoid` (cDPO); the math is the reference."""
    _, model = models
    split = _with_reference(_prepared(tmp_path, tok, PAIRS, "preference"), model)
    batch = _our_pairs_batch(split)
    ours = Pairs(DPO(beta=0.3, label_smoothing=0.2), loss.model_token_logprobs).loss(
        model, batch, torch.tensor([len(PAIRS), 0.0])
    )
    with torch.no_grad():
        logps = loss.model_token_logprobs(model, batch).sum(-1)
    ratio = logps - batch["reference_logps"]
    d = 0.3 * (ratio[:4] - ratio[4:])
    expected = (-0.8 * F.logsigmoid(d) - 0.2 * F.logsigmoid(-d)).mean()
    torch.testing.assert_close(ours.detach(), expected, rtol=1e-6, atol=1e-6)
    plain = dpo_losses(ratio[:4], ratio[4:], 0.3, "sigmoid")
    torch.testing.assert_close(plain, -F.logsigmoid(d))


def _trl_strings():
    return Dataset.from_list(
        [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in PAIRS]
    )


def _paired_inputs(split) -> dict[str, torch.Tensor]:
    """TRL's older pair layout (CPO, ORPO): chosen_* and rejected_* tensors, labels -100 on the prompt."""
    batch = {}
    for k, name in enumerate(("chosen", "rejected")):
        rows = [split[i]["rows"][k] for i in range(len(split))]
        padded = collate(rows, pad_id=0)
        batch[f"{name}_input_ids"], batch[f"{name}_attention_mask"] = (
            padded["input_ids"],
            padded["attention_mask"],
        )
        batch[f"{name}_labels"] = padded["labels"]
    return batch


def _pairs_trainer_loss(trainer_cls, config_cls, model, tok, split, **fields) -> torch.Tensor:
    """The loss of TRL's CPO or ORPO trainer on our pairs, in its older pair layout."""
    trainer = trainer_cls(
        model=model, args=_args(config_cls, **fields), train_dataset=_trl_strings(), processing_class=tok
    )
    loss, _ = trainer.get_batch_loss_metrics(model, _paired_inputs(split))
    return loss


def test_simpo_equals_trl_cpo(tmp_path, tok, models):
    _, model = models
    split = _prepared(tmp_path, tok, PAIRS, "preference").train
    ours = Pairs(SimPO(beta=2.0, gamma=0.7), loss.model_token_logprobs).loss(
        model, _our_pairs_batch(split), torch.tensor([len(PAIRS), 0.0])
    )
    cpo = trl.experimental.cpo
    theirs = _pairs_trainer_loss(
        cpo.CPOTrainer,
        cpo.CPOConfig,
        model,
        tok,
        split,
        loss_type="simpo",
        beta=2.0,
        simpo_gamma=0.7,
        cpo_alpha=0.0,
    )
    _assert_same(ours, theirs, model)


def test_orpo_equals_trl_with_the_nll_on_the_prompt_too(tmp_path, tok, models):
    """TRL's ORPO trains its NLL term on the prompt as well: ours does so with data.train_on_inputs."""
    _, model = models
    split = _prepared(tmp_path, tok, PAIRS, "preference").train
    batch = _our_pairs_batch(split)
    chosen_targets = (batch["attention_mask"][:4, 1:]).sum()
    objective = Pairs(ORPO(lambda_=0.25), loss.model_token_logprobs, nll_on_prompt=True)
    counts = objective.counts(batch)
    assert counts[1] == chosen_targets
    ours = objective.loss(model, batch, counts)
    orpo = trl.experimental.orpo
    theirs = _pairs_trainer_loss(orpo.ORPOTrainer, orpo.ORPOConfig, model, tok, split, beta=0.25)
    _assert_same(ours, theirs, model)


def test_orpo_default_nll_is_the_answers_sft_loss(tmp_path, tok, models):
    _, model = models
    split = _prepared(tmp_path, tok, PAIRS, "preference").train
    batch = _our_pairs_batch(split)
    objective = Pairs(ORPO(lambda_=0.25), loss.model_token_logprobs)
    with_odds = objective.loss(model, batch, objective.counts(batch))
    chosen = {k: v[:4] for k, v in batch.items() if k != "reference_logps"}
    sft = loss.loss_sum(model, chosen, "causal-lm") / loss.num_targets(chosen, "causal-lm")
    logps = loss.model_token_logprobs(model, batch)
    mean = logps.sum(-1) / (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)
    log_odds = (mean[:4] - mean[4:]) - (torch.log1p(-mean[:4].exp()) - torch.log1p(-mean[4:].exp()))
    torch.testing.assert_close(with_odds, sft - 0.25 * F.logsigmoid(log_odds).mean(), rtol=1e-5, atol=1e-5)


KTO_ROWS = [
    {"prompt": p["prompt"], "completion": p[key], "label": key == "chosen"}
    for p in PAIRS
    for key in ("chosen", "rejected")
]


def test_kto_equals_trl(tmp_path, tok, models):
    base, model = models
    split = _with_reference(_prepared(tmp_path, tok, KTO_ROWS, "kto"), model)
    config = KTO(beta=0.2, desirable_weight=1.3, undesirable_weight=0.7)
    batch = collate([split[i] for i in range(len(split))], pad_id=0)
    ours = KTOObjective(config, loss.model_token_logprobs, None).loss(
        model, batch, torch.tensor([len(split)])
    )

    strings = Dataset.from_list(KTO_ROWS)
    args = _args(
        trl.KTOConfig,
        beta=0.2,
        desirable_weight=1.3,
        undesirable_weight=0.7,
        train_sampling_strategy="sequential",
    )
    trainer = trl.KTOTrainer(
        model=model, ref_model=base, args=args, train_dataset=strings, processing_class=tok
    )
    examples = []
    for i in range(len(split)):
        (prompt, completion), (kl_prompt, kl_completion) = (_split(row) for row in split[i]["rows"])
        assert kl_prompt == prompt  # the KL row: this prompt, the row before's answer
        examples.append(
            {
                "prompt_ids": prompt,
                "completion_ids": completion,
                "KL_completion_ids": kl_completion,
                "label": split[i]["desirable"],
            }
        )
    assert examples[1]["KL_completion_ids"] == examples[0]["completion_ids"]
    theirs = trainer._compute_loss(model, trainer.data_collator(examples), return_outputs=False)
    _assert_same(ours, theirs, model)


@pytest.mark.parametrize("config", [DPO(beta=0.3), SimPO(), ORPO()], ids=lambda c: c.name)
def test_padding_does_not_change_a_pairs_loss(tmp_path, tok, models, config):
    """The short pair alone, or padded beside a long one: its loss is the same."""
    _, model = models
    rows = [PAIRS[1], {**PAIRS[2], "rejected": " " + "no, " * 12 + "never."}]
    split = _with_reference(_prepared(tmp_path, tok, rows, "preference"), model)
    objective = Pairs(config, loss.model_token_logprobs)
    together = collate([split[0], split[1]], pad_id=0)
    assert together["attention_mask"][0].sum() < together["attention_mask"].shape[1]  # padded
    both = objective.loss(model, together, torch.tensor([1.0, 1.0]))
    alone = [objective.loss(model, collate([split[i]], pad_id=0), torch.tensor([1.0, 1.0])) for i in (0, 1)]
    torch.testing.assert_close(both, alone[0] + alone[1], rtol=1e-5, atol=1e-6)


def test_kto_eval_leaves_out_what_one_kind_of_answer_cannot_say():
    """Only desirable answers held out: no margin and no rejected log-prob, rather than NaN."""
    objective = KTOObjective(KTO(), loss.model_token_logprobs, None)
    sums = objective.sums([1.0, 4, 4, 0, 0.8, 0.0, 3.0, -40.0, 0.0, 0.4])
    assert objective.eval_metrics(sums) == {"loss": 0.25, "accuracy": 0.75, "chosen_logps": -10.0, "kl": 0.1}
