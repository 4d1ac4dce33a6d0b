"""The output directory of a run: refusing to clobber one, checkpoints, metrics.jsonl, tokenizer files."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from peftcli import fileio
from peftcli.errors import UserError
from peftcli.runs.adapter import CONFIG_NAME, LABELS_NAME, RECIPE_NAME, WEIGHTS_NAME

# A checkpoint's training state (train/state.py): complete once STATE_NAME is written, which comes last.
OPTIMIZER_NAME = "optimizer.safetensors"
STATE_NAME = "trainer_state.json"

# Files whose presence means output_dir already holds a run.
RUN_MARKERS = (RECIPE_NAME, "metrics.jsonl", "checkpoints", CONFIG_NAME, "report.json")
RUN_FILES = RUN_MARKERS + ("report.md", "loss.png", WEIGHTS_NAME, LABELS_NAME)


def check_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Refuse to clobber another run. Returns the newest checkpoint when resuming."""
    if resume:
        latest = latest_checkpoint(output_dir)
        if latest is None:
            raise UserError(f"--resume: no checkpoint under {output_dir / 'checkpoints'} to resume from")
        return latest
    existing = [m for m in RUN_MARKERS if (output_dir / m).exists()]
    if existing and not overwrite:
        raise UserError(
            f"output_dir {output_dir} already holds a run ({', '.join(existing)}); "
            "continue it with --resume or replace it with --overwrite"
        )
    return None


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of the complete checkpoints, oldest first."""
    found = []
    for path in (output_dir / "checkpoints").glob("step-*"):
        step = path.name.removeprefix("step-")
        if step.isdigit() and (path / STATE_NAME).is_file():
            found.append((int(step), path))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = _checkpoints(output_dir)
    return found[-1][1] if found else None


def write_checkpoint(output_dir: Path, step: int, keep: int, write: Callable[[Path], None]) -> Path:
    """checkpoints/step-N/: `write(tmp_dir)` fills a temp dir that is renamed into place, so a
    checkpoint is complete or absent; then all but the newest `keep` are removed."""
    root = output_dir / "checkpoints"
    final, tmp = root / f"step-{step}", root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for _, old in _checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_tokenizer(tokenizer, directory: Path) -> None:
    """The tokenizer files (chat template included), each moved into place whole."""
    tmp = directory / ".tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    for f in tmp.iterdir():
        f.replace(directory / f.name)
    tmp.rmdir()


def clear_previous_run(output_dir: Path) -> None:
    """--overwrite: remove what a run writes, and nothing else the user keeps there."""
    for name in RUN_FILES:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended as training goes."""

    def __init__(self, path: Path, keep_until_step: int | None = None):
        """Start the file afresh, or (resuming) keep the lines up to `keep_until_step`."""
        self.path = path
        kept = [r for r in self.read() if r["step"] <= keep_until_step] if keep_until_step is not None else []
        fileio.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line]
