"""Write a random-weight Llama-2-7B-shaped model (bf16 safetensors shards) so the 7B case runs offline.

    python scripts/make_llama_7b.py /tmp/llama-7b          # ~13.5 GB of disk; check `df -h` first
    python scripts/bench_memory.py --model /tmp/llama-7b --sides peftcli:int4 --batch 1 --length 256 \
        --rank 8 --targets q_proj,v_proj --steps 3 --rounds 1 --warmup 0
    rm -r /tmp/llama-7b

The shape is Llama-2-7B's (Touvron et al. 2023: 32 layers, hidden 4096, MLP 11008, 32 heads, vocabulary
32000; 6,738,415,616 parameters); the weights are N(0, 0.02) (norms 1), which is all a memory and speed
benchmark needs. Tensors are drawn and written one at a time (peftcli/models/shards.py's writer), so this
script never holds more than one of them. Not part of the tests: it writes 13.5 GB.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

SHARD_BYTES = 2 * 10**9
STD = 0.02


def tensors(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of LlamaForCausalLM with this config, in a checkpoint's order."""
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    names = [("model.embed_tokens.weight", (config.vocab_size, hidden))]
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}"
        names += [
            (f"{layer}.self_attn.q_proj.weight", (hidden, hidden)),
            (f"{layer}.self_attn.k_proj.weight", (kv, hidden)),
            (f"{layer}.self_attn.v_proj.weight", (kv, hidden)),
            (f"{layer}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{layer}.mlp.gate_proj.weight", (inter, hidden)),
            (f"{layer}.mlp.up_proj.weight", (inter, hidden)),
            (f"{layer}.mlp.down_proj.weight", (hidden, inter)),
            (f"{layer}.input_layernorm.weight", (hidden,)),
            (f"{layer}.post_attention_layernorm.weight", (hidden,)),
        ]
    names += [("model.norm.weight", (hidden,)), ("lm_head.weight", (config.vocab_size, hidden))]
    return names


def shards(specs: list[tuple[str, tuple[int, ...]]]) -> list[list[tuple[str, tuple[int, ...]]]]:
    out, current, size = [], [], 0
    for name, shape in specs:
        nbytes = 2 * math.prod(shape)
        if current and size + nbytes > SHARD_BYTES:
            out.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    return [*out, current]


def draw(name: str, shape: tuple[int, ...], generator):
    import torch

    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=generator) * STD).to(torch.bfloat16)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output", type=Path)
    p.add_argument("--layers", type=int, default=32, help="fewer layers for a quick try")
    args = p.parse_args(argv)
    import torch
    from transformers import LlamaConfig

    from peftcli import fileio
    from peftcli.models.shards import INDEX_NAME, write_safetensors

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        dtype="bfloat16",
    )
    specs = tensors(config)
    need = 2 * sum(math.prod(shape) for _, shape in specs)
    args.output.mkdir(parents=True, exist_ok=False)
    free = shutil.disk_usage(args.output).free
    if free < need * 1.05:
        args.output.rmdir()
        sys.exit(f"{args.output}: {free / 1e9:.1f} GB free, the model needs {need / 1e9:.1f} GB")
    config.save_pretrained(args.output)
    generator = torch.Generator().manual_seed(0)
    groups = shards(specs)
    weight_map, started = {}, time.perf_counter()
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(
            args.output / name,
            [(key, torch.bfloat16, shape) for key, shape in group],
            (draw(key, shape, generator) for key, shape in group),
        )
        weight_map.update(dict.fromkeys((key for key, _ in group), name))
        print(f"{name}: {len(group)} tensors ({time.perf_counter() - started:.0f} s)", flush=True)
    fileio.write_json(args.output / INDEX_NAME, {"metadata": {"total_size": need}, "weight_map": weight_map})
    print(f"done: {need / 1e9:.2f} GB, {sum(math.prod(s) for _, s in specs):,} parameters in {args.output}")


if __name__ == "__main__":
    main()
