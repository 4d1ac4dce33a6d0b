"""The output dir of a training run: what it holds, checkpoints, metrics.jsonl, and replacing a run safely.

Every write is atomic (a temp file or dir renamed into place), so the dir holds the previous good state or
the next one, never half of one. `--overwrite` sets the previous run aside (``.replaced/``) and discards it
only once the new run has written its first good state (a checkpoint or its adapter); a new run that fails
before that, or is killed (the next command finds ``.replaced/``), gets the previous run put back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from peftcli import fileio
from peftcli.errors import UserError
from peftcli.runs.adapter import CONFIG_NAME, LABELS_NAME, RECIPE_NAME, WEIGHTS_NAME

log = logging.getLogger(__name__)

# A checkpoint's training state (train/state.py): complete once STATE_NAME is written, which comes last.
OPTIMIZER_NAME = "optimizer.safetensors"
STATE_NAME = "trainer_state.json"
METRICS_NAME = "metrics.jsonl"
REPORT_NAME = "report.json"
SET_ASIDE = ".replaced"  # the previous run, while an --overwrite run has not yet written a good state

# Files whose presence means output_dir already holds a run.
RUN_MARKERS = (RECIPE_NAME, METRICS_NAME, "checkpoints", CONFIG_NAME, REPORT_NAME)
RUN_FILES = RUN_MARKERS + ("report.md", "loss.png", WEIGHTS_NAME, LABELS_NAME)


def check_writable(output_dir: Path) -> None:
    """Refuse, before anything is loaded, an output_dir that cannot be created or written to."""
    if output_dir.is_file():
        raise UserError(f"output_dir {output_dir} is a file; output_dir must be a directory")
    existing = output_dir
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.is_file():
        raise UserError(f"output_dir {output_dir} cannot be made: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output_dir {output_dir}: {existing} is not writable (permission denied)")


def check_output_dir(
    output_dir: Path, resume: bool, overwrite: bool, readable: Callable[[Path], str | None] | None = None
) -> Path | None:
    """Refuse to clobber another run. Returns the newest usable checkpoint when resuming (`readable`: see
    latest_checkpoint)."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: continue the run, or replace it")
    if resume:
        latest = latest_checkpoint(output_dir, readable)
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


# --------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of the complete checkpoints, oldest first."""
    found = []
    for path in (output_dir / "checkpoints").glob("step-*"):
        step = path.name.removeprefix("step-")
        if step.isdigit() and (path / STATE_NAME).is_file():
            found.append((int(step), path))
    return sorted(found)


def latest_checkpoint(output_dir: Path, readable: Callable[[Path], str | None] | None = None) -> Path | None:
    """The newest complete checkpoint; with `readable` (-> None, or why it cannot be read), the newest that
    reads, each one passed over said in a note."""
    for _, path in reversed(checkpoints(output_dir)):
        problem = readable(path) if readable else None
        if problem is None:
            return path
        log.warning("passing over checkpoint %s: %s", path, problem)
    return None


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
    for _, old in checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_tokenizer(tokenizer, directory: Path) -> None:
    """The tokenizer files (chat template included), each moved into place whole."""
    tmp = directory / ".tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():
            fileio.make_readable(f)
            f.replace(directory / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Replacing a run (--overwrite)


def set_aside(output_dir: Path) -> None:
    """Move the previous run's files into .replaced/ (renames: nothing is copied or lost)."""
    aside = output_dir / SET_ASIDE
    aside.mkdir()
    for name in RUN_FILES:
        if (output_dir / name).exists():
            (output_dir / name).rename(aside / name)


def discard_set_aside(output_dir: Path) -> None:
    """The new run has a good state of its own: the previous run goes."""
    shutil.rmtree(output_dir / SET_ASIDE, ignore_errors=True)


def restore_set_aside(output_dir: Path) -> bool:
    """Put the previous run back in place of a replacement that never reached a good state; returns
    whether there was one to put back."""
    aside = output_dir / SET_ASIDE
    if not aside.is_dir():
        return False
    clear_previous_run(output_dir)
    for path in aside.iterdir():
        path.rename(output_dir / path.name)
    aside.rmdir()
    return True


def clear_previous_run(output_dir: Path) -> None:
    """Remove what a run writes, and nothing else the user keeps there."""
    for name in RUN_FILES:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


# --------------------------------------------------------------------------------------------------
# metrics.jsonl


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended as training goes.

    Resuming from step N drops the lines after N (the steps are redone), but only when the resumed run
    logs its first line: a resume that fails before it leaves the file as it was. That first line is a
    ``{"type": "resume", "step": N}`` record (with the recipe changes the resume made, if any).
    """

    def __init__(self, path: Path, keep_until_step: int | None = None, changed: dict | None = None):
        """Start the file afresh, or (resuming) keep lines up to `keep_until_step` from the first append."""
        self.path = path
        self._resumed = None
        if keep_until_step is None:
            fileio.write_text(path, "")
        else:
            self._resumed = {
                "type": "resume",
                "step": keep_until_step,
                **({"changed": changed} if changed else {}),
            }

    def append(self, record: dict) -> None:
        if self._resumed is not None:
            kept = [r for r in self.read() if r["step"] <= self._resumed["step"]] + [self._resumed]
            fileio.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            self._resumed = None
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        """The records (a line cut short by a crash is left out)."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records
