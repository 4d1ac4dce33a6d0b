"""What each process holds under train.distributed: fsdp, at 1, 2 and 4 processes (torchrun, CPU, gloo).

    python scripts/bench_scale.py                      # a random Llama of ~100 MB (8 layers x 512), LoRA r=8
    python scripts/bench_scale.py --processes 1 2 --layers 4 --hidden 256 --steps 2

For each count the script launches `torchrun --nproc_per_node N` of itself as a worker. Each worker runs
peftcli's own training setup (peftcli.train.loop.setup: load, inject, shard, AdamW) and then a few optimizer
steps (loop.train_step), and reports:
- model bytes held: the parameters this process holds after sharding (its shards: 1/N of every sharded
  tensor), counted from the tensors themselves;
- RSS after setup: the process's resident memory once the model is sharded and freed heap is returned
  (malloc_trim), before training;
- peak RSS: the process's high-water mark, loading included; and "peak - start", that mark less the
  process's resident memory before setup (Python, torch and transformers imported): what loading, sharding
  and training added. transformers maps a safetensors file whose dtype is the model's rather than reading
  it, and fully_shard copies out each process's own dim-0 slices, so a process touches only its slices of
  the file: the base's share of the peak falls with N. (A checkpoint cast to another dtype, or a GGUF base
  dequantized, is materialized whole in each process before sharding.)
- step seconds: the median of the timed steps.
On one small CPU machine the N processes share its cores: step time says what communication costs, not
what N machines would give.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _status(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def worker(recipe_path: str, steps: int) -> None:
    import torch
    import transformers  # noqa: F401  (imported before the start figure, as setup would import it)

    from peftcli.recipe import load_recipe
    from peftcli.train import loop

    start = _status("VmRSS")
    s = loop.setup(load_recipe(recipe_path))
    held = 0
    for p in s.model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        held += local.numel() * local.element_size()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    after_setup = _status("VmRSS")
    seconds = []
    for step in range(steps):
        started = time.perf_counter()
        loop.train_step(s, step)
        seconds.append(time.perf_counter() - started)
    torch.distributed.barrier() if s.accelerator.num_processes > 1 else None
    row = {
        "processes": s.accelerator.num_processes,
        "rank": s.accelerator.process_index,
        "mode": s.mode,
        "model_bytes_held": held,
        "rss_after_setup": after_setup,
        "peak_rss": _status("VmHWM"),
        "peak_over_start": _status("VmHWM") - start,
        "step_seconds": statistics.median(seconds),
    }
    print("BENCH " + json.dumps(row), flush=True)


def make_base(directory: Path, layers: int, hidden: int) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from tiny import tiny_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def write_recipe(root: Path, base: str, batch: int) -> Path:
    import yaml

    rows = [{"text": f"The number {i} comes after {i - 1}, and before {i + 1}."} for i in range(64)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "model": {"name": base},
        "method": {"name": "lora", "rank": 8, "target_modules": "all-linear"},
        "data": {"train": str(root / "data.jsonl"), "format": "text", "validation": None, "max_length": 64},
        "train": {"max_steps": 100, "batch_size": batch, "seed": 0, "distributed": "fsdp"},
        "output_dir": str(root / "run"),
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps)
        return
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PEFTCLI_CACHE": tempfile.mkdtemp(prefix="bench_scale_cache"),
    }
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = make_base(root / "base", args.layers, args.hidden)
        rows = []
        for n in args.processes:
            recipe = write_recipe(root, base, args.global_batch // n)
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n)]
            command += [__file__, "--worker", str(recipe), "--steps", str(args.steps)]
            out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root, check=False)
            found = [json.loads(line[6:]) for line in out.stdout.splitlines() if line.startswith("BENCH ")]
            if out.returncode or len(found) != n:
                sys.exit(f"{n} processes failed:\n{out.stderr[-3000:]}")
            rows += sorted(found, key=lambda r: r["rank"])
    mib = 1 << 20
    heads = (
        ("N", 2),
        ("rank", 4),
        ("mode", 6),
        ("model held MiB", 15),
        ("RSS after setup", 16),
        ("peak RSS", 9),
        ("peak - start", 12),
    )
    print(" ".join(f"{name:>{width}}" for name, width in heads), f"{'step s':>7}")
    for r in rows:
        print(
            f"{r['processes']:>2} {r['rank']:>4} {r['mode']:>6} {r['model_bytes_held'] / mib:>15.1f} "
            f"{r['rss_after_setup'] / mib:>16.1f} {r['peak_rss'] / mib:>9.1f} "
            f"{r['peak_over_start'] / mib:>12.1f} {r['step_seconds']:>7.3f}"
        )


if __name__ == "__main__":
    main()
