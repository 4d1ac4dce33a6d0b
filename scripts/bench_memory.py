"""Peak memory and step time of a LoRA step at each precision, peftcli beside HF PEFT, in one run.

    python scripts/bench_memory.py            # SmolLM2-135M: fp32 / bf16 / int8 / int4 / nf4 / GGUF-packed
    python scripts/bench_memory.py --sides peftcli:int4 hf:nf4 --json memory.json
    python scripts/bench_memory.py --model /tmp/llama-7b --sides peftcli:int4 --batch 1 --length 256 \
        --rank 8 --targets q_proj,v_proj --steps 3 --rounds 1 --warmup 0      # scripts/make_llama_7b.py

Sides (each its own child process, loaded once, stepped in alternating rounds as scripts/bench_train.py
does, whose helpers this reuses):
- ``peftcli:fp32`` / ``peftcli:bf16``: ``model.dtype`` float32 / bfloat16, unquantized;
- ``peftcli:int8`` / ``peftcli:int4`` / ``peftcli:nf4``: ``model.quantize``, ``model.dtype`` float32
  (``+bf16`` for a bf16 product: ``peftcli:int4+bf16``);
- ``peftcli:gguf``: the packaged GGUF file with its Q4_1 / Q8_0 blocks kept packed (``quantize: auto``);
- ``hf:fp32`` / ``hf:bf16``: transformers (``dtype=``) + HF PEFT; ``hf:nf4``: transformers with
  ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`` + HF PEFT (QLoRA).
For a GGUF model the non-GGUF sides read a safetensors copy of it (dequantized to fp32 once, first).

peftcli's step is `peft train`'s (fast.install's speed-ups at the recipe defaults, AdamW); HF's is
``model(..., labels=...).loss``. All sides start from the same LoRA adapter (r, alpha = 2r, dropout 0).
Reported per side: peak RSS while loading, the frozen weights' bytes, peak RSS while training (the kernel's
high-water mark reset after loading, as bench_train.py does), the median step time and tokens/s, and the
first step's loss. The machine is shared: read ratios from one run, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402  (the sibling script: its child protocol and measuring helpers)
from bench_train import (  # noqa: E402
    ROOT,
    _reset_high_water,
    _rss_high_water,
    make_batch,
    matmul_rate,
)

SEED, LEARNING_RATE = 0, 1e-4
PEFTCLI = {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none"), "int8": ("float32", "int8")}
PEFTCLI |= {"int4": ("float32", "int4"), "nf4": ("float32", "nf4"), "gguf": ("float32", "auto")}
HF = {"fp32", "bf16", "nf4"}


# --------------------------------------------------------------------------------------------------
# child


def _peftcli_side(args, kind: str, extra: set[str]):
    import torch

    from peftcli import fast
    from peftcli.methods import make_config
    from peftcli.models.load import load_model
    from peftcli.models.sources import resolve
    from peftcli.quant.convert import frozen_bytes
    from peftcli.recipe import Recipe, TrainSection
    from peftcli.runs import adapter as adapter_files
    from peftcli.train.loop import inject, make_optimizer, upcast_trainable

    dtype, quantize = PEFTCLI[kind]
    dtype = "bfloat16" if "bf16" in extra else dtype
    targets = args.targets.split(",") if args.targets != "all-linear" else "all-linear"
    recipe = Recipe(
        method=make_config("lora", rank=args.rank, alpha=2.0 * args.rank, target_modules=targets),
        train=TrainSection(learning_rate=LEARNING_RATE),
    )
    model = load_model(resolve(args.gguf if kind == "gguf" else args.model), dtype=dtype, quantize=quantize)
    torch.manual_seed(SEED)
    model = inject(model, recipe, tokenizer=None)
    upcast_trainable(model, autocast=False)
    if args.adapter_out:
        adapter_files.save_adapter(model, recipe.method, "causal-lm", args.model, args.adapter_out)
    speedups = fast.install(model, recipe.train, "causal-lm")
    model.train()
    optimizer = make_optimizer(model, recipe)
    return model, _step(model, optimizer, speedups.loss), {"frozen_bytes": frozen_bytes(model)}


def _hf_side(args, kind: str, extra: set[str]):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": torch.bfloat16 if kind == "bf16" else torch.float32}
    if kind == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
        kwargs["device_map"] = "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    model = PeftModel.from_pretrained(model, args.adapter_in, is_trainable=True)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return model, _step(model, optimizer, None), {"frozen_bytes": frozen}


def _step(model, optimizer, loss_fn):
    """One optimizer step on a batch: `peft train`'s loss (the speed-ups' where installed) or HF's."""
    import torch

    from peftcli.train.loss import loss_sum, num_targets

    trainable = [p for p in model.parameters() if p.requires_grad]

    def step(batch) -> float:
        targets = num_targets(batch, "causal-lm")
        if loss_fn is not None:
            loss = loss_fn(model, batch) / targets
        elif hasattr(model, "peft_config"):
            loss = model(**batch).loss
        else:
            loss = loss_sum(model, batch, "causal-lm") / targets
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def child(args) -> None:
    import torch

    name, _, opts = args.child.partition(":")
    kind, *extra = opts.split("+")
    batch = torch.load(args.batch_file)
    started = time.perf_counter()
    build = _peftcli_side if name == "peftcli" else _hf_side
    _, step, info = build(args, kind, set(extra))
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's RSS at fork (Linux keeps the larger)
    ready = {
        "ready": True,
        "load_seconds": time.perf_counter() - started,
        "load_peak_bytes": _rss_high_water(),
    }
    _reset_high_water()
    print(json.dumps({**ready, **info}), flush=True)
    losses: list[float] = []
    for line in sys.stdin:
        order = json.loads(line)
        if order["cmd"] == "exit":
            break
        seconds = []
        for _ in range(order["steps"]):
            begun = time.perf_counter()
            losses.append(step(batch))
            seconds.append(time.perf_counter() - begun)
        print(json.dumps({"seconds": seconds, "losses": losses, "peak_bytes": _rss_high_water()}), flush=True)


