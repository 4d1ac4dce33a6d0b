"""Tiny randomly initialised models and a byte-level tokenizer, built in-process: fast and offline.

Also the few helpers the method tests (tests/methods/) share: the default task of an architecture, logits
and loss on a batch, perturbing what trains, one optimizer step, copying trained heads into HF PEFT's model;
for the virtual-token methods (prefix and prompt tuning), a cache-free greedy reference, checks of
`generate`, and the adapter_config.json fields HF PEFT writes for them; and for the tests of the step's
fast paths (test_perf_paths.py, test_lean.py), a LoRA model, one step's loss and gradients, and the bytes
autograd keeps for backward.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    RobertaConfig,
)

from peftcli.methods import Context, lora, make_config
from peftcli.methods.modules import ModulesToSave
from peftcli.runs import adapter as checkpoint
from peftcli.train.loss import loss_sum, num_targets

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VOCAB_SIZE = 256 + len(SPECIALS)

ARCHS = ["llama", "gpt2", "bert", "roberta", "opt"]
DECODERS = ["llama", "gpt2", "opt"]
ENCODERS = ["bert", "roberta"]
# Our task names -> HF PEFT's `task_type`.
HF_TASK = {"causal-lm": "CAUSAL_LM", "sequence-classification": "SEQ_CLS"}


def llama_2_7b_config() -> LlamaConfig:
    """Llama-2-7B's shape (Touvron et al. 2023), for counting on the meta device: 6,738,415,616 parameters."""
    return LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    )


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Every byte is a token (ids 0..255), plus chat/special tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tok = _byte_level(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens(SPECIALS)
    return _with_chat_specials(tok)


def _byte_level(model) -> Tokenizer:
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _with_chat_specials(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        chat_template=CHAT_TEMPLATE,
    )


def chat_rows(n: int) -> list[dict]:
    """`n` chat examples a tiny model learns in a few steps: "What is i plus i?" -> "It is 2i."."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"It is {2 * i}."},
            ]
        }
        for i in range(n)
    ]


def tiny_config(arch: str, num_labels: int = 3):
    common = dict(
        vocab_size=VOCAB_SIZE, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=num_labels
    )
    # Two layers of four heads each (GPT-2's config spells these n_layer, n_head, n_positions).
    layers = dict(num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512, **common)
    if arch == "llama":  # grouped-query attention: 4 heads share 2 key/value heads
        return LlamaConfig(hidden_size=64, intermediate_size=96, num_key_value_heads=2, **layers)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, **common)
    if arch == "opt":
        return OPTConfig(hidden_size=32, ffn_dim=64, word_embed_proj_dim=32, **layers)
    if arch == "bert":
        return BertConfig(hidden_size=32, intermediate_size=64, **layers)
    if arch == "roberta":  # positions are numbered from the padding id + 1: two more for the same 512
        return RobertaConfig(
            hidden_size=32, intermediate_size=64, **dict(layers, max_position_embeddings=514)
        )
    raise ValueError(arch)


def task_of(arch: str) -> str:
    """The task tiny_model builds by default: causal-lm for decoders, sequence-classification for encoders."""
    return "causal-lm" if arch in DECODERS else "sequence-classification"


def tiny_model(arch: str, task: str | None = None, seed: int = 0, num_labels: int = 3):
    """A random tiny model; decoders default to causal-lm, encoders to sequence-classification."""
    task = task or task_of(arch)
    torch.manual_seed(seed)
    config = tiny_config(arch, num_labels)
    cls = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    return cls.from_config(config).eval()


def save_tiny(
    directory: str | Path, arch: str, task: str | None = None, seed: int = 0, num_labels: int = 3
) -> Path:
    """Write a tiny model + tokenizer as a normal transformers model dir."""
    directory = Path(directory)
    tiny_model(arch, task, seed, num_labels).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def save_bases(root: Path, archs: tuple[str, ...] = ("llama", "gpt2", "bert")) -> dict[str, str]:
    """{arch: model dir} of tiny models saved under `root`, for tests that train from a model name."""
    return {arch: str(save_tiny(Path(root) / arch, arch)) for arch in archs}


def launch_two_processes(*args: str) -> list[str]:
    """`accelerate launch` of `python -m peftcli.cli ARGS` on 2 CPU processes (gloo)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*launch, "-m", "peftcli.cli", *args]


