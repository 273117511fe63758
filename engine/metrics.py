"""Top-1 / top-5 accuracy of a classifier over a loader of (images, labels) batches."""
from __future__ import annotations

import torch

from .errors import EngineError


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader, device, limit: int = 0) -> dict:
    """Top-1 / top-5 in percent over the loader (only the first `limit` samples when > 0);
    top-5 is top-min(5, classes). Returns {"top1", "top5", "count"}."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct1 = correct5 = count = 0
    for x, y in loader:
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
    if count == 0:
        raise EngineError("validation: the val loader gave no samples")
    return {"top1": round(100.0 * correct1 / count, 2), "top5": round(100.0 * correct5 / count, 2), "count": count}
