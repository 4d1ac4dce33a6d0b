"""One LoRA training step, peftcli vs HF PEFT on plain transformers, timed side by side.

    python scripts/bench_train.py                      # SmolLM2-135M-Instruct, r=16 all-linear, 4 x 256, fp32
    python scripts/bench_train.py --quick              # a tiny random Llama: a smoke test in seconds
    python scripts/bench_train.py --mid --sides peftcli peftcli:dora   # DoRA vs LoRA, SmolLM2's layers x 6
    python scripts/bench_train.py --sides peftcli hf peftcli:gc peftcli:plain --json bench.json

Each side runs in its own child process, which loads the model once and then waits for orders on a
pipe; the parent runs the children's steps in alternating rounds (never two at once: on a small CPU
concurrency corrupts the timing), and times a big fp32 matmul between rounds for the machine's peak.

The step is the same on every side: one forward + backward of a fixed batch of real text tokens (the
README, tokenized), gradient clipping at 1.0, AdamW (lr 1e-4, betas 0.9/0.999, no weight decay). Both
sides start from the same adapter: the peftcli child injects LoRA with a fixed seed and saves it with
peftcli.runs.adapter.save_adapter; the HF child loads that file with PeftModel.from_pretrained. Both load
the base model with peftcli.models.load.load_model (transformers' own from_pretrained underneath).

peftcli's step is built from peftcli.train's own pieces (inject, the AdamW groups, peftcli.fast.install,
the losses), so the bench measures what `peft train` runs. HF's step is
`model(input_ids, attention_mask=..., labels=...).loss`.

Memory: "peak_memory_bytes" is the process's peak resident set during training. Loading the GGUF
dequantizes every tensor and leaves a high-water mark of its own that says nothing about training, so
each child, after loading and setting up, returns freed heap to the OS (malloc_trim) and resets the
kernel's high-water mark (/proc/self/clear_refs, "5"); VmHWM afterwards is the peak resident memory
while training, model weights included. The whole-process peak (load included) is reported too.
That resident set includes what glibc's heap holds free between tensors (on this workload ~0.5 GiB for
peftcli); `--live-memory` starts the children with MALLOC_MMAP_THRESHOLD_=262144, which maps every tensor
of 256 KiB or more on its own and unmaps it when freed, so the peak is close to the tensors alive at once
(the steps are then slower: every such allocation faults in fresh pages; compare memory, not time).

FLOPs counted per step (T = batch x length tokens; frozen weights get no weight gradient):
- each frozen Linear (in, out): forward 2*T*in*out, input gradient 2*T*in*out;
- the output head (vocab x hidden, frozen): the same, on all T rows;
- each LoRA pair (rank r): forward 2*T*r*(in + out); backward twice that (input and weight gradients);
- attention scores and values, counted dense (causal masking is not subtracted):
  forward 4*B*heads*S^2*head_dim, backward twice that.
Elementwise work (norms, activations, softmax, the optimizer) is not counted. The fraction reported is
achieved FLOP/s over the median measured fp32 matmul rate of this run.
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

ROOT = Path(__file__).resolve().parent.parent
LEARNING_RATE = 1e-4
MAX_GRAD_NORM = 1.0
SEED = 0
# A side is a name plus options: "peftcli", "hf", "peftcli:gc" (activation checkpointing), "peftcli:mlpgc"
# (the MLPs only), "peftcli:upgc" (up's projection only), "peftcli:nogc" (no recompute at all: the
# default recomputes up's projection), "peftcli:plain" (chunked loss and lean layers off),
# "peftcli:nolean" (lean layers off), "peftcli:mkl" (frozen products on MKL, not oneDNN),
# "peftcli:compile", "peftcli:dora" (DoRA at the same rank), "hf:gc"; options combine with "+":
# "peftcli:gc+plain". The first peftcli side writes the adapter the HF sides load: put a DoRA side first
# to compare DoRA with HF PEFT's.
SIDE_OPTIONS = {"gc", "mlpgc", "upgc", "nogc", "plain", "nolean", "mkl", "compile", "dora"}
# side option -> train.gradient_checkpointing (else the recipe's default)
RECOMPUTE = {"gc": True, "mlpgc": "mlp", "upgc": "up", "nogc": False}


# --------------------------------------------------------------------------------------------------
# child: one side, loaded once, steps on demand


def _rss_high_water() -> int:
    """Peak resident set (bytes) since the last reset of the high-water mark."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_high_water() -> bool:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _process_peak() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peftcli_side(args, options: set[str], batch: dict):
    """The model and step as `peft train` builds them."""
    import torch

    from peftcli import fast
    from peftcli.methods import make_config
    from peftcli.models.load import load_model
    from peftcli.models.sources import resolve
    from peftcli.recipe import Recipe, TrainSection
    from peftcli.runs import adapter as adapter_files
    from peftcli.train.loop import inject
    from peftcli.train.loss import loss_sum, num_targets
    from peftcli.train.optim import make_optimizer

    recipe = Recipe(
        method=make_config(
            "lora",
            rank=args.rank,
            alpha=2.0 * args.rank,
            target_modules="all-linear",
            use_dora="dora" in options,
        ),
        train=TrainSection(
            learning_rate=LEARNING_RATE,
            max_grad_norm=MAX_GRAD_NORM,
            chunked_loss="plain" not in options,
            lean_layers="plain" not in options and "nolean" not in options,
            gradient_checkpointing=next(
                (v for k, v in RECOMPUTE.items() if k in options), TrainSection.gradient_checkpointing
            ),
        ),
    )
    model = load_model(resolve(args.model), dtype="float32", quantize="none")
    torch.manual_seed(SEED)
    model = inject(model, recipe, tokenizer=None)
    if args.adapter_out:
        adapter_files.save_adapter(model, recipe.method, "causal-lm", args.model, args.adapter_out)
    speedups = fast.install(model, recipe.train, "causal-lm", onednn="mkl" not in options)
    model.train()
    optimizer = make_optimizer(model, recipe)
    forward = torch.compile(model) if "compile" in options else model
    targets = num_targets(batch, "causal-lm")
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step_loss() -> torch.Tensor:
        if speedups.loss is not None:
            return speedups.loss(forward, batch)
        return loss_sum(forward, batch, "causal-lm")

    def step() -> float:
        loss = step_loss()
        (loss / targets).backward()
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()) / targets

    info = {
        "chunked_loss": speedups.loss is not None,
        "attn_implementation": model.config._attn_implementation,
    }
    return model, step, info


