"""Soft-label TESLA: trajectory matching with a learned student step size (METHODS.md section 2).

One distillation iteration takes an expert's parameters theta_0 = expert[t] and
its target theta* = expert[t + M], runs N = syn_steps SGD steps of a student on
minibatches X_i of the synthetic images (each augmented by a replayable DSA
draw) with the learned step size alpha:

    theta_{i+1} = theta_i - alpha * g_i,   g_i = grad_theta CE(f(theta_i; aug(X_i)), Y_i)
    L = ||theta_N - theta*||^2 / ||theta_0 - theta*||^2

and returns L with dL/dX and dL/dalpha (`matching_gradients`), computed in one
of three modes:

- ``unrolled``: MTT's full graph (create_graph through every step, one
  backward); activation memory grows linearly in N.
- ``exact``: pass 1 runs the N steps without a graph and keeps theta_0..theta_N;
  pass 2 walks i = N-1 .. 0 with the adjoint lambda (lambda_N = dL/dtheta_N). At
  each step it recomputes g_i with a graph and takes ONE vector-Jacobian product
  of (g_i . lambda_{i+1}) with respect to (theta_i, X_i), giving the
  Hessian-vector product H_i lambda_{i+1} and the image gradient:
      dL/dX_i    = -alpha (dg_i/dX_i)^T lambda_{i+1}
      lambda_i   = lambda_{i+1} - alpha H_i lambda_{i+1}
      dL/dalpha  = -sum_i lambda_{i+1} . g_i
  Memory: one step's graph plus the N+1 stored parameter vectors. The result
  equals back-propagation through the unrolled steps (to rounding).
- ``tesla``: the published two-pass approximation. Pass 1 as above, also
  accumulating G = sum_i g_i; pass 2 recomputes each g_i with a graph and uses
  one fixed vector lambda_N for every step:
      dL/dX_i    = -alpha (dg_i/dX_i)^T lambda_N
      dL/dalpha  = -lambda_N . G
  i.e. the gradient of L with theta_N = theta_0 - alpha * sum_i g_i(theta_i, X_i)
  where the theta_i are treated as constants: exact for the last step only.

`distill` is the loop: per iteration it samples an expert and a start epoch,
labels the synthetic images (`per_iteration`: softmax of the target expert on
the current un-augmented images, the published behaviour; `frozen`: softmax of
the labelling expert on the initial images, computed once; `hard`: the intended
classes, MTT), computes the gradients and takes one SGD(momentum) step on the
images and one on alpha. Labels never receive a gradient (stop-gradient).

Everything random (expert, start epoch, minibatches, DSA draws) derives from
(seed, stage, iteration, step) through engine.seeding, so a run is replayable.
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, EngineError
from ..models.functional import check_flat_params, functional_forward
from ..seeding import torch_gen
from .dsa import DEFAULT_STRATEGY, DSADraw, DSAParams, apply_dsa, parse_strategy, sample_dsa

MODES = ("exact", "tesla", "unrolled")
LABEL_MODES = ("per_iteration", "frozen", "hard")


# ---------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------

def model_num_classes(model: nn.Module) -> int | None:
    fc = getattr(model, "fc", None)
    return fc.out_features if isinstance(fc, nn.Linear) else None


def _snapshots(expert):
    return getattr(expert, "snapshots", expert)


def _available_epochs(expert) -> list[int]:
    s = _snapshots(expert)
    if isinstance(s, Mapping):
        return sorted(int(k) for k in s)
    return list(range(len(s)))


def _snapshot(expert, epoch: int) -> torch.Tensor:
    return _snapshots(expert)[epoch]


def check_experts(model: nn.Module, experts: Sequence, needed_epochs: Sequence[int]) -> None:
    """Every expert holds every needed snapshot, each of the model's size."""
    if len(experts) == 0:
        raise ConfigError("tesla: no experts given")
    for k, ex in enumerate(experts):
        have = set(_available_epochs(ex))
        missing = [e for e in needed_epochs if e not in have]
        if missing:
            span = f"{min(have)}..{max(have)}" if have else "none"
            raise ConfigError(f"tesla: expert {k} has snapshots {span} but max_start_epoch + expert_epochs needs "
                              f"epoch {missing[0]} (start epoch beyond the saved snapshots)")
        for e in needed_epochs:
            check_flat_params(model, _snapshot(ex, e), what=f"expert {k} epoch {e}")


