"""The recipe's sections as typed dataclasses: the single home of every default.

A recipe is read by parse.py (safely, with each key's line) and checked by checks.py; `load_recipe`
(recipe/__init__.py) ties them together. The `method:` section is the chosen method's own ``Config``
(methods/<name>.py), picked by its ``name``. Each section also holds what its names resolve to, worked out
once when the recipe is loaded: the model's `ModelSource` and the data's `DataSource`s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from peftcli.data.sources import VALIDATION_SPLITS, DataSource
from peftcli.methods import METHODS, MethodConfig, lora
from peftcli.models.sources import ModelSource, resolve

TASKS = ("causal-lm", "sequence-classification")
DATA_FORMATS = ("text", "instruction", "chat", "classification")


@dataclass
class ModelSection:
    # local model dir | hub id | path/to/file.gguf | built-in name (smollm2-135m-instruct, all-minilm-l6-v2)
    name: str = ""
    task: Literal["causal-lm", "sequence-classification"] = "causal-lm"
    num_labels: int | None = None  # sequence classification: default is the number of labels in the data
    # The frozen base's dtype (and the dtype quantized weights are computed in). auto: bf16 where the
    # hardware computes it natively (a bf16 GPU; a CPU with AVX512_BF16 or AMX), else float32.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Frozen linear layers stored quantized: int8 | int4 (blocks of 32, GGUF Q8_0's / Q4_1's layouts) | nf4
    # (bitsandbytes, QLoRA) | none. auto: a GGUF file keeps its own blocks; anything else: none.
    quantize: Literal["auto", "none", "int8", "int4", "nf4"] = "auto"
    revision: str | None = None  # hub revision
    trust_remote_code: bool = False  # run a hub model's own Python code: only when the recipe says so

    @cached_property
    def source(self) -> ModelSource:
        """Where `name` points, classified once (models/sources.py)."""
        return resolve(self.name, "model.name")


@dataclass
class DataSection:
    train: str = ""  # a .json/.jsonl/.csv/.parquet file, a `save_to_disk` dir, or a hub dataset name
    format: Literal["text", "instruction", "chat", "classification"] = "text"
    validation: float | str | None = 0.1  # a fraction held out with the seed, a file, or null
    max_length: int = 512
    train_on_inputs: bool = False  # False: loss on responses only (prompt tokens get label -100)
    packing: bool = False  # concatenate short examples into full max_length rows
    split: str = "train"  # the split of a hub dataset or a DatasetDict
    text_column: str = "text"
    instruction_column: str = "instruction"
    input_column: str = "input"
    output_column: str = "output"
    messages_column: str = "messages"
    label_column: str = "label"

    @cached_property
    def train_source(self) -> DataSource:
        """The training data, classified once (data/sources.py)."""
        return DataSource(self.train, "data.train", (self.split,))

    @cached_property
    def validation_source(self) -> DataSource | None:
        """A validation file or saved dataset; None for a held-out fraction or no validation."""
        if not isinstance(self.validation, str):
            return None
        return DataSource(self.validation, "data.validation", VALIDATION_SPLITS, local_only=True)


@dataclass
class TrainSection:
    max_steps: int | None = None  # optimizer steps; wins over epochs when both are set
    epochs: float | None = None  # default: 1 epoch when neither is set
    batch_size: int = 4  # per process, per micro-step
    gradient_accumulation: int = 1
    learning_rate: float = 2.0e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0  # null: no clipping
    eval_every: int | None = None  # steps; null: only before and after training
    eval_batch_size: int | None = None  # default: batch_size
    max_eval_batches: int | None = None  # cap an eval pass; null: the whole validation set
    save_every: int | None = None  # steps; null: only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 42
    # auto: bf16 on a GPU that has it, else fp32
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # Recompute activations in backward instead of keeping them. true: every layer (least memory);
    # mlp: the SwiGLU MLPs' gate and up projections; up: up's only (mlp and up need lean_layers and a
    # Llama-family model); auto: up where that applies, else nothing; false: nothing (fastest)
    gradient_checkpointing: bool | Literal["auto", "up", "mlp"] = "auto"
    # Cross-entropy over vocabulary chunks of rows, never holding every token's fp32 logits at once.
    chunked_loss: bool = True
    # Llama-family SwiGLU MLPs and RMSNorms keep less for backward and recompute the rest (same math).
    lean_layers: bool = True


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    # The chosen method's Config (methods/<name>.py), picked by `method.name`.
    method: MethodConfig = field(default_factory=lora.Config)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    output_dir: str = "runs/peftcli"

    def to_dict(self) -> dict[str, Any]:
        """Plain data, every default filled in: what recipe.yaml holds."""
        return {**dataclasses.asdict(self), "method": self.method.to_dict()}


# What a union-typed key accepts, in words; the bare type names would not say what the value means.
# (A method's own keys are described by its Config.ACCEPTS.)
ACCEPTS = {
    ("data", "validation"): "a fraction like 0.1, a file path, or null for no validation",
    ("train", "gradient_checkpointing"): "auto, true, false, up or mlp",
}


def method_configs() -> dict[str, type[MethodConfig]]:
    """method.name -> its Config, read from the registry each time (a test may register a method)."""
    return {name: module.Config for name, module in METHODS.items()}


# The recipe's tagged sections: the field's declared type -> (the tag key, the dataclasses it picks from).
TAGGED = {MethodConfig: ("name", method_configs)}