def _hf_side(args, options: set[str], batch: dict):
    """HF PEFT on plain transformers, from the adapter the peftcli child saved."""
    import torch
    from peft import PeftModel

    from peftcli.fast import checkpointing
    from peftcli.models.load import load_model
    from peftcli.models.sources import resolve

    model = load_model(resolve(args.model), dtype="float32", quantize="none")
    if "gc" in options:
        checkpointing.enable(model)
    model = PeftModel.from_pretrained(model, args.adapter_in, is_trainable=True)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, betas=(0.9, 0.999), weight_decay=0.0)
    forward = torch.compile(model) if "compile" in options else model

    def step() -> float:
        loss = forward(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    info = {"attn_implementation": model.base_model.model.config._attn_implementation}
    return model, step, info


def child(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    name, _, opts = args.child.partition(":")
    options = set(filter(None, opts.split("+")))
    batch = torch.load(args.batch_file)
    build = _peftcli_side if name == "peftcli" else _hf_side
    model, step, info = build(args, options, batch)
    load_peak = _process_peak()
    reset = _reset_high_water()
    reply = sys.stdout
    print(
        json.dumps(
            {
                "ready": True,
                "load_peak_bytes": load_peak,
                "hwm_reset": reset,
                "threads": torch.get_num_threads(),
                **info,
            }
        ),
        file=reply,
        flush=True,
    )
    losses: list[float] = []
    for line in sys.stdin:
        order = json.loads(line)
        if order["cmd"] == "exit":
            break
        seconds, cpu_seconds = [], []
        for _ in range(order["steps"]):
            started, cpu_started = time.perf_counter(), time.process_time()
            losses.append(step())
            seconds.append(time.perf_counter() - started)
            cpu_seconds.append(time.process_time() - cpu_started)
        print(
            json.dumps(
                {
                    "seconds": seconds,
                    "cpu_seconds": cpu_seconds,
                    "losses": losses,
                    "peak_memory_bytes": _rss_high_water(),
                    "process_peak_bytes": _process_peak(),
                }
            ),
            file=reply,
            flush=True,
        )


# --------------------------------------------------------------------------------------------------
# parent: data, adapter handoff, alternating rounds, report


def make_batch(model: str, batch: int, length: int, path: Path) -> None:
    """batch x length tokens of real text (the README, repeated), labels = inputs, no padding."""
    import torch

    from peftcli.models.load import load_tokenizer
    from peftcli.models.sources import resolve

    tokenizer = load_tokenizer(resolve(model))
    ids = tokenizer((ROOT / "README.md").read_text(encoding="utf-8"))["input_ids"]
    need = batch * length
    ids = (ids * (need // len(ids) + 1))[:need]
    input_ids = torch.tensor(ids).view(batch, length) % len(tokenizer)
    torch.save(
        {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()},
        path,
    )


# --mid: SmolLM2-135M's layer shapes (hidden 576, intermediate 1536, 9 heads sharing 3 key/value heads) in 6
# layers with a byte vocabulary: the layers' step without the output head's share, 5x faster than SmolLM2
MID_MODEL = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=9, num_key_value_heads=3
)


def make_quick_model(directory: Path, **sizes) -> None:
    """A random Llama (GQA, tied embeddings, like SmolLM2; tiny unless `sizes` say otherwise) saved with a
    byte-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="Ā").save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=256,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        **{
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            **sizes,
        },
    )
    torch.manual_seed(SEED)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)


def count_flops(model_name: str, batch: int, length: int, rank: int) -> dict:
    """FLOPs of one step as documented at the top, from the model built on the meta device."""
    from torch import nn

    from peftcli.methods import modules
    from peftcli.models.load import meta_model
    from peftcli.models.sources import resolve

    model = meta_model(resolve(model_name), task="causal-lm")
    tokens = batch * length
    lora_names = set(modules.match_targets(model, "all-linear"))
    linear = lora = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            linear += 4 * tokens * module.in_features * module.out_features  # forward + input grad
            if name in lora_names:
                lora += 6 * tokens * rank * (module.in_features + module.out_features)
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    attention = 12 * batch * c.num_attention_heads * length * length * head_dim * c.num_hidden_layers
    return {"frozen_linear": linear, "lora": lora, "attention": attention, "total": linear + lora + attention}


def matmul_rate(seconds: float = 1.0, size: int = 2048) -> float:
    """Best fp32 matmul FLOP/s over ~`seconds` of size x size products (the machine's peak, now)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - started))
    return best


class Child:
    def __init__(self, side: str, args, batch_file: Path, adapter_dir: Path, save_adapter: bool):
        command = [
            sys.executable,
            __file__,
            "--child",
            side,
            "--model",
            args.model,
            "--rank",
            str(args.rank),
            "--batch-file",
            str(batch_file),
            "--threads",
            str(args.threads),
        ]
        command += ["--adapter-out" if save_adapter else "--adapter-in", str(adapter_dir)]
        env = {
            **os.environ,
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "TQDM_DISABLE": "1",
        }
        if args.live_memory:
            env["MALLOC_MMAP_THRESHOLD_"] = "262144"
        self.side = side
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )

    def receive(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"side {self.side}: the child process died (exit {self.process.wait()})")
        return json.loads(line)

    def run(self, steps: int) -> dict:
        self.process.stdin.write(json.dumps({"cmd": "run", "steps": steps}) + "\n")
        self.process.stdin.flush()
        return self.receive()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
            self.process.stdin.close()
            self.process.wait(timeout=60)


def parent(args) -> dict:
    import torch

    if args.threads:  # the matmul peak is measured with the children's thread count
        torch.set_num_threads(args.threads)
    sides = args.sides
    if not any(s.partition(":")[0] == "peftcli" for s in sides):
        sides = ["peftcli", *sides]  # the adapter comes from a peftcli side
    for side in sides:
        name, _, opts = side.partition(":")
        unknown = set(filter(None, opts.split("+"))) - SIDE_OPTIONS
        if name not in ("peftcli", "hf") or unknown:
            raise SystemExit(f"unknown side {side!r}: use peftcli or hf, options {sorted(SIDE_OPTIONS)}")
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        tmp = Path(tmp)
        if args.quick or args.mid:
            make_quick_model(tmp / "model", **(MID_MODEL if args.mid else {}))
            args.model = str(tmp / "model")
        print(
            f"model {args.model}: batch {args.batch} x {args.length}, LoRA r={args.rank} all-linear, "
            f"sides {' '.join(sides)}",
            flush=True,
        )
        batch_file, adapter_dir = tmp / "batch.pt", tmp / "adapter"
        make_batch(args.model, args.batch, args.length, batch_file)
        flops = count_flops(args.model, args.batch, args.length, args.rank)
        started = time.perf_counter()
        first = Child(
            sides[0] if sides[0].startswith("peftcli") else "peftcli",
            args,
            batch_file,
            adapter_dir,
            save_adapter=True,
        )
        children = {first.side: first}
        try:
            ready = {first.side: first.receive()}  # the adapter exists from here on
            for side in sides:
                if side not in children:
                    children[side] = Child(side, args, batch_file, adapter_dir, save_adapter=False)
            for side, c in children.items():
                if side not in ready:
                    ready[side] = c.receive()  # the others load one after another, never while timing
            print(
                f"loaded in {time.perf_counter() - started:.0f} s: "
                + "; ".join(f"{s} {json.dumps(r)}" for s, r in ready.items()),
                flush=True,
            )
            for c in children.values():
                c.run(args.warmup)
            seconds: dict[str, list[float]] = {s: [] for s in sides}
            cpu_seconds: dict[str, list[float]] = {s: [] for s in sides}
            last: dict[str, dict] = {}
            rates = []
            for round_ in range(args.rounds):
                rates.append(matmul_rate(args.matmul_seconds))
                order = sides if round_ % 2 == 0 else sides[::-1]  # ABBA: drift hits both sides alike
                for side in order:
                    last[side] = children[side].run(args.steps)
                    seconds[side] += last[side]["seconds"]
                    cpu_seconds[side] += last[side]["cpu_seconds"]
                print(
                    f"round {round_ + 1}/{args.rounds}: "
                    + "  ".join(
                        f"{s} {statistics.median(last[s]['seconds']):.3f} s "
                        f"(cpu {statistics.median(last[s]['cpu_seconds']):.3f} s)"
                        for s in sides
                    )
                    + f"  matmul {rates[-1] / 1e9:.0f} GFLOP/s",
                    flush=True,
                )
        finally:
            for c in children.values():
                c.close()
    tokens = args.batch * args.length
    peak_rate = statistics.median(rates)
    results = {}
    for side in sides:
        step_seconds = statistics.median(seconds[side])
        results[side] = {
            "step_seconds": step_seconds,
            # CPU time of the side's process (all threads) per step: on a loaded machine it leaves out the
            # time spent waiting for a core, which wall time counts
            "cpu_step_seconds": statistics.median(cpu_seconds[side]),
            "tokens_per_second": tokens / step_seconds,
            "peak_memory_bytes": last[side]["peak_memory_bytes"],
            "process_peak_bytes": last[side]["process_peak_bytes"],
            "load_peak_bytes": ready[side]["load_peak_bytes"],
            "flops_per_second": flops["total"] / step_seconds,
            "flops_fraction": flops["total"] / step_seconds / peak_rate,
            "losses": last[side]["losses"],
            "all_step_seconds": seconds[side],
            "all_cpu_step_seconds": cpu_seconds[side],
            **{k: v for k, v in ready[side].items() if k not in ("ready", "load_peak_bytes")},
        }
    summary = {
        "model": args.model,
        "batch": args.batch,
        "length": args.length,
        "rank": args.rank,
        "live_memory": args.live_memory,
        "threads": torch.get_num_threads() if not args.threads else args.threads,
        "flops_per_step": flops,
        "matmul_peak_flops": peak_rate,
        "matmul_rates": rates,
        "sides": results,
    }
    if "peftcli" in results and "hf" in results:
        ours, theirs = results["peftcli"], results["hf"]
        summary["peftcli"] = {k: ours[k] for k in ("tokens_per_second", "peak_memory_bytes", "step_seconds")}
        summary["hf_peft"] = {
            k: theirs[k] for k in ("tokens_per_second", "peak_memory_bytes", "step_seconds")
        }
        summary["speedup"] = ours["tokens_per_second"] / theirs["tokens_per_second"]
        summary["memory_ratio"] = ours["peak_memory_bytes"] / theirs["peak_memory_bytes"]
        summary["flops_fraction"] = ours["flops_fraction"]
        summary["first_loss_difference"] = abs(ours["losses"][0] - theirs["losses"][0])
    return summary


def print_summary(summary: dict) -> None:
    gib = 2**30
    print(
        f"\nmatmul peak (median of rounds) {summary['matmul_peak_flops'] / 1e9:.0f} GFLOP/s; "
        f"step = {summary['flops_per_step']['total'] / 1e9:.0f} GFLOP counted"
    )
    print(
        f"{'side':<20}{'step s':>9}{'tok/s':>9}{'peak GiB':>10}{'+load GiB':>11}{'GFLOP/s':>9}{'of peak':>9}"
        f"{'cpu s':>9}  first losses"
    )
    for side, r in summary["sides"].items():
        print(
            f"{side:<20}{r['step_seconds']:>9.3f}{r['tokens_per_second']:>9.0f}"
            f"{r['peak_memory_bytes'] / gib:>10.2f}{r['process_peak_bytes'] / gib:>11.2f}"
            f"{r['flops_per_second'] / 1e9:>9.0f}{r['flops_fraction']:>9.0%}{r['cpu_step_seconds']:>9.3f}  "
            + " ".join(f"{x:.6f}" for x in r["losses"][:3])
        )
    if "speedup" in summary:
        print(
            f"peftcli vs HF PEFT: {summary['speedup']:.2f}x tokens/s, "
            f"{summary['memory_ratio']:.2f}x peak memory, "
            f"first-step loss difference {summary['first_loss_difference']:.2e}"
        )


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=2, help="timed steps per side per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side before the first round")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each child (0: torch's default)")
    p.add_argument("--sides", nargs="+", default=["peftcli", "hf"])
    p.add_argument("--matmul-seconds", type=float, default=1.0)
    p.add_argument("--live-memory", action="store_true", help="no heap slack in the memory figures (slower)")
    p.add_argument("--quick", action="store_true", help="a tiny random Llama, a few short rounds")
    p.add_argument("--mid", action="store_true", help="a 6-layer random Llama of SmolLM2's layer shapes")
    p.add_argument("--json", type=Path, help="write the results here")
    # internal: the child processes
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--batch-file", help=argparse.SUPPRESS)
    p.add_argument("--adapter-out", help=argparse.SUPPRESS)
    p.add_argument("--adapter-in", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return None
    if args.quick:
        args.batch, args.length, args.rank, args.steps, args.rounds = 2, 32, 4, 2, 2
        args.matmul_seconds = min(args.matmul_seconds, 0.2)
    summary = parent(args)
    print_summary(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
