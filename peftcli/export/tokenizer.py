"""The tokenizer as llama.cpp reads it from a GGUF file's ``tokenizer.*`` keys.

- A GGUF base: its own tokenizer keys, copied with their types (the vocabulary llama.cpp already read),
  with the run's chat template where the run saved one.
- A transformers base: a byte-level BPE tokenizer (GPT-2, Llama 3, Qwen2, SmolLM) written as llama.cpp's
  "gpt2" model: every token by id (up to the model's vocabulary size, the rest as unused padding), its
  type (added special tokens CONTROL, other added tokens USER_DEFINED, the rest NORMAL), the merges in
  rank order, llama.cpp's name for the pre-tokenizer (`PRE_TOKENIZERS`), the special ids, whether a BOS is
  added, and the chat template. Other tokenizer models (SentencePiece, WordPiece, Unigram) are refused.

Both also name the end-of-turn token (`end_of_turn_id`): llama.cpp and Ollama stop there, so the exported
model stops where `peft generate` does.
"""

from __future__ import annotations

import json

from peftcli.errors import UserError
from peftcli.infer.prompt import end_of_turn_id
from peftcli.models.gguf_header import GGUFFile

# GGUF value types (gguf.GGUFValueType)
U32, I32, F32_VALUE, BOOL, STRING, ARRAY = 4, 5, 6, 7, 8, 9
# llama.cpp token types (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

# key -> (value, value type, item type of an array)
Metadata = dict[str, tuple[object, int, int | None]]

# The split patterns of byte-level BPE pre-tokenizers as tokenizer.json spells them, by llama.cpp's name.
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# A pre-tokenizer's shape (pre_tokenizer_signature) -> llama.cpp's tokenizer.ggml.pre
PRE_TOKENIZERS = {
    ("bytelevel-regex",): "gpt-2",
    ("digits-individual", "bytelevel-regex"): "smollm",
    (f"split:{_LLAMA3_PATTERN}", "bytelevel"): "llama-bpe",
    (f"split:{_QWEN2_PATTERN}", "bytelevel"): "qwen2",
    (f"split:{_GPT2_PATTERN}", "bytelevel"): "gpt-2",
}


def tokenizer_metadata(tokenizer, vocab_size: int, base: GGUFFile | None) -> Metadata:
    """The ``tokenizer.*`` keys for a model with `vocab_size` embedding rows."""
    if base is not None:
        metadata = {
            key: (value, *base.types[key])
            for key, value in base.metadata.items()
            if key.startswith("tokenizer.")
        }
        tokens = metadata.get("tokenizer.ggml.tokens", ([],))[0]
        if len(tokens) != vocab_size:
            raise UserError(f"export: the base GGUF has {len(tokens)} tokens for {vocab_size} embedding rows")
    else:
        metadata = _from_transformers(tokenizer, vocab_size)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        metadata["tokenizer.chat_template"] = (template, STRING, None)
    eot = end_of_turn_id(tokenizer)
    eos = metadata.get("tokenizer.ggml.eos_token_id", (None,))[0]
    if eot is not None and eot != eos and eot < vocab_size:
        metadata["tokenizer.ggml.eot_token_id"] = (eot, U32, None)
    return metadata


def _from_transformers(tokenizer, vocab_size: int) -> Metadata:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("export: the run's tokenizer has no tokenizer.json (a slow tokenizer): not exported")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    signature = pre_tokenizer_signature(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or model.get("byte_fallback") or signature is None:
        kind = model.get("type", "unknown")
        raise UserError(
            f"export: the tokenizer is a {kind} model without a byte-level pre-tokenizer; peft export writes "
            "byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM style) only"
        )
    pre = PRE_TOKENIZERS.get(signature)
    if pre is None:
        raise UserError(
            "export: llama.cpp has no pre-tokenizer known here for this tokenizer's "
            f"({' + '.join(signature)})"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    special, added = set(), set()
    for token in spec.get("added_tokens") or []:
        vocab[token["content"]] = token["id"]
        (special if token.get("special") else added).add(token["id"])
    if max(vocab.values()) >= vocab_size:
        raise UserError(
            f"export: the tokenizer has ids up to {max(vocab.values())} for {vocab_size} embedding rows"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for text, index in vocab.items():
        tokens[index] = text
        types[index] = CONTROL if index in special else USER_DEFINED if index in added else NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    metadata: Metadata = {
        "tokenizer.ggml.model": ("gpt2", STRING, None),
        "tokenizer.ggml.pre": (pre, STRING, None),
        "tokenizer.ggml.tokens": (tokens, ARRAY, STRING),
        "tokenizer.ggml.token_type": (types, ARRAY, I32),
        "tokenizer.ggml.merges": (merges, ARRAY, STRING),
        "tokenizer.ggml.add_bos_token": (_adds_bos(tokenizer), BOOL, None),
    }
    for name in ("bos", "eos", "unk", "pad"):
        index = getattr(tokenizer, f"{name}_token_id", None)
        if isinstance(index, int) and 0 <= index < vocab_size:
            key = {"unk": "unknown", "pad": "padding"}.get(name, name)
            metadata[f"tokenizer.ggml.{key}_token_id"] = (index, U32, None)
    return metadata


def pre_tokenizer_signature(pre: dict | None) -> tuple[str, ...] | None:
    """The pre-tokenizer's steps as short strings, or None where it is not a byte-level one."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    out = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            out.append("bytelevel-regex" if step.get("use_regex", True) else "bytelevel")
            if step.get("add_prefix_space"):
                return None
        elif kind == "Digits":
            out.append("digits-individual" if step.get("individual_digits") else "digits")
        elif kind == "Split" and isinstance(step.get("pattern"), dict) and "Regex" in step["pattern"]:
            out.append(f"split:{step['pattern']['Regex']}")
        else:
            out.append(str(kind))
    return tuple(out) if out and out[-1].startswith("bytelevel") else None


def _adds_bos(tokenizer) -> bool:
    """Whether encoding adds a BOS token, as the tokenizer really does it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos
