"""Where methods go, by module name: the rules LoRA's targets, adapters' sites and modules_to_save follow.

Plain names and config facts, no torch: injection (methods/) and the config-only count (shapes.py,
count.py) both decide from these, so the two cannot disagree on which layers a method takes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from peftcli.errors import UserError, did_you_mean

# The architecture's usual LoRA targets: the same facts HF PEFT ships as its default mapping.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "bloom": ["query_key_value"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "codegen": ["qkv_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "layoutlm": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
}

# Classification heads trained in full by default for sequence classification (HF PEFT's choice too).
CLASSIFIER_HEADS = ["classifier", "score"]


def matches(name: str, entry: str) -> bool:
    """A list entry names a module by its full name or a `.`-suffix of it (`q_proj`, `attn.c_proj`)."""
    return name == entry or name.endswith("." + entry)


def inside(name: str, prefixes: Iterable[str]) -> bool:
    """Whether `name` is one of the modules `prefixes` names in full, or lies under one."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def outermost(names: list[str]) -> list[str]:
    """`names` without those inside another of them: a module trained in full trains what it holds."""
    return [n for n in names if not any(n != other and inside(n, [other]) for other in names)]


def covers(save_name: str, layer_name: str) -> bool:
    """Whether a modules_to_save entry matches `layer_name` itself or one of its parents."""
    parts = layer_name.split(".")
    return any(matches(".".join(parts[: i + 1]), save_name) for i in range(len(parts)))


def select_targets(names: list[str], targets: list[str] | str, output_heads: set[str]) -> list[str]:
    """The entries of `names` (linear layers, in model order) that `targets` picks.

    A list matches a layer whose full name equals an entry or ends with ``.`` + entry;
    a string other than ``all-linear`` is a regular expression that must match the full name.
    ``all-linear`` is every layer except the output head (`output_heads`) and classification heads.
    No match is an error that lists names that do exist.
    """
    if targets == "all-linear":
        found = [
            n
            for n in names
            if n not in output_heads
            and n.rsplit(".", 1)[-1] not in CLASSIFIER_HEADS
            and not any(n.startswith(h + ".") for h in CLASSIFIER_HEADS)
        ]
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise UserError(f"method.target_modules: bad regular expression {targets!r}: {e}") from e
        found = [n for n in names if pattern.fullmatch(n)]
    else:
        found = [n for n in names if any(matches(n, t) for t in targets)]
        missing = [t for t in targets if not any(matches(n, t) for n in found)]
        if missing and found:
            raise UserError(_no_match_message(missing[0], names))
    if not found:
        first = targets if isinstance(targets, str) else targets[0]
        raise UserError(_no_match_message(first, names))
    return found


def _no_match_message(target: str, names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    lead = f"method.target_modules: `{target}` matches no layer"
    return f"{lead}{did_you_mean(target, leaves)}; layer names here: {', '.join(leaves)}"


def default_targets(
    model_type: str | None, table: dict[str, list[str]] = DEFAULT_TARGETS, method: str = "LoRA"
) -> list[str]:
    """The architecture's usual targets (LoRA's, or a method's own `table`), for a recipe that names none."""
    if model_type not in table:
        raise UserError(
            f"method.target_modules: no default {method} targets for model type {model_type!r}; "
            "set method.target_modules (e.g. [q_proj, v_proj] or all-linear)"
        )
    return table[model_type]


def default_modules_to_save(requested: list[str] | None, task: str) -> list[str]:
    if requested is not None:
        return requested
    return list(CLASSIFIER_HEADS) if task == "sequence-classification" else []


# Where the adapters go, per model_type: (attention output projection, feed-forward output projection),
# each a module path relative to one numbered transformer block (`...layers.<i>.`).
SITES: dict[str, tuple[str, str]] = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "mistral": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen3": ("self_attn.o_proj", "mlp.down_proj"),
    "gemma": ("self_attn.o_proj", "mlp.down_proj"),
    "gemma2": ("self_attn.o_proj", "mlp.down_proj"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),  # Conv1D: the adapter only sees its output, so that is fine
    "opt": ("self_attn.out_proj", "fc2"),
    "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h"),
    "phi": ("self_attn.dense", "mlp.fc2"),
    "bert": ("attention.output.dense", "output.dense"),
    "roberta": ("attention.output.dense", "output.dense"),
    "xlm-roberta": ("attention.output.dense", "output.dense"),
    "electra": ("attention.output.dense", "output.dense"),
}


def adapter_sites(names: list[str], model_type: str | None, placement: str) -> list[str]:
    """The entries of `names` (every module, in model order) that get an adapter for `placement`."""
    if model_type not in SITES:
        supported = ", ".join(sorted(SITES))
        raise UserError(
            f"method.name adapter: no adapter placement is known for model type `{model_type}`"
            f"{did_you_mean(str(model_type), SITES)} (known: {supported}); set "
            "method.target_modules to the output projections that should get an adapter"
        )
    attention, feed_forward = SITES[model_type]
    sites = (attention, feed_forward) if placement == "houlsby" else (feed_forward,)
    # A site is a path inside a numbered block: `...layer.3.output.dense` but not `...attention.output.dense`
    # (BERT's attention output also ends in `output.dense`) nor the pooler's `dense`.
    pattern = re.compile(r"(?:.+\.)?\d+\.(?:" + "|".join(re.escape(s) for s in sites) + ")")
    found = [n for n in names if pattern.fullmatch(n)]
    if not found:
        raise UserError(
            f"method.placement {placement}: found none of {', '.join(sites)} in this "
            f"{model_type} model; set method.target_modules to the layers to adapt"
        )
    return found


def select_biases(owners: list[str], biases: list[str] | str, model_type: str) -> list[str]:
    """The entries of `owners` (modules that own a bias, in model order) that `biases` names for BitFit:
    "all", or exact names / `.`-suffixes."""
    if not owners:
        raise UserError(
            f"method.name bitfit: {model_type} has no bias terms (its layers are bias-free), so "
            "BitFit would train nothing; use method.name: lora instead"
        )
    if biases == "all":
        return owners
    if isinstance(biases, str) or not biases:
        raise UserError(f"method.biases: expected `all` or a non-empty list of module names, got {biases!r}")
    for entry in biases:
        if not any(matches(n, entry) for n in owners):
            names = _short_names(owners)
            raise UserError(
                f"method.biases: `{entry}` matches no module with a bias{did_you_mean(entry, names)}; "
                f"modules with biases here: {', '.join(names)}"
            )
    return [n for n in owners if any(matches(n, e) for e in biases)]


def _short_names(names: list[str]) -> list[str]:
    """Leaf names, with the parent's name where a leaf sits under several (`output.dense`, `pooler.dense`).

    What a user would write in `method.biases`: `query`, `intermediate.dense`, `c_attn`. Layer indices
    are not parents worth naming: a bare leaf already matches it in every layer.
    """
    parents: dict[str, set[str]] = {}
    for name in names:
        *path, leaf = name.split(".")
        parent = path[-1] if path and not path[-1].isdigit() else ""
        parents.setdefault(leaf, set()).add(parent)
    short = set()
    for leaf, above in parents.items():
        short |= {leaf} if len(above) == 1 else {f"{p}.{leaf}" if p else leaf for p in above}
    return sorted(short)
