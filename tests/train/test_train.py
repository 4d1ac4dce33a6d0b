"""`peft train` end to end on tiny models: files written, reload, resume, Ctrl-C, NaN guard, two processes."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import batch, launch_two_processes, tiny_tokenizer
from typer.testing import CliRunner

from peftcli.errors import UserError
from peftcli.infer import run_generate, run_predict
from peftcli.methods import lora_init
from peftcli.models.load import load_model
from peftcli.models.sources import resolve
from peftcli.recipe import load_recipe
from peftcli.runs import adapter as checkpoint
from peftcli.runs import rundir
from peftcli.train import loop, objectives
from peftcli.train.run import TrainingStopped, run

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()

CHAT = [
    {
        "messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"It is {2 * i}."},
        ]
    }
    for i in range(24)
]
TEXT = [{"text": f"The number {i} comes after {i - 1}."} for i in range(24)]
INSTRUCTION = [
    {"instruction": "Double the number.", "input": str(i), "output": str(2 * i)} for i in range(24)
]
PREFERENCE = [
    {"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": f"Maybe {i + 1}, or {i}."}
    for i in range(24)
]
KTO = [
    {
        "prompt": f"What is {i} plus {i}?",
        "completion": f"It is {2 * i}." if i % 3 else f"About {i}.",
        "label": i % 3 > 0,
    }
    for i in range(24)
]
ROWS = {"preference": PREFERENCE, "kto": KTO}
CLASSES = [
    {"text": f"{'good' if i % 2 else 'bad'} trip number {i}", "label": "pos" if i % 2 else "neg"}
    for i in range(24)
]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTCLI_CACHE", str(tmp_path / "cache"))


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_recipe(
    tmp_path: Path, model: str, rows: list[dict], fmt: str, method: dict | None = None, **train_overrides
) -> Path:
    task = "sequence-classification" if fmt == "classification" else "causal-lm"
    recipe = {
        "model": {"name": model, "task": task},
        "method": method or {"name": "lora", "rank": 4},
        "data": {
            "train": write_jsonl(tmp_path / "data.jsonl", rows),
            "format": fmt,
            "validation": 0.25,
            "max_length": 64,
        },
        "train": {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-2, "seed": 0, **train_overrides},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def train_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "peftcli.cli", "train", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )


def logits_of(run_dir: Path, base: str, task: str):
    model = load_model(resolve(base), task)
    model, _ = checkpoint.load_adapter(model, run_dir)
    with torch.no_grad():
        return model(**batch()).logits


# --------------------------------------------------------------------------------------------------


METHOD_CASES = [
    ("llama", "chat", {"name": "lora", "rank": 4, "target_modules": "all-linear"}),
    ("gpt2", "text", {"name": "lora", "rank": 4}),
    ("llama", "instruction", {"name": "prefix-tuning", "num_virtual_tokens": 4}),
    ("gpt2", "chat", {"name": "prompt-tuning", "num_virtual_tokens": 4}),
    ("llama", "text", {"name": "adapter", "placement": "houlsby"}),
    ("bert", "classification", {"name": "bitfit"}),
    ("bert", "classification", {"name": "lora", "rank": 4}),
    ("llama", "chat", {"name": "ia3"}),
    ("bert", "classification", {"name": "ia3"}),
    ("gpt2", "text", {"name": "vera", "rank": 16}),
    ("bert", "classification", {"name": "vera", "rank": 16}),
    ("llama", "instruction", {"name": "loha", "rank": 4}),
    ("bert", "classification", {"name": "loha", "rank": 4}),
    ("gpt2", "chat", {"name": "lokr", "rank": 4}),
    ("bert", "classification", {"name": "lokr", "rank": 4}),
    ("llama", "chat", {"name": "oft", "block_size": 8}),
    ("bert", "classification", {"name": "oft", "block_size": 8}),
    ("llama", "chat", {"name": "lora", "rank": 4, "target_modules": "all-linear", "use_dora": True}),
    ("bert", "classification", {"name": "lora", "rank": 4, "use_dora": True, "loraplus_lr_ratio": 4.0}),
    # trained on the residual base, saved converted: the reload onto the original base must agree
    ("gpt2", "text", {"name": "lora", "rank": 4, "init": "pissa", "loraplus_lr_ratio": 4.0}),
    ("bert", "classification", {"name": "lora", "rank": 4, "init": "olora"}),
]


def _case_id(value) -> str:
    if isinstance(value, str):
        return value
    options = [k for k in ("use_dora", "loraplus_lr_ratio") if value.get(k)] + [value.get("init", "")]
    return "-".join([value["name"], *filter(None, options)])


@pytest.mark.parametrize(("arch", "fmt", "method"), METHOD_CASES, ids=_case_id)
def test_train_writes_a_reloadable_run(tmp_path, bases, arch, fmt, method):
    rows = {"chat": CHAT, "text": TEXT, "instruction": INSTRUCTION, "classification": CLASSES}[fmt]
    recipe = load_recipe(write_recipe(tmp_path, bases[arch], rows, fmt, method))
    summary = run(recipe)
    out = Path(recipe.output_dir)
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "recipe.yaml",
        "metrics.jsonl",
        "report.json",
        "report.md",
        "tokenizer_config.json",
    ):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == method["name"] and report["steps"] == 4 == summary["steps"]
    assert 0 < report["params"]["trainable"] < report["params"]["total"]
    assert report["eval"]["before"]["loss"] > 0 and report["eval"]["after"]["loss"] > 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["type"] == "train"] == [1, 2, 3, 4]
    # The adapter reloads onto a fresh base and reproduces the trained model's eval loss.
    reloaded = loop.setup(
        load_recipe(out / "recipe.yaml", [f"output_dir={tmp_path / 'again'}", f"method.from_adapter={out}"])
    )
    assert loop.evaluate(reloaded)["loss"] == pytest.approx(report["eval"]["after"]["loss"], abs=1e-5)
    check_generates(out, fmt)


def check_generates(out: Path, fmt: str) -> None:
    if fmt == "classification":
        assert json.loads((out / "labels.json").read_text()) == ["neg", "pos"]
        assert run_predict(out, "good trip").split(" ")[0] in ("neg", "pos")
    else:  # every causal-LM method generates from its run dir
        assert isinstance(run_generate(out, "What is 3 plus 3?", max_new_tokens=3), str)


# Every method of the registry trains with a preference objective (DPO's reference switches the method off),
# and every objective trains with LoRA: the run reloads, evaluates and generates like an SFT run.
PREFERENCE_CASES = [
    ("llama", {"name": "lora", "rank": 4, "target_modules": "all-linear"}, "dpo"),
    ("gpt2", {"name": "lora", "rank": 4}, "orpo"),
    ("llama", {"name": "lora", "rank": 4}, "simpo"),
    ("llama", {"name": "lora", "rank": 4}, "kto"),
    ("llama", {"name": "prefix-tuning", "num_virtual_tokens": 4}, "dpo"),
    ("gpt2", {"name": "prompt-tuning", "num_virtual_tokens": 4}, "kto"),
    ("llama", {"name": "adapter", "placement": "houlsby"}, "dpo"),
    ("gpt2", {"name": "bitfit"}, "dpo"),
    ("llama", {"name": "lora", "rank": 4, "use_dora": True}, "dpo"),
    ("llama", {"name": "ia3"}, "dpo"),
    ("gpt2", {"name": "vera", "rank": 16}, "kto"),
    ("llama", {"name": "oft", "block_size": 8}, "dpo"),
]


@pytest.mark.parametrize(
    ("arch", "method", "objective"), PREFERENCE_CASES, ids=lambda v: v if isinstance(v, str) else v["name"]
)
def test_preference_objectives_train_every_method(tmp_path, bases, arch, method, objective):
    fmt = "kto" if objective == "kto" else "preference"
    recipe = load_recipe(
        write_recipe(tmp_path, bases[arch], ROWS[fmt], fmt, method, objective=objective, learning_rate=3e-2)
    )
    run(recipe)
    out = Path(recipe.output_dir)
    report = json.loads((out / "report.json").read_text())
    assert report["objective"] == objective and report["steps"] == 4
    before, after = report["eval"]["before"], report["eval"]["after"]
    for key in ("loss", "reward_margin", "accuracy", "chosen_logps", "rejected_logps"):
        assert math.isfinite(before[key]) and math.isfinite(after[key]), key
    assert after["loss"] < before["loss"] and after["reward_margin"] > before["reward_margin"]
    # A fresh adapter of these is the identity: the policy starts as the reference, with no margin (virtual
    # tokens are not the identity, so prefix and prompt tuning start off it).
    if objective in ("dpo", "kto") and method["name"] in ("lora", "adapter", "bitfit"):
        assert before["reward_margin"] == pytest.approx(0.0, abs=1e-4)
        assert before["accuracy"] == pytest.approx(0.5, abs=0.2)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"reward_margin", "accuracy"} <= metrics[-1].keys() and "reward margin" in (
        out / "report.md"
    ).read_text()
    # The adapter reloads onto a fresh base: the policy's log-probs are the trained model's.
    again = load_recipe(
        out / "recipe.yaml", [f"output_dir={tmp_path / 'again'}", f"method.from_adapter={out}"]
    )
    reloaded = loop.evaluate(loop.setup(again))
    for key in ("chosen_logps", "rejected_logps"):
        assert reloaded[key] == pytest.approx(after[key], abs=1e-4)
    check_generates(out, fmt)


# Each with some randomness in training (dropout of inputs, rows, whole layers): the RNG state must be
# restored too; and each objective with state of its own (DPO's cached reference, KTO's reference point).
LORA_DROPOUT = {"name": "lora", "rank": 4, "dropout": 0.1}
NOT_RESULTS = ("lr", "tokens_per_second", "step_seconds")  # settings and timings, not results
OBJECTIVE_CASES = [("chat", "sft"), ("preference", "dpo"), ("kto", "kto")]
RESUME_CASES = [
    ("chat", "sft", LORA_DROPOUT),
    ("preference", "dpo", LORA_DROPOUT),
    ("kto", "kto", LORA_DROPOUT),
    ("chat", "sft", {"name": "lora", "rank": 4, "dropout": 0.1, "use_dora": True, "loraplus_lr_ratio": 4.0}),
    # the checkpoint holds the initial factors the residual base is rebuilt from
    ("chat", "sft", {"name": "lora", "rank": 4, "init": "pissa_niter_2", "loraplus_lr_ratio": 4.0}),
    ("chat", "sft", {"name": "ia3"}),
    ("chat", "sft", {"name": "vera", "rank": 8, "dropout": 0.1}),
    ("chat", "sft", {"name": "loha", "rank": 2, "rank_dropout": 0.2, "module_dropout": 0.2}),
    ("chat", "sft", {"name": "lokr", "rank": 2, "rank_dropout": 0.2, "rank_dropout_scale": True}),
    ("chat", "sft", {"name": "oft", "block_size": 8, "block_share": True}),
]


@pytest.mark.parametrize(("fmt", "objective", "method"), RESUME_CASES, ids=_case_id)
def test_resume_reproduces_the_uninterrupted_run(tmp_path, bases, fmt, objective, method, monkeypatch):
    path = write_recipe(
        tmp_path,
        bases["llama"],
        ROWS.get(fmt, CHAT),
        fmt,
        method,
        max_steps=6,
        save_every=3,
        gradient_accumulation=2,
        batch_size=2,
        objective=objective,
    )
    run(load_recipe(path))
    out = tmp_path / "run"
    full = load_file(str(out / checkpoint.WEIGHTS_NAME))
    # Keep only the step-3 checkpoint, as if the run had died after it.
    partial = tmp_path / "partial"
    (partial / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step-3", partial / "checkpoints" / "step-3")
    shutil.copy(out / "metrics.jsonl", partial / "metrics.jsonl")
    if "init" in method:  # the resumed run starts from the checkpoint's factors, not a new decomposition

        def no_decomposition(*args):
            raise AssertionError("decomposed the base weight again")

        monkeypatch.setattr(lora_init, "initial_factors", no_decomposition)
    run(load_recipe(path, [f"output_dir={partial}"]), resume=True)
    resumed = load_file(str(partial / checkpoint.WEIGHTS_NAME))
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=0)
    steps = [
        json.loads(line)["step"]
        for line in (partial / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["type"] == "train"
    ]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_changed_learning_rate_ratio(tmp_path, bases):
    method = {"name": "lora", "rank": 4, "loraplus_lr_ratio": 4.0}
    path = write_recipe(tmp_path, bases["llama"], CHAT, "chat", method, max_steps=2, save_every=1)
    run(load_recipe(path))
    for change in ("method.loraplus_lr_ratio=8.0", "method.loraplus_lr_ratio=null"):
        with pytest.raises(UserError, match="cannot change: method.loraplus_lr_ratio: 4.0 -> "):
            run(load_recipe(path, [change, "train.max_steps=3"]), resume=True)


@pytest.mark.parametrize("init", ["kaiming", "pissa"])  # pissa reads the checkpoint before the model loads
def test_resume_passes_over_a_truncated_checkpoint(tmp_path, bases, init, caplog):
    # PiSSA's initial factors live in the checkpoint's optimizer file: the older checkpoint's must serve
    method = {"name": "lora", "rank": 4, "init": init}
    path = write_recipe(tmp_path, bases["llama"], CHAT, "chat", method, max_steps=2, save_every=1)
    run(load_recipe(path))
    optimizer = rundir.latest_checkpoint(tmp_path / "run") / rundir.OPTIMIZER_NAME
    optimizer.write_bytes(optimizer.read_bytes()[:1000])
    run(load_recipe(path, ["train.max_steps=3"]), resume=True)
    assert "passing over checkpoint" in caplog.text and "step-2" in caplog.text
    assert rundir.latest_checkpoint(tmp_path / "run").name == "step-3"


def test_loraplus_first_step_moves_b_ratio_times_further(tmp_path, bases):
    # B starts at 0 and A gets no gradient at step 1; Adam's first update is lr * g / |g| per element.
    lr, ratio = 1e-3, 8.0
    method = {"name": "lora", "rank": 4, "loraplus_lr_ratio": ratio}
    path = write_recipe(
        tmp_path, bases["llama"], CHAT, "chat", method, max_steps=1, learning_rate=lr, scheduler="constant"
    )
    run(load_recipe(path))
    state = load_file(str(tmp_path / "run" / checkpoint.WEIGHTS_NAME))
    b_moves = [t.abs().max().item() for k, t in state.items() if "lora_B" in k]
    assert b_moves and all(move == pytest.approx(ratio * lr, rel=1e-3) for move in b_moves)


def test_training_from_an_adapter_keeps_the_recipe_s_loraplus_ratio(tmp_path, bases):
    path = write_recipe(tmp_path, bases["llama"], CHAT, "chat", max_steps=1)
    run(load_recipe(path))
    again = [f"method.from_adapter={tmp_path / 'run'}", "method.loraplus_lr_ratio=8.0"]
    s = loop.setup(load_recipe(path, [*again, f"output_dir={tmp_path / 'again'}"]))
    assert s.recipe.method.loraplus_lr_ratio == 8.0 and s.recipe.method.rank == 4
    assert sorted({g["lr_scale"] for g in s.optimizer.param_groups}) == [1.0, 8.0]


@pytest.mark.parametrize(
    ("arch", "fmt", "rows"), [("llama", "chat", CHAT), ("bert", "classification", CLASSES)], ids=["lm", "cls"]
)
def test_the_cli_trains_merges_and_uses_dora_with_pissa_and_loraplus(tmp_path, bases, arch, fmt, rows):
    method = {"name": "lora", "rank": 4, "use_dora": True, "init": "pissa", "loraplus_lr_ratio": 4.0}
    path = write_recipe(tmp_path, bases[arch], rows, fmt, method, max_steps=2)
    trained = train_cli(str(path))
    assert trained.returncode == 0, trained.stderr[-2000:]
    out = tmp_path / "run"
    saved = json.loads((out / checkpoint.CONFIG_NAME).read_text())
    assert (saved["r"], saved["use_dora"], saved["init_lora_weights"]) == (8, True, True)
    merged = subprocess.run(
        [sys.executable, "-m", "peftcli.cli", "merge", str(out), "--output", str(tmp_path / "merged")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert merged.returncode == 0 and "check: max |logit difference|" in merged.stdout, merged.stderr[-2000:]
    if fmt == "classification":
        assert run_predict(out, "good trip").split(" ")[0] in ("neg", "pos")
    else:
        assert isinstance(run_generate(out, "What is 3 plus 3?", max_new_tokens=3), str)


def test_existing_run_is_never_overwritten_silently(tmp_path, bases):
    path = write_recipe(tmp_path, bases["gpt2"], TEXT, "text", max_steps=1)
    assert train_cli(str(path)).returncode == 0
    before = (tmp_path / "run" / checkpoint.WEIGHTS_NAME).read_bytes()
    again = train_cli(str(path))
    assert again.returncode == 2
    assert "--resume" in again.stderr and "--overwrite" in again.stderr and "Traceback" not in again.stderr
    assert (tmp_path / "run" / checkpoint.WEIGHTS_NAME).read_bytes() == before
    assert train_cli(str(path), "--overwrite", "--set", "train.seed=1").returncode == 0
    assert (tmp_path / "run" / checkpoint.WEIGHTS_NAME).read_bytes() != before
    missing = train_cli(str(path), "--resume", "--set", f"output_dir={tmp_path / 'empty'}")
    assert missing.returncode == 2 and "no checkpoint" in missing.stderr


def test_nan_loss_stops_and_keeps_the_last_good_adapter(tmp_path, bases, monkeypatch):
    recipe = load_recipe(write_recipe(tmp_path, bases["llama"], CHAT, "chat", max_steps=5))
    real = objectives.Supervised.loss
    calls = {"train": 0}

    def poisoned(self, model, batch, totals):
        calls["train"] += 1
        loss = real(self, model, batch, totals)
        return loss * float("nan") if calls["train"] == 3 else loss  # the third optimizer step's loss

    monkeypatch.setattr(objectives.Supervised, "loss", poisoned)
    with pytest.raises(TrainingStopped, match="non-finite loss .* step 3") as info:
        run(recipe)
    assert info.value.exit_code == 1
    out = Path(recipe.output_dir)
    adapter = load_file(str(out / checkpoint.WEIGHTS_NAME))
    assert all(torch.isfinite(t).all() for t in adapter.values())
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 2 and "non-finite" in report["stopped"]


def test_ctrl_c_checkpoints_then_resume_finishes(tmp_path, bases):
    path = write_recipe(tmp_path, bases["llama"], CHAT, "chat", max_steps=400, eval_every=None)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "peftcli.cli", "train", str(path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count('"train"') >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    saved = rundir.latest_checkpoint(out)
    assert saved is not None
    step = int(saved.name.split("-")[1])
    assert 2 <= step < 400
    done = train_cli(str(path), "--resume", "--set", f"train.max_steps={step + 2}")
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "report.json").read_text())["steps"] == step + 2


def test_bad_data_is_refused_before_the_model_loads(tmp_path, bases):
    path = write_recipe(tmp_path, bases["llama"], [{"prompt": "x"}] * 4, "text")
    result = train_cli(str(path))
    assert result.returncode == 2
    assert "text" in result.stderr and "prompt" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "objective"), OBJECTIVE_CASES, ids=[o for _, o in OBJECTIVE_CASES])
def test_two_processes_match_one(tmp_path, bases, fmt, objective):
    """accelerate launch with 2 CPU processes at batch 2 == one process at batch 4 (same global batch)."""
    one = write_recipe(
        tmp_path, bases["llama"], ROWS.get(fmt, CHAT), fmt, max_steps=3, batch_size=4, objective=objective
    )
    assert train_cli(str(one)).returncode == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        launch_two_processes(
            "train", str(one), "--set", "train.batch_size=2", "--set", f"output_dir={tmp_path / 'two'}"
        ),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes" in two.stdout

    # KTO's reference point is reduced over the processes, in training and in eval alike.
    def records(run):
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [m for m in lines if m["type"] in ("train", "eval")]

    one_records, two_records = records(tmp_path / "run"), records(tmp_path / "two")
    assert [m["type"] for m in two_records] == [m["type"] for m in one_records]
    assert "eval" in {m["type"] for m in one_records}
    for ours, theirs in zip(two_records, one_records, strict=True):
        keys = [k for k, v in theirs.items() if isinstance(v, float) and k not in NOT_RESULTS]
        assert {k: ours[k] for k in keys} == pytest.approx({k: theirs[k] for k in keys}, abs=1e-5, rel=1e-6)


def test_gradient_checkpointing_trains_lora_and_is_refused_for_prefix_tuning(tmp_path, bases):
    lora = write_recipe(tmp_path, bases["llama"], CHAT, "chat", max_steps=2, gradient_checkpointing=True)
    assert run(load_recipe(lora))["steps"] == 2
    (tmp_path / "prefix").mkdir()
    prefix = write_recipe(
        tmp_path / "prefix",
        bases["llama"],
        CHAT,
        "chat",
        {"name": "prefix-tuning"},
        gradient_checkpointing=True,
    )
    with pytest.raises(UserError, match="gradient checkpointing"):
        run(load_recipe(prefix))


def test_a_bf16_base_trains_fp32_lora_factors(tmp_path, bases):
    base = tmp_path / "bf16"
    load_model(resolve(bases["llama"])).to(torch.bfloat16).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    recipe = load_recipe(write_recipe(tmp_path, str(base), CHAT, "chat", max_steps=2, learning_rate=1e-4))
    recipe.model.dtype = "bfloat16"  # auto would pick fp32 on a machine without native bf16
    s = loop.setup(recipe)
    assert s.model.model.norm.weight.dtype == torch.bfloat16
    assert s.precision["dtype"] == "bfloat16" and s.precision["trainable_dtype"] == "float32"
    factors = {n: p for n, p in s.model.named_parameters() if p.requires_grad}
    assert factors and all(p.dtype == torch.float32 for p in factors.values())
    before = {n: p.detach().clone() for n, p in factors.items()}
    loop.fit(s, log=lambda record: None, save_checkpoint=lambda step: None)
    changed = [n for n, p in factors.items() if "lora_A" in n and not torch.equal(p, before[n])]
    assert changed  # in bf16, updates of ~lr would round away


def test_a_non_finite_gradient_stops_before_the_update(tmp_path, bases, monkeypatch):
    recipe = load_recipe(write_recipe(tmp_path, bases["llama"], CHAT, "chat", max_steps=4))
    s = loop.setup(recipe)
    param = next(p for p in s.model.parameters() if p.requires_grad)
    steps = {"n": 0}

    def poison(grad):
        steps["n"] += 1
        return grad * float("inf") if steps["n"] == 2 else grad

    param.register_hook(poison)
    before = None
    real_step = s.optimizer.step

    def step_and_snapshot(*args, **kwargs):
        nonlocal before
        result = real_step(*args, **kwargs)
        before = {n: p.detach().clone() for n, p in s.model.named_parameters() if p.requires_grad}
        return result

    monkeypatch.setattr(s.optimizer, "step", step_and_snapshot)
    summary = loop.fit(s, log=lambda record: None, save_checkpoint=lambda step: None)
    assert "non-finite gradient norm" in summary["stopped"] and summary["steps"] == 1
    for n, p in s.model.named_parameters():
        if p.requires_grad:
            assert torch.isfinite(p).all() and torch.equal(p, before[n])
