"""torch.distributed, passed around explicitly: who we are, and the few collectives training needs.

`torchrun --nproc_per_node=K -m distillery.cli train ...` sets RANK/WORLD_SIZE/LOCAL_RANK; we use NCCL on
GPUs (with gloo beside it for the objects that checkpoints gather) and gloo on CPU. Every helper is a no-op
in a single process, so losses and methods never branch on whether a process group exists. Tensors handed
to a collective live on the run's device: NCCL has no CPU tensors, and `_reduce` refuses one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_run_device = torch.device("cpu")  # set by init_distributed


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group torchrun describes; `cuda` (or no device, with a GPU) means cuda:LOCAL_RANK."""
    global _run_device
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _run_device = device
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return DistInfo(rank, world_size, local_rank, device)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _on_run_device(tensor: torch.Tensor) -> torch.Tensor:
    """Every tensor collective passes its tensor through here, so placement is checked in one place."""
    if tensor.device != _run_device:
        raise RuntimeError(f"a collective on a {tensor.device} tensor in a run on {_run_device}")
    return tensor


def _reduce(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(_on_run_device(tensor))
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean over ranks (in place), or the tensor itself in a single process."""
    if is_distributed():
        _reduce(tensor).div_(dist.get_world_size())
    return tensor


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows; gradients flow back to each rank's own rows (TinTeM's global SNE term)."""
    if not is_distributed():
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(_on_run_device(tensor)), dim=0)


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (one element in a single process)."""
    if not is_distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def any_rank(flag: torch.Tensor) -> bool:
    """True if the boolean tensor `flag` is true on any rank, so every rank stops together. Reading the
    answer is one host sync: callers pass the flag as it lies on the device, not a Python bool."""
    flag = flag.to(device=_run_device, dtype=torch.float32).reshape(1)
    if is_distributed():
        _reduce(flag)
    return bool(flag.item() > 0)


def barrier() -> None:
    if is_distributed():
        dist.barrier()
