"""The checks every method of adapted linear layers (IA3, VeRA, LoHa, LoKr, OFT) passes, against HF PEFT (the
reference) and against itself; each method's test module (tests/methods/test_<name>.py) runs them on its own
configurations. A `Case` is one adapter configuration, ours and HF PEFT's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import peft
import torch
from tiny import HF_TASK, batch, logits, one_step_changes, randomise, task_of, tiny_model, trainable_names

from peftcli.methods import METHODS, Context, make_config, modules
from peftcli.runs import adapter as checkpoint
from peftcli.train.loop import upcast_trainable

# Adapters start as (or near) the identity: a perturbation of every trained value makes a wrong load, a
# wrong scale or a left-out part show in the outputs.
NOISE = 0.1


@dataclass
class Case:
    method: str
    fields: dict  # our recipe's method keys
    hf: Callable[..., peft.PeftConfig]  # HF PEFT's config class
    hf_fields: dict  # its fields for the same adapter
    parts: tuple[str, ...]  # the names a layer's trained tensors may have (the ends of their keys)
    # The architectures whose target layers HF PEFT 0.21 adapts with this method (LoHa, LoKr and OFT leave
    # GPT-2's Conv1D out).
    hf_archs: tuple[str, ...] = ("llama", "gpt2", "bert")
    hf_random_init: dict = field(default_factory=dict)  # HF fields that make its adapter start random

    def config(self, **overrides):
        return make_config(self.method, **{**self.fields, **overrides})

    def hf_config(self, task: str, **overrides) -> peft.PeftConfig:
        return self.hf(task_type=HF_TASK[task], **{**self.hf_fields, **overrides})

    @property
    def module(self):
        return METHODS[self.method]


def injected(case: Case, arch: str, seed: int = 0, **overrides):
    task = task_of(arch)
    model = case.module.inject(tiny_model(arch, task, seed=seed), case.config(**overrides), Context(task))
    return model, task


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# --------------------------------------------------------------------------------------------------
# The wrapped model


def assert_identity_at_init(case: Case, arch: str) -> None:
    base = logits(tiny_model(arch, task_of(arch)))
    model, _ = injected(case, arch)
    assert modules.adapted_layers(model, case.method)
    torch.testing.assert_close(logits(model), base, rtol=0, atol=0)


def assert_only_parts_train(case: Case, arch: str) -> None:
    """Only the method's parts (and the classifier head, trained in full) require grad; one AdamW step
    changes nothing else, and every part of every layer."""
    model, task = injected(case, arch)
    trainable = trainable_names(model)
    head = {n for n in trainable if ".trained." in n}
    assert trainable - head == {n for n in trainable if any(n.endswith("." + p) for p in case.parts)}
    assert trainable - head and bool(head) == (task == "sequence-classification")
    randomise(model, NOISE)  # off the identity: every part gets a gradient (a zero factor would block one)
    changed = one_step_changes(model, task, weight_decay=0.0)
    assert changed <= trainable
    layers = modules.adapted_layers(model, case.method)
    assert {f"{name}.{part}" for name, layer in layers for part in layer.parts()} <= changed


def assert_counts_equal_hf(case: Case, arch: str) -> None:
    model, task = injected(case, arch)
    hf = peft.get_peft_model(tiny_model(arch, task), case.hf_config(task))
    assert modules.count_parameters(model) == hf.get_nb_trainable_parameters()


def assert_half_base_trains_fp32_parts(case: Case) -> None:
    """On a bf16 base the training setup keeps the parts in float32 (the layer casts its input): the forward
    runs, returns bf16 logits close to the float32 model's, and the parts get float32 gradients."""
    model, task = injected(case, "llama")
    randomise(model, NOISE)
    reference = logits(model)
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert all(layer.casts_input for _, layer in modules.adapted_layers(half, case.method))
    upcast_trainable(half, autocast=False)
    parts = [p for _, layer in modules.adapted_layers(half, case.method) for p in layer.parts().values()]
    assert parts and all(p.dtype == torch.float32 for p in parts)
    out = half(**batch()).logits
    assert out.dtype == torch.bfloat16
    assert max_diff(out.float(), reference) <= 0.05 * max(1.0, float(reference.abs().max()))
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in parts)
    assert any(p.grad.abs().sum() > 0 for p in parts)


# --------------------------------------------------------------------------------------------------
# Saved in HF PEFT's format, both ways


def assert_round_trip(case: Case, arch: str, tmp_path) -> None:
    model, task = injected(case, arch)
    randomise(model, NOISE)
    expected = logits(model)
    checkpoint.save_adapter(model, case.config(), task, "tiny", tmp_path)
    loaded, method = checkpoint.load_adapter(tiny_model(arch, task), tmp_path)
    assert method.name == case.method and all(getattr(method, k) == v for k, v in case.fields.items())
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)


