"""Each fast path of the training step gives the plain path's loss and gradients.

The plain path: full (tokens, vocab) logits then cross-entropy; LoRA as base(x) + scale * B(A(x)) with
fresh tensors; no gradient checkpointing. The fast paths are what `peft train` runs by default or on
request (peftcli/fast: the chunked loss, LoRA's in-place addmm, gradient checkpointing).
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import (
    VOCAB_SIZE,
    assert_same_step,
    batch,
    close,
    lora_model,
    loss_and_grads,
    saved_bytes,
    tiny_model,
)
from torch import nn

from peftcli.data.batches import IGNORE_INDEX
from peftcli.fast import checkpointing, chunked_loss
from peftcli.fast import lora as fast_lora
from peftcli.fast.chunked_loss import ChunkedLoss
from peftcli.methods import METHODS, Context, lora, make_config
from peftcli.train.loss import causal_lm_loss_sum, model_token_logprobs, token_logprobs

ROOT = Path(__file__).resolve().parents[2]


def labelled(n: int = 2, length: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    b = batch(n, length, seed)
    labels = b["input_ids"].clone()
    labels[b["attention_mask"] == 0] = IGNORE_INDEX
    labels[1, :4] = IGNORE_INDEX  # a prompt that carries no loss
    return {**b, "labels": labels}


# --------------------------------------------------------------------------------------------------
# chunked cross-entropy


def head_case(with_bias: bool):
    """(a seeded generator, final hidden states (3, 10, 16), a head (50, 16) and maybe its bias, labels with
    a masked prompt and right padding)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 10, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g)
    bias = torch.randn(50, generator=g) if with_bias else None
    labels = torch.randint(0, 50, (3, 10), generator=g)
    labels[0, :5] = IGNORE_INDEX
    labels[2, 7:] = IGNORE_INDEX
    return g, hidden, weight, bias, labels


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 64, 4096])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_loss_equals_the_plain_loss_and_gradients(monkeypatch, chunk_rows, with_bias):
    monkeypatch.setattr(chunked_loss, "CHUNK_ROWS", chunk_rows)
    _, hidden, weight, bias, labels = head_case(with_bias)

    plain = causal_lm_loss_sum(nn.functional.linear(hidden, weight, bias), labels)
    (plain_grad,) = torch.autograd.grad(2.5 * plain, hidden)
    chunked = chunked_loss.chunked_causal_lm_loss_sum(hidden, weight, bias, labels)
    (chunked_grad,) = torch.autograd.grad(2.5 * chunked, hidden)  # backward scales by the upstream grad
    assert close(chunked, plain)
    assert close(chunked_grad, plain_grad)
    with torch.no_grad():  # evaluation: no gradient formed, same value
        assert close(chunked_loss.chunked_causal_lm_loss_sum(hidden, weight, bias, labels), plain)


@pytest.mark.parametrize("chunk_rows", [1, 4, 4096])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_token_logprobs_equal_the_plain_ones_and_their_gradients(monkeypatch, chunk_rows, with_bias):
    """The preference objectives' path: per-position log-probs, and gradients under an upstream gradient
    that differs per position (as DPO's does per sequence)."""
    monkeypatch.setattr(chunked_loss, "CHUNK_ROWS", chunk_rows)
    g, hidden, weight, bias, labels = head_case(with_bias)
    upstream = torch.randn(3, 9, generator=g)

    plain = token_logprobs(nn.functional.linear(hidden, weight, bias), labels)
    chunked = chunked_loss.chunked_token_logprobs(hidden, weight, bias, labels)
    assert chunked.shape == (3, 9) and torch.all(chunked[labels[:, 1:] == IGNORE_INDEX] == 0)
    assert close(chunked, plain)
    (plain_grad,) = torch.autograd.grad((upstream * plain).sum(), hidden)
    (chunked_grad,) = torch.autograd.grad((upstream * chunked).sum(), hidden)
    assert close(chunked_grad, plain_grad)


def test_chunked_token_logprobs_on_a_lora_model_match_the_plain_ones():
    model, b = lora_model("llama"), labelled()
    chunked = ChunkedLoss.for_model(model)
    weights = torch.linspace(-1, 2, 22).reshape(2, 11)
    plain = model_token_logprobs(model, b)
    assert close(chunked.token_logprobs(model, b), plain)
    plain_grads = torch.autograd.grad(
        (weights * plain).sum(), [p for p in model.parameters() if p.requires_grad]
    )
    fast = torch.autograd.grad(
        (weights * chunked.token_logprobs(model, b)).sum(), [p for p in model.parameters() if p.requires_grad]
    )
    assert all(close(a, b) for a, b in zip(fast, plain_grads, strict=True))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_chunked_loss_engages_on_a_lora_model_and_matches_the_plain_step(monkeypatch, arch):
    monkeypatch.setattr(chunked_loss, "CHUNK_ROWS", 5)  # several chunks and a ragged last one
    model, b = lora_model(arch), labelled()
    plain_value, plain_grads = loss_and_grads(model, b)
    chunked = ChunkedLoss.for_model(model)
    # LoRA changes the transformers model in place: its own head must be found (not its backbone's).
    assert chunked is not None and chunked.head.weight.shape[0] == VOCAB_SIZE
    chunked_value, chunked_grads = loss_and_grads(model, b, chunked)
    assert plain_grads.keys() == chunked_grads.keys() and plain_grads
    assert_same_step((chunked_value, chunked_grads), (plain_value, plain_grads))
    # Outside the loss the model is untouched: its head in place, its logits real logits.
    assert model.get_output_embeddings() is chunked.head
    assert model(**b).logits.shape[-1] == VOCAB_SIZE


