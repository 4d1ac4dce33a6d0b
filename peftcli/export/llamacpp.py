"""llama.cpp itself, through the ``xllamacpp`` wheel (llama.cpp prebuilt, no compiler): load a GGUF file
(and a LoRA adapter GGUF on it), tokenize, render the chat template, continue greedily.

xllamacpp wraps llama.cpp's server: loading a model starts its HTTP server on the loopback interface, and
its native endpoints are the ones that return token ids exactly (the OpenAI-style ones drop tokens that are
not whole UTF-8 characters). The server here gets a random API key, so no other process can use it while it
runs, and is stopped on `close()`. llama.cpp's own log (stderr, from C++) is captured while the model loads
and kept as `load_log`; its warnings are `warnings`.
"""

from __future__ import annotations

import gc
import json
import os
import secrets
import signal
import tempfile
import urllib.request
from pathlib import Path

from peftcli.errors import UserError

# The log level that shows warnings and errors but not llama.cpp's info lines (xllamacpp's verbosity).
_WARNINGS = 2


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("xllamacpp") is not None


class LlamaCpp:
    """A GGUF model loaded by llama.cpp, greedy and single-sequence; use as a context manager."""

    def __init__(
        self, model: str | Path, lora: str | Path | None = None, context: int = 512, threads: int = 0
    ):
        if not available():
            raise UserError(
                "checking the export needs llama.cpp's Python binding: pip install 'peftcli[export]' "
                "(or pass --no-verify to skip the check)"
            )
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = str(model)
        if lora is not None:
            params.lora_adapters = [xllamacpp.CommonAdapterLoraInfo(str(lora), 1.0)]
        params.n_ctx = context
        params.n_parallel = 1
        params.warmup = False
        params.verbosity = _WARNINGS
        threads = threads or max(1, min(os.cpu_count() or 1, 8))
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        self._key = secrets.token_hex(16)
        params.api_keys = [self._key]
        self.load_log = ""
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        with _captured_stderr() as log:
            try:
                self._server = xllamacpp.Server(params)
            except RuntimeError:
                self._server = None
            finally:  # the server takes over Ctrl-C and SIGTERM; they stay Python's (KeyboardInterrupt ...)
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)
        self.load_log = log.read()
        if self._server is None:
            errors = [line for line in self.load_log.splitlines() if " E " in line]
            detail = _message(errors[0]) if errors else "see llama.cpp's log"
            raise LoadFailed(f"llama.cpp cannot load {model}: {detail}", self.load_log)
        self._address = self._server.listening_address
        # A server stopped before its task loop runs waits for that loop forever: one token through the
        # loop (a tokenization would not do: the HTTP thread answers it) proves it runs.
        self.greedy([0], 1)

    @property
    def warnings(self) -> list[str]:
        """llama.cpp's warnings while loading, each as its message."""
        return [_message(line) for line in self.load_log.splitlines() if " W " in line]

    def _post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(
            self._address + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self._key}"},
        )
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, special tokens parsed, no BOS added."""
        return self._post("/tokenize", {"content": text, "add_special": False, "parse_special": True})[
            "tokens"
        ]

    def apply_template(self, messages: list[dict]) -> str:
        """The GGUF's chat template rendered by llama.cpp, with the assistant's turn opened."""
        return self._post("/apply-template", {"messages": messages})["prompt"]

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """The greedy continuation of `prompt_ids`, at most `max_new_tokens`; it stops before an
        end-of-generation token (llama.cpp's own set: EOS, end-of-turn)."""
        body = {
            "prompt": prompt_ids,
            "n_predict": max_new_tokens,
            "temperature": 0.0,
            "top_k": 1,
            "samplers": ["top_k"],
            "return_tokens": True,
            "cache_prompt": False,
        }
        return self._post("/completion", body)["tokens"]

    def close(self) -> None:
        self._server = None
        gc.collect()  # the server stops when its last reference goes

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LoadFailed(UserError):
    def __init__(self, message: str, log: str):
        super().__init__(message)
        self.log = log


def _message(line: str) -> str:
    """A llama.cpp log line without its time stamp and level: "0.00.1 W load: text" -> "load: text"."""
    parts = line.split(None, 2)
    return parts[2].strip() if len(parts) == 3 and parts[1] in ("W", "E", "I") else line.strip()


class _captured_stderr:
    """Redirect file descriptor 2 (C++'s stderr) to a temp file for the block; `.read()` it afterwards."""

    def __enter__(self):
        import sys

        sys.stderr.flush()
        self._file = tempfile.TemporaryFile(mode="w+b")
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self._saved, 2)
        os.close(self._saved)

    def read(self) -> str:
        self._file.seek(0)
        text = self._file.read().decode("utf-8", errors="replace")
        self._file.close()
        return text
