"""Atomic writes: a file is either the old one or the complete new one, never half-written.

Temp files and dirs are created private (mode 0600 / 0700); what is renamed into place gets the mode any
other tool's output would get under the user's umask (usually 0644 / 0755), so a teammate or a serving
process can read it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from peftcli.errors import UserError


@functools.cache
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_readable(path: str | Path) -> None:
    """Give a file made private by tempfile (or a dir, recursively) the modes the umask allows."""
    path = Path(path)
    if path.is_dir():
        os.chmod(path, 0o777 & ~_umask())
        for child in path.iterdir():
            make_readable(child)
    else:
        os.chmod(path, 0o666 & ~_umask())


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, then rename the temp file over `path` (same directory, same filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with disk_errors(path):
            write(tmp)
            make_readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


# errno values that mean "no room": the disk is full, a quota or `ulimit -f` was reached
_NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class DiskFull(UserError):
    """A write ran out of room: what was there before is left as it was."""


@contextlib.contextmanager
def disk_errors(what: str | Path) -> Iterator[None]:
    """Turn running out of disk inside the block into a DiskFull naming what was being written; other
    errors pass through. (safetensors' writer reports the errno only in its message: messages count too.)"""
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:
        if not is_no_room(e):
            raise
        raise DiskFull(f"no room to write {what} ({_reason(e)}); the previous files are unchanged") from e


def is_no_room(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in _NO_ROOM:
        return True
    text = str(error)
    return any(os.strerror(code) in text for code in _NO_ROOM) or "No space left" in text


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno in _NO_ROOM:
        return os.strerror(error.errno).lower()
    return next((os.strerror(c).lower() for c in _NO_ROOM if os.strerror(c) in str(error)), "disk full")