def torchrun(*args: str, processes: int = 2) -> list[str]:
    """`torchrun` of `python -m peftcli.cli ARGS` on `processes` CPU processes (gloo), one node."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "-m",
        "peftcli.cli",
        *args,
    ]


def batch(n: int = 2, length: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on the first row exercises the attention mask
    return {"input_ids": ids, "attention_mask": mask}


# --------------------------------------------------------------------------------------------------
# What the method tests share


def labels_for(task: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The ids themselves for causal-lm (the model shifts them), else a class per row of `batch()`."""
    return inputs["input_ids"] if task == "causal-lm" else torch.tensor([0, 2])


def loss_of(model: nn.Module, task: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs, labels=labels_for(task, inputs)).loss


@torch.no_grad()
def logits(model: nn.Module, inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The model's logits on `inputs` (default `batch()`), without a graph."""
    return model(**(batch() if inputs is None else inputs)).logits


def randomise(model: nn.Module, scale: float = 0.5, seed: int = 3, replace: bool = False) -> None:
    """Add seeded noise of std `scale` to every trainable tensor (or, with `replace`, set it to the noise).

    Adapters start as the identity (LoRA's B, an adapter's `up` at zero): perturbed, a wrong load, a
    wrong scale or a dropped head shows in the outputs.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g) * scale
                if replace:
                    p.copy_(noise)
                else:
                    p.add_(noise)


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def one_step_changes(model: nn.Module, task: str, weight_decay: float = 0.01) -> set[str]:
    """Names of the parameters that one AdamW step (lr 1e-2) on the loss of `batch()` changes.

    The model is left in train mode with its gradients in place.
    """
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=weight_decay)
    model.train()
    loss_of(model, task, batch()).backward()
    optimizer.step()
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def copy_heads_into_hf(base_model: nn.Module, hf_model: nn.Module) -> None:
    """Give HF PEFT's model the trained copy of each of our modules_to_save (the classification head)."""
    for name, module in base_model.named_modules():
        if isinstance(module, ModulesToSave):
            hf_head = hf_model.base_model.get_submodule(name).modules_to_save["default"]
            hf_head.load_state_dict(module.trained.state_dict())


# --------------------------------------------------------------------------------------------------
# Virtual-token methods (prefix and prompt tuning)

# The fields of every HF PEFT prompt-learning adapter_config.json.
PROMPT_LEARNING_FIELDS = [
    "num_virtual_tokens",
    "token_dim",
    "num_transformer_submodules",
    "num_attention_heads",
    "num_layers",
    "peft_type",
    "task_type",
]


def saved_configs(
    ours: nn.Module, section, task: str, hf_model: nn.Module, directory: Path
) -> tuple[dict, dict]:
    """adapter_config.json as we save `ours` (under directory/ours) and as HF PEFT saves `hf_model`."""
    checkpoint.save_adapter(ours, section, task, "tiny", directory / "ours")
    hf_model.save_pretrained(directory / "hf")
    ours_config = json.loads((directory / "ours" / "adapter_config.json").read_text())
    hf_config = json.loads((directory / "hf" / "adapter_config.json").read_text())
    return ours_config, hf_config


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as `generate` numbers them: each row's real tokens from 0, padding at 0."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


@torch.no_grad()
def greedy_without_cache(
    next_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], inputs: dict, steps: int
) -> torch.Tensor:
    """Greedy decoding that reads the whole sequence again for every new token: a reference for `generate`.

    next_logits(ids, mask) -> (batch, seq, vocab); the last position's argmax is the next token.
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for _ in range(steps):
        next_token = next_logits(ids, mask)[:, -1].argmax(-1)
        ids = torch.cat([ids, next_token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


def check_generate_from_embeds_and_beams(model: nn.Module) -> torch.Tensor:
    """`generate` from inputs_embeds picks the tokens it picks from input_ids, and beam search returns
    num_return_sequences rows per prompt. Returns the greedy ids (prompt + 4 new tokens).
    """
    inputs = batch()
    by_ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    by_embeds = model.generate(
        inputs_embeds=embeds, attention_mask=inputs["attention_mask"], max_new_tokens=4, do_sample=False
    )
    assert torch.equal(by_embeds, by_ids[:, -4:])  # from embeddings, generate returns the new tokens only
    beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    assert beams.shape == (4, inputs["input_ids"].shape[1] + 3)
    return by_ids


# --------------------------------------------------------------------------------------------------
# the step's fast paths


def lora_model(arch: str = "llama", **fields) -> nn.Module:
    """LoRA r=4 (all linear layers unless `fields` say otherwise) with a random B: B = 0 at init would
    hide every LoRA term from a comparison. In eval mode like every tiny model (GPT-2's and OPT's dropout
    would make two passes differ); gradients still flow."""
    fields = {"rank": 4, "alpha": 8.0, "target_modules": "all-linear", **fields}
    method = make_config("lora", **fields)
    model = lora.inject(tiny_model(arch, "causal-lm"), method, Context("causal-lm"))
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.1)
    return model


def step_loss(model: nn.Module, b: dict, loss: Callable | None = None) -> torch.Tensor:
    """The causal-LM loss sum of batch `b`: the plain one, or `loss(model, b)` (a speed-up's)."""
    return loss(model, b) if loss is not None else loss_sum(model, b, "causal-lm")


def loss_and_grads(model: nn.Module, b: dict, loss: Callable | None = None) -> tuple[torch.Tensor, dict]:
    """The training step's normalised loss and the gradient of every trainable parameter."""
    value = step_loss(model, b, loss) / num_targets(b, "causal-lm")
    value.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return value.detach(), grads


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def assert_same_step(step: tuple[torch.Tensor, dict], plain: tuple[torch.Tensor, dict]) -> None:
    """`step`'s loss and every gradient (loss_and_grads) close to the `plain` path's."""
    (value, grads), (plain_value, plain_grads) = step, plain
    assert close(value, plain_value)
    for name, grad in plain_grads.items():
        assert close(grads[name], grad), name


def saved_bytes(model: nn.Module, b: dict, loss: Callable | None = None) -> int:
    """Bytes of the distinct tensors autograd keeps for backward in one forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step_loss(model, b, loss)
    return sum(storages.values())


# --------------------------------------------------------------------------------------------------
# LoRA's forward, plain (methods/lora.py) or fast (fast/lora.py): `install(layer)` puts the one to test in
# place (None: the plain one)


def lora_layer(base: nn.Module, install: Callable | None = None, **fields) -> nn.Module:
    layer = lora.wrap_layer(base, **{"rank": 4, "alpha": 8.0, **fields})
    if install is not None:
        install(layer)
    return layer


def assert_lora_formula(kind: str, install: Callable | None = None) -> None:
    """The layer's output, input gradient and factor gradients equal the textbook formula's."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = nn.Linear(12, 10) if kind == "linear" else Conv1D(10, 12)
    layer = lora_layer(base, install)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 12, requires_grad=True)  # x needs grad, as after an earlier adapted layer
    target = torch.randn(3, 5, 10)

    def formula(x):
        weight = base.weight.T if kind == "conv1d" else base.weight
        lora_path = (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
        return x @ weight.T + base.bias + layer.scale * lora_path

    grads = []
    for forward in (layer, formula):
        loss = ((forward(x) - target) ** 2).sum()
        grads.append(
            (loss.detach(), *torch.autograd.grad(loss, [x, layer.lora_A.weight, layer.lora_B.weight]))
        )
    for ours, reference in zip(*grads, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert layer.scale == 2.0


def assert_lora_dtypes(install: Callable | None = None, **fields) -> None:
    """Under autocast the output is bf16 and close to fp32's; fp32 parts on a bf16 base give a bf16 output
    and get fp32 grads. `fields`: more of wrap_layer's arguments (use_dora)."""
    torch.manual_seed(0)
    layer = lora_layer(nn.Linear(16, 8), install, **fields)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 3, 16)
    reference = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)
    half = lora_layer(nn.Linear(16, 8).bfloat16(), install, **fields)
    for part in half.parts().values():
        part.data = part.data.float()  # what the training setup does on a half-precision base
    out = half(x.bfloat16())
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(part.grad.dtype == torch.float32 for part in half.parts().values())


