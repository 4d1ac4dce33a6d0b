"""Load a base model and its tokenizer from a resolved `ModelSource` (sources.py).

The source may be a local transformers model dir, a `.gguf` file, a built-in name for a model that a
Python package ships, or a hub id (standard transformers loading). A dir holding only config.json is
enough for `peft count`, which reads shapes (shapes.py) or builds the model on the meta device, and
reads no weights.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from peftcli.errors import FieldError
from peftcli.models import filled, precision
from peftcli.models.sources import ModelSource
from peftcli.quant import nf4
from peftcli.quant.convert import left_unquantized, quantize_model
from peftcli.quant.formats import FORMATS

log = logging.getLogger(__name__)

TASK_AUTO_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# Encoder-only architectures: their attention sees every position, later ones too. As a causal LM each
# token would be trained to predict a token it can already see.
ENCODER_ONLY = {
    "albert", "bert", "camembert", "data2vec-text", "deberta", "deberta-v2", "distilbert", "electra",
    "ernie", "megatron-bert", "modernbert", "mpnet", "nezha", "rembert", "roberta", "roformer", "xlm",
    "xlm-roberta", "xmod",
}  # fmt: skip


@contextlib.contextmanager
def reading(source: ModelSource, what: str) -> Iterator[None]:
    """Any fault while transformers reads the model's files (a damaged or cut-short file, a format it
    cannot read) becomes one line naming the model; --debug shows the traceback."""
    try:
        yield
    except FieldError:
        raise
    except Exception as e:  # readers of many formats raise many types: this is the boundary
        raise FieldError("model.name", f"cannot {what} {source.name}: {_first_line(e)}") from e


def load_config(source: ModelSource, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoConfig

    kwargs = {"trust_remote_code": trust_remote_code, "revision": revision}
    if source.gguf_file:
        from peftcli.models.gguf_load import fast_gguf, gguf_config

        path = f"{source.path}/{source.gguf_file}"
        with reading(source, "read"):
            gguf = fast_gguf(path)
        if gguf is not None:  # the header alone, not transformers' full parse
            return gguf_config(gguf, path)
        kwargs["gguf_file"] = source.gguf_file
    with reading(source, "read the config of"):
        return AutoConfig.from_pretrained(source.path, **kwargs)


def check_task(config, task: str, source: ModelSource) -> None:
    """Refuse an encoder-only model for causal-lm (unless its config makes it a decoder)."""
    model_type = getattr(config, "model_type", None)
    if task == "causal-lm" and model_type in ENCODER_ONLY and not getattr(config, "is_decoder", False):
        raise FieldError(
            "model.task",
            f"causal-lm needs a decoder, and {source.name} is a {model_type} encoder: its attention sees "
            "later tokens, so it would learn to copy the next token rather than predict it; use "
            "model.task: sequence-classification, or a decoder model",
        )


def check_weights(source: ModelSource) -> None:
    """A local model dir must hold safetensors weights: pickle files (pytorch_model.bin) are never loaded."""
    if not source.is_local or source.gguf_file:
        return
    root = Path(source.path)
    if any(root.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise FieldError(
            "model.name",
            f"{source.name} holds only pickle weights ({', '.join(pickles)}), which peftcli never loads: "
            "a pickle can run code; save the model with safetensors (save_pretrained does by default)",
        )


def auto_class(task: str):
    import transformers

    return getattr(transformers, TASK_AUTO_CLASSES[task])


def classification_config(config, num_labels: int | None, label_names: list[str] | None):
    if label_names:
        config.num_labels = len(label_names)
        config.id2label = dict(enumerate(label_names))
        config.label2id = {name: i for i, name in enumerate(label_names)}
    elif num_labels:
        config.num_labels = num_labels
    if getattr(config, "pad_token_id", None) is None:
        # Decoder classifiers pool the last non-pad token and need to know the pad id.
        config.pad_token_id = getattr(config, "eos_token_id", None)
        if isinstance(config.pad_token_id, list):
            config.pad_token_id = config.pad_token_id[0]
    return config


def load_model(
    source: ModelSource,
    task: str = "causal-lm",
    *,
    num_labels: int | None = None,
    label_names: list[str] | None = None,
    dtype: str = "auto",
    quantize: str = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> nn.Module:
    """Load the base model with real weights, in eval mode, ready for a method to be injected.

    `dtype` and `quantize` as the recipe's model section has them (precision.py resolves auto). Quantized
    (and GGUF) bases are filled tensor by tensor (filled.py: a llama GGUF file read in one pass, its blocks
    kept packed or dequantized); where that cannot place the checkpoint, the model is loaded whole by
    transformers and quantized after.
    """
    chosen = precision_of(source, dtype, quantize)
    torch_dtype = DTYPES[chosen.dtype]
    config = load_config(source, trust_remote_code, revision)
    check_task(config, task, source)
    check_weights(source)
    if task == "sequence-classification":
        config = classification_config(config, num_labels, label_names)
    if chosen.quantize == "nf4":
        nf4.check_available()
    model = None
    if chosen.quantize != "none" or source.gguf_file:
        with reading(source, f"load {task} weights of"):
            try:
                model = filled.load_filled(
                    auto_class(task), config, source, torch_dtype, chosen.quantize, task
                )
            except filled.CannotFill as e:
                if chosen.quantize in FORMATS:
                    log.info("loading %s whole, then quantizing it: %s", source.name, e)
                elif chosen.quantize == "gguf":
                    log.info(
                        "loading %s whole (every tensor dequantized by transformers): %s", source.name, e
                    )
    if model is None:
        model = _from_pretrained(source, task, config, torch_dtype, trust_remote_code, revision)
        if chosen.quantize in FORMATS:
            quantize_model(model, chosen.quantize, torch_dtype)
    skipped = left_unquantized(model) if chosen.quantize in FORMATS else []
    if skipped:
        log.info(
            "model.quantize: %s leaves %d linear layers unquantized (e.g. `%s`): int8 and int4 need inputs "
            "in whole blocks of 32, and GPT-2's Conv1D layers are not quantized",
            chosen.quantize,
            len(skipped),
            skipped[0],
        )
    model.config.name_or_path = source.name
    model.eval()
    return model


def precision_of(source: ModelSource, dtype: str = "auto", quantize: str = "auto") -> precision.Precision:
    """The dtype and weight storage `load_model` uses for `source`, with the reasons."""
    return precision.resolve(dtype, quantize, gguf=bool(source.gguf_file))


def _from_pretrained(source: ModelSource, task: str, config, dtype, trust_remote_code: bool, revision):
    """transformers' own loading of the whole model (a GGUF file dequantized in full)."""
    kwargs = {"config": config, "trust_remote_code": trust_remote_code, "revision": revision, "dtype": dtype}
    if not source.gguf_file:
        kwargs["use_safetensors"] = True  # a hub model with pickle weights only is refused, not unpickled
    if task == "sequence-classification":
        # A base with a head of another size (or none) gets a fresh head of the recipe's size.
        kwargs["ignore_mismatched_sizes"] = True
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    with reading(source, f"load {task} weights of"):
        model = auto_class(task).from_pretrained(source.path, **kwargs)
    if source.gguf_file:
        drop_quantization_flags(model)
    return model


