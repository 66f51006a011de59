"""The processes of a run, through accelerate: one (a plain ``python``/``hificl`` call) or several (``accelerate
launch`` / ``torchrun``: one process per GPU, or gloo processes on a machine without GPUs)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState

SHARDING_ENGINES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


def process_state() -> PartialState:
    """accelerate's process-wide state. On a machine without GPUs several launched processes are accelerate's
    MULTI_CPU (gloo), which it sets up only when told the run is on the CPU."""
    return PartialState(cpu=not torch.cuda.is_available())


def sharding_engine() -> str | None:
    """The engine an ``accelerate launch`` config asks for that shards or steps the trainable parameters itself
    (what accelerate reads from its launch environment), if any."""
    for variable, engine in SHARDING_ENGINES.items():
        if os.environ.get(variable, "false").lower() in ("1", "true", "yes"):
            return engine
    return None


def refuse_sharding_engines() -> None:
    """Stop before a backbone is loaded when the launch asks for an engine hificl does not train with yet."""
    engine = sharding_engine()
    if engine is not None:
        raise ValueError(f"hificl trains on one process or several with DDP (multi-GPU, or gloo on CPUs); this run is "
                         f"launched for {engine} (distributed_type in the accelerate config). Launch it with plain DDP "
                         "(e.g. `accelerate launch --multi_gpu ...` or `torchrun ...`): the frozen backbone is "
                         "replicated, only the adapter's small gradients are exchanged.")


def accelerator_for(mixed_precision: str, log_with: Sequence[str] = (), project_dir: Path | None = None) -> Accelerator:
    """An Accelerator with this precision. accelerate keeps one process-wide state; a single-process run that
    asks for another precision than an earlier trainer (e.g. a comparison in one Python session) resets it."""
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, mixed_precision) and AcceleratorState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(),
                       log_with=list(log_with) or None, project_dir=str(project_dir) if project_dir else None)
