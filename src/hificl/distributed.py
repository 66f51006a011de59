"""The processes of a run, through accelerate: one (a plain ``python``/``hificl`` call) or several (``accelerate
launch`` / ``torchrun``: one process per GPU, or gloo processes on a machine without GPUs), replicating the
backbone (DDP) or sharding it (FSDP2); which launches hificl runs is checked before a backbone loads."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

logger = logging.getLogger(__name__)
SHARDING_ENGINES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


def process_state() -> PartialState:
    """accelerate's process-wide state. On a machine without GPUs several launched processes are accelerate's
    MULTI_CPU (gloo), which it sets up only when told the run is on the CPU."""
    return PartialState(cpu=not torch.cuda.is_available())


def _flag(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).lower() in ("1", "true", "yes")


def sharding_engine() -> str | None:
    """The engine an ``accelerate launch`` config asks for that shards or steps the parameters itself (what
    accelerate reads from its launch environment), if any."""
    for variable, engine in SHARDING_ENGINES.items():
        if _flag(variable):
            return engine
    return None


def check_engine() -> None:
    """Stop before a backbone is loaded (minutes, for the models these engines are for) when the launch asks for
    an engine, or an engine setting, that hificl does not train with; the message names the setting to change.
    hificl trains with DDP and with FSDP2 (`fsdp_version: 2`: the backbone's weights sharded over the processes,
    the adapter's too, its checkpoints gathered whole)."""
    engine = sharding_engine()
    if engine == "DeepSpeed":
        raise ValueError("This run is launched for DeepSpeed (distributed_type: DEEPSPEED in the accelerate config), "
                         "which hificl does not train with yet. Shard the backbone with FSDP2 instead "
                         "(accelerate/fsdp2.yaml in hificl's repository: distributed_type: FSDP, fsdp_version: 2), "
                         "or replicate it with DDP (accelerate/multi-gpu.yaml).")
    if engine != "FSDP":
        return
    settings = {
        "fsdp_version": (os.environ.get("FSDP_VERSION", "1") != "2",
                         "hificl runs FSDP2 only (per-parameter sharding: its frozen and trainable weights share "
                         "a wrap unit, which FSDP1 flattens): set fsdp_version: 2"),
        "fsdp_offload_params": (_flag("FSDP_OFFLOAD_PARAMS"),
                                "offloading parameters to the CPU is not supported yet: set fsdp_offload_params: "
                                "false"),
        "fsdp_cpu_ram_efficient_loading": (_flag("FSDP_CPU_RAM_EFFICIENT_LOADING"),
                                           "hificl attaches its adapter to a loaded backbone (a probe forward finds "
                                           "the attention modules), which a backbone on the meta device cannot run: "
                                           "set fsdp_cpu_ram_efficient_loading: false"),
    }
    for name, (refused, why) in settings.items():
        if refused:
            raise ValueError(f"This run is launched for FSDP with {name} as set in the accelerate config: {why}.")


def is_sharded_model(model: nn.Module) -> bool:
    """Whether a sharding engine holds `model`'s weights (some are DTensors): every forward is then a collective,
    so generation keeps the processes in step (``synced_gpus``)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def shard_for_evaluation(model: nn.Module, mixed_precision: str) -> None:
    """Under an FSDP2 launch, shard a model whose weights are still whole (a method that trained nothing, or a
    loaded adapter) over the processes, in place, as training shards it: generation then never holds the whole
    backbone on one device. A no-op for other launches and for a model already sharded."""
    if sharding_engine() != "FSDP" or is_sharded_model(model):
        return
    accelerator = accelerator_for(mixed_precision)
    accelerator.prepare_model(model, evaluation_mode=True)
    prepare_sharded(model)
    logger.info("the model is sharded over %d processes for its evaluation (FSDP2)", accelerator.num_processes)


def prepare_sharded(model: nn.Module) -> None:
    """What a model sharded in place (FSDP2) needs from hificl: `generate` runs the engine's gathering like
    `forward`, and modules that cache products of their parameters stop (gathered weights reuse storage without a
    new version)."""
    for module in model.modules():
        if hasattr(module, "cache_products"):
            module.cache_products = False
    if isinstance(model, FSDPModule) and not getattr(model, "_hificl_generate_registered", False):
        register_fsdp_forward_method(model, "generate")
        model._hificl_generate_registered = True


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether the accelerator shards the model's parameters over the processes (FSDP2): a parameter is then a
    DTensor, its whole value a collective (every process must ask)."""
    return accelerator.distributed_type == DistributedType.FSDP


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's whole value (a sharded DTensor gathered: a collective, every process must ask in the same order)."""
    tensor = tensor.detach()
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def set_whole_(target: torch.Tensor, value: torch.Tensor) -> None:
    """Set `target` to the whole `value`: a sharded DTensor takes this process's shard of it (no communication:
    every process holds `value`)."""
    with torch.no_grad():
        if isinstance(target, DTensor):
            value = distribute_tensor(value.to(target.device, target.dtype), target.device_mesh, target.placements,
                                      src_data_rank=None)
        target.copy_(value.to(target.dtype))


@contextlib.contextmanager
def whole_parameters(model: nn.Module) -> Iterator[None]:
    """Within the block, every sharded trainable parameter of `model` holds its whole value on every process (an
    ordinary parameter in place of its shard), so that code written for one device -- saving or restoring an
    adapter -- runs unchanged; what the block sets is written back into the shards. Enter it on every process
    (gathering is a collective); a model with no sharded parameter is left as it is."""
    for module in model.modules():  # every unit back to its shards on every process (the root keeps its parameters
        if isinstance(module, FSDPModule):  # gathered after a forward): what runs in the block changes none's state
            module.reshard()
    swapped = []
    for name, param in model.named_parameters():
        if param.requires_grad and isinstance(param, DTensor):
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            swapped.append((owner, leaf, param, nn.Parameter(whole(param).clone(), requires_grad=True)))
    for owner, leaf, _, plain in swapped:
        owner._parameters[leaf] = plain
    try:
        yield
    finally:
        for owner, leaf, shard, plain in swapped:
            set_whole_(shard, plain.detach())
            owner._parameters[leaf] = shard


def accelerator_for(mixed_precision: str, log_with: Sequence[str] = (), project_dir: Path | None = None) -> Accelerator:
    """An Accelerator with this precision. accelerate keeps one process-wide state; a single-process run that
    asks for another precision than an earlier trainer (e.g. a comparison in one Python session) resets it."""
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, mixed_precision) and AcceleratorState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(),
                       log_with=list(log_with) or None, project_dir=str(project_dir) if project_dir else None)
