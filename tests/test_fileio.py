"""fileio.py: atomic writes that follow the umask, and a full disk said as such."""

from __future__ import annotations

import errno
import os
import resource
import stat

import pytest

from peftcli import fileio


def test_written_files_get_the_umask_modes_not_the_temp_files(tmp_path):
    old = os.umask(0o022)
    try:
        fileio._umask.cache_clear()
        fileio.write_text(tmp_path / "a.txt", "x")
        assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
        (tmp_path / "d").mkdir(mode=0o700)
        (tmp_path / "d" / "f").write_text("y")
        os.chmod(tmp_path / "d" / "f", 0o600)
        fileio.make_readable(tmp_path / "d")
        assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
        assert stat.S_IMODE((tmp_path / "d" / "f").stat().st_mode) == 0o644
    finally:
        os.umask(old)
        fileio._umask.cache_clear()


def test_a_full_disk_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    fileio.write_text(tmp_path / "a.txt", "old")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
    try:
        with pytest.raises(fileio.DiskFull, match=r"no room to write .*a\.txt \(file too large\)"):
            fileio.write_text(tmp_path / "a.txt", "n" * 5000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert (tmp_path / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_other_errors_pass_through():
    with pytest.raises(PermissionError):
        with fileio.disk_errors("x"):
            raise PermissionError(errno.EACCES, "denied")
    with pytest.raises(fileio.DiskFull, match="no space left on device"):
        with fileio.disk_errors("x"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
