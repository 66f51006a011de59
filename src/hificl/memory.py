"""Peak memory of training: CUDA's allocator statistics, or the process's resident memory on a CPU."""

from __future__ import annotations

import contextlib

import torch


def reset_peak_memory(device: torch.device) -> bool:
    """Start a fresh peak: CUDA's allocator statistics, or on Linux the process's resident-memory high-water
    mark (so methods trained one after another in one process each get their own peak). False where the OS
    does not allow it (the CPU peak then covers the whole process)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated tensor memory. CPU: peak resident memory of the process (model included) since the
    last `reset_peak_memory` where the OS allows a reset, else since the process started."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError):  # no /proc (not Linux): the resource module's peak below
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # KiB
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    except ImportError:  # pragma: no cover - non-Unix
        return 0.0
