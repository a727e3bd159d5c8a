"""Process group for DistributedDataParallel (``torchrun``), and the device of this process.

``torchrun --nproc_per_node N -m training.train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; without
them the run is a single process. NCCL on CUDA, gloo on CPU (tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Rank and world size of this process, and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Whether this process writes checkpoints and logs (rank 0)."""
        return self.rank == 0


def pick_device(choice: str) -> torch.device:
    """'cuda', 'cpu', or 'auto' (CUDA when available)."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(device_choice: str = "auto") -> DistInfo:
    """Join the process group when WORLD_SIZE > 1 (env:// rendezvous); returns this process' rank, world and device."""
    device = pick_device(device_choice)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank=rank, world=world, device=device)


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is true on any rank (a stop decision all replicas follow)."""
    if info.world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def shutdown(info: DistInfo) -> None:
    if info.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def gather_strings(value: str, info: DistInfo) -> list[str]:
    """``value`` of every rank, in rank order (a list of one without a process group)."""
    if info.world == 1:
        return [value]
    out: list[str] = [""] * info.world
    dist.all_gather_object(out, value)
    return out
