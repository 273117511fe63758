"""Expert trajectories for trajectory matching (METHODS.md sections 2 and 3).

    traj = train_expert(model, images, labels, epochs=50, seed=(run_seed, "expert", 0))
    traj.snapshots[0]       # flat parameters at initialisation
    traj.snapshots[13]      # ... after epoch 13

An expert is trained on real images (a tensor, already normalised) with SGD
and DSA: each minibatch gets one DSA family with per-sample parameters, as in
the reference buffer code. The flat parameter vector is saved at
initialisation (epoch 0) and after every epoch e = 1..epochs, or only after the
epochs listed in `save_epochs` (distillation uses 0 .. max_start_epoch +
expert_epochs - 1).

AST's smoothing options (METHODS section 3), all off by default:
- `ce_scale_schedule`: per-epoch factors on the CE loss for the first epochs
  (`ast_ce_schedule()` = 0.5, 0.55, ..., 0.95 over 10 epochs, the "clipping loss");
- `grad_penalty`: weight w of w * mean_pixels (||d sum(logits)/dx||_2 - 1)^2, the
  norm over channels at each pixel of the network input (AST: 2);
- with them AST uses SGD lr 0.003, momentum 0.9, weight decay 1e-3 and lr x0.6 at
  epoch 26: `lr`, `momentum`, `weight_decay`, `lr_decay_epochs=(26,)`, `lr_decay_factor=0.6`.

Everything random derives from `seed` through engine.seeding (initialisation,
shuffling per epoch, DSA per minibatch), so on the CPU a seed gives the same
trajectory bit for bit (same thread count).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, EngineError
from ..models.functional import check_flat_params, flatten_params, init_flat_params, load_flat_params
from ..seeding import torch_gen
from .dsa import DEFAULT_STRATEGY, DSAParams, apply_dsa, parse_strategy, sample_dsa


def ast_ce_schedule(start: float = 0.5, step: float = 0.05, epochs: int = 10) -> tuple[float, ...]:
    """AST's CE factors for the first epochs: start, start + step, ... (0.5 .. 0.95 by default)."""
    return tuple(round(start + step * k, 10) for k in range(epochs))


@dataclass
class ExpertTrajectory:
    snapshots: dict[int, torch.Tensor]            # epoch -> flat parameters (CPU); 0 = initialisation
    train_loss: list[float] = field(default_factory=list)      # mean CE per epoch (unscaled)
    train_accuracy: list[float] = field(default_factory=list)  # percent, on the augmented batches
    seconds: float = 0.0


def input_gradient_penalty(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, mean over pixels of (||d sum(logits)/dx||_2 - 1)^2), the norm over channels per pixel;
    differentiable in the parameters (double backward)."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    gx, = torch.autograd.grad(logits.sum(), x, create_graph=True)
    norm = gx.pow(2).sum(dim=1).add(1e-12).sqrt()
    return logits, (norm - 1).pow(2).mean()


