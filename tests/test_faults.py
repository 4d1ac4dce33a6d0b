"""The real CLI, driven through ordinary faults in subprocesses: signals, concurrent runs, a full disk
(`ulimit -f`), damaged files, bad input. Each asserts no traceback, the right exit code, and that the
previous good state is intact.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from tiny import save_tiny, tiny_model, write_gguf

ROOT = Path(__file__).resolve().parents[1]
ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"{2 * i}"},
        ]
    }
    for i in range(16)
]
pytestmark = pytest.mark.slow  # each case runs `peft` in a fresh process or two


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return str(save_tiny(tmp_path_factory.mktemp("base") / "llama", "llama"))


def peft(
    *args, cwd: Path, env: dict | None = None, file_limit: int | None = None, **popen
) -> subprocess.CompletedProcess:
    """`peft ARGS` in a fresh interpreter running this checkout; `file_limit`: `ulimit -f` in bytes."""

    def limit() -> None:
        if file_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PEFTCLI_CACHE": str(cwd / "cache"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "peftcli.cli", *map(str, args)],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600, preexec_fn=limit, **popen,
    )  # fmt: skip


def recipe(tmp_path: Path, base: str, name: str = "recipe.yaml", **train) -> Path:
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    text = {
        "model": {"name": base},
        "method": {"name": "lora", "rank": 4},
        "data": {"train": "data.jsonl", "format": "chat", "validation": 0.25, "max_length": 48},
        "train": {"max_steps": 4, "batch_size": 4, "learning_rate": 0.01, "seed": 0, **train},
        "output_dir": "run",
    }
    (tmp_path / name).write_text(yaml.safe_dump(text))
    return tmp_path / name


def clean(result: subprocess.CompletedProcess, code: int) -> None:
    """The command exited with `code`, and said what it had to say without a traceback."""
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def start(args, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PEFTCLI_CACHE": str(cwd / "cache")}
    return subprocess.Popen(
        [sys.executable, "-m", "peftcli.cli", *map(str, args)],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for_steps(out: Path, steps: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 300
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count('"train"') >= steps:
            return
        time.sleep(0.1)
    raise AssertionError(
        f"no {steps} steps: {proc.poll()} {proc.stderr.read() if proc.poll() is not None else ''}"
    )


# --------------------------------------------------------------------------------------------------
# Run directory integrity


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_checkpoints_and_the_hint_resumes_this_very_run(tmp_path, base, sig):
    path = recipe(tmp_path, base, max_steps=500)
    proc = start(["train", path, "--set", "output_dir=elsewhere", "--set", "train.eval_every=1000"], tmp_path)
    wait_for_steps(tmp_path / "elsewhere", 2, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert "peft train --resume elsewhere" in " ".join(stderr.split())  # the run, with its overrides
    steps = max(int(p.name.split("-")[1]) for p in (tmp_path / "elsewhere" / "checkpoints").glob("step-*"))
    done = peft("train", "elsewhere", "--resume", "--set", f"train.max_steps={steps + 1}", cwd=tmp_path)
    clean(done, 0)
    report = json.loads((tmp_path / "elsewhere" / "report.json").read_text())
    assert report["steps"] == steps + 1
    assert not (tmp_path / "run").exists()  # the recipe's own output_dir was never touched


def test_resume_refuses_a_changed_recipe_and_records_allowed_changes(tmp_path, base):
    path = recipe(tmp_path, base, max_steps=2)
    clean(peft("train", path, cwd=tmp_path), 0)
    before = snapshot(tmp_path / "run")
    changed = peft("train", path, "--resume", "--set", "method.rank=8", "--set", "train.seed=1", cwd=tmp_path)
    clean(changed, 2)
    assert "method.rank: 4 -> 8" in changed.stderr and "train.seed: 0 -> 1" in changed.stderr
    assert snapshot(tmp_path / "run") == before
    finished = peft("train", path, "--resume", cwd=tmp_path)
    clean(finished, 0)
    assert (
        "is complete (2 steps)" in " ".join(finished.stdout.split()) and snapshot(tmp_path / "run") == before
    )
    longer = peft("train", path, "--resume", "--set", "train.max_steps=3", cwd=tmp_path)
    clean(longer, 0)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"type": "resume", "step": 2, "changed": {"train.max_steps": [2, 3]}} in lines
    assert [r["step"] for r in lines if r["type"] == "train"] == [1, 2, 3]
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["train"]["max_steps"] == 3
    both = peft("train", path, "--resume", "--overwrite", cwd=tmp_path)
    clean(both, 2)
    assert "contradict" in both.stderr


def test_a_failed_overwrite_leaves_the_previous_run(tmp_path, base):
    path = recipe(tmp_path, base, max_steps=2)
    clean(peft("train", path, cwd=tmp_path), 0)
    before = snapshot(tmp_path / "run")
    # room for the data cache and the new run's first small files, none for its first checkpoint
    full = peft("train", path, "--overwrite", "--set", "train.seed=1", cwd=tmp_path, file_limit=20_000)
    clean(full, 2)
    assert "no room to write" in full.stderr
    assert snapshot(tmp_path / "run") == before


def test_an_overwrite_killed_before_its_first_checkpoint_is_undone_by_the_next_command(tmp_path, base):
    path = recipe(tmp_path, base, max_steps=2)
    clean(peft("train", path, cwd=tmp_path), 0)
    before = snapshot(tmp_path / "run")
    slow = recipe(tmp_path, base, name="slow.yaml", max_steps=500, save_every=400)
    proc = start(["train", slow, "--overwrite"], tmp_path)
    while not (tmp_path / "run" / ".replaced").exists() and proc.poll() is None:
        time.sleep(0.1)  # the previous run's metrics.jsonl is there until the new run sets it aside
    wait_for_steps(tmp_path / "run", 1, proc)
    proc.kill()  # kill -9: nothing of its own runs
    proc.communicate()
    assert (tmp_path / "run" / ".replaced").is_dir()
    again = peft("train", path, "--resume", cwd=tmp_path)
    clean(again, 0)
    assert "put back the run" in again.stdout
    assert snapshot(tmp_path / "run") == before


def test_a_second_run_on_the_same_dir_is_refused_and_a_stale_lock_taken_over(tmp_path, base):
    path = recipe(tmp_path, base, max_steps=500)
    proc = start(["train", path], tmp_path)
    wait_for_steps(tmp_path / "run", 1, proc)
    second = peft("train", path, "--overwrite", cwd=tmp_path)
    clean(second, 2)
    assert f"pid {proc.pid}" in second.stderr and "in use" in second.stderr
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    step = max(int(p.name.split("-")[1]) for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    # a lock left by a process that died (pids never reach 2**22 + 7)
    (tmp_path / "run" / ".peftcli.lock").write_text(
        json.dumps({"pid": 2**22 + 7, "host": os.uname().nodename})
    )
    clean(peft("train", path, "--resume", "--set", f"train.max_steps={step + 1}", cwd=tmp_path), 0)
    assert not (tmp_path / "run" / ".peftcli.lock").exists()


def test_a_refused_resume_changes_nothing(tmp_path, base):
    path = recipe(tmp_path, base, max_steps=3)
    clean(peft("train", path, cwd=tmp_path), 0)
    before = snapshot(tmp_path / "run")
    fewer = peft("train", path, "--resume", "--set", "train.max_steps=2", cwd=tmp_path)  # below the 3 trained
    clean(fewer, 2)
    assert "has trained 3 steps already" in fewer.stderr
    assert snapshot(tmp_path / "run") == before  # metrics.jsonl, recipe.yaml and report.json as they were


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, base):
    path = recipe(tmp_path, base, max_steps=4, save_every=1, keep_checkpoints=3)
    clean(peft("train", path, "--set", "train.max_steps=3", cwd=tmp_path), 0)
    optimizer = tmp_path / "run" / "checkpoints" / "step-3" / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    resumed = peft("train", path, "--resume", cwd=tmp_path)
    clean(resumed, 0)
    assert "passing over checkpoint" in resumed.stderr and "step-3" in resumed.stderr
    assert "resuming from" in resumed.stdout and "step-2" in resumed.stdout


# --------------------------------------------------------------------------------------------------
# Bounded resources, paths, permissions


def test_a_batch_larger_than_the_data_is_refused(tmp_path, base):
    result = peft("train", recipe(tmp_path, base), "--set", "train.batch_size=100000", cwd=tmp_path)
    clean(result, 2)
    assert "train.batch_size: 100000" in result.stderr and "12 training examples" in result.stderr
    assert not (tmp_path / "run" / "recipe.yaml").exists()


def test_output_dir_expands_home_and_files_follow_the_umask(tmp_path, base):
    home = tmp_path / "home"
    home.mkdir()
    clean(
        peft(
            "train",
            recipe(tmp_path, base, max_steps=1),
            "--set",
            "output_dir=~/out",
            cwd=tmp_path,
            env={"HOME": str(home)},
        ),
        0,
    )
    out = home / "out"
    assert (out / "adapter_model.safetensors").is_file() and not (tmp_path / "~").exists()
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "recipe.yaml",
        "report.json",
        "metrics.jsonl",
    ):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~_umask(), name
    merged = peft("merge", out, "--output", "~/merged", cwd=tmp_path, env={"HOME": str(home)})
    clean(merged, 0)
    assert stat.S_IMODE((home / "merged").stat().st_mode) == 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_output_dir_that_cannot_be_written_is_refused_before_loading(tmp_path, base):
    path = recipe(tmp_path, base)
    (tmp_path / "file").write_text("x")
    under_file = peft("train", path, "--set", "output_dir=file/run", cwd=tmp_path)
    clean(under_file, 2)
    assert "file is a file" in under_file.stderr and "model: loading" not in under_file.stdout
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        read_only = peft("train", path, "--set", "output_dir=ro/run", cwd=tmp_path)
        clean(read_only, 2)
        assert "not writable" in read_only.stderr


def test_a_full_disk_while_merging_leaves_nothing_behind(tmp_path, base):
    clean(peft("train", recipe(tmp_path, base, max_steps=1), cwd=tmp_path), 0)
    full = peft("merge", "run", "--output", "merged", cwd=tmp_path, file_limit=30_000)
    clean(full, 2)
    assert "no room to write the merged model" in full.stderr
    assert not any(p.name.startswith((".merged", "merged")) for p in tmp_path.iterdir())


def test_a_cache_that_cannot_be_written_is_a_warning(tmp_path, base):
    path = recipe(tmp_path, base, max_steps=1)
    (tmp_path / "cache").write_text("a file where the cache dir would go")
    result = peft("train", path, cwd=tmp_path)
    clean(result, 0)
    assert "not cached" in result.stderr


# --------------------------------------------------------------------------------------------------
# Damaged or wrong files: one line, exit 2


def test_damaged_bases_and_data_are_named(tmp_path, base):
    path = recipe(tmp_path, base)
    garbage = tmp_path / "garbage"
    shutil.copytree(base, garbage)
    (garbage / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    pickle_only = tmp_path / "pickle"
    shutil.copytree(base, pickle_only)
    (pickle_only / "model.safetensors").unlink()
    torch.save(tiny_model("llama").state_dict(), pickle_only / "pytorch_model.bin")
    for model, expected in ((garbage, "cannot load"), (pickle_only, "pickle")):
        result = peft("train", path, "--set", f"model.name={model}", cwd=tmp_path)
        clean(result, 2)
        assert expected in result.stderr and str(model.name) in result.stderr
    (tmp_path / "text.parquet").write_text("this is not parquet")
    parquet = peft("train", path, "--set", "data.train=text.parquet", cwd=tmp_path)
    clean(parquet, 2)
    assert "could not read it as parquet" in parquet.stderr


def test_a_gguf_cut_inside_its_header_is_refused_by_count_and_train(tmp_path, base):
    from gguf import GGUFValueType

    whole = Path(write_gguf(tmp_path / "whole.gguf", {"llama.block_count": (GGUFValueType.UINT32, 2)}))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[:60])
    count = peft("count", cut, cwd=tmp_path)
    clean(count, 2)
    assert "cut.gguf" in count.stderr
    train = peft("train", recipe(tmp_path, base), "--set", f"model.name={cut}", cwd=tmp_path)
    clean(train, 2)
    assert "cut.gguf" in train.stderr


def test_an_encoder_is_refused_as_a_causal_lm(tmp_path):
    bert = save_tiny(tmp_path / "bert", "bert")
    result = peft("train", recipe(tmp_path, str(bert)), cwd=tmp_path)
    clean(result, 2)
    assert "model.task: causal-lm needs a decoder" in result.stderr


def test_a_run_dir_never_runs_code_of_its_own(tmp_path, base):
    clean(peft("train", recipe(tmp_path, base, max_steps=1), cwd=tmp_path), 0)
    run = tmp_path / "run"
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('x')\n"
    (run / "evil.py").write_text(code + "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    config = json.loads((run / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    (run / "tokenizer_config.json").write_text(json.dumps(config))
    result = peft(
        "generate", run, "--prompt", "hi", "--max-new-tokens", "2", cwd=tmp_path, stdin=subprocess.DEVNULL
    )
    assert not marker.exists()
    assert "Traceback" not in result.stderr and result.returncode in (0, 2), result.stderr


def test_classification_data_faults_are_named(tmp_path):
    bert = str(save_tiny(tmp_path / "bert", "bert"))
    rows = [{"text": f"trip {i}", "label": "good"} for i in range(8)]
    (tmp_path / "one.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bad = [{"text": ["trip", str(i)], "label": "good" if i % 2 else "bad"} for i in range(8)]
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    two = [{"text": f"trip {i}", "label": "good" if i % 2 else "bad"} for i in range(8)]
    (tmp_path / "two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in two))
    base_args = ["--set", "model.task=sequence-classification", "--set", "data.format=classification"]
    path = recipe(tmp_path, bert)
    single = peft("train", path, *base_args, "--set", "data.train=one.jsonl", cwd=tmp_path)
    clean(single, 2)
    assert "every row has the label `good`" in single.stderr
    cell = peft(
        "train",
        path,
        *base_args,
        "--set",
        "data.train=bad.jsonl",
        "--set",
        "data.validation=null",
        cwd=tmp_path,
    )
    clean(cell, 2)
    assert "line 1: column `text`: expected text, got ['trip', '0']" in cell.stderr  # JSON Lines: its line
    labels = peft(
        "train",
        path,
        *base_args,
        "--set",
        "data.train=two.jsonl",
        "--set",
        "model.num_labels=5",
        cwd=tmp_path,
    )
    clean(labels, 2)
    assert "model.num_labels: 5, but the data has 2 labels (bad, good)" in labels.stderr


def test_count_shows_every_method_and_why_one_does_not_apply(tmp_path, base):
    result = peft("count", base, "-m", "lora", "-m", "bitfit", "--json", cwd=tmp_path)
    clean(result, 0)
    rows = json.loads(result.stdout)
    assert rows[0]["method"] == "lora" and rows[0]["trainable"] > 0
    assert rows[1]["method"] == "bitfit" and "no bias terms" in rows[1]["error"]
