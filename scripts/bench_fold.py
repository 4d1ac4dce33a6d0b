"""Time to fold a LoRA into the weights of a SmolLM2-135M-shaped model (30 layers x 7 linear layers, float32):
`lora.fold_weight` (one addmm per layer, what merge and `peft generate` use) against the two-step
W + scale * (B @ A) it replaced, each result copied into the weight as `infer/load.fold_lora` does.
Rounds alternate the sides; medians are reported.

    python scripts/bench_fold.py [--rank 16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from peftcli.methods.lora import fold_weight

HIDDEN, INTERMEDIATE, KV, LAYERS = 576, 1536, 192, 30
SHAPES = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN)]
SHAPES += [(INTERMEDIATE, HIDDEN), (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]


def two_step(weight, lora_A, lora_B, scale):
    return weight + (lora_B @ lora_A) * scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    layers = [
        (torch.randn(out, inp), torch.randn(args.rank, inp) * 0.01, torch.randn(out, args.rank) * 0.01)
        for _ in range(LAYERS)
        for out, inp in SHAPES
    ]
    sides = {
        "fold_weight (addmm)": lambda w, a, b: fold_weight(w, a, b, 2.0, False),
        "two-step (before)": lambda w, a, b: two_step(w, a, b, 2.0),
    }
    times = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, fold in sides.items():
            started = time.perf_counter()
            with torch.no_grad():
                for weight, lora_A, lora_B in layers:
                    weight.copy_(fold(weight, lora_A, lora_B))
            times[name].append(time.perf_counter() - started)
    print(json.dumps({name: round(statistics.median(t), 3) for name, t in times.items()}, indent=2))


if __name__ == "__main__":
    main()