def train_expert(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int = 50,
                 lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0, batch_size: int = 256,
                 lr_decay_epochs: Sequence[int] = (), lr_decay_factor: float = 0.1,
                 dsa_strategy: str | None = DEFAULT_STRATEGY, dsa_params: DSAParams | None = None,
                 ce_scale_schedule: Sequence[float] = (), grad_penalty: float = 0.0,
                 save_epochs: Sequence[int] | None = None, init_params: torch.Tensor | None = None,
                 seed=0, callback: Callable[[int, dict], None] | None = None) -> ExpertTrajectory:
    """Train one expert from `init_params` (default: the model's own initialisation drawn from `seed`) on
    images (n, C, H, W) with labels (n,) and return its trajectory. The model is only a skeleton: it is
    copied, never modified; training runs on the images' device and dtype.

    lr_decay_epochs: epochs (1-based, counted like the snapshots) after which the lr is multiplied by
    lr_decay_factor, i.e. (26,) makes epochs 27.. use lr * factor."""
    if int(epochs) < 1:
        raise ConfigError(f"experts.epochs: expected at least 1, got {epochs}")
    if int(batch_size) < 1:
        raise ConfigError(f"experts.batch_size: expected at least 1, got {batch_size}")
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"experts.lr: expected a positive number, got {lr}")
    if any(not (math.isfinite(s) and s >= 0) for s in ce_scale_schedule):
        raise ConfigError(f"experts.ce_scale_schedule: expected non-negative factors, got {list(ce_scale_schedule)}")
    if grad_penalty < 0:
        raise ConfigError(f"experts.grad_penalty: expected 0 or more, got {grad_penalty}")
    parse_strategy(dsa_strategy)
    if images.dim() != 4 or not images.is_floating_point():
        raise EngineError(f"experts: images must be a float (n, C, H, W) tensor, got {tuple(images.shape)}")
    n = images.shape[0]
    if n == 0 or labels.shape != (n,):
        raise EngineError(f"experts: {tuple(labels.shape)} labels for {n} images (expected one per image)")
    fc = getattr(model, "fc", None)
    labels = labels.to(images.device).long()
    if isinstance(fc, nn.Linear) and (labels.min() < 0 or labels.max() >= fc.out_features):
        raise ConfigError(f"experts: labels span {int(labels.min())}..{int(labels.max())} but the model has "
                          f"{fc.out_features} classes")
    wanted = set(range(int(epochs) + 1)) if save_epochs is None else {int(e) for e in save_epochs}
    bad = sorted(e for e in wanted if not 0 <= e <= epochs)
    if bad:
        raise ConfigError(f"experts.save_epochs: epoch {bad[0]} outside 0..{epochs}")
    seed_parts = seed if isinstance(seed, tuple) else (seed,)

    net = copy.deepcopy(model).to(device=images.device, dtype=images.dtype)
    flat0 = init_flat_params(model, *seed_parts, "expert-init") if init_params is None else init_params.detach()
    check_flat_params(net, flat0, "experts.init_params")
    load_flat_params(net, flat0.to(images))
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    decay_at = {int(e) for e in lr_decay_epochs}
    size = tuple(images.shape[-2:])
    out = ExpertTrajectory({})
    if 0 in wanted:
        out.snapshots[0] = flatten_params(net).cpu()
    t0 = time.perf_counter()
    for epoch in range(1, int(epochs) + 1):
        scale = float(ce_scale_schedule[epoch - 1]) if epoch - 1 < len(ce_scale_schedule) else 1.0
        order = torch.randperm(n, generator=torch_gen("expert-shuffle", *seed_parts, epoch)).to(images.device)
        loss_sum, correct = 0.0, 0
        for k, idx in enumerate(order.split(int(batch_size))):
            draw = sample_dsa(dsa_strategy, len(idx), size, *seed_parts, "expert-dsa", epoch, k, params=dsa_params)
            x = apply_dsa(images[idx], draw)
            y = labels[idx]
            if grad_penalty > 0:
                logits, gp = input_gradient_penalty(net, x)
            else:
                logits, gp = net(x), None
            ce = F.cross_entropy(logits, y)
            loss = scale * ce if gp is None else scale * ce + grad_penalty * gp
            if not torch.isfinite(loss):
                raise EngineError(f"experts: non-finite loss at epoch {epoch} batch {k}; lower experts.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(ce.detach()) * len(idx)
            correct += int((logits.detach().argmax(1) == y).sum())
        out.train_loss.append(loss_sum / n)
        out.train_accuracy.append(100.0 * correct / n)
        if epoch in decay_at:
            for group in opt.param_groups:
                group["lr"] *= lr_decay_factor
        if epoch in wanted:
            out.snapshots[epoch] = flatten_params(net).cpu()
        if callback is not None:
            callback(epoch, {"epoch": epoch, "loss": out.train_loss[-1], "accuracy": out.train_accuracy[-1],
                             "lr": opt.param_groups[0]["lr"]})
    out.seconds = time.perf_counter() - t0
    return out