def test_chunked_loss_engages_through_a_virtual_token_wrapper():
    method = make_config("prefix-tuning", num_virtual_tokens=3)
    model = METHODS["prefix-tuning"].inject(tiny_model("llama", "causal-lm"), method, Context("causal-lm"))
    b = labelled()
    plain_value, plain_grads = loss_and_grads(model, b)
    chunked = ChunkedLoss.for_model(model)
    assert chunked is not None
    assert_same_step(loss_and_grads(model, b, chunked), (plain_value, plain_grads))
    assert model.base_model.get_output_embeddings() is chunked.head


def test_chunked_loss_stays_off_for_a_trained_head():
    model = tiny_model("llama", "causal-lm")
    model.get_output_embeddings().weight.requires_grad_(True)
    assert ChunkedLoss.for_model(model) is None


# --------------------------------------------------------------------------------------------------
# LoRA forward: in-place addmm, no dropout module at p = 0


def _reference_lora(layer, x: torch.Tensor) -> torch.Tensor:
    """The textbook form, fresh tensors throughout."""
    return layer.base(x) + layer.scale * layer.lora_B(layer.lora_A(x))


@pytest.mark.parametrize("make_input", ["contiguous", "transposed"])
def test_lora_forward_in_place_equals_the_textbook_form(make_input):
    torch.manual_seed(0)
    layer = lora.wrap_layer(nn.Linear(16, 24), rank=4, alpha=8.0)
    fast_lora.install(layer)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    layer.base.requires_grad_(False)
    assert layer.dropout is None
    x = torch.randn(3, 5, 16)
    if make_input == "transposed":
        x = torch.randn(5, 3, 16).transpose(0, 1)
    x.requires_grad_(True)
    grads = []
    for forward in (layer, lambda t: _reference_lora(layer, t)):
        out = forward(x)
        assert out.shape == (3, 5, 24)
        (out * torch.linspace(-1, 1, 24)).sum().backward()
        grads.append(
            (out.detach(), x.grad.clone(), layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone())
        )
        x.grad = None
        layer.zero_grad(set_to_none=True)
    for fast, plain in zip(*grads, strict=True):
        assert close(fast, plain)


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_lora_model_step_equals_the_textbook_lora(fast):
    """The whole model: LoRA's forward (plain, and fast/lora.py's) against the textbook forward, same loss and
    LoRA gradients."""
    model, b = lora_model("llama"), labelled()
    if fast:
        fast_lora.install(model)
    ours_value, ours_grads = loss_and_grads(model, b)
    textbook = copy.deepcopy(model)
    for _, layer in lora.lora_layers(textbook):
        layer.run = _reference_lora
    assert_same_step((ours_value, ours_grads), loss_and_grads(textbook, b))


# --------------------------------------------------------------------------------------------------
# gradient checkpointing


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model, b = lora_model("llama").train(), labelled()  # transformers checkpoints only in train mode
    chunked = ChunkedLoss.for_model(model)
    plain_value, plain_grads = loss_and_grads(model, b, chunked)
    plain_saved = saved_bytes(model, b, chunked)
    undo = checkpointing.enable(model)
    ckpt = loss_and_grads(model, b, chunked)
    assert saved_bytes(model, b, chunked) < plain_saved / 2  # it engaged: each layer keeps only its input
    assert_same_step(ckpt, (plain_value, plain_grads))
    undo()
    assert saved_bytes(model, b, chunked) > plain_saved / 2  # off again


# --------------------------------------------------------------------------------------------------
# the benchmark itself


@pytest.mark.slow
def test_bench_quick_runs_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--quick", "--json", str(out)],
        check=True,
        cwd=ROOT,
        timeout=600,
        capture_output=True,
    )
    import json

    result = json.loads(out.read_text())
    for side in ("peftcli", "hf_peft"):
        assert result[side]["tokens_per_second"] > 0 and result[side]["peak_memory_bytes"] > 0
    assert result["first_loss_difference"] < 1e-4
    assert result["speedup"] > 0 and result["memory_ratio"] > 0 and result["flops_fraction"] > 0
