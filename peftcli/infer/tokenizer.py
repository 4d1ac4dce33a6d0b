"""A run's saved tokenizer for generate and chat without importing transformers, which takes about a second
of the first token (transformers 5 reads its model sources on every import).

The `tokenizers` library reads tokenizer.json (transformers' fast tokenizers are that library underneath)
and jinja2 renders the chat template in the environment transformers renders it in: a sandbox with
trim_blocks and lstrip_blocks, loop controls, and the helpers chat templates call (raise_exception,
strftime_now, a JSON `tojson`, `dict`, a `namespace` that takes no underscore names).

`load_saved` applies only where transformers would use the files as they are: the plain tokenizers-backed
class; a config with only the keys and values below; every named special token already a special added
token; a post-processor and no padding section in tokenizer.json; no older files beside (a
special_tokens_map.json, say); a template this environment compiles. Anything else (a Llama-class tokenizer
that rebuilds its post-processor, `add_bos_token`, `{% generation %}` blocks, ...) returns None and the
caller loads transformers' tokenizer. tests/infer/test_tokenizer.py holds the two equal.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cache
from pathlib import Path

import torch

from peftcli.runs.adapter import PLAIN_TOKENIZERS, TOKENIZER_FILES

# transformers' named special tokens, in its order (all_special_ids lists them so)
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
EXTRA_TOKENS = ("extra_special_tokens", "additional_special_tokens")
# tokenizer_config.json keys that change nothing the plain class does with tokenizer.json at inference, and
# the values each may take here (None: any)
INERT_KEYS = {
    "backend": ("tokenizers",),
    "tokenizer_class": PLAIN_TOKENIZERS,
    "is_local": None,
    "local_files_only": None,
    "model_max_length": None,
    "name_or_path": None,
    "padding_side": ("left", "right"),
    "truncation_side": ("left", "right"),
    "model_input_names": (["input_ids", "attention_mask"],),
    "clean_up_tokenization_spaces": (False,),
    "split_special_tokens": (False,),
    "chat_template": None,  # checked in load_saved
}
NO_LIMIT = int(1e30)  # transformers' model_max_length where the config sets none
TEMPLATE_FILE = "chat_template.jinja"
# files transformers reads beside the two (older saves, or several templates): their runs load its tokenizer
OTHER_FILES = ("special_tokens_map.json", "added_tokens.json", "additional_chat_templates")


class SavedTokenizer:
    """What generate and chat ask of a tokenizer, as transformers' tokenizers-backed class answers it."""

    def __init__(self, backend, config: dict, chat_template: str | None):
        self.backend = backend
        self.chat_template = chat_template
        self.model_max_length = config.get("model_max_length") or NO_LIMIT
        self.special = {name: config[name] for name in NAMED_TOKENS if config.get(name) is not None}
        if "pad_token" not in self.special and "eos_token" in self.special:  # as load_saved_tokenizer pads
            self.special["pad_token"] = self.special["eos_token"]
        self.extra = [token for key in EXTRA_TOKENS for token in config.get(key) or ()]

    def token_id(self, name: str) -> int | None:
        token = self.special.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self.token_id("pad_token")

    @property
    def all_special_ids(self) -> list[int]:
        tokens = dict.fromkeys([*(self.special[n] for n in NAMED_TOKENS if n in self.special), *self.extra])
        return [self.backend.token_to_id(token) for token in tokens]

    @property
    def added_tokens_decoder(self) -> dict:
        return self.backend.get_added_tokens_decoder()

    def __call__(self, text: str, add_special_tokens: bool = True, return_tensors: str | None = None) -> dict:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if return_tensors == "pt":
            return {
                "input_ids": torch.tensor([ids], dtype=torch.long),
                "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            }
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = False
    ) -> str:
        if tokenize:
            raise ValueError("SavedTokenizer renders text only: tokenize it with the tokenizer call")
        messages = [{key: value for key, value in m.items() if value is not None} for m in messages]
        return _compile(self.chat_template).render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.special,
        )


