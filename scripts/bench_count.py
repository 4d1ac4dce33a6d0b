"""Wall time of `peft count` on a GPT-3-175B-shaped config (or --model), from shapes vs on the meta model.

Writes the config (Brown et al. 2020: 96 layers, d_model 12288, 96 heads, 2048 positions, GPT-2's
vocabulary) to a temp dir, unless --model names another model, then alternates, each round in fresh
processes (imports included, as a user pays them):

- cli: `python -m peftcli.cli count DIR -m ... --json`, the command as users run it (counts from the
  config's shapes: no torch import);
- meta: the same counts by injecting each method into the model built on the meta device
  (`peftcli.count.meta_counts`), the path every other architecture takes.

Prints each side's median and the ratio, and checks that both give the same numbers.

    python scripts/bench_count.py [--rounds 5] [--method lora --method adapter ...]
    python scripts/bench_count.py --model smollm2-135m-instruct     # the packaged GGUF
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COUNT_KEYS = ("method", "trainable", "total", "trainable_percent")
GPT3_175B = {
    "model_type": "gpt2",
    "vocab_size": 50257,
    "n_positions": 2048,
    "n_embd": 12288,
    "n_layer": 96,
    "n_head": 96,
}

META = """
import json, sys
from peftcli.count import meta_counts, method_configs
counts = meta_counts(sys.argv[1], method_configs(None, sys.argv[2:], {}))
print(json.dumps([c.to_dict() for c in counts]))
"""


def run(command: list[str]) -> tuple[float, list]:
    started = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return time.perf_counter() - started, json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--method", action="append", help="repeatable; default: lora")
    parser.add_argument("--model", help="a model name as `peft count` takes it; default: the 175B config")
    args = parser.parse_args()
    methods = args.method or ["lora"]
    with tempfile.TemporaryDirectory() as work:
        (Path(work) / "config.json").write_text(json.dumps(GPT3_175B))
        model = args.model or work
        flags = [x for m in methods for x in ("--method", m)]
        sides = {
            "cli": [sys.executable, "-m", "peftcli.cli", "count", model, *flags, "--json"],
            "meta": [sys.executable, "-c", META, model, *methods],
        }
        times: dict[str, list[float]] = {side: [] for side in sides}
        rows = {}
        for i in range(args.rounds):
            for side, command in sides.items():
                seconds, rows[side] = run(command)
                times[side].append(seconds)
                print(f"round {i + 1}: {side:4s} {seconds:6.2f} s", flush=True)
        # the command's rows hold the memory estimate too; the parameter counts are what both sides give
        counts = {side: [{k: row[k] for k in COUNT_KEYS} for row in rows[side]] for side in sides}
        if counts["cli"] != counts["meta"]:
            sys.exit(f"counts differ: cli {counts['cli']} vs meta {counts['meta']}")
        cli, meta = (statistics.median(times[s]) for s in ("cli", "meta"))
        print(f"methods {', '.join(methods)}; counts agree: {counts['cli']}")
        print(f"median: cli {cli:.2f} s, meta {meta:.2f} s ({meta / cli:.1f}x)")


if __name__ == "__main__":
    main()
