import pytest

from peftcli.errors import UserError
from peftcli.runs import rundir


def _fake_checkpoint(directory):
    directory.mkdir(parents=True)
    (directory / rundir.STATE_NAME).write_text("{}")


def test_write_checkpoint_keeps_the_newest_and_leaves_no_temp_dir(tmp_path):
    for step in (2, 4, 6):
        rundir.write_checkpoint(tmp_path, step, keep=2, write=_fake_checkpoint)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-4", "step-6"]
    assert rundir.latest_checkpoint(tmp_path).name == "step-6"


def test_a_failed_checkpoint_write_leaves_the_previous_ones(tmp_path):
    rundir.write_checkpoint(tmp_path, 2, keep=2, write=_fake_checkpoint)

    def broken(directory):
        directory.mkdir(parents=True)
        raise OSError("disk full")

    with pytest.raises(OSError):
        rundir.write_checkpoint(tmp_path, 4, keep=2, write=broken)
    assert rundir.latest_checkpoint(tmp_path).name == "step-2"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-2"]  # no half-written step-4


def test_output_dir_with_a_run_is_refused_unless_resume_or_overwrite(tmp_path):
    assert rundir.check_output_dir(tmp_path, resume=False, overwrite=False) is None
    (tmp_path / "recipe.yaml").write_text("x: 1")
    with pytest.raises(UserError, match="--resume.*--overwrite"):
        rundir.check_output_dir(tmp_path, resume=False, overwrite=False)
    assert rundir.check_output_dir(tmp_path, resume=False, overwrite=True) is None
    with pytest.raises(UserError, match="no checkpoint"):
        rundir.check_output_dir(tmp_path, resume=True, overwrite=False)


def test_clear_previous_run_keeps_the_users_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "report.json").write_text("{}")
    _fake_checkpoint(tmp_path / "checkpoints" / "step-1")
    rundir.clear_previous_run(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_metrics_log_keeps_lines_up_to_the_resumed_step(tmp_path):
    log = rundir.MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        log.append({"type": "train", "step": step})
    resumed = rundir.MetricsLog(tmp_path / "metrics.jsonl", keep_until_step=2)
    assert [r["step"] for r in resumed.read()] == [
        1,
        2,
        3,
    ]  # a resume that fails before logging changes nothing
    resumed.append({"type": "train", "step": 3})
    assert [(r["type"], r["step"]) for r in resumed.read()] == [
        ("train", 1),
        ("train", 2),
        ("resume", 2),
        ("train", 3),
    ]


def test_an_unwritable_output_dir_is_refused(tmp_path):
    rundir.check_writable(tmp_path / "new" / "deeper")  # made on demand
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        rundir.check_writable(tmp_path / "file")
    with pytest.raises(UserError, match=r"cannot be made: .*file is a file"):
        rundir.check_writable(tmp_path / "file" / "run")


def test_an_overwrite_sets_the_run_aside_and_puts_it_back_or_lets_it_go(tmp_path):
    (tmp_path / "report.json").write_text("old")
    (tmp_path / "notes.txt").write_text("mine")
    _fake_checkpoint(tmp_path / "checkpoints" / "step-1")
    rundir.set_aside(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".replaced", "notes.txt"]
    (tmp_path / "report.json").write_text("new, failed")
    assert rundir.restore_set_aside(tmp_path)
    assert (tmp_path / "report.json").read_text() == "old" and (tmp_path / "checkpoints" / "step-1").is_dir()
    assert not rundir.restore_set_aside(tmp_path)  # nothing set aside any more
    rundir.set_aside(tmp_path)
    rundir.discard_set_aside(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_resume_passes_over_a_checkpoint_that_does_not_read(tmp_path, caplog):
    for step in (1, 2):
        rundir.write_checkpoint(tmp_path, step, keep=2, write=_fake_checkpoint)
    problem = {"step-2": "cut short"}
    assert rundir.latest_checkpoint(tmp_path, lambda p: problem.get(p.name)).name == "step-1"
    assert "passing over checkpoint" in caplog.text and "cut short" in caplog.text
    with pytest.raises(UserError, match="contradict"):
        rundir.check_output_dir(tmp_path, resume=True, overwrite=True)
