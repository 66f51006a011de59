"""Run hificl's command line with accelerate's FSDP2 or DeepSpeed engine on a machine without GPUs (gloo):
accelerate honours those launch configs only on accelerators and turns a CPU launch into plain MULTI_CPU, so this
sets its state as a GPU launch of the same config would (the FSDP plugin read from the FSDP_* variables the launch
exported, or the DeepSpeed plugin accelerate built from the ACCELERATE_DEEPSPEED_* ones), then runs ``hificl.cli``
with the given arguments. Everything after that -- accelerate's preparation, the engine's gradient exchange,
clipping and optimiser step, and hificl's own code -- runs unchanged. DeepSpeed needs ``DS_ACCELERATOR=cpu``.

    torchrun --nproc_per_node 2 tools/engine_on_cpu.py train --config ...  (with ACCELERATE_USE_FSDP=true,
    FSDP_VERSION=2, or ACCELERATE_USE_DEEPSPEED=true, ACCELERATE_DEEPSPEED_ZERO_STAGE=3, in the environment)
"""

import os
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


def act_as_on_accelerators() -> None:
    """From now on, accelerate's state set up for a CPU launch (MULTI_CPU) takes the FSDP or DeepSpeed launch
    config as a GPU launch would."""
    initialise = AcceleratorState.__init__

    def init(self, mixed_precision=None, cpu=False, dynamo_plugin=None, deepspeed_plugin=None, *args, **kwargs):
        initialise(self, mixed_precision, cpu, dynamo_plugin, deepspeed_plugin, *args, **kwargs)
        if self.distributed_type != DistributedType.MULTI_CPU:
            return
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = FullyShardedDataParallelPlugin()
        elif deepspeed_plugin is not None:  # the processes' state too, as a DeepSpeed launch sets it (accelerate
            PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED  # copies it into this one)
            self.distributed_type = DistributedType.DEEPSPEED
            deepspeed_plugin.set_mixed_precision(self._mixed_precision)
            deepspeed_plugin.select(_from_accelerator_state=True)
            self.deepspeed_plugins = deepspeed_plugin
            self._mixed_precision = "no"  # DeepSpeed handles the precision from its config, as on accelerators

    AcceleratorState.__init__ = init


if __name__ == "__main__":
    from hificl.cli import main

    act_as_on_accelerators()
    sys.exit(main(sys.argv[1:]))
