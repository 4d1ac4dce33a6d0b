"""How the processes of a `torchrun` / `accelerate launch` share the model: train.distributed.

- ddp: every process holds the whole model; Accelerate wraps it in DistributedDataParallel.
- fsdp: torch.distributed's FSDP2 (``fully_shard``): each decoder layer is one sharded group, then the root
  (embeddings, final norm, head, what is left): every parameter, frozen base and trained alike, is split
  into one slice per process (dim 0), gathered for a group's forward and backward and freed after. Called
  directly rather than through Accelerate's FSDP plugin, which Accelerate 1.15 does not apply on CPU (it
  falls back to data-parallel there); Accelerate still owns the process group, the device, autocast and
  the reductions.
- auto: fsdp when the frozen base would not leave room for training on one device (see `choose`), else ddp.

One process is plain training whatever the setting. In both modes the loss is the global batch's and the
gradients are averaged over processes, so one process and N processes at the same global batch compute the
same update (train/loop.py).

Saving gathers: the trained parameters and their optimizer state are full tensors in the adapter and the
checkpoint (the trained part of a PEFT run is small), written once by the main process, so a checkpoint
does not depend on how many processes wrote it. Each process's RNG state is kept too (`rng_states`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from peftcli.errors import FieldError, UserError
from peftcli.quant.convert import is_quantized

log = logging.getLogger(__name__)

# auto picks fsdp when the frozen base takes more than this share of one process's device memory: the
# rest holds activations, the trained parameters with their gradients and AdamW's two moments, and the
# framework's own buffers. Simple on purpose: a rough line, said in the README.
BASE_SHARE = 0.5


def choose(setting: str, processes: int, base_bytes: int, device_bytes: int | None) -> str:
    """ "single" (one process), "ddp" or "fsdp" for train.distributed `setting`; `device_bytes`: one process's
    share of its device's memory (None: unknown, taken as room enough)."""
    if processes == 1:
        return "single"
    if setting != "auto":
        return setting
    if device_bytes is not None and base_bytes > BASE_SHARE * device_bytes:
        return "fsdp"
    return "ddp"


def base_bytes(model: nn.Module) -> int:
    """Bytes of the model's frozen parameters (each tensor once)."""
    seen = {id(p): p for p in model.parameters() if not p.requires_grad}
    return sum(p.numel() * p.element_size() for p in seen.values())


