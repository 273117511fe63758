"""DataDAM: attention matching (METHODS.md section 4), as a pure function of real images.

Per iteration `it` a freshly initialised ConvNet (frozen; instance norm, or BatchNorm in train mode,
so normalisation uses batch statistics) is drawn from a seed derived from (run seed, iteration)
only, so every class block of a run sees the same network at the same iteration. For each class c:

    real   = a batch of `real_batch` real images of class c   (seed: run seed, iteration, class)
    syn    = all synthetic images of class c                  (IPC of them)
    draw   = one per-batch DSA draw                           (seed: run seed, iteration, class)
    f_l    = block outputs of the net on apply_dsa(real, draw) and apply_dsa(syn, draw)
    A_l(x) = normalise_L2( flatten( sum_channels |f_l(x)|^p ) )   per sample, every block but the last
    loss_c = scale * sum_l ||mean_real A_l - mean_syn A_l||^2
           + scale * lambda * ||mean_real emb - mean_syn emb||^2  (emb: the last block's output, flattened)

and one SGD(momentum) step on the pixels of every class after all classes of the block.

Classes interact only through the shared network seed: each class has its own forward passes, its
own backward and its own leaf tensor (SGD without foreach), so the images of a class are the same
bytes whether its block holds one class or all of them (same hardware, same thread count).

Nothing here reads files or knows about units or Ray: `distill_block` takes real image pools and
starting images in memory (engine.synth.datadam_stage feeds it from the shards).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, EngineError
from ..seeding import torch_gen
from .dsa import DSAParams, apply_dsa, parse_strategy, sample_dsa


@dataclass
class DatadamResult:
    """Final synthetic images (normalised float, class-major: for c in classes, for IPC index) and the
    per-iteration record {iteration, loss, attention, embedding, seconds} (losses summed over classes)."""
    images: torch.Tensor
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------

def check_power(power: float) -> float:
    p = float(power)
    if not (math.isfinite(p) and p >= 1):
        raise ConfigError(f"config key 'synth.datadam.power': expected a finite number of at least 1 "
                          f"(METHODS section 4: p in 1..4), got {power}")
    return p


def block_features(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The output of every block of a ConvNet-like net (`net.blocks`, applied in order)."""
    blocks = getattr(net, "blocks", None)
    if blocks is None:
        raise EngineError(f"datadam: {type(net).__name__} has no `blocks` (attention is taken at every block "
                          "but the last of a ConvNet)")
    feats = []
    for b in blocks:
        x = b(x)
        feats.append(x)
    return feats


def check_spatial(net: nn.Module, image_shape: tuple[int, int, int], device=None) -> list[tuple[int, ...]]:
    """One probe forward of a zero image: every block but the last must give a spatial map
    (N, C, H, W) with H * W > 1, and there must be at least one such block. Returns the output shapes."""
    x = torch.zeros((1, *image_shape), device=device)
    with torch.no_grad():
        shapes = [tuple(f.shape) for f in block_features(net, x)]
    name = type(net).__name__
    if len(shapes) < 2:
        raise ConfigError(f"datadam: {name} with {len(shapes)} block(s) gives no spatial attention map "
                          "(attention is taken at every block but the last: use a ConvNet of depth 2 or more)")
    for k, s in enumerate(shapes[:-1]):
        if len(s) != 4 or s[-1] * s[-2] < 2:
            raise ConfigError(f"datadam: block {k} of {name} gives output {list(s[1:])}, no spatial map "
                              "(attention needs (C, H, W) block outputs with H x W > 1)")
    return shapes


def attention_map(feature: torch.Tensor, power: float) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W): sum over channels of |f|^p, flattened, L2-normalised per sample."""
    a = feature.abs().pow(power).sum(dim=1).flatten(1)
    return F.normalize(a, p=2.0, dim=1)


def attention_matching_loss(real_feats: list[torch.Tensor], syn_feats: list[torch.Tensor], power: float,
                            lam: float, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, attention part, embedding part) of one class from its block outputs (see the module
    docstring); the parts are already scaled, loss = attention + embedding."""
    att = real_feats[0].new_zeros(())
    for fr, fs in zip(real_feats[:-1], syn_feats[:-1]):
        att = att + ((attention_map(fr, power).mean(0) - attention_map(fs, power).mean(0)) ** 2).sum()
    emb = ((real_feats[-1].flatten(1).mean(0) - syn_feats[-1].flatten(1).mean(0)) ** 2).sum()
    att, emb = scale * att, scale * lam * emb
    return att + emb, att, emb


# ---------------------------------------------------------------------------
# seeds
# ---------------------------------------------------------------------------

def net_seed(seed: int, iteration: int) -> tuple:
    """The parts of the iteration's network seed: run seed and iteration only (never the block)."""
    return (int(seed), "datadam-net", int(iteration))


def dsa_seed(seed: int, iteration: int, c: int) -> tuple:
    """One DSA draw per (iteration, class), shared by the class's real and synthetic batch."""
    return (int(seed), "datadam-dsa", int(iteration), int(c))


