"""`peft export` and `peft generate` on a trained quickstart run: llama.cpp's agreement with peftcli, the
style of its answers, export time and peak memory, and generation latency and decode speed.

    peft train configs/quickstart.yaml --set output_dir=/tmp/qs      # once (~4-5 min)
    python scripts/bench_export.py /tmp/qs [--work DIR] [--rounds 3] [--baseline-tree /path/to/main]
    python scripts/bench_export.py /tmp/qs --generate-only --baseline-tree /path/to/main   # timings alone

What it measures (the issue's targets):

- agreement: the 16 held-out prompts (configs/data/quickstart-heldout.jsonl), rendered by the chat template.
  For each exported file, llama.cpp's greedy 24-token continuation against peftcli's (the adapter folded,
  as `peft generate` decodes) -- identical or not -- and llama.cpp's whole answer (up to 96 tokens) against
  the trained style: it starts "Velmora Guide:" and contains "Safe travels!". Files: the merged model at q8_0,
  the merged model in the base's own types (q4_1), and the adapter alone on the packaged Q4_1 base.
- rsLoRA: the run's adapter rewritten as the rsLoRA with the same scale (alpha / sqrt(r) = the plain
  alpha / r) exports to the same adapter tensors and the same llama.cpp answers.
- export: wall time and peak RSS (GNU time's maximum resident set) of each `peft export` process, check
  included; llama.cpp's warnings while loading (the check fails on vocabulary warnings).
- generate: seconds from starting `peft generate` to its first printed token (warm disk cache), for this
  tree and, with --baseline-tree, for another checkout (the previous code); and decode speed in one
  process, alternating: peftcli's fold-in-memory path against plain transformers generate on the merged
  model `peft merge` writes (64 new tokens, no early stop).

Rounds alternate the sides; medians are reported. The machine is shared: quote ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "configs" / "data" / "quickstart-heldout.jsonl"
PROMPT = "Which currency should I bring to Velmora?"


def peft_command(tree: Path, *args: str) -> tuple[list[str], dict]:
    """The command running `tree`'s peftcli. -P: `python -m` would otherwise put the working directory
    first on the path, and a checkout there would shadow `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return [sys.executable, "-P", "-m", "peftcli.cli", *args], env


def timed_export(run: Path, out: Path, *flags: str) -> dict:
    """One `peft export` process: seconds, peak RSS (GNU time) and what it printed."""
    out.unlink(missing_ok=True)
    command, env = peft_command(ROOT, "export", str(run), "--gguf", str(out), *flags)
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-f", "%M", *command], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"export {flags} failed:\n{result.stdout}\n{result.stderr[-3000:]}")
    peak_kb = int(result.stderr.strip().splitlines()[-1])
    return {"seconds": seconds, "peak_rss_gib": peak_kb / 2**20, "output": result.stdout.strip().splitlines()}


def heldout_prompts() -> list[str]:
    rows = [json.loads(line) for line in HELDOUT.read_text().splitlines() if line.strip()]
    return [next(m["content"] for m in row["messages"] if m["role"] == "user") for row in rows]


def references(run: Path, prompts: list[str]):
    """peftcli's 24-token greedy continuations (the adapter folded, as `peft generate`), with the ids."""
    from peftcli.export.verify import reference_continuations
    from peftcli.infer import load_for_inference
    from peftcli.infer.prompt import stop_ids

    model, tokenizer, _ = load_for_inference(run, fold=True)
    probes = reference_continuations(
        model, tokenizer, "chat", tuple(prompts), stop_ids(tokenizer, "chat"), "cpu"
    )
    return probes, tokenizer


def llamacpp_answers(model: Path, probes, tokenizer, lora: Path | None = None) -> dict:
    """llama.cpp on `model` (+ `lora`): identical 24-token continuations, and the style of whole answers."""
    from peftcli.export.llamacpp import LlamaCpp

    identical, styled, continuations = 0, 0, []
    with LlamaCpp(model, lora=lora, context=512) as llama:
        warnings = llama.warnings
        for probe in probes:
            theirs = llama.greedy(probe.ids, 24)
            theirs = theirs[:-1] if theirs and theirs[-1] in probe.stop else theirs
            continuations.append(theirs)
            identical += theirs == probe.ours
            answer = tokenizer.decode(llama.greedy(probe.ids, 96), skip_special_tokens=True).strip()
            styled += answer.startswith("Velmora Guide:") and "Safe travels!" in answer
    return {
        "identical": identical,
        "styled": styled,
        "of": len(probes),
        "warnings": warnings,
        "ids": continuations,
    }


def rslora_copy(run: Path, work: Path) -> Path:
    """The run's adapter as the rsLoRA with the same scale: alpha' = (alpha / r) * sqrt(r)."""
    copy = work / "rslora-run"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "*.png", "recipe.yaml"))
    config = json.loads((copy / "adapter_config.json").read_text())
    rank = config["r"]
    config["lora_alpha"], config["use_rslora"] = config["lora_alpha"] / rank * rank**0.5, True
    (copy / "adapter_config.json").write_text(json.dumps(config))
    return copy


def first_token_seconds(tree: Path, run: Path) -> tuple[float, float]:
    """(seconds to the first printed byte, seconds to exit) of `peft generate` from `tree`."""
    command, env = peft_command(tree, "generate", str(run), "--prompt", PROMPT, "--max-new-tokens", "24")
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    process.stdout.read(1)
    first = time.perf_counter() - started
    process.stdout.read()
    process.wait()
    return first, time.perf_counter() - started


def decode_speed(run: Path, work: Path, rounds: int, tokens: int = 64) -> dict:
    """Tokens per second, peftcli's generate path against transformers' generate on the merged model."""
    import torch
    from transformers import AutoModelForCausalLM

    from peftcli.infer import load_for_inference
    from peftcli.infer.generate import continue_ids
    from peftcli.infer.prompt import encode_prompt
    from peftcli.merge.to_dir import merge_to_dir

    merged_dir = work / "merged"
    shutil.rmtree(merged_dir, ignore_errors=True)
    merge_to_dir(run, merged_dir, verify=False, console=None)
    plain = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    ours, tokenizer, _ = load_for_inference(run, fold=True)
    ids, _ = encode_prompt(tokenizer, PROMPT, "chat")

    def ours_run():
        continue_ids(ours, tokenizer, ids, tokens, [])

    def plain_run():
        with torch.no_grad():
            fixed = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False}
            mask = torch.ones_like(ids)
            plain.generate(ids, attention_mask=mask, pad_token_id=tokenizer.pad_token_id, **fixed)

    times = {"peftcli": [], "transformers-merged": []}
    for fn in (ours_run, plain_run):
        fn()  # warm-up
    for _ in range(rounds):
        for side, fn in (("peftcli", ours_run), ("transformers-merged", plain_run)):
            started = time.perf_counter()
            fn()
            times[side].append(tokens / (time.perf_counter() - started))
    return {side: statistics.median(values) for side, values in times.items()}


def agreement(run: Path, work: Path, base_gguf: Path) -> dict:
    prompts = heldout_prompts()
    probes, tokenizer = references(run, prompts)
    report = {}
    for name, flags in (
        ("q8_0", ["--quant", "q8_0"]),
        ("base-types", []),
        ("adapter-only", ["--adapter-only"]),
    ):
        out = work / f"{name}.gguf"
        report[name] = {"export": timed_export(run, out, *flags)}
        model, lora = (base_gguf, out) if name == "adapter-only" else (out, None)
        report[name]["llamacpp"] = llamacpp_answers(model, probes, tokenizer, lora)
    rs = rslora_copy(run, work)
    rs_out = work / "rslora-adapter.gguf"
    timed_export(rs, rs_out, "--adapter-only")
    rs_answers = llamacpp_answers(base_gguf, probes, tokenizer, rs_out)
    report["rslora"] = {
        "same_files_tensors": _tensor_bytes(rs_out) == _tensor_bytes(work / "adapter-only.gguf"),
        "same_llamacpp_continuations": rs_answers["ids"] == report["adapter-only"]["llamacpp"]["ids"],
    }
    for entry in report.values():
        entry.get("llamacpp", {}).pop("ids", None)
    return report


def _tensor_bytes(path: Path) -> bytes:
    from peftcli.models.gguf_header import read_gguf

    gguf = read_gguf(str(path))
    blob = path.read_bytes()
    return b"".join(blob[t.offset : t.offset + t.nbytes] for t in gguf.tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--baseline-tree", type=Path, default=None, help="another checkout to time generate from"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--generate-only", action="store_true", help="time generate only (no exports, no llama.cpp)"
    )
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from peftcli.models.sources import resolve

    source = resolve("smollm2-135m-instruct")
    base_gguf = Path(source.path) / source.gguf_file
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-export-"))
    work.mkdir(parents=True, exist_ok=True)
    report = {} if args.generate_only else {"agreement": agreement(args.run, work, base_gguf)}
    trees = [("this tree", ROOT)] + ([("baseline", args.baseline_tree)] if args.baseline_tree else [])
    latency = {name: [] for name, _ in trees}
    first_token_seconds(ROOT, args.run)  # warm the disk cache
    for _ in range(args.rounds):
        for name, tree in trees:
            latency[name].append(first_token_seconds(tree, args.run))
    report["generate_first_token_s"] = {n: statistics.median(f for f, _ in v) for n, v in latency.items()}
    report["generate_total_s"] = {n: statistics.median(t for _, t in v) for n, v in latency.items()}
    report["decode_tokens_per_s"] = decode_speed(args.run, work, args.rounds)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
