"""One preference training step against one SFT step over the same tokens, timed side by side.

    python scripts/bench_preference.py                    # SmolLM2-135M-Instruct, LoRA r=16 all-linear, fp32
    python scripts/bench_preference.py --quick            # a tiny random Llama: a smoke test in seconds
    python scripts/bench_preference.py --sides sft dpo orpo simpo kto --pairs 4 --rounds 5 --json bench.json
    python scripts/bench_preference.py --sides sft dpo dpo:plain     # log-probs from full logits too

The batch: the first --pairs pairs of configs/data/preference.jsonl, tokenized as `peft train` does
(chat template, the prompt masked). The SFT side trains on the very same rows (every chosen row and every
rejected row, the same target tokens) with the plain SFT objective; a preference side takes them as pairs,
its reference log-probs computed once before timing (as `peft train` caches them). Both steps are what
`peft train` runs: the objective's loss through peftcli.train.objectives with the default speed-ups,
backward, clipping at 1.0 and AdamW. KTO takes each pair as one desirable and one undesirable example (its
mismatched rows are extra forwards without gradient).

Each side runs in its own child process, which loads once and then steps on orders from the parent; the
parent alternates the sides round by round (never two at once). Memory is each child's peak resident set
while stepping (the high-water mark is reset after loading; see bench_train.py), model weights included.
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

import bench_train
from bench_train import _reset_high_water, _rss_high_water, make_quick_model

ROOT = Path(__file__).resolve().parent.parent
PAIRS_FILE = ROOT / "configs" / "data" / "preference.jsonl"
SIDES = ("sft", "dpo", "orpo", "simpo", "kto")


# --------------------------------------------------------------------------------------------------
# child: one side, loaded once, steps on demand


def _data(side: str, pairs: int, workdir: Path, tokenizer):
    """The side's one batch: `pairs` pairs as pairs, as KTO examples, or as their 2 x pairs SFT rows."""
    from peftcli.data.batches import collate
    from peftcli.data.prepare import prepare_data
    from peftcli.recipe import DataSection

    rows = [json.loads(line) for line in PAIRS_FILE.read_text().splitlines()[:pairs]]
    if side == "kto":
        rows = [
            {"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"}
            for r in rows
            for k in ("chosen", "rejected")
        ]
    path = workdir / f"{side}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataSection(
        train=str(path), format="kto" if side == "kto" else "preference", validation=None, max_length=128
    )
    prepared = prepare_data(data, tokenizer, "causal-lm", 0, cache_dir=workdir / "cache")
    split = prepared.train
    if side == "sft":  # the pairs' rows, chosen first: the same tokens and targets as the pairs' batch
        rows = [split.row(i) for i in range(0, split.num_rows, 2)] + [
            split.row(i) for i in range(1, split.num_rows, 2)
        ]
        return collate(rows, prepared.pad_id), prepared, split
    return collate([split[i] for i in range(len(split))], prepared.pad_id), prepared, split


