"""infer/load.py's LoRA shortcut: folding a saved adapter's tensors straight into the base equals inject, load
and merge bit for bit, and anything it cannot fold is left untouched for the long way."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from peftcli.infer.load import fold_lora
from peftcli.methods import Context, lora, make_config
from peftcli.runs import adapter as checkpoint


@pytest.mark.parametrize(
    "fields",
    [
        {"target_modules": "all-linear"},
        {"target_modules": ["q_proj", "v_proj"], "use_rslora": True, "rank": 3},
        {"target_modules": ["q_proj", "down_proj"], "use_dora": True},
    ],
    ids=["lora", "rslora", "dora"],
)
def test_folding_the_saved_tensors_equals_inject_load_and_merge(fields):
    """fold_state (generate's shortcut) leaves the weights bit for bit as inject + load + merge does."""
    config = make_config("lora", **fields)
    trained = lora.inject(tiny_model("llama"), config, Context("causal-lm"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    state = lora.adapter_state(trained)
    merged = lora.merge(checkpoint.apply_adapter(tiny_model("llama"), lora, config, "causal-lm", state))
    model = tiny_model("llama")
    assert fold_lora(model, config, state)
    ours, theirs = model.state_dict(), merged.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert any(not torch.equal(ours[k], tiny_model("llama").state_dict()[k]) for k in ours)


def test_folding_the_saved_tensors_leaves_what_it_cannot_fold_alone():
    """False and nothing changed: the caller takes the long way (which says what is wrong, if anything)."""
    config = make_config("lora", target_modules=["q_proj"])
    state = lora.adapter_state(lora.inject(tiny_model("llama"), config, Context("causal-lm")))
    before = tiny_model("llama").state_dict()
    extra = {**state, "base_model.model.lm_head.weight": torch.zeros(1)}  # a module trained in full
    missing = dict(list(state.items())[1:])
    for model_config, tensors in (
        (make_config("lora", target_modules=["q_proj"], init="pissa"), state),
        (config, extra),
        (config, missing),
        (make_config("lora", target_modules=["q_proj"], rank=4), state),  # the file's rank is 8
    ):
        model = tiny_model("llama")
        assert not fold_lora(model, model_config, tensors)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    tied = tiny_model("llama")
    tied.lm_head.weight = tied.model.embed_tokens.weight
    head = make_config("lora", target_modules=["lm_head"])
    head_state = lora.adapter_state(lora.inject(tiny_model("llama"), head, Context("causal-lm")))
    assert not fold_lora(tied, head, head_state)