def drop_quantization_flags(model: nn.Module) -> None:
    """A GGUF model's weights are plain dequantized tensors, yet transformers flags the model as
    quantized and refuses to save it; the flags describe the file, not the tensors, so drop them."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False if attr == "is_quantized" else None)
            except AttributeError:
                pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False, revision: str | None = None):
    kwargs = {"trust_remote_code": trust_remote_code, "revision": revision}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    with reading(source, "load the tokenizer of"):
        tokenizer = _tokenizer_class(source).from_pretrained(source.path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tokenizer_class(source: ModelSource):
    """AutoTokenizer, or for a local llama GGUF file the class AutoTokenizer picks for it. To pick,
    AutoTokenizer builds the file's config with transformers' full GGUF parser (about 10 s for the packaged
    SmolLM2, on every run), and then, with no tokenizer_config.json beside the file, takes the class
    registered for LlamaConfig. The same choice is made here from the registry, the file's header read as
    for the model."""
    from transformers import AutoTokenizer

    if not (source.gguf_file and source.is_local) or (Path(source.path) / "tokenizer_config.json").exists():
        return AutoTokenizer
    from peftcli.models.gguf_header import GGUFError
    from peftcli.models.gguf_load import fast_gguf

    try:
        header = fast_gguf(str(Path(source.path) / source.gguf_file))
    except GGUFError:  # AutoTokenizer says what is wrong
        return AutoTokenizer
    if header is None:  # not what transformers reads as llama
        return AutoTokenizer
    from transformers import LlamaConfig, TokenizersBackend
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    registered = TOKENIZER_MAPPING.get(LlamaConfig, TokenizersBackend)
    if registered is None or registered.__name__ == "MistralCommonBackend":  # AutoTokenizer looks further
        return AutoTokenizer
    return registered


def meta_model(source: ModelSource, task: str | None = None, trust_remote_code: bool = False) -> nn.Module:
    """The model built on the meta device from its config alone: shapes, no weights, no download.

    The class is the one named in the config's `architectures` unless `task` says otherwise.
    """
    import transformers

    config = load_config(source, trust_remote_code)
    cls = None
    if task is None and getattr(config, "architectures", None):
        cls = getattr(transformers, config.architectures[0], None)
    if cls is None:
        cls = auto_class(task or "causal-lm")
    with torch.device("meta"), reading(source, "build"):
        if cls.__name__.startswith("Auto"):
            return cls.from_config(config, trust_remote_code=trust_remote_code)
        return cls(config)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
