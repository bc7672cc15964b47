"""Lightning's FSDP strategy on CPU processes (gloo), for tests only: FSDP's sharding, gathering,
state-dict and optimizer-state paths run here without CUDA.

Lightning refuses its registered FSDP strategy without a GPU (the check looks at the exact class, so a
subclass passes), and torch's FSDP needs ``device_id=cpu`` to accept CPU parameters. Offloading a full
state dict to the CPU is the one path that cannot run when the parameters already live there (it
crashes), so the state-dict contexts here keep them in place; on CUDA Lightning's own contexts apply.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies import fsdp as lightning_fsdp


def _full_state_dict_context(module, world_size: int, rank0_only: bool = True):
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.api import FullOptimStateDictConfig

    return FSDP.state_dict_type(
        module,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
    )


class CPUFSDPStrategy(FSDPStrategy):
    """FSDPStrategy whose processes shard CPU parameters (gloo)."""

    def setup(self, trainer) -> None:
        lightning_fsdp._get_full_state_dict_context = _full_state_dict_context  # this test process only
        super().setup(trainer)

    def _setup_model(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            model = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **self.kwargs,
            )
        return super()._setup_model(model)  # sees the wrapped model: activation checkpointing etc.
