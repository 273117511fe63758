"""Top-1 / top-5 accuracy of a classifier over a loader of (images, labels) batches,
in one process or data parallel (torch.distributed, no Ray here)."""
from __future__ import annotations

import torch

from .errors import EngineError


def distributed_world() -> tuple[int, int]:
    """(rank, world size) of the active torch.distributed process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(values, dtype: torch.dtype, device=None) -> list:
    """Sum `values` (a list of numbers) over all ranks of the process group; every rank
    must call it. The tensor lives on the GPU under NCCL (which cannot reduce CPU tensors),
    on the CPU otherwise."""
    import torch.distributed as dist

    device = torch.device(device) if device is not None else torch.device("cpu")
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    elif dist.get_backend() != "nccl":
        device = torch.device("cpu")
    t = torch.tensor(list(values), dtype=dtype, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def limit_share(limit: int, rank: int, world: int) -> int:
    """Rank `rank`'s share of a global sample limit: limit // world, plus one for the
    first limit % world ranks, so the shares sum to `limit`."""
    return limit // world + (1 if rank < limit % world else 0)


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader, device, limit: int = 0, distributed: bool | None = None) -> dict:
    """Top-1 / top-5 in percent over the loader (only the first `limit` samples when > 0);
    top-5 is top-min(5, classes). Returns {"top1", "top5", "count"}.

    Data parallel -- `distributed=True`, or None (the default) with an initialised
    torch.distributed process group of more than one process: `loader` is this rank's
    shard of the val set (e.g. engine.data.loader_from_config(..., rank=, world_size=),
    which deals every sample to exactly one rank) and every rank must call this. The raw
    correct / count sums are all-reduced, so top1, top5 and count are over the whole val
    set, each sample counted once. `limit` > 0 stays a global sample count: rank r counts
    its first `limit_share(limit, r, W)` samples (limit // W, one more on the first
    limit % W ranks), shares that sum to `limit` (less where a rank's shard is shorter).
    Where the reader deals samples round-robin (rank r gets samples r, r + W, ...: FFCV,
    and WebDataset in sample mode with a single loader worker) these are exactly the
    first `limit` samples of the single-process order; with whole shards per rank they
    are another subset of the same size. Pass the unwrapped model, not a
    DistributedDataParallel wrapper (its forward may run collectives, and ranks see
    different numbers of batches here)."""
    device = torch.device(device)
    rank, world = distributed_world()
    if distributed is None:
        distributed = world > 1
    elif distributed and world == 1 and not torch.distributed.is_initialized():
        raise EngineError("validation: distributed=True needs an initialised torch.distributed process group")
    if distributed and limit:
        limit = limit_share(int(limit), rank, world)
        skip = limit == 0  # more ranks than samples: this rank counts none
    else:
        skip = False
    was_training = model.training
    model.eval()
    correct1 = correct5 = count = 0
    for x, y in ([] if skip else loader):
        if limit and count >= limit:
            break
        if limit and count + len(y) > limit:
            x, y = x[:limit - count], y[:limit - count]
        x, y = x.to(device, non_blocking=True).float(), torch.as_tensor(y).to(device).long()
        logits = model(x)
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
        correct1 += int(hit[:, 0].sum())
        correct5 += int(hit.any(dim=1).sum())
        count += len(y)
    model.train(was_training)
    if distributed:
        correct1, correct5, count = all_reduce_sum([correct1, correct5, count], torch.int64, device)
    if count == 0:
        raise EngineError("validation: the val loader gave no samples")
    return {"top1": round(100.0 * correct1 / count, 2), "top5": round(100.0 * correct5 / count, 2), "count": count}
