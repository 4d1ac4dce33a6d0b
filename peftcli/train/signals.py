"""Stopping a training run cleanly: Ctrl-C or SIGTERM ask for a checkpoint after the current step."""

from __future__ import annotations

import signal


class StopRequest:
    """Ctrl-C, or SIGTERM (what `kill`, `timeout` and job schedulers send), asks the loop to checkpoint and
    stop after the current step; a second one stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
