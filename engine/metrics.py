"""Top-k accuracy of a classifier over a loader of (images, labels) batches."""
from __future__ import annotations

import torch


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader, device, limit: int = 0, ks=(1, 5)) -> dict:
    """Top-k accuracies in percent over the loader (the first `limit` samples if > 0)."""
    was_training = model.training
    model.eval()
    correct = {k: 0 for k in ks}
    seen = 0
    for x, y in loader:
        if limit and seen >= limit:
            break
        if limit:
            x, y = x[: limit - seen], y[: limit - seen]
        logits = model(x.to(device))
        top = logits.topk(max(ks), dim=1).indices.cpu()
        hit = top == y.view(-1, 1)
        for k in ks:
            correct[k] += int(hit[:, :k].any(dim=1).sum())
        seen += len(y)
    model.train(was_training)
    if seen == 0:
        return {f"top{k}": 0.0 for k in ks} | {"samples": 0}
    return {f"top{k}": round(100.0 * correct[k] / seen, 2) for k in ks} | {"samples": seen}