def assert_hf_loads_ours(case: Case, arch: str, tmp_path) -> None:
    model, task = injected(case, arch)
    randomise(model, NOISE)
    checkpoint.save_adapter(model, case.config(), task, "tiny", tmp_path)
    hf = peft.PeftModel.from_pretrained(tiny_model(arch, task), tmp_path)
    assert max_diff(logits(hf), logits(model)) <= 1e-5
    assert max_diff(logits(hf), logits(tiny_model(arch, task))) > 1e-3  # the adapter mattered


def assert_we_load_hf(case: Case, arch: str, tmp_path) -> None:
    """An adapter HF PEFT trained (random init, perturbed): ours reproduces its logits."""
    task = task_of(arch)
    hf = peft.get_peft_model(tiny_model(arch, task), case.hf_config(task, **case.hf_random_init))
    randomise(hf, NOISE)
    hf.save_pretrained(tmp_path)
    hf.eval()
    loaded, _ = checkpoint.load_adapter(tiny_model(arch, task), tmp_path)
    assert max_diff(logits(loaded.eval()), logits(hf)) <= 1e-5


def assert_hf_refuses_conv1d(case: Case, tmp_path) -> None:
    """GPT-2's Conv1D: HF PEFT 0.21 does not adapt it with this method; ours does, in the same file format."""
    model, task = injected(case, "gpt2")
    assert modules.adapted_layers(model, case.method)
    checkpoint.save_adapter(model, case.config(), task, "tiny", tmp_path)
    try:
        peft.PeftModel.from_pretrained(tiny_model("gpt2"), tmp_path)
    except (TypeError, ValueError) as e:
        assert "Conv1D" in str(e)
    else:
        raise AssertionError("HF PEFT now adapts Conv1D with this method: test gpt2 against it")


# --------------------------------------------------------------------------------------------------
# Merging


def assert_merge_equals_unmerged(case: Case, arch: str, tmp_path) -> None:
    """merge() leaves a plain transformers model with the adapted model's logits; where HF PEFT adapts the
    architecture, its merge_and_unload() writes the same weights."""
    model, task = injected(case, arch)
    randomise(model, NOISE)
    expected = logits(model)
    checkpoint.save_adapter(model, case.config(), task, "tiny", tmp_path)
    merged = case.module.merge(model)
    assert not any(type(m).__module__.startswith("peftcli") for m in merged.modules())
    assert max_diff(logits(merged), expected) <= 1e-5
    if arch not in case.hf_archs:
        return
    hf = peft.PeftModel.from_pretrained(tiny_model(arch, task), tmp_path).merge_and_unload()
    ours, theirs = merged.state_dict(), hf.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert max_diff(ours[key], theirs[key]) <= 1e-6, key


# --------------------------------------------------------------------------------------------------
# The checks above as one test class: a method's test module subclasses it with its cases and imports
# `pytest_generate_tests`, which parametrizes the tests of every such class in that module.


class CommonChecks:
    """The properties every method of adapted linear layers must have, on each of `cases` (id -> Case):
    `arch` runs on `archs`, `hf_arch` on those of them HF PEFT adapts, `count_arch` on those plus RoBERTa
    and OPT (counts only)."""

    cases: dict[str, Case] = {}
    archs: tuple[str, ...] = ("llama", "gpt2", "bert")

    def test_output_equals_base_at_init(self, case, arch):
        assert_identity_at_init(case, arch)

    def test_only_the_method_and_head_train(self, case, arch):
        assert_only_parts_train(case, arch)

    def test_counts_equal_hf(self, case, count_arch):
        assert_counts_equal_hf(case, count_arch)

    def test_save_load_round_trip(self, case, arch, tmp_path):
        assert_round_trip(case, arch, tmp_path)

    def test_hf_peft_loads_our_adapter(self, case, hf_arch, tmp_path):
        assert_hf_loads_ours(case, hf_arch, tmp_path)

    def test_we_load_hf_peft_adapter(self, case, hf_arch, tmp_path):
        assert_we_load_hf(case, hf_arch, tmp_path)

    def test_merge_equals_unmerged_and_hf_merge(self, case, arch, tmp_path):
        assert_merge_equals_unmerged(case, arch, tmp_path)

    def test_a_bf16_base_keeps_fp32_parts(self, case):
        assert_half_base_trains_fp32_parts(case)


def pytest_generate_tests(metafunc) -> None:
    """Parametrize CommonChecks' tests by the subclass's cases and architectures."""
    cls = metafunc.cls
    if cls is None or not issubclass(cls, CommonChecks):
        return
    names = metafunc.fixturenames
    rows, ids = [], []
    for case_id, case in cls.cases.items():
        hf_archs = [a for a in cls.archs if a in case.hf_archs]
        archs = {
            "arch": cls.archs,
            "hf_arch": hf_archs,
            "count_arch": [*hf_archs, "roberta", "opt"],
        }
        key = next((k for k in archs if k in names), None)
        for arch in archs[key] if key else [None]:
            rows.append((case, arch) if key else (case,))
            ids.append(f"{case_id}-{arch}" if key else case_id)
    metafunc.parametrize(["case", key] if key else ["case"], rows, ids=ids)
