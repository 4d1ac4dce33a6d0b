"""train.distributed: the choice, the refusals, and (slow, torchrun on 2 CPU processes with gloo) FSDP2
training that equals one process, saves the one-process adapter and resumes exactly."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import tiny_model, torchrun

from peftcli.errors import FieldError, UserError
from peftcli.recipe import load_recipe
from peftcli.runs import adapter as adapter_files
from peftcli.runs import rundir
from peftcli.train import distributed

ROOT = Path(__file__).resolve().parents[2]
GiB = 1 << 30
CHAT = [
    {
        "messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"It is {2 * i}."},
        ]
    }
    for i in range(24)
]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTCLI_CACHE", str(tmp_path / "cache"))


def write_recipe(
    tmp_path: Path, base: str, method: dict | None = None, validation: float = 0.25, **train
) -> Path:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    recipe = {
        "model": {"name": base},
        "method": method or {"name": "lora", "rank": 4, "target_modules": "all-linear"},
        "data": {"train": str(data), "format": "chat", "validation": validation, "max_length": 64},
        "train": {
            "max_steps": 5,
            "batch_size": 4,
            "gradient_accumulation": 2,
            "learning_rate": 1e-2,
            "seed": 0,
            "distributed": "fsdp",
            **train,
        },
        "output_dir": str(tmp_path / "one"),
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def cli(*args: str, processes: int = 1) -> subprocess.CompletedProcess:
    command = (
        torchrun(*args, processes=processes)
        if processes > 1
        else [sys.executable, "-m", "peftcli.cli", *args]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(run: Path, kind: str = "train") -> dict[int, float]:
    lines = [json.loads(line) for line in (run / rundir.METRICS_NAME).read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if m["type"] == kind}


def header(path: Path) -> bytes:
    """A safetensors file's JSON header: every key's dtype, shape and byte offsets."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return data[8 : 8 + size]


def assert_same_tensors(a: Path, b: Path, atol: float = 1e-6) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(tb[key], ta[key], atol=atol, rtol=0)


# --------------------------------------------------------------------------------------------------
# the choice and the refusals


def test_choose_is_plain_on_one_process_and_auto_shards_a_base_that_leaves_no_room():
    assert distributed.choose("fsdp", 1, 10 * GiB, GiB) == "single"
    assert distributed.choose("ddp", 2, 10 * GiB, GiB) == "ddp"
    assert distributed.choose("fsdp", 2, 1, 10 * GiB) == "fsdp"
    assert distributed.choose("auto", 2, 6 * GiB, 10 * GiB) == "fsdp"  # over half of the device
    assert distributed.choose("auto", 2, 4 * GiB, 10 * GiB) == "ddp"
    assert distributed.choose("auto", 2, 100 * GiB, None) == "ddp"  # unknown memory: no guess


@pytest.mark.parametrize(("arch", "path"), [("llama", "model.layers"), ("gpt2", "transformer.h")])
def test_the_decoder_layers_are_the_repeated_blocks(arch, path):
    model = tiny_model(arch)
    layers = distributed.decoder_layers(model)
    assert layers == list(model.get_submodule(path))


def test_a_bad_setting_is_refused_with_its_line(tmp_path, bases):
    path = write_recipe(tmp_path, bases["llama"], distributed="zero")
    with pytest.raises(UserError, match=r"recipe.yaml:\d+: train.distributed.*auto.*ddp.*fsdp"):
        load_recipe(path)


def test_rng_states_are_restored_per_process_and_not_across_a_different_count(caplog):
    torch.manual_seed(1)
    first = torch.get_rng_state()
    torch.manual_seed(2)
    second = torch.get_rng_state()
    saved = {"rng.torch.0": first, "rng.torch.1": second}
    distributed.restore_rng(saved, rank=1, processes=2, saved_processes=2)
    assert torch.equal(torch.get_rng_state(), second)
    distributed.restore_rng({"rng.torch": first}, rank=0, processes=1, saved_processes=1)  # older checkpoints
    assert torch.equal(torch.get_rng_state(), first)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    with caplog.at_level(logging.WARNING):
        distributed.restore_rng(saved, rank=0, processes=1, saved_processes=2)
    assert torch.equal(torch.get_rng_state(), before)
    assert "written by 2 processes, this run has 1" in caplog.text


# --------------------------------------------------------------------------------------------------
# two processes (slow)


