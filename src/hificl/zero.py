"""DeepSpeed ZeRO (stages 1-3) through accelerate: what hificl's trainer needs from it. DeepSpeed keeps the
trainable weights' float32 master copies and the optimiser's moments in flat partitions, one slice per process
(ZeRO-3 partitions every weight, frozen ones too); hificl's checkpoints stay engine-free (whole tensors by
parameter name), so saving gathers them through DeepSpeed's own accessors and loading sets each process's slice.
hificl's trainer keeps its accumulation, clipping norm and schedule: the DeepSpeed config gets them from the train
config (an explicit, different value there is refused). deepspeed is imported only when a run uses it."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator

import torch
from torch import nn


def is_zero_parameter(tensor: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO holds `tensor`: a ZeRO-3 partitioned parameter, or a trainable ZeRO-1/2 one (linked
    to its float32 master slice on the processes that hold part of it, to None on the others, which still take
    part in gathering it)."""
    return hasattr(tensor, "ds_id") or hasattr(tensor, "_hp_mapping")


def is_partitioned(tensor: torch.Tensor) -> bool:
    """A ZeRO-3 parameter: each process holds only its slice; a forward gathers it (a collective)."""
    return hasattr(tensor, "ds_id")


def whole_master(param: nn.Parameter) -> torch.Tensor:
    """The whole float32 master value of a trainable ZeRO parameter (a collective: every process asks)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(param).detach()


def set_whole_master_(param: nn.Parameter, value: torch.Tensor) -> None:
    """Set a ZeRO parameter to `value` (held whole by every process): its float32 master slice, where an optimiser
    holds one, and the weights the forward uses (a ZeRO-3 parameter's slice: a collective)."""
    from deepspeed import zero
    from deepspeed.utils import safe_set_full_fp32_param

    with torch.no_grad():
        if is_partitioned(param):
            with zero.GatheredParameters([param], modifier_rank=0):
                param.data.copy_(value.to(param.data.device, param.dtype))
        else:
            param.data.copy_(value.to(param.device, param.dtype))
        if hasattr(param, "_z3_optimizer") or hasattr(param, "_hp_mapping"):
            safe_set_full_fp32_param(param, value.to(param.device, torch.float32))


def _partitions(optimizer) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    """The torch optimiser under accelerate's and DeepSpeed's wrappers, and the flat float32 partitions it steps
    (its state is keyed by them)."""
    zero_optimizer = optimizer.optimizer  # accelerate's wrapper holds DeepSpeed's ZeRO optimiser
    for attribute in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):  # ZeRO-3, ZeRO-1/2
        if hasattr(zero_optimizer, attribute):
            return zero_optimizer.optimizer, list(getattr(zero_optimizer, attribute))
    raise TypeError(f"{type(zero_optimizer).__name__} is not a DeepSpeed ZeRO optimiser hificl knows.")


def _moment_slots(base: torch.optim.Optimizer, flat: torch.Tensor) -> tuple[list[str], Any]:
    """The optimiser's per-element slots (Adam's moments) and its step count, as a partition holds them."""
    state = base.state.get(flat, {})
    slots = [k for k, v in state.items() if torch.is_tensor(v) and v.numel() == flat.numel()]
    return slots, state.get("step")


