"""The one exception type the CLI turns into a clean message and a non-zero exit code."""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Iterable
from pathlib import Path


class UserError(Exception):
    """A problem with the user's input (recipe, files, flags): exit code 2, one line, no traceback."""

    exit_code = 2


class FieldError(UserError):
    """A fault in one named input (a recipe key such as ``data.train``, or a flag): ``key: message``.

    Raised where the value is interpreted; a recipe reader adds the file and line it came from."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}")


class CheckFailed(UserError):
    """A self-check after the work was done failed (e.g. merged logits differ): exit code 1."""

    exit_code = 1


def did_you_mean(word: str, choices: Iterable[str], n: int = 1) -> str:
    """' (did you mean `x`?)' for the closest choice, or '' when nothing is close."""
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(word), choices, n=n, cutoff=0.6)
    if not close:
        # suffix-aware: `q` for `self_attn.q_proj` is helped by matching the last name component
        tails = {c.rsplit(".", 1)[-1]: c for c in choices}
        close = difflib.get_close_matches(str(word), list(tails), n=n, cutoff=0.6)
        close = [tails[c] for c in close]
    return f" (did you mean `{close[0]}`?)" if close else ""


def not_found(value: str) -> str:
    """`not found: data/trian.jsonl (did you mean `data/train.jsonl`?)`. Relative paths are relative to
    the working directory, like every command-line argument."""
    path = Path(value).expanduser()
    message = f"not found: {value}"
    if path.parent.is_dir():
        siblings = [p.name for p in itertools.islice(path.parent.iterdir(), 2000)]
        close = difflib.get_close_matches(path.name, siblings, n=1, cutoff=0.6)
        if close:
            message += f" (did you mean `{value[: len(value) - len(path.name)]}{close[0]}`?)"
    if not path.is_absolute():
        message += f"; relative paths are read from the working directory {Path.cwd()}"
    return message