def child(args) -> None:
    import torch

    from peftcli.data.batches import collate
    from peftcli.methods import make_config
    from peftcli.models.load import load_tokenizer
    from peftcli.models.sources import resolve
    from peftcli.recipe import Recipe, TrainSection
    from peftcli.recipe.schema import OBJECTIVES
    from peftcli.train import reference
    from peftcli.train.loop import build_model, make_optimizer
    from peftcli.train.objectives import make_objective

    if args.threads:
        torch.set_num_threads(args.threads)
    side, _, option = args.child.partition(":")
    workdir = Path(args.workdir)
    recipe = Recipe(
        method=make_config("lora", rank=16, alpha=32.0, target_modules="all-linear"),
        train=TrainSection(learning_rate=1e-4, objective=OBJECTIVES[side](), chunked_loss=option != "plain"),
    )
    recipe.model.name, recipe.model.dtype = args.model, "float32"
    tokenizer = load_tokenizer(resolve(args.model))
    batch, prepared, split = _data(side, args.pairs, workdir, tokenizer)
    model, speedups, _ = build_model(recipe, tokenizer, None, autocast=False)
    objective = make_objective(recipe, speedups, None)
    if objective.needs_reference:  # computed once, untimed, as `peft train` caches them
        with reference.reference_context(model, recipe):
            split.reference_logps = reference.row_logprobs(
                model.eval(), split, objective.token_logprobs, 8, prepared.pad_id, torch.device("cpu")
            )
        batch = collate([split[i] for i in range(len(split))], prepared.pad_id)
    model.train()
    optimizer = make_optimizer(model, recipe)
    trainable = [p for p in model.parameters() if p.requires_grad]
    totals = objective.counts(batch)

    def step() -> float:
        loss = objective.loss(model, batch, totals)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    tokens = sum(int(v.sum()) for k, v in batch.items() if k.endswith("attention_mask"))
    targets = int((batch["labels"][:, 1:] != -100).sum())
    step()  # warm up: first-call allocations and kernel choices are not the step
    _reset_high_water()
    print(
        json.dumps({"ready": True, "tokens": tokens, "targets": targets, "rows": len(batch["input_ids"])}),
        flush=True,
    )
    for line in sys.stdin:  # {"cmd": "run", "steps": n} or {"cmd": "exit"}
        order = json.loads(line)
        if order["cmd"] == "exit":
            break
        seconds, losses = [], []
        for _ in range(order["steps"]):
            started = time.perf_counter()
            losses.append(step())
            seconds.append(time.perf_counter() - started)
        print(
            json.dumps({"seconds": seconds, "losses": losses, "peak_memory_bytes": _rss_high_water()}),
            flush=True,
        )


# --------------------------------------------------------------------------------------------------
# parent


class Child(bench_train.Child):
    """A side's process, spoken to as bench_train's children are (one JSON line per order and reply)."""

    def __init__(self, side: str, args, workdir: Path):
        flags = {"--child": side, "--model": args.model, "--pairs": args.pairs, "--workdir": workdir}
        if args.threads:
            flags["--threads"] = args.threads
        command = [sys.executable, __file__, *(str(x) for flag in flags.items() for x in flag)]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
        self.side = side
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )
        self.info = self.receive()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama instead of --model")
    parser.add_argument(
        "--sides",
        nargs="+",
        default=["sft", "dpo"],
        choices=[*SIDES, *(f"{side}:plain" for side in SIDES)],
        help="objectives; `:plain` computes the log-probs from full logits (train.chunked_loss: false)",
    )
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="steps per side per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            make_quick_model(Path(tmp) / "quick")
            args.model = str(Path(tmp) / "quick")
        children = [Child(side, args, Path(tmp)) for side in args.sides]
        seconds = {c.side: [] for c in children}
        peaks = {}
        for _ in range(args.rounds):
            for c in children:
                reply = c.run(args.steps)
                seconds[c.side] += reply["seconds"]
                peaks[c.side] = reply["peak_memory_bytes"]
        for c in children:
            c.close()
    report(args, children, seconds, peaks)


def report(args, children: list[Child], seconds: dict, peaks: dict) -> None:
    base = children[0].side
    results = {}
    print(f"{args.model}: {args.pairs} pairs, LoRA r=16 all-linear, fp32; {args.rounds} x {args.steps} steps")
    versus = f"vs {base}"
    print(
        f"{'side':<9} {'rows':>4} {'tokens':>6} {'step (median)':>13} {versus:>8} {'peak RSS':>9} {versus:>8}"
    )
    for c in children:
        median = statistics.median(seconds[c.side])
        ratio = median / statistics.median(seconds[base])
        memory = peaks[c.side] / peaks[base]
        results[c.side] = {
            **c.info,
            "median_step_seconds": median,
            "step_ratio": ratio,
            "seconds": seconds[c.side],
        }
        results[c.side] |= {"peak_memory_bytes": peaks[c.side], "memory_ratio": memory}
        print(
            f"{c.side:<9} {c.info['rows']:>4} {c.info['tokens']:>6} {median:>11.3f} s {ratio:>7.2f}x "
            f"{peaks[c.side] / 2**30:>7.2f} GiB {memory:>7.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
