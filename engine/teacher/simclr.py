"""SimCLR-style self-supervised pretraining: two augmented views, NT-Xent loss, no labels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2


def view_augment(size: int, channels: int):
    """The two-view augmentation (per sample): crop, flip, intensity jitter."""
    ops = [v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    if channels == 3:
        ops += [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2)]
    else:
        ops += [v2.RandomApply([v2.ColorJitter(0.4, 0.4)], p=0.8)]
    return v2.Compose(ops)


class ProjectionHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.BatchNorm1d(in_dim), nn.ReLU(inplace=True),
                                 nn.Linear(in_dim, out_dim))

    def forward(self, x):
        return self.net(x)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Normalised-temperature cross-entropy over 2N views; positives are the other view."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled pre-logit features of a timm/torchvision ResNet or a ConvNet."""
    if hasattr(model, "forward_head"):
        return model.forward_head(model.forward_features(x), pre_logits=True)
    if hasattr(model, "embed"):
        return model.embed(x)
    raise TypeError(f"{type(model).__name__}: cannot take pooled features")


def feature_dim(model: nn.Module) -> int:
    head = getattr(model, "fc", None) or getattr(model, "get_classifier", lambda: None)()
    return head.in_features
