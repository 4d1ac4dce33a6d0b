"""runs/lock.py: one writer per directory; a dead holder's lock is taken over."""

from __future__ import annotations

import json
import os
import socket

import pytest

from peftcli.runs.lock import LOCK_NAME, Locked, hold


def test_a_held_directory_refuses_a_second_holder_and_is_free_afterwards(tmp_path):
    with hold(tmp_path, "peft train"):
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(Locked, match=rf"in use by another process \(pid {os.getpid()} on"):
            with hold(tmp_path, "peft merge"):
                pass
    assert not (tmp_path / LOCK_NAME).exists()
    with hold(tmp_path, "peft train"):  # free again
        pass


def test_a_lock_whose_holder_died_is_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 2**22 + 7, "host": socket.gethostname()}))
    with hold(tmp_path, "peft train"):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_reused_pid_is_not_its_old_holder(tmp_path):
    # our own pid, but a start time that is not ours: the process that wrote it is gone
    (tmp_path / LOCK_NAME).write_text(
        json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "-1"})
    )
    with hold(tmp_path, "peft train"):
        pass


def test_another_hosts_lock_and_a_lock_being_written_are_respected(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "time": 0}))
    with pytest.raises(Locked, match="pid 1 on elsewhere"):
        with hold(tmp_path, "peft train"):
            pass
    (tmp_path / LOCK_NAME).write_text("")  # created a moment ago, its holder about to write it
    with pytest.raises(Locked):
        with hold(tmp_path, "peft train"):
            pass
    old = 1_000_000.0
    os.utime(tmp_path / LOCK_NAME, (old, old))  # and one that stayed empty: its holder died writing it
    with hold(tmp_path, "peft train"):
        pass