def real_batch_indices(n: int, batch: int, seed: int, iteration: int, c: int, replacement: bool) -> torch.Tensor:
    """Positions in the class's real pool of the iteration's real batch (distinct unless `replacement`)."""
    g = torch_gen(int(seed), "datadam-real", int(iteration), int(c))
    if replacement:
        return torch.randint(n, (batch,), generator=g)
    if batch > n:
        raise ConfigError(f"config key 'synth.datadam.real_batch' ({batch}): class {c} has {n} real images "
                          "(set synth.datadam.sample_with_replacement: true to draw with replacement)")
    return torch.randperm(n, generator=g)[:batch]


def init_network(net: nn.Module, skeleton: nn.Module, seed: int, iteration: int) -> None:
    """Give `net` the iteration's fresh parameters: each layer's default initialisation drawn on the CPU
    skeleton from (seed, iteration), copied to net's device (the same values on every device)."""
    from ..models.functional import init_flat_params, load_flat_params

    load_flat_params(net, init_flat_params(skeleton, *net_seed(seed, iteration)))


# ---------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------

def distill_block(net: nn.Module, real: dict[int, torch.Tensor], init: dict[int, torch.Tensor], *,
                  iterations: int, lr: float, momentum: float, power: float, lam: float, loss_scale: float,
                  real_batch: int, sample_with_replacement: bool, dsa_strategy: str | None, seed: int,
                  mean, std, device=None, block: str = "", log_every: int = 1,
                  dsa_params: DSAParams | None = None, on_iteration=None) -> DatadamResult:
    """Attention-match the synthetic images of the classes in `init` against their real images.

    net:   a ConvNet (engine.models.convnet; `blocks` then `fc`) of the run's architecture; its
           parameters are replaced every iteration (engine.models.functional.init_flat_params on a CPU
           copy, seed (seed, "datadam-net", iteration)) and never trained.
    real:  {class: uint8 (N_c, C, H, W)} the class's real pool (CPU); batches are drawn from it.
    init:  {class: float (IPC, C, H, W)} starting images in normalised space.
    block: a name for error messages (the class block).
    Returns the final images class-major in the order of `init`'s keys."""
    from ..labels import normalise_images

    power = check_power(power)
    if int(iterations) < 0:
        raise ConfigError(f"config key 'synth.datadam.iterations': expected 0 or more, got {iterations}")
    if int(real_batch) < 1:
        raise ConfigError(f"config key 'synth.datadam.real_batch': expected at least 1, got {real_batch}")
    strategy = dsa_strategy or None
    parse_strategy(strategy)
    device = torch.device(device or "cpu")
    classes = list(init)
    missing = [c for c in classes if c not in real]
    if missing:
        raise EngineError(f"datadam: no real images for class {missing[0]}")
    for c in classes:
        n = len(real[c])
        if n < 1:
            raise EngineError(f"datadam: class {c} has no real images")
        if int(real_batch) > n and not sample_with_replacement:
            raise ConfigError(f"config key 'synth.datadam.real_batch' ({real_batch}): class {c} has {n} real "
                              "images (set synth.datadam.sample_with_replacement: true to draw with replacement)")
    image_shape = tuple(init[classes[0]].shape[1:])
    skeleton = _cpu_copy(net)
    net = net.to(device).train()  # BatchNorm variants normalise with batch statistics
    for p in net.parameters():
        p.requires_grad_(False)
    check_spatial(net, image_shape, device)
    size = image_shape[-2:]
    syn = {c: init[c].detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True) for c in classes}
    # one leaf per class, no foreach: a class's update never depends on which other classes are in the block
    opt = torch.optim.SGD([syn[c] for c in classes], lr=float(lr), momentum=float(momentum), foreach=False)
    history = []
    every = max(1, int(log_every))
    t_start = time.perf_counter()
    for it in range(int(iterations)):
        t0 = time.perf_counter()
        init_network(net, skeleton, seed, it)
        opt.zero_grad(set_to_none=True)
        parts = []
        for c in classes:
            idx = real_batch_indices(len(real[c]), int(real_batch), seed, it, c, sample_with_replacement)
            xr = normalise_images(real[c][idx].to(device), mean, std)
            draw = sample_dsa(strategy, 1, size, *dsa_seed(seed, it, c), per_batch=True, params=dsa_params)
            with torch.no_grad():
                fr = block_features(net, apply_dsa(xr, draw))
            fs = block_features(net, apply_dsa(syn[c], draw))
            loss, att, emb = attention_matching_loss(fr, fs, power, float(lam), float(loss_scale))
            loss.backward()
            parts.append(torch.stack([loss.detach(), att.detach(), emb.detach()]))
        vals = torch.stack(parts).cpu()  # one sync per iteration
        if not bool(torch.isfinite(vals).all()):
            bad = classes[int((~torch.isfinite(vals)).any(1).nonzero()[0])]
            raise EngineError(f"datadam: non-finite loss in class block {block or '?'} at iteration {it} "
                              f"(class {bad}); lower synth.datadam.lr or check the images")
        opt.step()
        tot = vals.sum(0)
        rec = {"iteration": it, "loss": float(tot[0]), "attention": float(tot[1]), "embedding": float(tot[2]),
               "seconds": time.perf_counter() - t0}
        history.append(rec)
        if on_iteration is not None and (it % every == 0 or it == int(iterations) - 1):
            on_iteration(rec)
    images = torch.cat([syn[c].detach() for c in classes])
    return DatadamResult(images, history, time.perf_counter() - t_start)


def _cpu_copy(net: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(net).to("cpu")