@pytest.mark.slow
def test_fsdp_on_two_processes_trains_and_saves_as_one_process(tmp_path, bases):
    """5 steps with gradient accumulation: 2 processes at batch 2 == 1 process at batch 4 (same global
    batch): losses to 1e-5; the adapter to 1e-6, with the same keys, dtypes, shapes, offsets and config."""
    recipe = write_recipe(tmp_path, bases["llama"], eval_every=5)
    cli("train", str(recipe))
    two = tmp_path / "two"
    result = cli(
        "train", str(recipe), "--set", "train.batch_size=2", "--set", f"output_dir={two}", processes=2
    )
    assert "2 processes" in result.stdout and "fsdp" in result.stdout
    one = tmp_path / "one"
    assert list(losses(two).values()) == pytest.approx(list(losses(one).values()), abs=1e-5)
    assert len(losses(one, "eval")) == 2  # before the first step and after the last
    assert list(losses(two, "eval").values()) == pytest.approx(list(losses(one, "eval").values()), abs=1e-5)
    weights = adapter_files.WEIGHTS_NAME
    assert header(two / weights) == header(one / weights)
    assert (two / adapter_files.CONFIG_NAME).read_bytes() == (one / adapter_files.CONFIG_NAME).read_bytes()
    assert_same_tensors(one / weights, two / weights)
    # The checkpoint holds whole tensors (gathered), as one process's does, and each process's RNG state.
    step = Path("checkpoints") / "step-5" / rundir.OPTIMIZER_NAME
    gathered, single = load_file(str(two / step)), load_file(str(one / step))
    assert {k: v.shape for k, v in gathered.items() if not k.startswith("rng.")} == {
        k: v.shape for k, v in single.items() if not k.startswith("rng.")
    }
    assert {"rng.torch.0", "rng.torch.1"} <= gathered.keys()
    assert not torch.equal(gathered["rng.torch.0"], gathered["rng.torch.1"])


@pytest.mark.slow
def test_fsdp_resume_is_exact_and_moves_onto_one_process(tmp_path, bases):
    """Per-process dropout (rank-seeded, RNG saved per process): stopping after step 3 and resuming on 2
    processes gives the uninterrupted run to 1e-6, run after run; a 2-process checkpoint also resumes on
    one process (whole tensors in the file)."""
    method = {"name": "lora", "rank": 4, "target_modules": "all-linear", "dropout": 0.3}
    recipe = write_recipe(tmp_path, bases["llama"], method, batch_size=2, save_every=3, keep_checkpoints=5)
    full = tmp_path / "full"
    cli("train", str(recipe), "--set", f"output_dir={full}", processes=2)
    again = tmp_path / "again"
    cli("train", str(recipe), "--set", f"output_dir={again}", processes=2)
    assert losses(again) == losses(full)  # reproducible run to run

    def cut_at_step_3(name: str) -> Path:
        partial = tmp_path / name
        (partial / "checkpoints").mkdir(parents=True)
        shutil.copytree(full / "checkpoints" / "step-3", partial / "checkpoints" / "step-3")
        shutil.copy(full / rundir.METRICS_NAME, partial / rundir.METRICS_NAME)
        return partial

    partial = cut_at_step_3("partial")
    cli("train", str(recipe), "--set", f"output_dir={partial}", "--resume", processes=2)
    assert losses(partial) == pytest.approx(losses(full), abs=1e-6)
    assert_same_tensors(full / adapter_files.WEIGHTS_NAME, partial / adapter_files.WEIGHTS_NAME)

    alone = cut_at_step_3("alone")
    result = cli("train", str(recipe), "--set", f"output_dir={alone}", "--resume")
    assert "written by 2 processes, this run has 1" in result.stderr
    assert sorted(losses(alone)) == [1, 2, 3, 4, 5]


PREFERENCE = [
    {"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": f"Maybe {i + 1}, or {i}."}
    for i in range(24)
]


@pytest.mark.slow
def test_fsdp_computes_dpo_s_reference_on_every_process_and_recomputes_whole_layers(tmp_path, bases):
    """The reference log-probs are a sharded forward: every process computes them (none waits on the main
    process's cache); gradient checkpointing recomputes sharded layers. Both equal one process to 1e-5.
    5 eval pairs: the first process has 3 (two eval batches), the second 2 (one), and joins the first's
    second sharded forward with a stand-in batch that counts nowhere, rather than leave it waiting."""
    recipe = write_recipe(
        tmp_path,
        bases["llama"],
        validation=0.2,
        objective="dpo",
        gradient_checkpointing=True,
        max_steps=3,
        eval_every=3,
    )
    text = yaml.safe_load(recipe.read_text())
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PREFERENCE))
    text["data"].update(train=str(tmp_path / "pairs.jsonl"), format="preference")
    recipe.write_text(yaml.safe_dump(text))
    cli("train", str(recipe))
    two = tmp_path / "two"
    cli("train", str(recipe), "--set", "train.batch_size=2", "--set", f"output_dir={two}", processes=2)
    for kind in ("train", "eval"):
        one = losses(tmp_path / "one", kind)
        assert list(losses(two, kind).values()) == pytest.approx(list(one.values()), abs=1e-5)
    assert len(one) == 2  # eval before the first step and after the last


def test_fsdp_refuses_a_quantized_base_and_auto_falls_back_to_ddp(bases, monkeypatch):
    from types import SimpleNamespace

    from peftcli.models.load import load_model
    from peftcli.models.sources import resolve
    from peftcli.recipe import Recipe

    model = load_model(resolve(str(bases["llama"])), quantize="int8")
    launch = SimpleNamespace(num_processes=2, device=torch.device("cpu"), reduce=lambda t, op: t * 2)
    recipe = Recipe()
    recipe.train.distributed = "fsdp"
    with pytest.raises(FieldError, match="train.distributed: fsdp does not shard quantized"):
        distributed.resolve(recipe, launch, model)
    recipe.train.distributed = "auto"
    monkeypatch.setattr(distributed, "device_bytes", lambda *args: 1)  # no room: auto would shard
    assert distributed.resolve(recipe, launch, model) == "ddp"
