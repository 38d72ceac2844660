"""The few things a run needs to know about its processes under ``torchrun`` (DDP).

One process or several (``WORLD_SIZE``): gloo on the CPU, nccl on CUDA. A process group this module
created is the caller's to destroy (``owns_group``); one made by an embedding program is left alone.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from training.errors import TrainingError


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def active(self) -> bool:
        return self.world > 1


def setup_distributed(device_setting: str) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    owns = False
    if not dist.is_initialized():
        use_cuda = device_setting == "cuda" or (device_setting == "auto" and torch.cuda.is_available())
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owns = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)


def pick_device(setting: str, local_rank: int) -> torch.device:
    if setting not in ("auto", "cpu", "cuda"):
        raise TrainingError(f"device must be auto, cpu or cuda, got {setting!r}")
    if setting == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda, but no CUDA device is available")
    if setting == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def wrap(net: nn.Module, dev: torch.device) -> nn.Module:
    """``net`` in DistributedDataParallel, without syncing buffers each forward.

    The buffers (ActNorm flags, LU masks) never change in training: no need to sync them each forward.
    torch >= 2.13 renamed the switch; older ones (GPU hosts) only know the old name."""
    ddp_cls = nn.parallel.DistributedDataParallel
    ids = [dev.index] if dev.type == "cuda" else None
    known = inspect.signature(ddp_cls.__init__).parameters
    switch = "forward_sync_buffers" if "forward_sync_buffers" in known else "broadcast_buffers"
    return ddp_cls(net, device_ids=ids, **{switch: False})
