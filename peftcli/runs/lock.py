"""One writer per directory: a lock file naming its holder (pid, host, start time, command).

`peft train` holds it on its output dir for the whole run; `peft merge` and `peft export` hold it on the
adapter dir they read, so an adapter is never read while a run rewrites it. A second process is refused
with who holds the lock. A lock left by a process that died (kill -9, a crash, a reboot) is recognised and
taken over: on this host its pid no longer runs, or now belongs to a process that started later.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from peftcli.errors import UserError

LOCK_NAME = ".peftcli.lock"


class Locked(UserError):
    """Another live process holds the directory."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): with the pid, it names
    one process even after the pid is reused. None where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(holder: dict) -> bool:
    """Whether the process that wrote `holder` still runs (assumed yes for another host's)."""
    if holder.get("host") != socket.gethostname() or holder.get("pid") == "?":
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    started = _start_time(pid)
    return started is None or started == holder.get("started")


def _describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} since {since} ({holder.get('command', '?')})"


@contextlib.contextmanager
def hold(directory: Path, what: str) -> Iterator[None]:
    """Hold `directory`'s lock for the block; `what` names the command in messages (e.g. "peft train").

    A directory that cannot be written to cannot be changed by anyone either: it is read without a lock.
    """
    path = Path(directory) / LOCK_NAME
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": _start_time(os.getpid()),
        "time": time.time(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200],
    }
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            if holder is None and time.time() - _mtime(path) < 10:  # its holder is still writing it
                holder = {"pid": "?", "host": "?", "time": _mtime(path), "command": "starting"}
            if holder is not None and _alive(holder):
                raise Locked(
                    f"{directory} is in use by another process ({_describe(holder)}); "
                    f"{what} waits for no one: "
                    f"try again when it is done (a stale lock is {path}: remove it if that process is gone)"
                ) from None
            path.unlink(missing_ok=True)  # its holder is gone: take it over
            continue
        except OSError as e:
            if Path(directory).is_dir() and not os.access(directory, os.W_OK):
                yield
                return
            raise UserError(f"cannot lock {directory}: {e.strerror or e}") from e
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise Locked(f"cannot take the lock {path}: it keeps coming back")
    try:
        yield
    finally:
        if _read(path) == me:
            path.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _read(path: Path) -> dict | None:
    """The holder a lock file names; None when it is unreadable (a holder killed while writing it)."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None
