"""The recipe's sections as typed dataclasses: the single home of every default.

A recipe is read by parse.py (safely, with each key's line) and checked by checks.py; `load_recipe`
(recipe/__init__.py) ties them together. The `method:` section is the chosen method's own ``Config``
(methods/<name>.py), picked by its ``name``. Each section also holds what its names resolve to, worked out
once when the recipe is loaded: the model's `ModelSource` and the data's `DataSource`s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Literal, NoReturn

from peftcli.data.rows import FORMATS
from peftcli.data.sources import VALIDATION_SPLITS, DataSource
from peftcli.methods import METHODS, MethodConfig, lora
from peftcli.models.sources import ModelSource, resolve
from peftcli.recipe.changes import RESUMABLE

TASKS = ("causal-lm", "sequence-classification")
DATA_FORMATS = FORMATS


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
    # text | instruction | chat | classification | preference (prompt, chosen, rejected) | kto (prompt,
    # completion, label) | tokenized (input_ids, labels) | segments (text pieces marked trained or not);
    # data/rows.py says what each reads
    format: Literal[FORMATS] = "text"
    validation: float | str | None = 0.1  # a fraction held out with the seed, a file, or null
    max_length: int = 512
    train_on_inputs: bool = False  # False: loss on responses only (prompt tokens get label -100)
    packing: bool = False  # concatenate short examples into full max_length rows
    split: str = "train"  # the split of a hub dataset or a DatasetDict
    # The data's own column for a field of the format where its name differs: {text: body}; inside chat
    # messages also {role: from, content: value}. (Replaces the older text_column, messages_column ... keys,
    # which are still read into it.)
    columns: dict[str, str] = field(default_factory=dict)
    # Chat roles as the data names them -> system, user, assistant or tool, beyond the known ones (these,
    # and sharegpt's human and gpt): {bot: assistant}
    roles: dict[str, str] = field(default_factory=dict)

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


Fail = Callable[[str, str], NoReturn]


@dataclass
class ObjectiveConfig:
    """train.objective: what a training step minimises, tagged by `name`; `train.objective: dpo` alone takes
    that objective's defaults. Each objective's math lives in peftcli/train/preference.py."""

    name: ClassVar[str]
    ACCEPTS: ClassVar[dict[str, str]] = {}
    # YAML key -> field, where the key is a Python keyword (ORPO's `lambda`).
    YAML_KEYS: ClassVar[dict[str, str]] = {}
    # The data.format it trains on, and whether it needs the reference policy's log-probabilities.
    DATA_FORMAT: ClassVar[str | None] = None
    REFERENCE: ClassVar[bool] = False

    def check(self, fail: Fail) -> None:
        """Ranges the types cannot say; `fail(key, message)` with the key relative to train.objective."""

    def to_dict(self) -> dict[str, Any] | str:
        """The recipe's `train.objective`: its name alone where it has no keys."""
        fields = {v: k for k, v in self.YAML_KEYS.items()}
        values = {fields.get(k, k): v for k, v in dataclasses.asdict(self).items()}
        return {"name": self.name, **values} if values else self.name


def _check_positive(config: ObjectiveConfig, names: str, fail: Fail) -> None:
    for name in names.split():
        if getattr(config, name) <= 0:
            key = {v: k for k, v in config.YAML_KEYS.items()}.get(name, name)
            fail(key, f"must be > 0, got {getattr(config, name)}")


@dataclass
class SFT(ObjectiveConfig):
    """Supervised fine-tuning: cross-entropy on the target tokens (classification: on the class)."""

    name: ClassVar[str] = "sft"