# ---------------------------------------------------------------------------
# labels
# ---------------------------------------------------------------------------

@torch.no_grad()
def expert_logits(model: nn.Module, params: torch.Tensor, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    params = params.to(images).detach()
    return torch.cat([functional_forward(model, params, images[i:i + chunk].detach())
                      for i in range(0, images.shape[0], chunk)])


def expert_soft_labels(model: nn.Module, params: torch.Tensor, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """softmax of the expert on the un-augmented images, under no_grad (a stop-gradient)."""
    return expert_logits(model, params, images, chunk).softmax(dim=1)


def class_agreement(model: nn.Module, params: torch.Tensor, images: torch.Tensor, classes: torch.Tensor) -> float:
    """Fraction of images the expert assigns to their intended class."""
    pred = expert_logits(model, params, images).argmax(1)
    return float((pred == classes.to(pred.device)).double().mean())


# ---------------------------------------------------------------------------
# one iteration
# ---------------------------------------------------------------------------

def step_batches(n_images: int, syn_steps: int, batch_syn: int | None, *seed) -> list[torch.Tensor]:
    """Index minibatches for the inner steps: chunks of batch_syn of a random permutation, a fresh
    permutation when one is used up (the reference's sampling)."""
    b = n_images if not batch_syn else min(int(batch_syn), n_images)
    g = torch_gen("tesla-batches", *seed)
    out: list[torch.Tensor] = []
    while len(out) < syn_steps:
        out.extend(torch.randperm(n_images, generator=g).split(b))
    return out[:syn_steps]


def step_draws(strategy: str | None, batches: Sequence[torch.Tensor], image_size, *seed,
               params: DSAParams | None = None) -> list[DSADraw]:
    """One per-sample DSA draw per inner step, from (seed, step)."""
    return [sample_dsa(strategy, len(b), image_size, *seed, "step", i, params=params) for i, b in enumerate(batches)]


@dataclass
class MatchResult:
    loss: float                   # ||theta_N - theta*||^2 / ||theta_0 - theta*||^2
    grad_images: torch.Tensor     # dL/dX, shaped like the images
    grad_lr: torch.Tensor         # dL/dalpha, 0-dim
    start_distance: float         # ||theta_0 - theta*||^2


def matching_gradients(model: nn.Module, start_params: torch.Tensor, target_params: torch.Tensor,
                       images: torch.Tensor, labels: torch.Tensor, syn_lr, *, syn_steps: int,
                       batch_syn: int | None = None, draws: Sequence[DSADraw | None] | None = None,
                       mode: str = "exact", batches: Sequence[torch.Tensor] | None = None,
                       seed=0) -> MatchResult:
    """(loss, dL/dimages, dL/dsyn_lr) of one trajectory-matching iteration.

    labels: (n,) class indices or (n, C) probabilities (soft labels; treated as constants).
    draws: one DSA draw per step (None: no augmentation). batches: index tensors per step; by
    default `step_batches(n, syn_steps, batch_syn, seed)`. All computation is in the images' dtype
    and device."""
    if mode not in MODES:
        raise ConfigError(f"tesla.mode '{mode}': expected one of {', '.join(MODES)}")
    if int(syn_steps) < 1:
        raise ConfigError(f"tesla.syn_steps: expected at least 1 inner step, got {syn_steps}")
    syn_steps = int(syn_steps)
    check_flat_params(model, start_params, "start parameters")
    check_flat_params(model, target_params, "target parameters")
    n = images.shape[0]
    if labels.shape[0] != n:
        raise EngineError(f"tesla: {labels.shape[0]} labels for {n} images")
    seed_parts = seed if isinstance(seed, tuple) else (seed,)
    if batches is None:
        batches = step_batches(n, syn_steps, batch_syn, *seed_parts)
    if len(batches) != syn_steps:
        raise EngineError(f"tesla: {len(batches)} minibatches for {syn_steps} inner steps")
    if draws is None:
        draws = [None] * syn_steps
    if len(draws) != syn_steps:
        raise EngineError(f"tesla: {len(draws)} DSA draws for {syn_steps} inner steps")
    batches = [b.to(images.device) for b in batches]

    images = images.detach()
    labels = labels.detach().to(images.device)
    if labels.is_floating_point():
        labels = labels.to(images.dtype)
    alpha = (syn_lr.detach().to(images) if torch.is_tensor(syn_lr)
             else torch.tensor(float(syn_lr), dtype=images.dtype, device=images.device))
    theta0 = start_params.detach().to(images)
    target = target_params.detach().to(images)
    denom = ((theta0 - target) ** 2).sum()
    if not denom > 0:
        raise EngineError("tesla: start and target parameters are identical (expert_epochs of 0?)")

    def inner_loss(theta, i, x):
        out = functional_forward(model, theta, apply_dsa(x, draws[i]))
        return F.cross_entropy(out, labels[batches[i]])

    if mode == "unrolled":
        X = images.clone().requires_grad_(True)
        a = alpha.clone().requires_grad_(True)
        theta = theta0.clone().requires_grad_(True)
        for i in range(syn_steps):
            g, = torch.autograd.grad(inner_loss(theta, i, X[batches[i]]), theta, create_graph=True)
            theta = theta - a * g
        loss = ((theta - target) ** 2).sum() / denom
        gX, ga = torch.autograd.grad(loss, (X, a))
        return MatchResult(float(loss.detach()), gX, ga, float(denom))

    # pass 1: the inner steps without a graph; keep theta_0..theta_N (and G for tesla)
    thetas = [theta0]
    G = torch.zeros_like(theta0) if mode == "tesla" else None
    for i in range(syn_steps):
        th = thetas[-1].detach().requires_grad_(True)
        g, = torch.autograd.grad(inner_loss(th, i, images[batches[i]]), th)
        if G is not None:
            G += g
        thetas.append((th.detach() - alpha * g).detach())
    diff = thetas[-1] - target
    loss = (diff ** 2).sum() / denom
    lam = 2 * diff / denom                                      # lambda_N = dL/dtheta_N
    gX = torch.zeros_like(images)

    # pass 2: one step's graph at a time
    if mode == "tesla":
        ga = -(lam * G).sum()
        for i in range(syn_steps):
            th = thetas[i].detach().requires_grad_(True)
            x = images[batches[i]].clone().requires_grad_(True)
            g, = torch.autograd.grad(inner_loss(th, i, x), th, create_graph=True)
            gx, = torch.autograd.grad((g * lam).sum(), x)
            gX.index_add_(0, batches[i], -alpha * gx)
        return MatchResult(float(loss), gX, ga, float(denom))

    ga = torch.zeros((), dtype=images.dtype, device=images.device)
    for i in reversed(range(syn_steps)):
        th = thetas[i].detach().requires_grad_(True)
        x = images[batches[i]].clone().requires_grad_(True)
        g, = torch.autograd.grad(inner_loss(th, i, x), th, create_graph=True)
        ga -= (g.detach() * lam).sum()
        if i > 0:
            hv, gx = torch.autograd.grad((g * lam).sum(), (th, x))
            gX.index_add_(0, batches[i], -alpha * gx)
            lam = lam - alpha * hv
        else:                                                   # lambda_0 is not needed
            gx, = torch.autograd.grad((g * lam).sum(), x)
            gX.index_add_(0, batches[i], -alpha * gx)
    return MatchResult(float(loss), gX, ga, float(denom))


# ---------------------------------------------------------------------------
# the distillation loop
# ---------------------------------------------------------------------------

@dataclass
class DistillResult:
    images: torch.Tensor              # final synthetic images (same order as given)
    syn_lr: float                     # learned student step size alpha
    labels: torch.Tensor              # labels to store: (n, C) soft (or one-hot for 'hard')
    label_mode: str
    label_expert: tuple[int, int]     # (expert index, epoch) that labels/judges the images
    agreement_initial: float          # fraction the labelling expert assigns to the intended class
    agreement_final: float
    history: list[dict] = field(default_factory=list)


def distill(model: nn.Module, experts: Sequence, images: torch.Tensor, classes: torch.Tensor, *,
            iterations: int, syn_steps: int = 10, expert_epochs: int = 3, max_start_epoch: int = 10,
            batch_syn: int | None = 100, lr_img: float = 1e4, lr_lr: float = 1e-4, syn_lr_init: float = 0.01,
            momentum_img: float = 0.5, momentum_lr: float = 0.5, mode: str = "exact",
            label_mode: str = "per_iteration", label_expert: tuple[int, int] | None = None,
            dsa_strategy: str | None = DEFAULT_STRATEGY, dsa_params: DSAParams | None = None, seed=0,
            callback: Callable[[int, dict], None] | None = None) -> DistillResult:
    """Distil `images` (n, C, H, W; real or noise, supplied by the caller; not modified) whose intended
    classes are `classes` (n,), against expert trajectories.

    experts: a sequence of trajectories, each a mapping {epoch: flat vector}, a list/2-D tensor
    indexed by epoch, or an object with such a `.snapshots`. Every expert must hold epochs
    0 .. max_start_epoch - 1 + expert_epochs. label_expert (default: expert 0 at epoch
    max_start_epoch - 1 + expert_epochs, the latest target) gives the frozen labels, the stored labels
    of the per_iteration mode (its softmax on the final images, as the target expert's would be) and
    the class agreement. Returns a DistillResult; raises EngineError naming the iteration when the
    loss, a gradient or the learning rate stops being finite."""
    if mode not in MODES:
        raise ConfigError(f"tesla.mode '{mode}': expected one of {', '.join(MODES)}")
    if label_mode not in LABEL_MODES:
        raise ConfigError(f"tesla.label_mode '{label_mode}': expected one of {', '.join(LABEL_MODES)}")
    for name, v in (("syn_steps", syn_steps), ("expert_epochs", expert_epochs),
                    ("max_start_epoch", max_start_epoch)):
        if int(v) < 1:
            raise ConfigError(f"tesla.{name}: expected at least 1, got {v}")
    if int(iterations) < 0:
        raise ConfigError(f"tesla.iterations: expected 0 or more, got {iterations}")
    if batch_syn is not None and int(batch_syn) < 1:
        raise ConfigError(f"tesla.batch_syn: expected at least 1 (or none for all images), got {batch_syn}")
    for name, v in (("lr_img", lr_img), ("lr_lr", lr_lr)):
        if not (math.isfinite(v) and v >= 0):
            raise ConfigError(f"tesla.{name}: expected a finite number of 0 or more, got {v}")
    for name, v in (("momentum_img", momentum_img), ("momentum_lr", momentum_lr)):
        if not 0 <= v < 1:
            raise ConfigError(f"tesla.{name}: expected a value in [0, 1), got {v}")
    if not (math.isfinite(syn_lr_init) and syn_lr_init > 0):
        raise ConfigError(f"tesla.syn_lr_init: expected a positive number, got {syn_lr_init}")
    if images.dim() != 4 or not images.is_floating_point():
        raise EngineError(f"tesla: images must be a float (n, C, H, W) tensor, got {tuple(images.shape)} "
                          f"{images.dtype}")
    n = images.shape[0]
    classes = classes.to(images.device).long()
    if classes.shape != (n,):
        raise EngineError(f"tesla: {tuple(classes.shape)} classes for {n} images (expected one per image)")
    ncls = model_num_classes(model)
    if ncls is not None and n and (classes.min() < 0 or classes.max() >= ncls):
        raise ConfigError(f"tesla: image classes span {int(classes.min())}..{int(classes.max())} but the model "
                          f"has {ncls} classes")
    parse_strategy(dsa_strategy)
    last = max_start_epoch - 1 + expert_epochs
    check_experts(model, experts, range(last + 1))
    if label_expert is None:
        label_expert = (0, last)
    le, lep = int(label_expert[0]), int(label_expert[1])
    if not 0 <= le < len(experts) or lep not in _available_epochs(experts[le]):
        raise ConfigError(f"tesla.label_expert {label_expert}: no such expert snapshot")
    label_params = _snapshot(experts[le], lep).to(images)
    check_flat_params(model, label_params, f"label expert {le} epoch {lep}")
    seed_parts = seed if isinstance(seed, tuple) else (seed,)

    X = images.detach().clone().requires_grad_(True)
    syn_lr = torch.tensor(float(syn_lr_init), dtype=images.dtype, device=images.device, requires_grad=True)
    opt_img = torch.optim.SGD([X], lr=lr_img, momentum=momentum_img)
    opt_lr = torch.optim.SGD([syn_lr], lr=lr_lr, momentum=momentum_lr)
    agreement_initial = class_agreement(model, label_params, X, classes)
    if label_mode == "frozen":
        fixed_labels = expert_soft_labels(model, label_params, X)
    elif label_mode == "hard":
        fixed_labels = classes
    else:
        fixed_labels = None
    size = tuple(images.shape[-2:])
    history: list[dict] = []
    for it in range(int(iterations)):
        t0 = time.perf_counter()
        g = torch_gen("tesla-iteration", *seed_parts, it)
        e = int(torch.randint(len(experts), (1,), generator=g))
        start_epoch = int(torch.randint(max_start_epoch, (1,), generator=g))
        start = _snapshot(experts[e], start_epoch)
        target = _snapshot(experts[e], start_epoch + expert_epochs)
        labels = fixed_labels if fixed_labels is not None else expert_soft_labels(model, target.to(X), X)
        batches = step_batches(n, syn_steps, batch_syn, *seed_parts, it)
        draws = step_draws(dsa_strategy, batches, size, *seed_parts, "tesla-dsa", it, params=dsa_params)
        r = matching_gradients(model, start, target, X, labels, syn_lr, syn_steps=syn_steps, draws=draws,
                               mode=mode, batches=batches)
        where = f"at iteration {it} (expert {e}, start epoch {start_epoch})"
        if not math.isfinite(r.loss):
            raise EngineError(f"tesla: non-finite matching loss {r.loss} {where}; lower lr_img or lr_lr")
        if not (torch.isfinite(r.grad_images).all() and torch.isfinite(r.grad_lr)):
            raise EngineError(f"tesla: non-finite gradient {where}; lower lr_img or lr_lr")
        X.grad = r.grad_images
        syn_lr.grad = r.grad_lr.reshape(())
        opt_img.step()
        opt_lr.step()
        lr_now = float(syn_lr.detach())
        if not math.isfinite(lr_now):
            raise EngineError(f"tesla: learning rate became {lr_now} {where}; lower lr_lr")
        info = {"iteration": it, "loss": r.loss, "syn_lr": lr_now, "expert": e, "start_epoch": start_epoch,
                "seconds": time.perf_counter() - t0}
        history.append(info)
        if callback is not None:
            callback(it, info)

    final = X.detach()
    label_final = expert_soft_labels(model, label_params, final)
    if label_mode == "frozen":
        stored = fixed_labels
    elif label_mode == "hard":
        stored = F.one_hot(classes, label_final.shape[1]).to(final.dtype)
    else:
        stored = label_final
    return DistillResult(final, float(syn_lr.detach()), stored, label_mode, (le, lep), agreement_initial,
                         float((label_final.argmax(1) == classes).double().mean()), history)
