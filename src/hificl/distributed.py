"""The processes of a run, through accelerate: one (a plain ``python``/``hificl`` call) or several (``accelerate
launch`` / ``torchrun``: one process per GPU, or gloo processes on a machine without GPUs), replicating the
backbone (DDP) or sharding it (FSDP2, DeepSpeed ZeRO: `hificl.zero`); which launches hificl runs is checked before
a backbone loads. The helpers below (`whole`, `set_whole_`, `whole_parameters`, `micro_batch`) let the trainer and
the protocol read, set and step a model the same way under every engine."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

from . import zero

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
    hificl trains with DDP, FSDP2 (`fsdp_version: 2`) and DeepSpeed ZeRO stages 1-3 (weights, or their optimiser
    state, sharded over the processes; checkpoints gathered whole)."""
    engine = sharding_engine()
    if engine == "DeepSpeed":
        refused = zero.refused_settings()
        if refused:
            raise ValueError("This run is launched for DeepSpeed with settings hificl cannot run: "
                             + "; ".join(refused) + ". accelerate/zero3.yaml in hificl's repository is one it runs.")
        return
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


def close_process_group() -> None:
    """End a launched run's process group once every process got here (torch asks for it: a group left to the
    interpreter's exit can abort a process while its communication threads still run)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def is_sharded_model(model: nn.Module) -> bool:
    """Whether a sharding engine holds `model`'s weights in slices (FSDP2's DTensors, ZeRO-3's partitions): every
    forward is then a collective, so generation keeps the processes in step (``synced_gpus``)."""
    return any(isinstance(p, DTensor) or zero.is_partitioned(p) for p in model.parameters())


def keeps_backbone_off_device() -> bool:
    """Whether the launch's engine places the backbone's weights itself (FSDP2, ZeRO-3 shard it from where it
    loaded): until then it stays where it loaded and is never whole on one device."""
    engine = sharding_engine()
    return engine == "FSDP" or (engine == "DeepSpeed" and zero.launch_zero_stage() == 3)


def shard_for_evaluation(model: nn.Module, mixed_precision: str) -> None:
    """Under a launch whose engine shards the weights (FSDP2, ZeRO-3), shard a model whose weights are still whole
    (a method that trained nothing, or a loaded adapter) over the processes, in place, as training shards it:
    generation then never holds the whole backbone on one device. A no-op for other launches (their backbone is
    on this process's device already) and for a model already sharded."""
    if not keeps_backbone_off_device() or is_sharded_model(model):
        return
    accelerator = accelerator_for(mixed_precision)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # an engine without optimiser: ZeRO-3 inference
        zero.configure(accelerator.state.deepspeed_plugin, 1, accelerator.num_processes, None)
    accelerator.prepare_model(model, evaluation_mode=True)
    prepare_sharded(model)
    logger.info("the model is sharded over %d processes for its evaluation (%s)", accelerator.num_processes,
                engine_name(accelerator))


def prepare_sharded(model: nn.Module) -> None:
    """What a model sharded in place (FSDP2, ZeRO-3) needs from hificl: `generate` runs FSDP2's gathering like
    `forward`, and modules that cache products of their parameters stop (gathered weights reuse storage without a
    new version)."""
    for module in model.modules():
        if hasattr(module, "cache_products"):
            module.cache_products = False
    if isinstance(model, FSDPModule) and not getattr(model, "_hificl_generate_registered", False):
        register_fsdp_forward_method(model, "generate")
        model._hificl_generate_registered = True


def engine_name(accelerator: Accelerator) -> str:
    """How the processes share the model: "single process", "DDP", "FSDP2", "DeepSpeed ZeRO-<stage>"."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "FSDP2" if accelerator.is_fsdp2 else "FSDP1"
    if kind == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    return "DDP" if accelerator.num_processes > 1 else "single process"


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether the accelerator's engine holds the trainable parameters or their optimiser state in slices over the
    processes (FSDP2, DeepSpeed ZeRO): their whole values are then collectives (every process must ask)."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's whole value: a sharded DTensor gathered, a ZeRO parameter's float32 master gathered (collectives:
    every process must ask in the same order); any other tensor as it is."""
    if isinstance(tensor, DTensor):
        return tensor.detach().full_tensor()
    if zero.is_zero_parameter(tensor):
        return zero.whole_master(tensor)
    return tensor.detach()


def set_whole_(target: torch.Tensor, value: torch.Tensor) -> None:
    """Set `target` to the whole `value`, held by every process: a sharded DTensor takes this process's shard of
    it, a ZeRO parameter its slices (a ZeRO-3 one in a collective: every process sets it in the same order)."""
    if zero.is_zero_parameter(target):
        zero.set_whole_master_(target, value)
        return
    with torch.no_grad():
        if isinstance(target, DTensor):
            value = distribute_tensor(value.to(target.device, target.dtype), target.device_mesh, target.placements,
                                      src_data_rank=None)
        target.copy_(value.to(target.dtype))


def optimizer_state(optimizer, params: list[nn.Parameter]) -> dict[str, Any]:
    """The optimiser's state dict in torch's layout with whole tensors, indices in the order of `params` (FSDP2's
    sharded moments and ZeRO's partitions gathered: a collective)."""
    if any(zero.is_zero_parameter(p) for p in params):
        return zero.optimizer_state(optimizer, params)
    state = optimizer.state_dict()
    state["state"] = {index: {k: whole(v).cpu() if torch.is_tensor(v) else v for k, v in slots.items()}
                      for index, slots in sorted(state["state"].items())}
    return state


def load_optimizer_state(optimizer, params: list[nn.Parameter], saved: dict[str, Any]) -> None:
    """Set the optimiser's state from `saved` (torch's layout, whole tensors, indices in the order of `params`):
    each process takes its shard of a sharded parameter's moments."""
    if any(zero.is_zero_parameter(p) for p in params):
        zero.load_optimizer_state(optimizer, params, saved)
        return
    state = {index: {k: _like(params[index], v) for k, v in slots.items()} for index, slots in saved["state"].items()}
    current = optimizer.state_dict()["param_groups"]
    groups = [dict(settings, params=now["params"]) for settings, now in zip(saved["param_groups"], current)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _like(param: torch.Tensor, value: Any) -> Any:
    """An optimiser state slot as its parameter holds it: this process's shard of a sharded parameter's moments."""
    if isinstance(param, DTensor) and torch.is_tensor(value) and value.shape == param.shape:
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return value


@contextlib.contextmanager
def micro_batch(accelerator: Accelerator, model: nn.Module, last: bool) -> Iterator[None]:
    """One micro-batch's forward and backward within an optimiser step: gradients are exchanged at the step's
    last micro-batch only (DDP's and FSDP2's `no_sync` before it), and DeepSpeed is told where the step ends
    (accelerate's accumulation boundary), where its engine then clips and steps."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.gradient_state._set_sync_gradients(last)
        try:
            yield
        finally:
            accelerator.gradient_state._set_sync_gradients(True)
    elif last:
        yield
    else:
        with accelerator.no_sync(model):
            yield


@contextlib.contextmanager
def whole_parameters(model: nn.Module) -> Iterator[None]:
    """Within the block, every sharded trainable parameter of `model` (FSDP2, DeepSpeed ZeRO) holds its whole value
    on every process (an ordinary parameter in place of its shard), so that code written for one device -- saving
    or restoring an adapter -- runs unchanged; what the block sets is written back into the shards. Enter it on
    every process (gathering is a collective); a model with no sharded parameter is left as it is."""
    for module in model.modules():  # every unit back to its shards on every process (the root keeps its parameters
        if isinstance(module, FSDPModule):  # gathered after a forward): what runs in the block changes none's state
            module.reshard()
    swapped = []
    for name, param in model.named_parameters():
        if param.requires_grad and (isinstance(param, DTensor) or zero.is_zero_parameter(param)):
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            swapped.append((owner, leaf, param, nn.Parameter(whole(param).clone(), requires_grad=True)))
    for owner, leaf, _, plain in swapped:
        owner._parameters[leaf] = plain
    try:
        yield
    finally:
        for owner, leaf, shard, plain in swapped:
            owner._parameters[leaf] = shard
            set_whole_(shard, plain.detach())


def accelerator_for(mixed_precision: str, log_with: Sequence[str] = (), project_dir: Path | None = None) -> Accelerator:
    """An Accelerator with this precision. accelerate keeps one process-wide state; a single-process run that
    asks for another precision than an earlier trainer (e.g. a comparison in one Python session) resets it."""
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, mixed_precision) and AcceleratorState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(),
                       log_with=list(log_with) or None, project_dir=str(project_dir) if project_dir else None)
