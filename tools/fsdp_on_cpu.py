"""Run hificl's command line with accelerate's FSDP2 engine on a machine without GPUs (gloo): accelerate honours an
FSDP launch config only on accelerators and turns a CPU launch into plain MULTI_CPU, so this sets its state as a
GPU launch of the same config would (the FSDP plugin read from the FSDP_* variables the launch exported), then
runs ``hificl.cli`` with the given arguments. Everything after that -- accelerate's FSDP2 preparation, gradient
accumulation, clipping and optimiser step, and hificl's own code -- runs unchanged.

    torchrun --nproc_per_node 2 tools/fsdp_on_cpu.py train --config ...  (with ACCELERATE_USE_FSDP=true,
    FSDP_VERSION=2 in the environment)
"""

import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


def act_as_on_accelerators() -> None:
    """From now on, accelerate's state set up for a CPU launch (MULTI_CPU) takes the FSDP launch config as a GPU
    launch would."""
    initialise = AcceleratorState.__init__

    def init(self, *args, **kwargs):
        initialise(self, *args, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = FullyShardedDataParallelPlugin()

    AcceleratorState.__init__ = init


if __name__ == "__main__":
    from hificl.cli import main

    act_as_on_accelerators()
    sys.exit(main(sys.argv[1:]))