def assert_lora_dropout(install: Callable | None = None) -> None:
    """No dropout module at p = 0; at p > 0 training-mode outputs are noisy, eval-mode ones are not."""
    assert lora_layer(nn.Linear(8, 8), install, rank=2, alpha=4.0, dropout=0.0).dropout is None
    layer = lora_layer(nn.Linear(8, 8), install, rank=2, alpha=4.0, dropout=0.5)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 8)
    layer.train()
    torch.manual_seed(0)
    noisy = layer(x)
    layer.eval()
    assert not torch.allclose(noisy, layer(x))


# --------------------------------------------------------------------------------------------------
# GGUF files


def write_gguf(path, values, arch="llama", tensors=("token_embd.weight", "blk.0.attn_q.weight")):
    """A small GGUF file: `values` {key: (GGUFValueType, value)} and tensors of the given names."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    for key, (kind, value) in values.items():
        writer.add_key_value(key, value, kind)
    for i, name in enumerate(tensors):
        writer.add_tensor(name, np.full((2, 3 + i), i, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


# --------------------------------------------------------------------------------------------------
# Byte-level BPE with merges (what llama.cpp's "gpt2" tokenizer model reads), and runs on it for export


def bpe_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer trained in-process on a few sentences: real merges, the chat
    specials of tiny_tokenizer() (ids 0-4) and its chat template."""
    from tokenizers import trainers

    tok = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = ["the quick brown fox jumps over the lazy dog", "hello world, what is the capital of France?"]
    tok.train_from_iterator(text * 20, trainer)
    return _with_chat_specials(tok)


