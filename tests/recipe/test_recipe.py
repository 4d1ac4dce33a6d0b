"""Tests for peftcli/recipe.py: defaults, --set overrides, and every way a recipe is refused.

Each test runs in a tmp dir that is also the working directory, so the recipe is named `recipe.yaml`
in messages and relative data paths resolve there, as they do for the CLI.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from peftcli.errors import UserError
from peftcli.methods import DEFAULT_LEARNING_RATE, METHODS, default_learning_rate, lora, make_config
from peftcli.recipe import (
    DataSection,
    ModelSection,
    Recipe,
    RecipeError,
    TrainSection,
    dump_recipe,
    load_recipe,
    parse_override,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))

# Line 1-4; a case appends its own section from line 5 on.
GOOD = """\
model:
  name: HuggingFaceTB/SmolLM2-135M
data:
  train: train.jsonl
"""


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "train.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "val.jsonl").write_text('{"text": "bye"}\n')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _write(text: str | bytes, name: str = "recipe.yaml") -> str:
    Path(name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return name


def _refusal(text: str | bytes, overrides: list[str] = ()) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(_write(text), overrides)
    assert isinstance(info.value, UserError) and info.value.exit_code == 2
    assert "\n" not in str(info.value), "a refusal is one line"
    return str(info.value)


# --------------------------------------------------------------------------------------------------
# Broken recipes: (file text, --set overrides, what the message must say)

BROKEN = [
    # unknown keys, with suggestions
    (
        "unknown-top-key",
        "modle:\n  name: x\n",
        [],
        ["recipe.yaml:1: modle: unknown key (did you mean `model`?)"],
    ),
    (
        "unknown-nested-key",
        GOOD + "method:\n  rnak: 4\n",
        [],
        ["recipe.yaml:6: method.rnak: unknown key (did you mean `rank`?)", "known keys here: name, rank"],
    ),
    (
        "unknown-key-no-match",
        GOOD + "train:\n  zzz: 1\n",
        [],
        ["recipe.yaml:6: train.zzz: unknown key; known"],
    ),
    (
        "key-wrong-case",
        GOOD + "method:\n  Rank: 4\n",
        [],
        ["method.Rank: unknown key (did you mean `rank`?)"],
    ),
    (
        "duplicate-key",
        GOOD + "method:\n  rank: 4\n  rank: 8\n",
        [],
        ["recipe.yaml:7: method.rank: duplicate key (first on line 6)"],
    ),
    # wrong types
    (
        "str-for-int",
        GOOD + 'train:\n  batch_size: "four"\n',
        [],
        ["recipe.yaml:6: train.batch_size: expected an integer, got 'four'"],
    ),
    (
        "bool-for-int",
        GOOD + "method:\n  rank: true\n",
        [],
        ["recipe.yaml:6: method.rank: expected an integer, got True"],
    ),
    ("float-for-int", GOOD + "method:\n  rank: 8.5\n", [], ["method.rank: expected an integer, got 8.5"]),
    ("bool-for-float", GOOD + "method:\n  alpha: yes\n", [], ["method.alpha: expected a number, got True"]),
    (
        "int-for-str",
        GOOD + "  split: 2024\n",
        [],
        ["recipe.yaml:5: data.split: expected a string, got 2024", "put it in quotes"],
    ),
    (
        "empty-value",
        GOOD + "method:\n  rank:\n",
        [],
        ["recipe.yaml:6: method.rank: has no value; expected an integer"],
    ),
    (
        "section-is-scalar",
        GOOD + "method: lora\n",
        [],
        ["recipe.yaml:5: method: must be a section", "write `method: {name: lora}`"],
    ),
    ("section-is-list", GOOD + "train: [1, 2]\n", [], ["recipe.yaml:5: train: must be a section"]),
    (
        "list-item-type",
        GOOD + "method:\n  target_modules: [q_proj, 3]\n",
        [],
        ["recipe.yaml:6: method.target_modules[1]: expected a string, got 3"],
    ),
    (
        "union-type",
        GOOD + "method:\n  target_modules: 3\n",
        [],
        ["method.target_modules: expected a list of module names like [q_proj, v_proj], all-linear", "got 3"],
    ),
    (
        "validation-bool",
        GOOD + "  validation: true\n",
        [],
        ["recipe.yaml:5: data.validation: expected a fraction like 0.1, a file path, or null", "got True"],
    ),
    ("betas-item", GOOD + "train:\n  betas: [0.9, x]\n", [], ["train.betas[1]: expected a number, got 'x'"]),
    (
        "nan",
        GOOD + "train:\n  learning_rate: .nan\n",
        [],
        ["train.learning_rate: must be a finite number, got nan"],
    ),
    # out of range
    ("rank-0", GOOD + "method:\n  rank: 0\n", [], ["recipe.yaml:6: method.rank: must be > 0, got 0"]),
    (
        "rank-negative",
        GOOD + "method:\n  rank: -4\n",
        [],
        ["recipe.yaml:6: method.rank: must be > 0, got -4"],
    ),
    ("alpha-0", GOOD + "method:\n  alpha: 0\n", [], ["method.alpha: must be > 0, got 0.0"]),
    (
        "dropout-1",
        GOOD + "method:\n  dropout: 1.0\n",
        [],
        ["recipe.yaml:6: method.dropout: must be in [0, 1), got 1.0"],
    ),
    (
        "dropout-negative",
        GOOD + "method:\n  dropout: -0.1\n",
        [],
        ["method.dropout: must be in [0, 1), got -0.1"],
    ),
    (
        "batch-size-0",
        GOOD + "train:\n  batch_size: 0\n",
        [],
        ["recipe.yaml:6: train.batch_size: must be > 0, got 0"],
    ),
    ("max-steps-0", GOOD + "train:\n  max_steps: 0\n", [], ["train.max_steps: must be > 0, got 0"]),
    (
        "lr-0",
        GOOD + "train:\n  learning_rate: 0\n",
        [],
        ["recipe.yaml:6: train.learning_rate: must be > 0, got 0.0"],
    ),
    (
        "lr-negative",
        GOOD + "train:\n  learning_rate: -1e-4\n",
        [],
        ["train.learning_rate: must be > 0, got -0.0001"],
    ),
    (
        "validation-1.5",
        GOOD + "  validation: 1.5\n",
        [],
        ["recipe.yaml:5: data.validation: a fraction must be in (0, 1), got 1.5"],
    ),
    (
        "validation-0",
        GOOD + "  validation: 0\n",
        [],
        ["must be in (0, 1), got 0.0; use null for no validation"],
    ),
    (
        "betas-length",
        GOOD + "train:\n  betas: [0.9]\n",
        [],
        ["recipe.yaml:6: train.betas: must be two numbers", "[0.9]"],
    ),
    (
        "checkpointing-word",
        GOOD + "train:\n  gradient_checkpointing: attention\n",
        [],
        [
            "recipe.yaml:6: train.gradient_checkpointing: expected auto, true, false, up or mlp,",
            "got 'attention'",
        ],
    ),
    (
        "mlp-checkpointing-without-lean-layers",
        GOOD + "train:\n  gradient_checkpointing: mlp\n  lean_layers: false\n",
        [],
        ["train.gradient_checkpointing: mlp needs train.lean_layers: true"],
    ),
    (
        "up-checkpointing-without-lean-layers",
        GOOD + "train:\n  gradient_checkpointing: up\n  lean_layers: false\n",
        [],
        ["train.gradient_checkpointing: up needs train.lean_layers: true"],
    ),
    (
        "betas-range",
        GOOD + "train:\n  betas: [0.9, 1.0]\n",
        [],
        ["train.betas: must be two numbers in [0, 1)"],
    ),
    (
        "num-labels-1",
        "model:\n  name: m\n  task: sequence-classification\n  num_labels: 1\n"
        "data:\n  train: train.jsonl\n  format: classification\n",
        [],
        ["recipe.yaml:4: model.num_labels: must be >= 2, got 1"],
    ),
    (
        "weight-decay",
        GOOD + "train:\n  weight_decay: -0.01\n",
        [],
        ["train.weight_decay: must be >= 0, got -0.01"],
    ),
    ("max-length", GOOD + "  max_length: 4\n", [], ["recipe.yaml:5: data.max_length: must be >= 8, got 4"]),
    (
        "prompt-text-missing",
        GOOD + "method:\n  name: prompt-tuning\n  prompt_init: text\n",
        [],
        ["method.prompt_init_text: required when method.prompt_init is text"],
    ),
    (
        "lora-init-typo",
        GOOD + "method:\n  name: lora\n  init: pisa\n",
        [],
        ["recipe.yaml:7: method.init: unknown value 'pisa' (did you mean `pissa`?)", "pissa_niter_<N>"],
    ),
    (
        "loraplus-ratio",
        GOOD + "method:\n  name: lora\n  loraplus_lr_ratio: 0\n",
        [],
        ["recipe.yaml:7: method.loraplus_lr_ratio: must be > 0, got 0"],
    ),
    (
        "use-dora-not-a-bool",
        GOOD + "method:\n  name: lora\n  use_dora: sometimes\n",
        [],
        ["method.use_dora"],
    ),
    # a key of another method: each method's section has its own keys
    (
        "key-of-another-method",
        GOOD + "method:\n  name: prefix-tuning\n  rank: 8\n",
        [],
        ["recipe.yaml:7: method.rank: unknown key", "known keys here: name, num_virtual_tokens"],
    ),
    (
        "key-of-another-method-default-lora",
        GOOD + "method:\n  biases: [query]\n",
        [],
        ["recipe.yaml:6: method.biases: unknown key", "known keys here: name, rank"],
    ),
    # unknown choices
    (
        "method-lora2",
        GOOD + "method:\n  name: lora2\n",
        [],
        [
            "recipe.yaml:6: method.name: unknown value 'lora2' (did you mean `lora`?)",
            "expected one of lora, prefix",
        ],
    ),
    (
        "method-lorra",
        GOOD + "method:\n  name: lorra\n",
        [],
        ["method.name: unknown value 'lorra' (did you mean `lora`?)"],
    ),
    ("method-case", GOOD + "method:\n  name: LoRA\n", [], ["(did you mean `lora`?)"]),
    ("method-prefix", GOOD + "method:\n  name: prefix\n", [], ["(did you mean `prefix-tuning`?)"]),
    (
        "format-near-miss",
        GOOD + "  format: chatt\n",
        [],
        ["recipe.yaml:5: data.format: unknown value 'chatt' (did you mean `chat`?)"],
    ),
    (
        "format-unknown",
        GOOD + "  format: sql\n",
        [],
        ["data.format: unknown value 'sql'; expected one of text, instruction, chat, classification"],
    ),
    (
        "task-near-miss",
        "model:\n  name: m\n  task: classification\ndata:\n  train: train.jsonl\n",
        [],
        [
            "recipe.yaml:3: model.task: unknown value 'classification'",
            "(did you mean `sequence-classification`?)",
        ],
    ),
    (
        "dtype",
        "model:\n  name: m\n  dtype: fp32\ndata:\n  train: train.jsonl\n",
        [],
        ["recipe.yaml:3: model.dtype: unknown value 'fp32'; expected one of auto, float32"],
    ),
    (
        "quantize",
        "model:\n  name: m\n  quantize: q4\ndata:\n  train: train.jsonl\n",
        [],
        ["recipe.yaml:3: model.quantize: unknown value 'q4'; expected one of auto, none, int8, int4, nf4"],
    ),
    (
        "format-task-mismatch",
        GOOD + "  format: classification\n",
        [],
        ["recipe.yaml:5: data.format: classification data needs model.task: sequence-classification"],
    ),
    (
        "task-format-mismatch",
        "model:\n  name: m\n  task: sequence-classification\ndata:\n  train: train.jsonl\n",
        [],
        ["data.format: text data needs model.task: causal-lm, but model.task is sequence-classification"],
    ),
    # target modules that mean something else than they say
    (
        "targets-comma",
        GOOD + "method:\n  target_modules: q_proj,v_proj\n",
        [],
        [
            "method.target_modules: 'q_proj,v_proj' would be read as one regular expression",
            "[q_proj, v_proj]",
        ],
    ),
    (
        "targets-all-linear",
        GOOD + "method:\n  target_modules: all_linear\n",
        [],
        ["(did you mean `all-linear`?)"],
    ),
    (
        "targets-bad-regex",
        GOOD + "method:\n  target_modules: '(q_proj'\n",
        [],
        ["recipe.yaml:6: method.target_modules: not a valid regular expression '(q_proj'"],
    ),
    (
        "targets-empty",
        GOOD + "method:\n  target_modules: []\n",
        [],
        ["method.target_modules: needs module names"],
    ),
    (
        "biases-str",
        GOOD + "method:\n  name: bitfit\n  biases: query\n",
        [],
        ["method.biases: expected all or a list", "[query]"],
    ),
    # missing files and models
    (
        "duplicate-section",
        GOOD + "model:\n  name: y\n",
        [],
        ["recipe.yaml:5: model: duplicate key (first on line 1)"],
    ),
    ("model-name-required", "data:\n  train: train.jsonl\n", [], ["recipe.yaml: model.name: required"]),
    (
        "model-dir-missing",
        "model:\n  name: ./nope/model\ndata:\n  train: train.jsonl\n",
        [],
        [
            "recipe.yaml:2: model.name: not found: ./nope/model",
            "relative paths are read from the working directory",
        ],
    ),
    (
        "gguf-missing",
        "model:\n  name: x.gguf\ndata:\n  train: train.jsonl\n",
        [],
        ["recipe.yaml:2: model.name: not found: x.gguf"],
    ),
    (
        "model-dir-no-config",
        "model:\n  name: ./empty\ndata:\n  train: train.jsonl\n",
        [],
        ["model.name: ./empty is a directory without config.json"],
    ),
    (
        "data-missing",
        "model:\n  name: m\ndata:\n  train: trian.jsonl\n",
        [],
        ["recipe.yaml:4: data.train: not found: trian.jsonl (did you mean `train.jsonl`?)"],
    ),
    ("data-required", "model:\n  name: m\n", [], ["data.train: required"]),
    (
        "data-wrong-suffix",
        "model:\n  name: m\ndata:\n  train: ./notes.txt\n",
        [],
        ["recipe.yaml:4: data.train: unsupported file type .txt: ./notes.txt"],
    ),
    (
        "validation-missing",
        GOOD + "  validation: vla.jsonl\n",
        [],
        ["recipe.yaml:5: data.validation: not found: vla.jsonl (did you mean `val.jsonl`?)"],
    ),
    (
        "validation-quoted-number",
        GOOD + "  validation: '0.1'\n",
        [],
        ["data.validation: not found: 0.1", "write a number without quotes: 0.1"],
    ),
    (
        "adapter-missing",
        GOOD + "method:\n  from_adapter: runs/old\n",
        [],
        ["recipe.yaml:6: method.from_adapter: no adapter directory: not found: runs/old"],
    ),
    (
        "output-dir-is-file",
        GOOD + "output_dir: train.jsonl\n",
        [],
        ["recipe.yaml:5: output_dir: train.jsonl is a file"],
    ),
    # not a recipe at all
    ("empty-file", "", [], ["recipe.yaml: the recipe is empty"]),
    ("whitespace-only", "  \n\n\t\n", [], ["recipe.yaml: the recipe is empty"]),
    ("comments-only", "# nothing yet\n", [], ["recipe.yaml: the recipe is empty (only comments)"]),
    (
        "list-document",
        "- model\n- data\n",
        [],
        ["recipe.yaml: the recipe must be a mapping of sections, got ['model'"],
    ),
    (
        "scalar-document",
        "hello\n",
        [],
        ["recipe.yaml: the recipe must be a mapping of sections, got 'hello'"],
    ),
    (
        "two-documents",
        GOOD + "---\nmodel: {}\n",
        [],
        ["recipe.yaml:5: YAML syntax error: a recipe is one YAML document"],
    ),
    (
        "syntax-flow",
        GOOD + "method:\n  target_modules: [q_proj, v_proj\n",
        [],
        ["recipe.yaml:7: YAML syntax error: expected ',' or ']'", "flow sequence started on line 6"],
    ),
    (
        "syntax-indent",
        GOOD + "method:\n rank: 4\n  alpha: 8\n",
        [],
        ["recipe.yaml:7: YAML syntax error: mapping values are not allowed here"],
    ),
    ("syntax-tab", GOOD + "method:\n\trank: 4\n", [], ["recipe.yaml:6: YAML syntax error"]),
    ("non-utf8", GOOD.encode() + b"output_dir: caf\xe9\n", [], ["recipe.yaml:5: not UTF-8 text (byte 0xe9"]),
    (
        "nul-char",
        GOOD + "output_dir: a\x00b\n",
        [],
        ["recipe.yaml:5: character U+0000 is not allowed in YAML"],
    ),
    ("unhashable-key", GOOD + "? [a, b]\n: c\n", [], ["recipe.yaml:5: YAML error: found unhashable key"]),
    (
        "local-tag",
        GOOD + "method:\n  rank: !int 4\n",
        [],
        ["recipe.yaml:6: method.rank: the YAML tag `!int` is refused: a recipe holds plain values only"],
    ),
    (
        "python-name-tag",
        GOOD + "output_dir: !!python/name:os.getcwd ''\n",
        [],
        ["recipe.yaml:5: output_dir: the YAML tag `!!python/name:os.getcwd` is refused"],
    ),
    (
        "recursive-anchor",
        "model: &m\n  name: x\n  again: *m\ndata:\n  train: train.jsonl\n",
        [],
        ["recipe.yaml:3: model.again: unknown key"],
    ),
    # --set overrides, validated like the file
    (
        "set-bad-value",
        GOOD,
        ["train.max_steps=ten"],
        ["--set train.max_steps: expected an integer or null, got 'ten'"],
    ),
    ("set-out-of-range", GOOD, ["method.rank=0"], ["--set method.rank: must be > 0, got 0"]),
    ("set-no-equals", GOOD, ["train.max_steps"], ["--set expects key.path=value", "'train.max_steps'"]),
    ("set-empty-key-part", GOOD, ["train..max_steps=3"], ["--set expects key.path=value"]),
    (
        "set-unknown-key",
        GOOD,
        ["methd.rank=4"],
        ["--set methd.rank: methd: unknown key (did you mean `method`?)"],
    ),
    (
        "set-unknown-method",
        GOOD,
        ["method.name=lorra"],
        ["--set method.name: unknown value 'lorra' (did you mean `lora`?)"],
    ),
    (
        "set-into-scalar",
        GOOD + "method:\n  rank: 4\n",
        ["method.rank.x=1"],
        ["--set method.rank.x: method.rank: is 4, not a section"],
    ),
    (
        "set-yaml-error",
        GOOD,
        ["method.target_modules=[q_proj"],
        ["--set method.target_modules: YAML syntax error"],
    ),
    ("set-python-tag", GOOD, ["output_dir=!!python/name:os.getcwd ''"], ["--set output_dir: the YAML tag"]),
    ("set-missing-data", GOOD, ["data.train=./nope.jsonl"], ["--set data.train: not found: ./nope.jsonl"]),
    ("set-empty-value", GOOD, ["model.name="], ["--set model.name: has no value; expected a string"]),
    # train.objective and the data it trains on
    (
        "objective-unknown",
        GOOD + "train:\n  objective: dop\n",
        [],
        ["recipe.yaml:6: train.objective.name: unknown value 'dop' (did you mean `dpo`?)"],
    ),
    (
        "objective-range",
        GOOD + "  format: preference\ntrain:\n  objective:\n    name: dpo\n    beta: 0\n",
        [],
        ["recipe.yaml:9: train.objective.beta: must be > 0, got 0.0"],
    ),
    (
        "objective-unknown-key",
        GOOD + "  format: preference\ntrain:\n  objective: {name: dpo, betta: 0.2}\n",
        [],
        ["train.objective.betta: unknown key (did you mean `beta`?); known keys here: name, beta, loss_type"],
    ),
    (
        "objective-needs-pairs",
        GOOD + "train:\n  objective: dpo\n",
        [],
        ["recipe.yaml:6: train.objective: dpo trains on data.format: preference, but data.format is text"],
    ),
    (
        "pairs-need-an-objective",
        GOOD + "  format: preference\n",
        [],
        [
            "recipe.yaml:5: data.format: preference data trains with train.objective dpo or orpo or simpo, "
            "not sft"
        ],
    ),
    (
        "label-smoothing-hinge",
        GOOD
        + "  format: preference\ntrain:\n  objective: {name: dpo, loss_type: hinge, label_smoothing: 0.1}\n",
        [],
        ["train.objective.label_smoothing: applies to loss_type sigmoid or robust, not hinge"],
    ),
    (
        "orpo-lambda",
        GOOD + "  format: preference\ntrain:\n  objective:\n    name: orpo\n    lambda: -1\n",
        [],
        ["recipe.yaml:9: train.objective.lambda: must be > 0, got -1.0"],
    ),
    (
        "kto-packing",
        GOOD + "  format: kto\n  packing: true\ntrain:\n  objective: kto\n",
        [],
        ["recipe.yaml:6: data.packing: kto compares whole answers: packing does not apply"],
    ),
    ("set-objective-key", GOOD, ["train.objective.beta=0.2"], ["--set train.objective.beta: unknown key"]),
    # data.columns and data.roles
    (
        "columns-unknown-field",
        GOOD + "  columns: {txt: body}\n",
        [],
        [
            "recipe.yaml:5: data.columns.txt: the text format reads no `txt` (did you mean `text`?); "
            "it reads text"
        ],
    ),
    (
        "columns-not-a-mapping",
        GOOD + "  columns: [a]\n",
        [],
        ["data.columns: expected a mapping from the format's"],
    ),
    ("columns-number-key", GOOD + "  columns: {1: a}\n", [], ["data.columns: keys must be names, got 1"]),
    (
        "roles-unknown-role",
        GOOD + "  format: chat\n  roles: {bot: assistent}\n",
        [],
        ["recipe.yaml:6: data.roles.bot: maps to `assistent` (did you mean `assistant`?); a role is one of"],
    ),
    (
        "old-column-key-conflict",
        GOOD + "  text_column: body\n  columns: {text: other}\n",
        [],
        ["recipe.yaml:5: data.text_column: names column `body`, but data.columns.text names `other`"],
    ),
]


@pytest.mark.parametrize(("text", "overrides", "expected"), [pytest.param(*c[1:], id=c[0]) for c in BROKEN])
def test_broken_recipe_is_refused_with_a_message_that_names_the_fault(workdir, text, overrides, expected):
    (workdir / "empty").mkdir()
    (workdir / "notes.txt").write_text("hello\n")
    message = _refusal(text, overrides)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    if "recipe.yaml" in message:
        assert message.startswith("recipe.yaml"), "the location comes first"


def test_at_least_twenty_distinct_refusals():
    assert len({c[0] for c in BROKEN}) == len(BROKEN) >= 20


def test_message_reads_file_line_key_message(workdir):
    message = _refusal(GOOD + "\n# a comment\nmethod:\n  name: lora\n  rank: 0\n")
    assert message == "recipe.yaml:9: method.rank: must be > 0, got 0"


def test_error_carries_key_and_location(workdir):
    with pytest.raises(RecipeError) as info:
        load_recipe(_write(GOOD + "method:\n  rank: 0\n"))
    assert (info.value.key, info.value.where) == ("method.rank", "recipe.yaml:6")


@pytest.mark.parametrize("where", ["top", "nested", "set"])
def test_python_tags_are_refused_and_never_run(workdir, where):
    marker = workdir / "pwned"
    payload = f'!!python/object/apply:os.system ["touch {marker}"]'
    if where == "top":
        text, overrides = f"{payload}\n", []
    elif where == "nested":
        text, overrides = GOOD + f"method:\n  rank: {payload}\n", []
    else:
        text, overrides = GOOD, [f"method.rank={payload}"]
    message = _refusal(text, overrides)
    assert "YAML tag `!!python/object/apply:os.system` is refused" in message
    assert not marker.exists()


def test_missing_recipe_file(workdir):
    with pytest.raises(RecipeError, match=r"^nope\.yaml: recipe file not found$"):
        load_recipe("nope.yaml")
    with pytest.raises(RecipeError, match="not a file"):
        load_recipe(str(workdir))


def test_huge_alias_value_gives_a_short_message(workdir):
    # "billion laughs" in small: each level is ten aliases of the one before, 10**6 leaves in all
    # (small enough that a regression fails in a second instead of hanging). Checking and reporting
    # must follow the aliases, never expand them.
    levels = ["&a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 6)]
    text = f"model:\n  name: m\n  revision: [{', '.join(levels)}]\ndata:\n  train: train.jsonl\n"
    message = _refusal(text)
    assert message.startswith("recipe.yaml:3: model.revision: expected a string or null, got [[")
    assert len(message) < 300


# --------------------------------------------------------------------------------------------------
# Good recipes


def test_defaults_come_from_the_dataclasses(workdir):
    recipe = load_recipe(_write(GOOD))
    expected = Recipe(
        model=ModelSection(name="HuggingFaceTB/SmolLM2-135M"),
        data=DataSection(train="train.jsonl"),
        train=TrainSection(learning_rate=lora.LEARNING_RATE),  # null in the schema: the method's own
    )
    assert recipe == expected
    assert (recipe.method.name, recipe.method.rank, recipe.method.alpha) == ("lora", 8, 16.0)
    assert recipe.data.validation == 0.1 and recipe.train.betas == [0.9, 0.999]
    assert recipe.train.max_steps is None and recipe.output_dir == "runs/peftcli"


def test_empty_sections_mean_defaults(workdir):
    recipe = load_recipe(_write(GOOD + "method:\ntrain:\n"))
    assert recipe.method == make_config("lora") and recipe.train == TrainSection(learning_rate=2e-4)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_recipe_without_a_learning_rate_gets_its_methods_default(workdir, name):
    recipe = load_recipe(_write(GOOD + f"method:\n  name: {name}\n"))
    assert recipe.train.learning_rate == default_learning_rate(name) == METHODS[name].LEARNING_RATE
    assert recipe.train.learning_rate > 0


def test_the_methods_default_learning_rates_are_the_documented_ones():
    # LoRA as QLoRA; prefix and prompt tuning as HF PEFT's guides; adapters as AdapterHub; BitFit's sweep top
    rates = {name: default_learning_rate(name) for name in ("lora", "prefix-tuning", "prompt-tuning")}
    assert rates == {"lora": 2e-4, "prefix-tuning": 1e-2, "prompt-tuning": 3e-2}
    assert (default_learning_rate("adapter"), default_learning_rate("bitfit")) == (1e-4, 1e-3)
    # the rates at which the quickstart comparison's 40 steps bring each >= 30% below the base (README)
    rates = {name: default_learning_rate(name) for name in ("ia3", "vera", "loha", "lokr", "oft")}
    assert rates == {"ia3": 3e-3, "vera": 2e-2, "loha": 5e-3, "lokr": 1e-2, "oft": 2e-4}


def test_a_learning_rate_the_recipe_sets_wins_and_null_asks_for_the_default(workdir):
    path = _write(GOOD + "method:\n  name: prompt-tuning\ntrain:\n  learning_rate: 5e-4\n")
    assert load_recipe(path).train.learning_rate == 5e-4
    assert load_recipe(path, ["train.learning_rate=null"]).train.learning_rate == 3e-2
    assert load_recipe(path, ["method.name=lora", "train.learning_rate=1e-3"]).train.learning_rate == 1e-3
    # the resolved number is what recipe.yaml holds, so a run reads back what it trained with
    assert (
        load_recipe(
            None, data=yaml.safe_load(dump_recipe(load_recipe(path, ["train.learning_rate=null"])))
        ).train.learning_rate
        == 3e-2
    )


def test_a_method_without_a_learning_rate_of_its_own_gets_the_common_default(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setitem(METHODS, "bare", SimpleNamespace(NAME="bare"))
    assert default_learning_rate("bare") == DEFAULT_LEARNING_RATE == 2e-4


def test_an_override_names_the_flag_it_came_from(workdir):
    flag = "--method lora:rank=0"
    message = _refusal(GOOD, [("method.rank=0", flag)])
    assert message == "--method lora:rank=0: method.rank: must be > 0, got 0", message
    message = _refusal(GOOD, [("method={name: prefix-tuning, rank: 4}", "--method prefix-tuning:rank=4")])
    assert message.startswith("--method prefix-tuning:rank=4: method.rank: unknown key"), message
    message = _refusal(GOOD, [("method.rank=[", flag)])
    assert message.startswith("--method lora:rank=0: YAML syntax error"), message


def test_overrides_are_applied_and_typed(workdir):
    recipe = load_recipe(
        _write(GOOD + "train:\n  max_steps: 100\n"),
        [
            "train.max_steps=10",
            "method.target_modules=[q_proj,k_proj]",
            "train.learning_rate=1e-4",
            "method.dropout=0.05",
            "train.gradient_checkpointing=true",
        ],
    )
    assert load_recipe(_write(GOOD)).train.gradient_checkpointing == "auto"
    for value in ("up", "mlp", "auto"):
        overrides = [f"train.gradient_checkpointing={value}"]
        assert load_recipe(_write(GOOD), overrides).train.gradient_checkpointing == value
    assert recipe.train.max_steps == 10 and type(recipe.train.max_steps) is int
    assert recipe.method.target_modules == ["q_proj", "k_proj"]
    assert recipe.train.learning_rate == 1e-4 and type(recipe.train.learning_rate) is float
    assert recipe.method.dropout == 0.05 and recipe.train.gradient_checkpointing is True


def test_override_all_linear_stays_a_string(workdir):
    recipe = load_recipe(_write(GOOD), ["method.target_modules=all-linear"])
    assert recipe.method.target_modules == "all-linear"


def test_later_override_wins_and_creates_missing_sections(workdir):
    recipe = load_recipe(_write(GOOD), ["method.rank=4", "method.rank=32", "method={name: bitfit}"])
    assert recipe.method == make_config("bitfit")  # the whole section was replaced


def test_overrides_do_not_change_the_callers_dict(workdir):
    data = {"model": {"name": "m"}, "data": {"train": "train.jsonl"}}
    recipe = load_recipe(None, ["method.rank=4", "model.name=other"], data=data)
    assert recipe.method.rank == 4 and recipe.model.name == "other"
    assert data == {"model": {"name": "m"}, "data": {"train": "train.jsonl"}}


def test_data_dict_errors_name_the_key_without_a_file(workdir):
    with pytest.raises(RecipeError, match=r"^method\.rank: must be > 0, got 0$"):
        load_recipe(
            None, data={"model": {"name": "m"}, "data": {"train": "train.jsonl"}, "method": {"rank": 0}}
        )


def test_parse_override_reads_the_value_as_yaml():
    assert parse_override("train.max_steps=10") == (["train", "max_steps"], 10)
    assert parse_override("method.target_modules=[q, v]") == (["method", "target_modules"], ["q", "v"])
    assert parse_override("data.validation=") == (["data", "validation"], None)
    assert parse_override("model.name=org/model=v2") == (["model", "name"], "org/model=v2")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("validation: 0.2", 0.2),
        ("validation: val.jsonl", "val.jsonl"),
        ("validation: null", None),
        ("validation: 1e-1", 0.1),
    ],
)
def test_validation_is_a_fraction_a_file_or_null(workdir, line, expected):
    recipe = load_recipe(_write(GOOD + f"  {line}\n"))
    assert recipe.data.validation == expected and type(recipe.data.validation) is type(expected)


def test_yaml_1_1_pitfalls_read_as_meant(workdir):
    text = GOOD + "train:\n  learning_rate: 2e-4\n  epochs: 3\n  mixed_precision: no\n"
    recipe = load_recipe(_write(text))
    assert recipe.train.learning_rate == 2e-4  # PyYAML alone reads `2e-4` as a string
    assert recipe.train.epochs == 3.0 and type(recipe.train.epochs) is float
    assert recipe.train.mixed_precision == "no"  # PyYAML alone reads `no` as false


def test_utf8_bom_and_merge_keys_are_accepted(workdir):
    text = "\ufeff" + GOOD + "method:\n  <<: {rank: 4, alpha: 8}\n  rank: 16\n"
    recipe = load_recipe(_write(text))
    assert (recipe.method.rank, recipe.method.alpha) == (16, 8.0)


def test_relative_paths_are_relative_to_the_working_directory(workdir):
    (workdir / "sub").mkdir()
    (workdir / "sub" / "only-here.jsonl").write_text("{}\n")
    assert load_recipe(_write(GOOD, "sub/recipe.yaml")).data.train == "train.jsonl"
    with pytest.raises(RecipeError, match="data.train: not found: only-here.jsonl"):
        load_recipe(_write(GOOD.replace("train.jsonl", "only-here.jsonl"), "sub/recipe.yaml"))


def test_dump_round_trips_through_load(workdir):
    text = GOOD + (
        "  validation: val.jsonl\n  split: '1e3'\nmethod:\n  name: lora\n  target_modules: [q_proj, v_proj]\n"
        "train:\n  learning_rate: 1e-5\n  mixed_precision: 'no'\n  max_steps: 7\noutput_dir: 'yes'\n"
    )
    recipe = load_recipe(_write(text))
    assert (recipe.data.split, recipe.output_dir) == ("1e3", "yes")
    dumped = dump_recipe(recipe)
    assert load_recipe(_write(dumped, "dumped.yaml")) == recipe
    assert load_recipe(None, data=yaml.safe_load(dumped)) == recipe  # plain YAML readers see the same
    defaults = load_recipe(_write(GOOD))
    assert load_recipe(_write(dump_recipe(defaults), "defaults.yaml")) == defaults


def test_objective_by_name_as_a_section_and_by_set(workdir):
    from peftcli.recipe.schema import DPO, ORPO, SFT

    pairs = GOOD + "  format: preference\ntrain:\n  objective: dpo\n"
    assert load_recipe(_write(pairs)).train.objective == DPO()
    assert load_recipe(_write(pairs), ["train.objective.beta=0.3"]).train.objective == DPO(beta=0.3)
    assert load_recipe(_write(pairs), ["train.objective=orpo"]).train.objective == ORPO()
    orpo = load_recipe(
        _write(GOOD + "  format: preference\ntrain:\n  objective: {name: orpo, lambda: 0.5}\n")
    )
    assert orpo.train.objective == ORPO(lambda_=0.5)
    assert (
        "    lambda: 0.5\n" in dump_recipe(orpo) and load_recipe(_write(dump_recipe(orpo), "o.yaml")) == orpo
    )
    sft = load_recipe(_write(GOOD))
    assert sft.train.objective == SFT() and "  objective: sft\n" in dump_recipe(sft)


def test_old_column_keys_are_read_into_columns(workdir):
    recipe = load_recipe(_write(GOOD + "  text_column: body\n"))
    assert recipe.data.columns == {"text": "body"}
    assert load_recipe(_write(GOOD), ["data.text_column=b"]).data.columns == {"text": "b"}
    # A run's recipe.yaml from before data.columns lists all six keys at their defaults.
    old = "".join(
        f"  {name}: {name.removesuffix('_column')}\n" for name in ("text_column", "messages_column")
    )
    old += "  label_column: stars\n  instruction_column: task\n"  # not read by the text format: dropped
    assert load_recipe(_write(GOOD + old)).data.columns == {}
    classes = load_recipe(
        _write(GOOD + "  label_column: stars\n  format: classification\n"),
        ["model.task=sequence-classification"],
    )
    assert classes.data.columns == {"label": "stars"}
    with pytest.raises(RecipeError, match=r"recipe.yaml:5: data.label_column: expected a column name, got 3"):
        load_recipe(_write(GOOD + "  label_column: 3\n"))


def test_dump_lists_every_field(workdir):
    recipe = load_recipe(_write(GOOD))
    dumped = dump_recipe(recipe)
    for section in (ModelSection, type(recipe.method), DataSection, TrainSection):
        for f in dataclasses.fields(section):
            assert f"  {f.name}:" in dumped
    assert "  name: lora" in dumped


# --------------------------------------------------------------------------------------------------
# The recipes shipped in configs/


@pytest.mark.parametrize("config", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_is_valid_and_round_trips(config, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)  # configs name their data as configs/data/...
    recipe = load_recipe(config.relative_to(REPO))
    assert recipe.model.name and recipe.data.train
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(dump_recipe(recipe))
    assert load_recipe(dumped) == recipe


# --------------------------------------------------------------------------------------------------
# Through the real command line

CLI_CASES = [
    (GOOD + "method:\n  rank: 0\n", [], "recipe.yaml:6: method.rank: must be > 0, got 0"),
    ("modle:\n  name: x\n", [], "recipe.yaml:1: modle: unknown key (did you mean `model`?)"),
    (GOOD, ["--set", "train.max_steps=ten"], "--set train.max_steps: expected an integer or null, got 'ten'"),
    (GOOD + "method:\n  rank: [1, 2\n", [], "recipe.yaml:7: YAML syntax error"),
]


@pytest.mark.parametrize(
    ("text", "flags", "expected"), CLI_CASES, ids=["range", "unknown-key", "set", "syntax"]
)
def test_cli_refuses_bad_recipe_with_exit_2_and_no_traceback(workdir, monkeypatch, text, flags, expected):
    from peftcli.cli import app

    monkeypatch.delenv("PEFTCLI_DEBUG", raising=False)
    result = CliRunner().invoke(app, ["train", _write(text), *flags])
    assert result.exit_code == 2, result.output
    assert expected in result.stderr
    assert "Traceback" not in result.output and not list(workdir.glob("runs"))


def test_cli_debug_shows_the_traceback(workdir, monkeypatch):
    from peftcli.cli import app

    monkeypatch.delenv("PEFTCLI_DEBUG", raising=False)
    result = CliRunner().invoke(app, ["--debug", "train", _write(GOOD + "method:\n  rank: 0\n")])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "RecipeError" in result.stderr
    assert "recipe.yaml:6: method.rank: must be > 0, got 0" in result.stderr


def test_cli_prints_square_brackets_in_messages(workdir):
    from peftcli.cli import app

    result = CliRunner().invoke(app, ["train", _write(GOOD + "method:\n  target_modules: q_proj,v_proj\n")])
    assert "for a list write [q_proj, v_proj]" in result.stderr


def test_entry_point_in_a_subprocess(workdir):
    result = subprocess.run(
        [sys.executable, "-m", "peftcli.cli", "train", _write("modle:\n  name: x\n")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2
    assert "recipe.yaml:1: modle: unknown key (did you mean `model`?)" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_nf4_without_bitsandbytes_is_refused_at_its_line(workdir, monkeypatch):
    from peftcli.recipe import checks

    real = checks.importlib.util.find_spec
    monkeypatch.setattr(
        checks.importlib.util, "find_spec", lambda n: None if n == "bitsandbytes" else real(n)
    )
    message = _refusal(GOOD.replace("  name: HuggingFaceTB/SmolLM2-135M\n", "  name: m\n  quantize: nf4\n"))
    assert message.startswith("recipe.yaml:3: model.quantize: nf4 needs bitsandbytes")
    assert "pip install 'peftcli[quant]'" in message
