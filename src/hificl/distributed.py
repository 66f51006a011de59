"""The processes of a run, through accelerate: one (a plain ``python``/``hificl`` call) or several (``accelerate
launch`` / ``torchrun``: one process per GPU, or gloo processes on a machine without GPUs)."""

from __future__ import annotations

import torch
from accelerate import PartialState


def process_state() -> PartialState:
    """accelerate's process-wide state. On a machine without GPUs several launched processes are accelerate's
    MULTI_CPU (gloo), which it sets up only when told the run is on the CPU."""
    return PartialState(cpu=not torch.cuda.is_available())
