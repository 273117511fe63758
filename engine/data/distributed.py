"""Who am I in the data-parallel world: (rank, world size), (worker, workers)."""
from __future__ import annotations

import os

import torch


def rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values win; then torch.distributed (DDP, Ray Train); then env vars."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def worker_slot() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)

