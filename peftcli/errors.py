"""The one exception type the CLI turns into a clean message and a non-zero exit code."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A problem with the user's input (recipe, files, flags): exit code 2, one line, no traceback."""

    exit_code = 2


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