# --------------------------------------------------------------------------------------------------
# parent


class Child(bench_train.Child):
    """A side's process (bench_train.Child's pipe protocol: receive, run, close), started with this script."""

    def __init__(self, side: str, args, tmp: Path, save_adapter: bool):
        command = [sys.executable, __file__, "--child", side, "--model", args.model, "--gguf", args.gguf]
        command += ["--rank", str(args.rank), "--targets", args.targets]
        command += ["--batch-file", str(tmp / "batch.pt")]
        command += ["--adapter-out" if save_adapter else "--adapter-in", str(tmp / "adapter")]
        env = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        env["TQDM_DISABLE"] = "1"
        self.side = side
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
            cwd=ROOT,
        )


def prepare(args, tmp: Path) -> None:
    """The batch; for a GGUF model, a safetensors copy (fp32: its dequantized values) for the other sides."""
    import torch

    from peftcli.models.sources import resolve

    source = resolve(args.model)
    if source.gguf_file:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from peftcli.models.load import drop_quantization_flags

        args.gguf = args.model
        copy = tmp / "safetensors"
        model = AutoModelForCausalLM.from_pretrained(
            source.path, gguf_file=source.gguf_file, dtype=torch.float32
        )
        drop_quantization_flags(model)
        model.save_pretrained(copy)
        AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file).save_pretrained(copy)
        del model
        make_batch(args.model, args.batch, args.length, tmp / "batch.pt")
        args.model = str(copy)
    else:
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(source.path).vocab_size
        ids = torch.randint(0, vocab, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        torch.save(batch, tmp / "batch.pt")


def parent(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_memory_", dir=args.tmp) as tmp:
        tmp = Path(tmp)
        prepare(args, tmp)
        sides = args.sides
        first_peftcli = next(s for s in sides if s.startswith("peftcli"))
        children, ready = {}, {}
        try:
            for side in [first_peftcli, *[s for s in sides if s != first_peftcli]]:  # the adapter comes first
                children[side] = Child(side, args, tmp, save_adapter=side == first_peftcli)
                ready[side] = children[side].receive()  # one loads at a time: load peaks do not overlap
                print(f"{side} loaded: {json.dumps(ready[side])}", flush=True)
            for c in children.values():
                if args.warmup:
                    c.run(args.warmup)
            seconds, last, rates = {s: [] for s in sides}, {}, []
            for round_ in range(args.rounds):
                rates.append(matmul_rate(0.5))
                for side in sides if round_ % 2 == 0 else sides[::-1]:
                    last[side] = children[side].run(args.steps)
                    seconds[side] += last[side]["seconds"]
                print(
                    f"round {round_ + 1}: "
                    + "  ".join(f"{s} {statistics.median(last[s]['seconds']):.2f} s" for s in sides),
                    flush=True,
                )
        finally:
            for c in children.values():
                c.close()
    tokens = args.batch * args.length
    results = {
        side: {
            **{k: v for k, v in ready[side].items() if k != "ready"},
            "step_seconds": statistics.median(seconds[side]),
            "tokens_per_second": tokens / statistics.median(seconds[side]),
            "train_peak_bytes": last[side]["peak_bytes"],
            "first_loss": last[side]["losses"][0],
            "losses": last[side]["losses"],
        }
        for side in sides
    }
    return {
        "model": args.model,
        "batch": args.batch,
        "length": args.length,
        "rank": args.rank,
        "targets": args.targets,
        "matmul_gflops": [r / 1e9 for r in rates],
        "sides": results,
    }


def print_summary(summary: dict) -> None:
    mib = 2**20
    print(
        f"\n{'side':<16}{'load peak':>11}{'frozen':>10}{'train peak':>12}{'step s':>9}{'tok/s':>8}"
        "  first loss"
    )
    for side, r in summary["sides"].items():
        print(
            f"{side:<16}{r['load_peak_bytes'] / mib:>8.0f} MiB{r['frozen_bytes'] / mib:>6.0f} MiB"
            f"{r['train_peak_bytes'] / mib:>8.0f} MiB{r['step_seconds']:>9.2f}{r['tokens_per_second']:>8.0f}"
            f"  {r['first_loss']:.5f}"
        )


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument(
        "--sides",
        nargs="+",
        default=[
            "peftcli:fp32",
            "peftcli:bf16",
            "peftcli:int8",
            "peftcli:int4",
            "peftcli:nf4",
            "peftcli:gguf",
            "hf:fp32",
            "hf:bf16",
            "hf:nf4",
        ],
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="all-linear", help="all-linear or comma-separated names")
    p.add_argument("--steps", type=int, default=2, help="timed steps per side per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--tmp", default=None, help="where the scratch copy and adapter go (default: the system's)"
    )
    p.add_argument("--json", type=Path)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--gguf", default="", help=argparse.SUPPRESS)
    p.add_argument("--batch-file", help=argparse.SUPPRESS)
    p.add_argument("--adapter-out", help=argparse.SUPPRESS)
    p.add_argument("--adapter-in", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return None
    for side in args.sides:
        name, _, kind = side.partition(":")
        if not (name == "peftcli" and kind.split("+")[0] in PEFTCLI or name == "hf" and kind in HF):
            raise SystemExit(
                f"unknown side {side!r}: peftcli:{{{','.join(PEFTCLI)}}} or hf:{{{','.join(HF)}}}"
            )
    if not any(s.startswith("peftcli") for s in args.sides):
        raise SystemExit("at least one peftcli side: it writes the adapter every side starts from")
    summary = parent(args)
    print_summary(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