@dataclass
class DPO(ObjectiveConfig):
    """Direct Preference Optimization — Rafailov et al. 2023, arXiv:2305.18290."""

    name: ClassVar[str] = "dpo"
    DATA_FORMAT: ClassVar[str] = "preference"
    REFERENCE: ClassVar[bool] = True

    beta: float = 0.1  # how far the policy may move from the reference (the KL penalty's inverse weight)
    # sigmoid: DPO's own; ipo: IPO's squared loss on per-token margins (Azar et al. 2023, arXiv:2310.12036);
    # hinge: SLiC's (Zhao et al. 2023, arXiv:2305.10425); robust: rDPO (Chowdhury et al. 2024,
    # arXiv:2403.00409), unbiased under label noise
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    # The share of pairs assumed flipped: sigmoid becomes conservative DPO, robust corrects for it.
    label_smoothing: float = 0.0

    def check(self, fail: Fail) -> None:
        _check_positive(self, "beta", fail)
        if not 0.0 <= self.label_smoothing < 0.5:
            fail("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type in ("ipo", "hinge"):
            fail("label_smoothing", f"applies to loss_type sigmoid or robust, not {self.loss_type}")


@dataclass
class ORPO(ObjectiveConfig):
    """Odds Ratio Preference Optimization — Hong et al. 2024, arXiv:2403.07691: SFT on the chosen answer plus
    lambda x the log odds ratio of chosen over rejected. No reference model."""

    name: ClassVar[str] = "orpo"
    DATA_FORMAT: ClassVar[str] = "preference"
    YAML_KEYS: ClassVar[dict[str, str]] = {"lambda": "lambda_"}

    lambda_: float = 0.1  # the odds-ratio term's weight (the paper's lambda; TRL's ORPOConfig.beta)

    def check(self, fail: Fail) -> None:
        _check_positive(self, "lambda_", fail)


@dataclass
class SimPO(ObjectiveConfig):
    """Simple Preference Optimization — Meng et al. 2024, arXiv:2405.14734: the length-normalised log-probs
    as the reward, a target margin gamma, no reference model."""

    name: ClassVar[str] = "simpo"
    DATA_FORMAT: ClassVar[str] = "preference"

    beta: float = 2.0  # the reward's scale (the paper's range: 2.0 - 2.5)
    gamma: float = 1.0  # the target reward margin (gamma / beta = 0.5, the paper's suggested start)

    def check(self, fail: Fail) -> None:
        _check_positive(self, "beta", fail)
        if self.gamma < 0:
            fail("gamma", f"must be >= 0, got {self.gamma}")


@dataclass
class KTO(ObjectiveConfig):
    """Kahneman-Tversky Optimization — Ethayarajh et al. 2024, arXiv:2402.01306: single answers marked
    desirable or not, against a reference point estimated from mismatched prompt/answer pairs."""

    name: ClassVar[str] = "kto"
    DATA_FORMAT: ClassVar[str] = "kto"
    REFERENCE: ClassVar[bool] = True

    beta: float = 0.1
    desirable_weight: float = 1.0  # weights of the two kinds of answer (to balance unequal counts)
    undesirable_weight: float = 1.0

    def check(self, fail: Fail) -> None:
        _check_positive(self, "beta desirable_weight undesirable_weight", fail)


OBJECTIVES: dict[str, type[ObjectiveConfig]] = {c.name: c for c in (SFT, DPO, ORPO, SimPO, KTO)}


@dataclass
class TrainSection:
    # How long to train: optimizer steps, which win over epochs when both are set; default 1 epoch. Either
    # may change when a run is resumed (see recipe/changes.py for what else may change then).
    max_steps: int | None = field(default=None, metadata=RESUMABLE)
    epochs: float | None = field(default=None, metadata=RESUMABLE)
    batch_size: int = 4  # per process, per micro-step
    gradient_accumulation: int = 1
    # null: the method's own default (LEARNING_RATE in methods/<name>.py: LoRA 2e-4, prompt tuning 3e-2)
    learning_rate: float | None = None
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0  # null: no clipping
    eval_every: int | None = field(default=None, metadata=RESUMABLE)  # steps; null: only before and after
    eval_batch_size: int | None = field(default=None, metadata=RESUMABLE)  # default: batch_size
    # cap an eval pass; null: the whole validation set
    max_eval_batches: int | None = field(default=None, metadata=RESUMABLE)
    save_every: int | None = field(default=None, metadata=RESUMABLE)  # steps; null: only at the end
    keep_checkpoints: int = field(default=2, metadata=RESUMABLE)
    log_every: int = field(default=1, metadata=RESUMABLE)
    seed: int = 42
    # sft | dpo | orpo | simpo | kto, or a section with the objective's keys: {name: dpo, beta: 0.1}
    objective: ObjectiveConfig = field(default_factory=SFT)
    # auto: bf16 on a GPU that has it, else fp32
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # Recompute activations in backward instead of keeping them. true: every layer (least memory);
    # mlp: the SwiGLU MLPs' gate and up projections; up: up's only (mlp and up need lean_layers and a
    # Llama-family model); auto: up where that applies, else nothing; false: nothing (fastest)
    gradient_checkpointing: bool | Literal["auto", "up", "mlp"] = field(default="auto", metadata=RESUMABLE)
    # Cross-entropy over vocabulary chunks of rows, never holding every token's fp32 logits at once.
    chunked_loss: bool = field(default=True, metadata=RESUMABLE)
    # Llama-family SwiGLU MLPs and RMSNorms keep less for backward and recompute the rest (same math).
    lean_layers: bool = field(default=True, metadata=RESUMABLE)
    # How the processes of a torchrun / accelerate launch share the model. ddp: each holds all of it;
    # fsdp: each holds one slice of every layer (FSDP2); auto: fsdp where the frozen base takes more than
    # half of one process's device memory, else ddp. One process trains plainly. See train/distributed.py.
    distributed: Literal["auto", "ddp", "fsdp"] = field(default="auto", metadata=RESUMABLE)


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
        values = {**dataclasses.asdict(self), "method": self.method.to_dict()}
        values["train"]["objective"] = self.train.objective.to_dict()
        return values


# What a union-typed key accepts, in words; the bare type names would not say what the value means.
# (A method's own keys are described by its Config.ACCEPTS.)
ACCEPTS = {
    ("data", "validation"): "a fraction like 0.1, a file path, or null for no validation",
    ("data", "columns"): "a mapping from the format's fields to your column names, like {text: body}",
    ("data", "roles"): "a mapping from your data's role names to system, user, assistant or tool",
    ("train", "gradient_checkpointing"): "auto, true, false, up or mlp",
    ("train", "learning_rate"): "a number, or null for the method's default",
}


def method_configs() -> dict[str, type[MethodConfig]]:
    """method.name -> its Config, read from the registry each time (a test may register a method)."""
    return {name: module.Config for name, module in METHODS.items()}


# The recipe's tagged sections: the field's declared type -> (the tag key, the dataclasses it picks from,
# whether the tag's value alone may stand for the section: `objective: dpo`).
TAGGED = {MethodConfig: ("name", method_configs, False), ObjectiveConfig: ("name", lambda: OBJECTIVES, True)}
