"""Frozen-weight products of a training step, MKL (F.linear) vs oneDNN (fast/frozen_linear.py), side by side.

    python scripts/bench_matmul.py                     # SmolLM2-135M's shapes at batch 4 x 256
    python scripts/bench_matmul.py --tokens 2048 --rounds 12

For each distinct (in, out) of the model's Linear layers, and the output head on a loss chunk of
CHUNK_ROWS rows (fast/chunked_loss.py), times the forward product `x @ W^T` both ways in alternating
rounds and prints the median GFLOP/s of each and their ratio. The input gradient `g @ W` stays on MKL in
peftcli and is timed too, for reference. Shapes are read from the model built on the meta device.
"""

from __future__ import annotations

import argparse
import statistics
import time


def shapes(model_name: str, tokens: int) -> list[tuple[str, int, int, int]]:
    """(label, rows, in, out) for each distinct Linear shape, plus the output head on one loss chunk."""
    from torch import nn

    from peftcli.fast.chunked_loss import CHUNK_ROWS
    from peftcli.models.load import meta_model
    from peftcli.models.sources import resolve

    model = meta_model(resolve(model_name), task="causal-lm")
    head = model.get_output_embeddings()
    found: dict[tuple[int, int], str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head:
            found.setdefault((module.in_features, module.out_features), name.rsplit(".", 1)[-1])
    rows = [(label, tokens, i, o) for (i, o), label in found.items()]
    rows.append(("head chunk", CHUNK_ROWS, head.in_features, head.out_features))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tokens", type=int, default=1024, help="rows of each product (batch x length)")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3, help="products per timing")
    args = p.parse_args()

    import torch
    import torch.nn.functional as F

    from peftcli.fast import frozen_linear

    if frozen_linear._onednn() is None:
        raise SystemExit("this torch build has no oneDNN linear; nothing to compare")
    cases = []
    for label, rows, fan_in, fan_out in shapes(args.model, args.tokens):
        x, w, g = torch.randn(rows, fan_in), torch.randn(fan_out, fan_in), torch.randn(rows, fan_out)
        cases.append(
            (
                f"{label} ({rows}x{fan_in} @ {fan_in}x{fan_out})",
                2 * rows * fan_in * fan_out,
                {
                    "forward MKL": lambda x=x, w=w: F.linear(x, w),
                    "forward oneDNN": lambda x=x, w=w: frozen_linear.linear(x, w),
                    "input grad MKL": lambda g=g, w=w: g @ w,
                },
            )
        )
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for label, _, ways in cases:
            for way, product in ways.items():
                product()  # warm
                started = time.perf_counter()
                for _ in range(args.repeat):
                    product()
                times.setdefault((label, way), []).append((time.perf_counter() - started) / args.repeat)
    print(f"{torch.get_num_threads()} threads, median of {args.rounds} alternating rounds, GFLOP/s")
    print(f"{'product':<44}{'fwd MKL':>9}{'fwd oneDNN':>12}{'ratio':>7}{'grad MKL':>10}")
    for label, flops, _ in cases:
        rate = {way: flops / statistics.median(times[(label, way)]) / 1e9 for way in cases[0][2]}
        print(
            f"{label:<44}{rate['forward MKL']:>9.0f}{rate['forward oneDNN']:>12.0f}"
            f"{rate['forward oneDNN'] / rate['forward MKL']:>7.2f}{rate['input grad MKL']:>10.0f}"
        )


if __name__ == "__main__":
    main()
