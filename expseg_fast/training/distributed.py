"""Multi-process training under torchrun (DDP): process group, rank, and small collectives.
Single-process runs (no WORLD_SIZE) never touch torch.distributed."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup(device_type: str) -> tuple[int, int]:
    """(rank, world size); initialises the process group (NCCL on CUDA, gloo on the CPU) under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return dist.get_rank(), world


def device_for(rank_device: torch.device) -> torch.device:
    """On CUDA each process takes the GPU of its LOCAL_RANK."""
    if rank_device.type == "cuda" and "LOCAL_RANK" in os.environ:
        index = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return rank_device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather(items: list) -> list:
    """Concatenation of every rank's items, in rank order (the items themselves on one process)."""
    if not dist.is_initialized():
        return items
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
