"""The CUDA side of model.dtype and model.quantize, checked on a machine with a GPU (not run in CI).

    python scripts/check_gpu.py            # ~1 minute; exit 1 if any check fails

The CPU tests (tests/quant, tests/models/test_filled.py, tests/test_interop_quantized.py) hold the math; the
CUDA paths share that code (the same dequantize-then-product on another device, bitsandbytes' CUDA kernels for
NF4), so these checks are the CPU tests' oracles again, on the GPU:

1. ``model.dtype: auto`` picks bf16 on a bf16 GPU and says why.
2. Each format's layer on CUDA equals its CPU self (codes moved, same dequantized weight) and its product
   and input gradient equal a dense layer's on the dequantized weight, in fp32 and bf16.
3. Loading a quantized base (int4, nf4) and a packed GGUF file, then ``.to("cuda")``: logits match the CPU's.
4. `peft train` on a tiny Llama with nf4 on the GPU (bf16 autocast, fp32 LoRA factors): it learns and reports
   bfloat16 / nf4; `peft generate` runs on it.
5. The adapter loads in HF PEFT on transformers' CUDA bitsandbytes 4-bit base and gives the same logits.
6. `peft generate`'s llama decoder (peftcli/infer/llama.py) on CUDA, in bf16 (``dtype: auto``): its logits
   match transformers' LlamaForCausalLM on the GPU in bf16, and its fp32 greedy tokens equal transformers'.
"""

from __future__ import annotations

import json
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
warnings.simplefilter("ignore")

import torch  # noqa: E402
from tiny import batch, save_tiny, tiny_config, write_llama_gguf  # noqa: E402

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def close(a, b, tolerance: float) -> None:
    a, b = a.float().cpu(), b.float().cpu()
    scale = max(1.0, float(b.abs().max()))
    diff = float((a - b).abs().max())
    assert diff <= tolerance * scale, f"max difference {diff:.3g} > {tolerance} x {scale:.3g}"


@check
def auto_dtype_is_bf16():
    from peftcli.models.precision import resolve

    chosen = resolve("auto", "auto", gguf=False)
    assert chosen.dtype == "bfloat16" and "CUDA" in chosen.dtype_reason, chosen


@check
def layers_on_cuda_match_cpu_and_the_dense_oracle():
    import torch.nn.functional as F

    from peftcli.quant import convert

    torch.manual_seed(0)
    weight = torch.randn(96, 128) * 0.05
    for kind in ("int8", "int4", "nf4"):
        for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            cpu = convert.quantize_linear(weight, None, kind, dtype)
            gpu = convert.quantize_linear(weight, None, kind, dtype).cuda()
            assert torch.equal(gpu.dequantize(torch.float32).cpu(), cpu.dequantize(torch.float32)), kind
            x = torch.randn(4, 128, device="cuda", dtype=dtype, requires_grad=True)
            out = gpu(x)
            out.float().square().sum().backward()
            dense = gpu.dequantize(dtype)
            xr = x.detach().clone().requires_grad_(True)
            F.linear(xr, dense).float().square().sum().backward()
            close(out, F.linear(x.detach(), dense), tolerance)
            close(x.grad, xr.grad, tolerance)


@check
def loaded_bases_on_cuda_match_cpu():
    from transformers import AutoModelForCausalLM

    from peftcli.models.load import load_model
    from peftcli.models.sources import resolve

    with tempfile.TemporaryDirectory() as tmp:
        base = str(save_tiny(Path(tmp) / "llama", "llama"))
        config = tiny_config("llama")
        config.tie_word_embeddings = True
        write_llama_gguf(Path(tmp) / "m.gguf", AutoModelForCausalLM.from_config(config), {"linear": "Q4_1"})
        for name, quantize in ((base, "int4"), (base, "nf4"), (str(Path(tmp) / "m.gguf"), "auto")):
            model = load_model(resolve(name), dtype="float32", quantize=quantize)
            with torch.no_grad():
                on_cpu = model(**batch()).logits
                on_gpu = model.cuda()(**{k: v.cuda() for k, v in batch().items()}).logits
            close(on_gpu, on_cpu, 1e-4)


