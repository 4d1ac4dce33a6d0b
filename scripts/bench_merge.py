"""Peak memory of `peft merge` on a base model far larger than its shards.

Builds a random Llama-style model (float32, >= --size-mb, default 600 MB) saved in --shard-size shards
(default 100MB), and a random LoRA adapter on every linear layer; then runs each merge in its own child
process and reports the child's peak RSS (VmHWM in /proc/self/status, read by the child as it ends):

- baseline: the child imports what a merge imports and does nothing (Python + torch + transformers);
- streaming, no check: the shard-by-shard merge alone (verify=False);
- streaming + check: the default, whose check loads base + adapter, then the merged model (float32);
- in memory, no check: the load-then-merge path, forced, for comparison.

    python scripts/bench_merge.py [--size-mb 600] [--shard-size 100MB] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("baseline", "streaming", "streaming+check", "in-memory")


def child(mode: str, work: Path) -> None:
    """One measurement; prints {"peak_rss_mb", "seconds"} as JSON on its last line."""
    import transformers  # noqa: F401 -- the baseline pays for the same imports as a merge
    from transformers import LlamaForCausalLM  # noqa: F401

    from peftcli.merge import to_dir as merge

    started = time.perf_counter()
    if mode != "baseline":
        if mode == "in-memory":
            merge.safetensors_shards = lambda source: None
        output = work / f"merged-{mode}"
        shutil.rmtree(output, ignore_errors=True)
        result = merge.merge_to_dir(work / "adapter", output, verify=mode == "streaming+check")
        assert result.streamed == (mode != "in-memory")
        shutil.rmtree(output)
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "seconds": time.perf_counter() - started}))


def peak_rss_mb() -> float:
    """This process's peak resident set size. VmHWM belongs to the address space exec made, whereas
    getrusage's ru_maxrss carries over the parent's peak from before exec (vfork + exec)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # elsewhere: kilobytes on Linux


def build(work: Path, size_mb: int, shard_size: str) -> dict:
    """The sharded base and the adapter; returns their sizes in MB."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftcli.methods import Context, lora, make_config
    from peftcli.runs import adapter as checkpoint

    hidden, inter, vocab = 1024, 2816, 16000
    per_layer = 4 * (2 * hidden * hidden + 2 * hidden * 256 + 3 * hidden * inter) / 1e6  # MB, float32
    layers = max(1, math.ceil((size_mb - 4 * 2 * vocab * hidden / 1e6) / per_layer))
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=vocab,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(work / "base", max_shard_size=shard_size)
    section = make_config("lora", rank=16, alpha=32.0, target_modules="all-linear")
    model = lora.inject(model, section, Context("causal-lm"))
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_B.weight.normal_(std=0.01)
    checkpoint.save_adapter(model, section, "causal-lm", str(work / "base"), work / "adapter")
    shards = list((work / "base").glob("*.safetensors"))
    largest_tensor = max(p.numel() * p.element_size() for p in model.parameters()) / 1e6
    return {
        "model_mb": sum(p.stat().st_size for p in shards) / 1e6,
        "shards": len(shards),
        "largest_shard_mb": max(p.stat().st_size for p in shards) / 1e6,
        "largest_tensor_mb": largest_tensor,
        "adapter_mb": (work / "adapter" / checkpoint.WEIGHTS_NAME).stat().st_size / 1e6,
        "layers": layers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=600)
    parser.add_argument("--shard-size", default="100MB")
    parser.add_argument("--keep", type=Path, help="build (or reuse) the model here and keep it")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.work)
        return

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-merge-"))
    try:
        started = time.perf_counter()
        sizes_path = work / "sizes.json"
        if sizes_path.is_file():
            sizes = json.loads(sizes_path.read_text())
        else:
            work.mkdir(parents=True, exist_ok=True)
            sizes = build(work, args.size_mb, args.shard_size)
            sizes_path.write_text(json.dumps(sizes))
        print(
            f"model: {sizes['model_mb']:.0f} MB float32 ({sizes['layers']} layers) in {sizes['shards']} "
            f"shards, largest shard {sizes['largest_shard_mb']:.0f} MB, largest tensor "
            f"{sizes['largest_tensor_mb']:.0f} MB; adapter {sizes['adapter_mb']:.1f} MB "
            f"(ready in {time.perf_counter() - started:.0f}s)"
        )
        print(f"{'run':<18}{'peak RSS MB':>12}{'minus baseline':>16}{'peak / model':>14}{'seconds':>10}")
        baseline = None
        for mode in MODES:
            done = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--work", str(work)],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            peak = measured["peak_rss_mb"]
            baseline = peak if baseline is None else baseline
            print(
                f"{mode:<18}{peak:>12.0f}{peak - baseline:>16.0f}{peak / sizes['model_mb']:>14.2f}"
                f"{measured['seconds']:>10.1f}"
            )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