def device_bytes(device: torch.device, local_processes: int) -> int | None:
    """One process's share of its device's memory: a GPU's whole memory (one process per GPU), or the
    machine's RAM divided among the processes on this node."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    return total // max(1, local_processes)


def resolve(recipe, accelerator, model: nn.Module) -> str:
    """train.distributed for this launch: "single", "ddp" or "fsdp". auto is agreed by every process (fsdp
    if any one's device is short of room: nodes may differ), since all must shard alike."""
    processes = accelerator.num_processes
    local = int(os.environ.get("LOCAL_WORLD_SIZE", processes))
    mode = choose(
        recipe.train.distributed, processes, base_bytes(model), device_bytes(accelerator.device, local)
    )
    if recipe.train.distributed == "auto" and processes > 1:
        vote = torch.tensor(float(mode == "fsdp"), device=accelerator.device)
        mode = "fsdp" if float(accelerator.reduce(vote, "sum")) > 0 else "ddp"
    if mode == "fsdp" and any(is_quantized(m) for m in model.modules()):
        # FSDP2 shards float parameters; packed quantized blocks (model.quantize, a GGUF's own blocks) are
        # not sharded here yet. Every process holds the same base, so each reaches the same answer.
        if recipe.train.distributed == "fsdp":
            raise FieldError(
                "train.distributed",
                "fsdp does not shard quantized frozen weights yet (model.quantize, or a GGUF base's packed "
                "blocks with model.quantize: auto): use ddp, or model.quantize: none",
            )
        log.warning("the base is quantized, which fsdp does not shard yet: data-parallel instead")
        mode = "ddp"
    return mode


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: the ModuleList of same-class modules that holds the most parameters
    (model.layers of Llama, transformer.h of GPT-2, encoder.layer of BERT)."""
    best: list[nn.Module] = []
    best_size = 0
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = list(module), size
    if not best:
        raise UserError(
            f"train.distributed: fsdp found no repeated layers to shard in {type(model).__name__}"
        )
    return best


def shard(model: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2 in place: each decoder layer, then the root. A layer frees its gathered weights after its
    forward (gathered again for backward); the root keeps its own (embeddings, final norm, head) until
    backward, because the chunked loss (fast/chunked_loss.py) reads the head's weight after the model's
    forward has returned."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # No model.to(device) first: fully_shard moves each group's tensors to the mesh's device as it shards
    # them, so a GPU never holds more than one group whole.
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    # FSDP2 warns of a view returned by the root on every forward; nothing here writes into its output.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    return model


def prepare(accelerator, model: nn.Module, mode: str, make_optimizer):
    """(model, optimizer) ready to train: sharded first where mode is fsdp (the optimizer must see the
    sharded parameters), else Accelerate's own wrapping."""
    if mode != "fsdp":
        return accelerator.prepare(model, make_optimizer(model))
    shard(model, accelerator.device)
    return model, accelerator.prepare(make_optimizer(model))


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def no_sync(accelerator, model: nn.Module) -> Iterator[None]:
    """A micro-batch whose gradients are not yet reduced across processes (all but the last of a step)."""
    if not is_sharded(model):
        with accelerator.no_sync(model):
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole (a collective: every process calls it, in the same order)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full tensor split the way `param` is (unchanged where `param` is not sharded)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor) or value.shape != param.shape:
        return value
    return distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh, param.placements)


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the trained parameters are whole tensors on every process (a collective on entry),
    so the methods' own `adapter_state` and `initial_state` read them as on one process; the shards are put
    back on exit. The frozen base stays sharded."""
    from torch.distributed.tensor import DTensor

    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    whole: dict[int, nn.Parameter] = {}
    if is_sharded(model):
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is None or not p.requires_grad or not isinstance(p, DTensor):
                    continue
                if id(p) not in whole:
                    whole[id(p)] = nn.Parameter(p.detach().full_tensor(), requires_grad=True)
                swapped.append((module, name, p))
                module._parameters[name] = whole[id(p)]
    try:
        yield model
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def optimizer_tensors(optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter tensors, gathered whole: {"state.<index>.<slot>": tensor}."""
    return {
        f"state.{idx}.{name}": full(v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
        for idx, slots in optimizer.state_dict()["state"].items()
        for name, v in slots.items()
    }


def split_optimizer_state(optimizer, slots: dict[int, dict[str, torch.Tensor]]) -> None:
    """Whole optimizer tensors (as saved) split like their parameters, in place, before load_state_dict."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for idx, values in slots.items():
        if idx < len(params):
            for name, value in values.items():
                values[name] = like(value, params[idx])


def rng_states(accelerator) -> dict[str, torch.Tensor]:
    """Every process's torch RNG state (and CUDA's), gathered: {"rng.torch.<rank>": ...}. A collective."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    found = {}
    for kind, state in states.items():
        if accelerator.num_processes > 1:
            rows = accelerator.gather(state.to(accelerator.device)[None]).cpu()
        else:
            rows = state[None]
        found.update({f"rng.{kind}.{rank}": row.contiguous() for rank, row in enumerate(rows)})
    return found


def restore_rng(tensors: dict[str, torch.Tensor], rank: int, processes: int, saved_processes: int) -> None:
    """This process's RNG as the checkpoint saved it (a checkpoint from before per-process states holds
    one, `rng.torch`). Onto a different number of processes the states do not map: each process keeps the
    seed + rank stream it started with, and the run continues with other dropout masks than it would have."""
    if saved_processes != processes:
        log.warning(
            "the checkpoint was written by %d processes, this run has %d: its RNG states are not restored "
            "(dropout masks differ from an uninterrupted run)",
            saved_processes,
            processes,
        )
        return
    for kind in ("torch", "cuda"):
        state = tensors.get(f"rng.{kind}.{rank}", tensors.get(f"rng.{kind}") if rank == 0 else None)
        if state is None:
            continue
        if kind == "torch":
            torch.set_rng_state(state)
        elif torch.cuda.is_available():
            torch.cuda.set_rng_state(state)