def optimizer_state(optimizer, params: list[nn.Parameter]) -> dict[str, Any]:
    """The optimiser's state in torch's layout (``{"state": {index: {slot: whole tensor}}, "param_groups": ...}``,
    indices in the order of `params`), gathered from the ZeRO partitions: a collective."""
    from deepspeed.utils import safe_get_full_optimizer_state

    base, flats = _partitions(optimizer)
    slots, step = _moment_slots(base, flats[0])
    state = {}
    for index, param in enumerate(params):
        state[index] = {"step": step.clone() if torch.is_tensor(step) else step} if step is not None else {}
        state[index].update({slot: safe_get_full_optimizer_state(param, slot).detach().cpu() for slot in slots})
    groups = [{k: v for k, v in group.items() if k != "params"} for group in base.param_groups]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(optimizer, params: list[nn.Parameter], saved: dict[str, Any]) -> None:
    """Set the optimiser's state from `saved` (torch's layout, whole tensors, indices in the order of `params`):
    each process's slice of every moment, the step count and the groups' settings (learning rates)."""
    from deepspeed.utils import safe_set_full_optimizer_state

    base, flats = _partitions(optimizer)
    for group, settings in zip(base.param_groups, saved["param_groups"]):
        group.update({k: v for k, v in settings.items() if k != "params"})
    first = saved["state"].get(0, {})
    slots = [k for k, v in first.items() if k != "step" and torch.is_tensor(v)]
    with torch.no_grad():
        for flat in flats:  # the torch optimiser creates its state lazily, at its first step
            state = base.state[flat]
            for slot in slots:
                state.setdefault(slot, torch.zeros_like(flat))
            if "step" in first:
                step = first["step"]
                state["step"] = step.clone() if torch.is_tensor(step) else torch.tensor(float(step))
        link = getattr(optimizer.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:  # ZeRO-1/2 link each parameter to its slice of the (now present) moments
            link()
        for index, param in enumerate(params):
            for slot in slots:
                safe_set_full_optimizer_state(param, saved["state"][index][slot].to(param.device, torch.float32),
                                              slot)


def configure(plugin, batch_size: int, processes: int, max_grad_norm: float | None) -> None:
    """Give the DeepSpeed config the trainer's settings before an engine is built: hificl deals out each
    optimiser step's micro-batches itself and tells DeepSpeed where a step ends (so DeepSpeed's own accumulation
    count is 1, and it does not divide the loss), and clips to ``train.max_grad_norm`` (None: an engine for
    evaluation, nothing to clip). A value the launch's config set explicitly that disagrees is refused, naming the
    setting."""
    config = plugin.deepspeed_config
    launched = plugin.__dict__.setdefault("hificl_launch_settings", {  # as the launch set them, before hificl's
        key: config.get(key, "auto") for key in ("gradient_accumulation_steps", "gradient_clipping")})
    accumulation, clipping = launched["gradient_accumulation_steps"], launched["gradient_clipping"]
    if accumulation not in ("auto", 1, "1"):
        raise ValueError(f"The DeepSpeed config sets gradient_accumulation_steps: {accumulation}. hificl accumulates "
                         "itself: set it to auto (or 1) there and use train.grad_accum.")
    if max_grad_norm is not None:
        if clipping not in ("auto", None) and float(clipping) != float(max_grad_norm):
            raise ValueError(f"The DeepSpeed config sets gradient_clipping: {clipping}, but train.max_grad_norm is "
                             f"{max_grad_norm:g}: set gradient_clipping to auto there (hificl's setting decides).")
        config["gradient_clipping"] = plugin.gradient_clipping = float(max_grad_norm)
    config.update(gradient_accumulation_steps=1, train_micro_batch_size_per_gpu=batch_size,
                  train_batch_size=batch_size * processes)
    plugin.gradient_accumulation_steps = 1


def refused_settings() -> list[str]:
    """What a DeepSpeed launch asks for that hificl cannot run, each with the setting to change (empty when it
    can run it). Read from the launch's environment and the DeepSpeed config file it names, as accelerate reads
    them."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return ["deepspeed is not installed: pip install 'hificl[deepspeed]' (or pip install deepspeed)"]
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin()
    config = plugin.deepspeed_config
    refused = []
    if str(plugin.offload_param_device).lower() not in ("none", "null"):
        refused.append(f"offload_param_device: {plugin.offload_param_device} (ZeRO-3 parameters offloaded to the "
                       "CPU are not supported: hificl reads and sets the adapter's weights; set it to none)")
    if str(plugin.offload_optimizer_device).lower() not in ("none", "null"):
        refused.append(f"offload_optimizer_device: {plugin.offload_optimizer_device} (the trainable state is the "
                       "adapter's, megabytes: offloading it saves nothing and needs DeepSpeed's own CPU Adam; set "
                       "it to none)")
    if plugin.zero3_init_flag:
        refused.append("zero3_init_flag: true (the backbone would load partitioned, but hificl attaches its adapter "
                       "with a probe forward of the loaded weights; set zero3_init_flag: false: the engine "
                       "partitions the weights when training starts)")
    for section in ("optimizer", "scheduler"):
        if section in config:
            refused.append(f"a {section!r} section in the DeepSpeed config (hificl's trainer builds its own AdamW "
                           "and schedule from the train settings; remove it)")
    return refused


def launch_zero_stage() -> int:
    """The ZeRO stage a DeepSpeed launch asks for (its environment, or the DeepSpeed config file it names)."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path != "none" and os.path.isfile(path):
        with open(path) as file:
            stage = json.load(file).get("zero_optimization", {}).get("stage")
        if isinstance(stage, int):
            return stage
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))


@contextlib.contextmanager
def loading_whole() -> Iterator[None]:
    """Within the block, transformers loads a model whole, as hificl attaches its adapter to loaded weights: once a
    ZeRO-3 engine exists, accelerate points transformers at its config, which would load the next backbone
    partitioned (`zero.Init`)."""
    from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    if not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        from accelerate.state import AcceleratorState

        AcceleratorState().deepspeed_plugin.set_deepspeed_weakref()
