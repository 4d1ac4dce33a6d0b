"""What `--resume` needs beyond the adapter files: every trainable parameter as it is, the optimizer's
tensors, the RNG states and the method's initial state where it has one (safetensors), and the step (JSON).
No pickle anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from peftcli import fileio
from peftcli.errors import UserError
from peftcli.runs.rundir import OPTIMIZER_NAME, STATE_NAME
from peftcli.train import distributed

INITIAL = "initial."  # key prefix of the method's initial state


def collect(accelerator, model: nn.Module, optimizer, initial: dict | None = None) -> dict[str, torch.Tensor]:
    """Everything --resume needs beyond the adapter files, as whole tensors: every trainable parameter as it
    is (some methods save a derived form in the adapter, e.g. prefix tuning's projected prefixes), the
    optimizer's tensors, every process's RNG states, and `initial`: the method's initial state (its
    ``initial_state(model)``, e.g. PiSSA's factors). A collective under several processes (sharded tensors
    are gathered, train/distributed.py): every process calls it, within `distributed.gathered(model)`."""
    tensors = distributed.optimizer_tensors(optimizer)
    tensors.update(
        {
            f"param.{name}": p.detach().cpu().contiguous()
            for name, p in model.named_parameters()
            if p.requires_grad
        }
    )
    tensors.update({f"{INITIAL}{name}": t.detach().cpu().contiguous() for name, t in (initial or {}).items()})
    tensors.update(distributed.rng_states(accelerator))
    return tensors


def save_training_state(
    directory: str | Path, tensors: dict[str, torch.Tensor], optimizer, state: dict
) -> None:
    """`collect`'s tensors (safetensors) and `state`, JSON data (step, seed, processes ...), with the
    optimizer's parameter groups."""
    directory = Path(directory)
    fileio.atomic_write(directory / OPTIMIZER_NAME, lambda tmp: save_file(tensors, tmp))
    groups = optimizer.state_dict()["param_groups"]
    fileio.write_json(directory / STATE_NAME, {**state, "param_groups": groups})


def load_initial_state(directory: str | Path) -> dict[str, torch.Tensor]:
    """The method's initial state a checkpoint holds (empty for most methods): inject starts from it."""
    path = Path(directory) / OPTIMIZER_NAME
    try:
        with safe_open(str(path), "pt") as f:
            return {
                key.removeprefix(INITIAL): f.get_tensor(key) for key in f.keys() if key.startswith(INITIAL)
            }
    except (OSError, SafetensorError) as e:
        raise UserError(f"checkpoint {directory} is incomplete or unreadable: {e}") from e


def load_training_state(directory: str | Path, accelerator, model: nn.Module, optimizer) -> dict:
    """Put the checkpoint's trained parameters, optimizer state and this process's RNG back (split the way
    this run shards them); returns its JSON state. Whole tensors in the file: any number of processes reads
    it."""
    directory = Path(directory)
    try:
        state = json.loads((directory / STATE_NAME).read_text(encoding="utf-8"))
        tensors = load_file(str(directory / OPTIMIZER_NAME))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, SafetensorError) as e:
        raise UserError(f"checkpoint {directory} is incomplete or unreadable: {e}") from e
    _check_groups(directory, optimizer, state.get("param_groups"))
    slots: dict[int, dict] = {}
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        kind, _, rest = key.partition(".")
        if kind == "state":
            idx, name = rest.split(".", 1)
            slots.setdefault(int(idx), {})[name] = value
        elif kind == "param":
            if rest not in params or params[rest].shape != value.shape:
                raise UserError(f"checkpoint {directory} does not fit this model: parameter {rest}")
            with torch.no_grad():
                params[rest].copy_(distributed.like(value, params[rest]))
    distributed.split_optimizer_state(optimizer, slots)
    optimizer.load_state_dict({"state": slots, "param_groups": state.pop("param_groups")})
    processes = accelerator.num_processes
    distributed.restore_rng(tensors, accelerator.process_index, processes, state.get("processes", processes))
    return state


def checkpoint_problem(directory: Path) -> str | None:
    """Why the training state in checkpoint `directory` cannot be read (a file cut short, say), or None."""
    try:
        json.loads((directory / STATE_NAME).read_text(encoding="utf-8"))
        load_file(str(directory / OPTIMIZER_NAME))
    except Exception as e:  # json, OS and safetensors' own errors alike
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def _check_groups(directory: Path, optimizer, saved) -> None:
    """The checkpoint's parameter groups must be this optimizer's: same sizes, same learning-rate scales."""

    def layout(groups) -> list[tuple[int, float]]:
        return [(len(g["params"]), g.get("lr_scale", 1.0)) for g in groups]

    ours = layout(optimizer.param_groups)
    theirs = layout(saved) if isinstance(saved, list) else saved
    if theirs != ours:
        raise UserError(
            f"checkpoint {directory} does not fit this run's optimizer (parameter groups of sizes and "
            f"learning-rate scales {ours}, the checkpoint's {theirs!r}): "
            "resume with the recipe the run began with"
        )
