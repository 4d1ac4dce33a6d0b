"""Tiny randomly initialised models and a byte-level tokenizer, built in-process: fast and offline."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
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

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VOCAB_SIZE = 256 + len(SPECIALS)

ARCHS = ["llama", "gpt2", "bert", "roberta", "opt"]
DECODERS = ["llama", "gpt2", "opt"]
ENCODERS = ["bert", "roberta"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Every byte is a token (ids 0..255), plus chat/special tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(arch: str, num_labels: int = 3):
    common = dict(vocab_size=VOCAB_SIZE, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=num_labels)
    if arch == "llama":  # grouped-query attention: 4 heads share 2 key/value heads
        return LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=512, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, **common)
    if arch == "opt":
        return OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=512, word_embed_proj_dim=32, **common)
    if arch == "bert":
        return BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=512, **common)
    if arch == "roberta":
        return RobertaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=514, **common)
    raise ValueError(arch)


def tiny_model(arch: str, task: str | None = None, seed: int = 0, num_labels: int = 3):
    """A random tiny model; decoders default to causal-lm, encoders to sequence-classification."""
    task = task or ("causal-lm" if arch in DECODERS else "sequence-classification")
    torch.manual_seed(seed)
    config = tiny_config(arch, num_labels)
    cls = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    return cls.from_config(config).eval()


def save_tiny(directory: str | Path, arch: str, task: str | None = None, seed: int = 0, num_labels: int = 3) -> Path:
    """Write a tiny model + tokenizer as a normal transformers model dir."""
    directory = Path(directory)
    tiny_model(arch, task, seed, num_labels).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def batch(n: int = 2, length: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on the first row exercises the attention mask
    return {"input_ids": ids, "attention_mask": mask}