@check
def train_nf4_bf16_on_cuda_and_generate():
    import yaml

    from peftcli.infer import run_generate
    from peftcli.recipe import load_recipe
    from peftcli.train.run import run

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = str(save_tiny(tmp / "llama", "llama"))
        rows = [{"text": f"The number {i} comes after {i - 1}."} for i in range(24)]
        (tmp / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        recipe = {
            "model": {"name": base, "quantize": "nf4"},
            "method": {"name": "lora", "rank": 4, "target_modules": "all-linear"},
            "data": {"train": str(tmp / "d.jsonl"), "format": "text", "max_length": 32},
            "train": {"max_steps": 6, "learning_rate": 1e-2, "eval_every": 3},
            "output_dir": str(tmp / "run"),
        }
        (tmp / "r.yaml").write_text(yaml.safe_dump(recipe))
        run(load_recipe(tmp / "r.yaml"))
        report = json.loads((tmp / "run" / "report.json").read_text())
        precision = report["precision"]
        assert precision["dtype"] == "bfloat16" and precision["quantize"] == "nf4", precision
        assert precision["trainable_dtype"] == "float32", precision
        assert report["eval"]["after"]["loss"] < report["eval"]["before"]["loss"], report["eval"]
        assert isinstance(run_generate(tmp / "run", "The number 3", max_new_tokens=4), str)


@check
def nf4_adapter_in_hf_peft_on_cuda_bitsandbytes():
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from peftcli.methods import Context, lora, make_config
    from peftcli.models.load import load_model
    from peftcli.models.sources import resolve
    from peftcli.runs import adapter as checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        base = str(save_tiny(Path(tmp) / "llama", "llama"))
        section = make_config("lora", rank=4, target_modules="all-linear")
        ours = lora.inject(
            load_model(resolve(base), dtype="float32", quantize="nf4"), section, Context("causal-lm")
        )
        for _, layer in lora.lora_layers(ours):
            torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
        checkpoint.save_adapter(ours, section, "causal-lm", base, Path(tmp) / "adapter")
        settings = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
        hf = AutoModelForCausalLM.from_pretrained(base, quantization_config=settings, device_map="cuda")
        hf = peft.PeftModel.from_pretrained(hf, Path(tmp) / "adapter").eval()
        inputs = {k: v.cuda() for k, v in batch().items()}
        with torch.no_grad():
            close(hf(**inputs).logits, ours.cuda().eval()(**inputs).logits, 1e-4)


@check
def llama_decoder_on_cuda_matches_transformers():
    from transformers import AutoModelForCausalLM

    from peftcli.infer import llama
    from peftcli.infer.generate import continue_ids
    from peftcli.models.sources import resolve

    with tempfile.TemporaryDirectory() as tmp:
        base = save_tiny(Path(tmp) / "llama", "llama")
        ids = batch()["input_ids"].cuda()
        for dtype, tolerance in ((torch.bfloat16, 3e-2), (torch.float32, 1e-4)):
            ours = llama.load(resolve(str(base)), dtype).cuda()
            theirs = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).cuda().eval()
            with torch.no_grad():
                close(ours(ids), theirs(ids).logits, tolerance)
        prompt = ids[:1, :6]
        assert continue_ids(ours, None, prompt, 12, []) == continue_ids(theirs, _NoPad(), prompt, 12, [])


class _NoPad:
    pad_token_id = 0


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here")
        return 1
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    failed = 0
    for fn in CHECKS:
        try:
            fn()
            print(f"PASS {fn.__name__}", flush=True)
        except Exception:  # every check runs and reports
            failed += 1
            print(f"FAIL {fn.__name__}\n{traceback.format_exc()}", flush=True)
    print(f"{len(CHECKS) - failed}/{len(CHECKS)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
