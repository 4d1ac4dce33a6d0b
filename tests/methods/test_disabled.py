"""The "disabled" part of the method contract (methods.disabled, modules.disabled, bitfit.disabled): within
the block a model carrying any registered method computes exactly as its base model; on exit, as before.

The preference objectives take their reference policy from it, so it is checked for every method in the
registry, on a causal LM and on a classifier (whose trained head copy must give way to the original).
"""

from __future__ import annotations

import pytest
import torch
from tiny import batch, logits, randomise, tiny_model

from peftcli.methods import METHODS, Context, disabled, make_config


def _adapted(name: str, arch: str, task: str):
    model = tiny_model(arch, task)
    adapted = METHODS[name].inject(tiny_model(arch, task), make_config(name), Context(task))
    randomise(adapted)  # every trained part away from its identity init, so a leak would show
    return model, adapted


@pytest.mark.parametrize("task", ["causal-lm", "sequence-classification"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_disabled_computes_as_the_base_model_and_restores(name, task):
    arch = "gpt2" if task == "causal-lm" else "bert"  # both have biases (BitFit) and a usual LoRA target
    base, adapted = _adapted(name, arch, task)
    inputs = batch()
    trained = logits(adapted, inputs)
    if task == "causal-lm":  # prompt tuning's logits start with its virtual tokens' positions
        assert not torch.allclose(
            trained[:, -inputs["input_ids"].shape[1] :], logits(base, inputs), atol=1e-4
        )
    else:
        assert not torch.allclose(trained, logits(base, inputs), atol=1e-4)
    before = {n: p.detach().clone() for n, p in adapted.named_parameters()}
    with disabled(adapted, name):
        torch.testing.assert_close(logits(adapted, inputs), logits(base, inputs), rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(adapted, inputs), trained, rtol=0, atol=0)
    for n, p in adapted.named_parameters():  # the same tensors, unchanged: an optimizer still holds them
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("name", sorted(METHODS))
def test_disabled_restores_after_an_error(name):
    _, adapted = _adapted(name, "gpt2", "causal-lm")
    trained = logits(adapted)
    with pytest.raises(RuntimeError, match="boom"), disabled(adapted, name):
        raise RuntimeError("boom")
    torch.testing.assert_close(logits(adapted), trained, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_nothing_trained_is_used_while_disabled(name):
    _, adapted = _adapted(name, "gpt2", "causal-lm")
    inputs = batch()
    with disabled(adapted, name):
        assert not adapted(**inputs, labels=inputs["input_ids"]).loss.requires_grad
