"""A LoRA adapter as llama.cpp's ``--lora`` (and Ollama's ADAPTER) reads it: a GGUF of its own.

The file: ``general.type = adapter``, ``general.architecture`` (the base's), ``adapter.type = lora``,
``adapter.lora.alpha``, and for each adapted weight W (llama.cpp's name, e.g. ``blk.3.attn_q.weight``) two
tensors ``<name>.lora_a`` = A (r, in) and ``<name>.lora_b`` = B (out, r), row-major as transformers holds
them.
llama.cpp adds ``(alpha / r) * B @ (A @ x)`` with r read from B, so alpha is written as ``scale * r``: for
rsLoRA (scale = alpha / sqrt(r)) that is alpha * sqrt(r), and an rsLoRA adapter and the plain LoRA with
the same scale give the same file's arithmetic. On a llama-architecture model, B's rows of the q and k
projections are reordered like the weights (gguf_names.to_llamacpp_rotary).

What llama.cpp cannot apply is refused with the reason: other methods, DoRA, modules trained in full
(``modules_to_save``), a LoRA on the token embedding or on an output head tied to it.
"""

from __future__ import annotations

from peftcli.errors import UserError
from peftcli.export.arch import hparams
from peftcli.export.gguf import PlannedTensor
from peftcli.export.quant import F16, F32, QUANTS, quantize
from peftcli.export.tokenizer import F32_VALUE, STRING, Metadata
from peftcli.models.gguf_names import rotary_heads, to_gguf_name, to_llamacpp_rotary

ADAPTER_TYPES = {F32, F16, QUANTS["bf16"]}


def check_adapter_only(adapter, quant_type: int | None) -> None:
    """Refuse, before loading anything, an adapter llama.cpp's LoRA file cannot carry."""
    if quant_type is not None and quant_type not in ADAPTER_TYPES:
        raise UserError("--adapter-only: --quant must be f32, f16 or bf16 (the LoRA factors are small)")
    method = adapter.method
    if method.name != "lora":
        raise UserError(
            f"--adapter-only writes LoRA adapters for llama.cpp; {adapter.path} holds a {method.name} "
            "adapter (export it merged, without --adapter-only, where the method folds into the weights)"
        )
    if getattr(method, "use_dora", False):
        raise UserError(
            "--adapter-only: a DoRA adapter rescales each weight column by its norm, which llama.cpp's LoRA "
            "does not do; export it merged instead"
        )
    if method.modules_to_save:
        raise UserError(
            f"--adapter-only: the adapter trains {', '.join(method.modules_to_save)} in full "
            "(modules_to_save), "
            "which a llama.cpp LoRA file cannot carry; export it merged instead"
        )


def adapter_tensors(
    model, arch: str, quant_type: int | None, base_tensors: set[str] | None
) -> tuple[list, float]:
    """(the planned lora_a/lora_b tensors, the alpha to write) of a model holding LoRA layers.
    `base_tensors`: llama.cpp's tensor names in the base GGUF, when there is one."""
    from peftcli.methods.lora import lora_layers

    kind = F32 if quant_type is None else quant_type
    hp = hparams(model.config.get_text_config(), arch)
    planned, alphas = [], set()
    for name, layer in lora_layers(model):
        target, rule = to_gguf_name(arch, f"{name}.weight")
        if target == "token_embd.weight":
            raise UserError(
                f"--adapter-only: LoRA on the token embedding (`{name}`) is not written for llama.cpp"
            )
        if base_tensors is not None and target not in base_tensors:
            raise UserError(
                f"--adapter-only: LoRA on `{name}`, whose llama.cpp tensor {target} the base file does not "
                "hold "
                "(an output head tied to the embedding); export it merged instead"
            )
        alphas.add(round(layer.scale * layer.rank, 6))
        a = layer.lora_A.weight.detach().float().cpu().numpy()  # (r, in)
        b = layer.lora_B.weight.detach().float().cpu().numpy()  # (out, r)
        heads = rotary_heads(rule, hp.heads, hp.kv_heads)
        if heads is not None:
            b = to_llamacpp_rotary(b, heads)
        for suffix, array in (("lora_a", a), ("lora_b", b)):
            data = quantize(array, kind)
            planned.append(PlannedTensor(f"{target}.{suffix}", array.shape, kind, lambda d=data: d))
    if len(alphas) != 1:
        raise UserError(
            "--adapter-only: the LoRA layers have different scales, which one alpha cannot express"
        )
    return planned, float(alphas.pop())


def adapter_metadata(arch: str, name: str, alpha: float) -> Metadata:
    return {
        "general.type": ("adapter", STRING, None),
        "general.name": (name, STRING, None),
        "adapter.type": ("lora", STRING, None),
        "adapter.lora.alpha": (alpha, F32_VALUE, None),
    }