def load_saved(directory: str | Path) -> SavedTokenizer | None:
    """The tokenizer saved in `directory` (a `peft train` output dir), where transformers would load it
    unchanged; else None (see the module docstring)."""
    directory = Path(directory)
    template_path = directory / TEMPLATE_FILE
    try:
        config = json.loads((directory / TOKENIZER_FILES[0]).read_text(encoding="utf-8"))
        file_template = template_path.read_text(encoding="utf-8") if template_path.is_file() else None
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not _plain_config(config):
        return None
    template = config.get("chat_template")
    if template is not None and (file_template is not None or not isinstance(template, str)):
        return None  # two templates, or named ones: transformers picks
    template = file_template if file_template is not None else template
    if any((directory / name).exists() for name in OTHER_FILES):
        return None
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_file(str(directory / TOKENIZER_FILES[1]))
    except Exception:  # tokenizers raises its own Exception for a bad file: transformers' load reports it
        return None
    # without a post-processor transformers writes one; from a padding section it takes a pad token
    if backend.post_processor is None or backend.padding is not None:
        return None
    tokenizer = SavedTokenizer(backend, config, template)
    if not _specials_in_place(backend, [*tokenizer.special.values(), *tokenizer.extra]):
        return None
    if template is not None:
        try:
            _compile(template)
        except Exception:  # a tag or syntax this environment lacks: transformers renders it
            return None
    backend.no_truncation()  # transformers turns it off for a call without truncation
    return tokenizer


def _plain_config(config: dict) -> bool:
    if config.get("tokenizer_class") not in PLAIN_TOKENIZERS:
        return False
    if all(config.get(key) for key in EXTRA_TOKENS):  # transformers reads one list then, not both
        return False
    for key, value in config.items():
        if key in NAMED_TOKENS:
            ok = value is None or isinstance(value, str)
        elif key in EXTRA_TOKENS:
            ok = isinstance(value, list) and all(isinstance(token, str) for token in value)
        else:
            allowed = INERT_KEYS.get(key, ())
            ok = key in INERT_KEYS and (
                allowed is None or any(value == a and type(value) is type(a) for a in allowed)
            )
        if not ok:
            return False
    return True


def _specials_in_place(backend, tokens: list[str]) -> bool:
    """Each of `tokens` (the special tokens the config names) is an added token marked special and not
    normalized: the state transformers' load would put it in (it adds any that is not)."""
    added = {token.content: token for token in backend.get_added_tokens_decoder().values()}
    return all(t in added and added[t].special and not added[t].normalized for t in tokens)


@cache
def _compile(template: str):
    return _environment().from_string(template)


@cache
def _environment():
    import jinja2
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    if tuple(int(part) for part in jinja2.__version__.split(".")[:3] if part.isdigit()) < (3, 1, 6):
        raise ImportError(
            "jinja2 before 3.1.6 has sandbox escapes: transformers refuses it, so this does too"
        )

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; templates expect plain JSON
        return json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    class PlainDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class SafeNamespace(Namespace):
        def __init__(*args, **kwargs):  # noqa: N805 - jinja's Namespace signature, so namespace(self=...) works
            attrs = dict(*args[1:], **kwargs)
            for name in attrs:
                SafeNamespace.refuse_private(name)
            Namespace.__init__(args[0], attrs)

        def __setitem__(self, name, value):
            SafeNamespace.refuse_private(name)
            Namespace.__setitem__(self, name, value)

        @staticmethod
        def refuse_private(name):
            if isinstance(name, str) and name.startswith("_"):
                from jinja2.exceptions import SecurityError

                raise SecurityError(f"a chat template cannot set {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(
        raise_exception=raise_exception,
        strftime_now=lambda fmt: datetime.now().strftime(fmt),
        dict=PlainDict(),
        namespace=SafeNamespace,
    )
    return env