def save_bpe_base(directory: str | Path, arch: str, seed: int = 0, scale: float = 0.4, **config) -> Path:
    """A tiny causal LM with bpe_tokenizer()'s vocabulary and weights ~ N(0, scale) (the default init
    makes near-uniform logits, whose argmax any rounding flips), saved with the tokenizer."""
    directory = Path(directory)
    tokenizer = bpe_tokenizer()
    model_config = tiny_config(arch)
    model_config.vocab_size = len(tokenizer)
    for key, value in config.items():
        setattr(model_config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, scale)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_lora_run(
    directory: str | Path, base: str | Path, seed: int = 1, data_format: str = "chat", **lora_fields
) -> Path:
    """A `peft train`-like output dir on `base`: a LoRA with random factors, the base's tokenizer and a
    recipe."""
    import yaml

    from peftcli.models.load import load_model, load_tokenizer
    from peftcli.models.sources import resolve

    directory = Path(directory)
    fields = {"rank": 4, "alpha": 8.0, "target_modules": "all-linear", **lora_fields}
    method = make_config("lora", **fields)
    model = lora.inject(load_model(resolve(str(base))), method, Context("causal-lm"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.2)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.2)
    checkpoint.save_adapter(model, method, "causal-lm", str(base), directory)
    load_tokenizer(resolve(str(base))).save_pretrained(directory)
    recipe = {
        "model": {"name": str(base), "task": "causal-lm"},
        "method": {"name": "lora", **{k: v for k, v in fields.items() if k != "modules_to_save"}},
        "data": {"train": "data.jsonl", "format": data_format, "max_length": 64},
    }
    (directory / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return directory


def save_gguf_base(path: str | Path, arch: str, quant: str = "f32", **config) -> Path:
    """A tiny causal LM with bpe_tokenizer()'s vocabulary as one GGUF file, written by peft export's writer
    (a GGUF base like the packaged SmolLM2, in miniature)."""
    from peftcli.export.arch import check_exportable
    from peftcli.export.gguf import model_metadata, model_tensors, write_gguf
    from peftcli.export.quant import FILE_TYPES, QUANTS
    from peftcli.export.tokenizer import tokenizer_metadata

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(save_bpe_base(path.with_suffix(".hf"), arch, **config))
    kind = check_exportable(model.config, "causal-lm")
    keys = tokenizer_metadata(bpe_tokenizer(), model.config.vocab_size, None)
    metadata = model_metadata(
        model.config, kind, "tiny", keys, FILE_TYPES[quant], quant not in ("f32", "f16")
    )
    write_gguf(path, kind, metadata, model_tensors(model, kind, QUANTS[quant]))
    return path


def llama_cpp_permute(weight, heads: int):
    """llama.cpp's converter's row order for a query or key weight: each head's rotary halves interleaved.
    (The loader's inverse is under test; this is the forward direction, written from the same facts.)"""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def write_llama_gguf(path, model, kinds: dict[str, str] | None = None, tied: bool = True) -> None:
    """A llama-architecture GGUF file of `model` (a tiny LlamaForCausalLM), as llama.cpp's converter lays it
    out: its names, the permuted query/key rows, (in, out) dims. `kinds`: GGUF type per tensor kind
    ("linear", "embedding", "head"; default F32), quantized by the gguf package itself."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    from peftcli.models.gguf_names import to_gguf_name

    kinds = {"linear": "F32", "embedding": "F32", "head": "F32", **(kinds or {})}
    c = model.config
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else 1e4)
    writer.add_vocab_size(c.vocab_size)
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        gguf, _ = to_gguf_name("llama", name)
        array = tensor.detach().float().numpy()
        if ".attn_q." in gguf:
            array = llama_cpp_permute(array, c.num_attention_heads)
        elif ".attn_k." in gguf:
            array = llama_cpp_permute(array, c.num_key_value_heads)
        kind = (
            "embedding"
            if gguf.startswith("token_embd")
            else "head"
            if gguf.startswith("output.")
            else "linear"
        )
        qtype = GGMLQuantizationType[kinds[kind] if array.ndim == 2 else "F32"]
        data = quants.quantize(np.ascontiguousarray(array), qtype)
        writer.add_tensor(gguf, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
