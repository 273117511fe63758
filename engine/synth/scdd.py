"""SC-DD / SRe2L recovery: optimise pixels so a frozen teacher sees its classes
with the BatchNorm statistics it was trained on (METHODS.md section 1).

    out = recover(teacher, classes=[0, ..., 9], ipc_range=(0, 10), cfg=ScddConfig(),
                  mean=[0.5], std=[0.5], image_size=28, channels=1, seed=0, device="cpu")
    out["images"]  # uint8 (10 * 10, 1, 28, 28), class-major: for c in classes: for ipc in range

A unit of work is (class block, IPC index range). All IPC indices of a unit
share one forward pass: the batch holds G = ipc_end - ipc_start *groups*, each
one image per class of the block (group-major inside: row g * B + b is class
classes[b] at IPC index ipc_start + g). Everything that defines one IPC index's
optimisation problem is per group:

- BN statistics are matched per group (each group's mean / biased variance
  over (N, H, W) against the running statistics), from per-sample moments
  (mean and mean of squares over H, W) averaged within the group; reducing a
  strided group view directly is several times slower (METHODS section 6).
- The augmentation (crop, flip, roll) is drawn per group, from
  (seed, "scdd-aug", first class of the block, IPC index, iteration).
- The loss that is back-propagated is the *sum* over groups of each group's
  loss (CE averaged over the group's images + r_bn * BN loss), so every image
  receives exactly the gradient it would get in a separate single-IPC run;
  the logged values are the average over groups (a single run's scale).

So an image depends on its class block, its IPC index and the seed, not on
which other IPC indices share its unit: splitting a block's IPC range into
more or fewer units changes the results only by floating-point reassociation
in the batched kernels (not bit-exact). Byte-identical re-runs hold for the
same unit, hardware and thread count (DESIGN principle 5).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EngineError
from ..models.bn_hooks import bn_layers
from ..runtime import supports_bf16
from ..seeding import py_rng, torch_gen


# ---------------------------------------------------------------------------
# BN-statistics matching
# ---------------------------------------------------------------------------

class _BNReference:
    """Running statistics of all BN layers, concatenated along channels, plus the
    segment boundaries and the per-layer weights (w_1 = first_bn_multiplier)."""

    def __init__(self, layers: Sequence[nn.BatchNorm2d], first_bn_multiplier: float):
        if layers:
            device = layers[0].running_mean.device
            self.mean = torch.cat([m.running_mean.detach().float() for m in layers])
            self.var = torch.cat([m.running_var.detach().float() for m in layers])
        else:
            device = torch.device("cpu")
            self.mean = self.var = torch.zeros(0)
        sizes = torch.tensor([m.num_features for m in layers], dtype=torch.long)
        ends = sizes.cumsum(0)
        self.ends = ends.to(device)
        self.starts = (ends - sizes).to(device)
        w = torch.ones(len(layers))
        if len(layers):
            w[0] = float(first_bn_multiplier)
        self.weights = w.to(device)
        self.num_layers = len(layers)

    def terms(self, gmean: torch.Tensor, gvar: torch.Tensor) -> torch.Tensor:
        """(G, S) group means / variances -> (G, L) weighted per-layer losses
        w_l * (||mu_l - running_mean_l||_2 + ||var_l - running_var_l||_2)."""
        if self.num_layers == 0:
            return gmean.new_zeros(gmean.shape[0], 0)
        d = torch.stack((gmean - self.mean, gvar - self.var)).square()  # (2, G, S)
        # Per-layer sums of squares in a fixed number of ops, whatever the layer
        # count: a float64 prefix sum, differenced at the layer boundaries
        # (exact enough, deterministic, and no TF32 matmul involved on CUDA).
        cs = F.pad(d.double().cumsum(-1), (1, 0))
        sq = cs.index_select(-1, self.ends) - cs.index_select(-1, self.starts)  # (2, G, L)
        per = sq.clamp_min(0).sqrt().sum(0).float()  # (G, L)
        return per * self.weights


def _layers_of(model_bn_layers) -> list[nn.BatchNorm2d]:
    return [m[1] if isinstance(m, tuple) else m for m in model_bn_layers]


def bn_matching_loss(stats, model_bn_layers, first_bn_multiplier: float):
    """sum_l w_l * (||mu_l - running_mean_l||_2 + ||var_l - running_var_l||_2).

    `stats`: one (mean, biased var) pair per BN layer, in `model_bn_layers`
    order (what `BNStatsHook.stats` or `GroupedBNStats.stats` hold); each is
    (C,) or (G, C) for G groups, in which case the loss is averaged over the
    groups. `model_bn_layers`: BN modules or bn_layers()' (name, module) pairs.
    Returns (total, per_layer): a scalar and the (L,) weighted per-layer terms
    (total == per_layer.sum())."""
    layers = _layers_of(model_bn_layers)
    if len(stats) != len(layers):
        raise ValueError(f"bn_matching_loss: {len(stats)} stat pairs for {len(layers)} BN layers")
    ref = _BNReference(layers, first_bn_multiplier)
    if not layers:
        z = torch.zeros(())
        return z, torch.zeros(0)
    two_d = lambda t: t if t.dim() == 2 else t.unsqueeze(0)  # noqa: E731
    gmean = torch.cat([two_d(m).float() for m, _ in stats], 1)
    gvar = torch.cat([two_d(v).float() for _, v in stats], 1)
    per_layer = ref.terms(gmean, gvar).mean(0)
    return per_layer.sum(), per_layer


class GroupedBNStats:
    """Forward hooks on every BN layer that record per-sample moments of its
    input; `loss()` turns them into the per-group BN-matching loss.

    The batch must be G groups of equal size, group-major (rows g*B .. g*B+B-1).
    Use as a context manager; call `clear()` before each forward pass."""

    def __init__(self, model: nn.Module, groups: int = 1, first_bn_multiplier: float = 1.0):
        self.layers = [m for _, m in bn_layers(model)]
        self.groups = int(groups)
        self.ref = _BNReference(self.layers, first_bn_multiplier)
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self._m: list[torch.Tensor] = []
        self._m2: list[torch.Tensor] = []
        self._handles = []

    def _hook(self, module, inputs, output):
        x = inputs[0]
        if x.dtype != torch.float32:  # bf16 autocast: moments in fp32
            x = x.float()
        xf = x.flatten(2)  # a view, also for channels_last
        self._m.append(xf.mean(2))
        self._m2.append(torch.linalg.vecdot(xf, xf) * (1.0 / xf.shape[2]))

    def clear(self) -> None:
        self._m = []
        self._m2 = []

    def __enter__(self):
        self._handles = [m.register_forward_hook(self._hook) for m in self.layers]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def group_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, S) per-group mean and biased variance, all layers' channels concatenated."""
        if len(self._m) != len(self.layers):
            raise RuntimeError(f"GroupedBNStats: {len(self._m)} hook calls for {len(self.layers)} BN layers "
                               "(call clear() before each forward pass)")
        m = torch.cat(self._m, 1)
        m2 = torch.cat(self._m2, 1)
        n, s = m.shape
        if n % self.groups:
            raise RuntimeError(f"GroupedBNStats: batch {n} is not {self.groups} equal groups")
        m = m.view(self.groups, n // self.groups, s)
        m2 = m2.view(self.groups, n // self.groups, s)
        gmean = m.mean(1)
        return gmean, m2.mean(1) - gmean.square()

    @property
    def stats(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (mean, var), each (G, C_l): the input of bn_matching_loss."""
        if not self.layers:
            return []
        gmean, gvar = self.group_moments()
        sizes = [m.num_features for m in self.layers]
        return list(zip(gmean.split(sizes, 1), gvar.split(sizes, 1)))

    def loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(per_group (G,), per_group_layer (G, L)): weighted BN losses of each group."""
        if not self.layers:
            z = torch.zeros(self.groups, device=self.device)
            return z, z.new_zeros(self.groups, 0)
        terms = self.ref.terms(*self.group_moments())
        return terms.sum(1), terms


# ---------------------------------------------------------------------------
# Initialisation and augmentation
# ---------------------------------------------------------------------------

def initial_noise(seed: int, cls: int, ipc: int, channels: int, image_size: int) -> torch.Tensor:
    """N(0, 1) noise in normalised space for one (class, IPC index): (C, H, W), float32, CPU.

    Drawn from its own generator, so it is the same in every unit."""
    g = torch_gen(seed, "scdd-init", int(cls), int(ipc))
    return torch.randn(channels, image_size, image_size, generator=g)


def crop_params(rng, height: int, width: int, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params, drawn from a `random.Random`: (i, j, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = rng.randint(0, height - h)
            j = rng.randint(0, width - w)
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class _Augment:
    """Random resized crop + horizontal flip + random roll, one draw per group
    (one per batch when G = 1, as the reference does), seeded from content."""

    def __init__(self, cfg, seed: int, block_first: int, ipc_start: int, groups: int, per_group: int,
                 size: int):
        self.crop = bool(cfg.random_resized_crop)
        self.flip = bool(cfg.flip)
        self.jitter = int(cfg.jitter)
        self.scale = tuple(float(s) for s in cfg.crop_scale)
        self.ratio = tuple(float(r) for r in cfg.crop_ratio)
        self.seed, self.first, self.ipc_start = seed, block_first, ipc_start
        self.groups, self.b, self.size = groups, per_group, size
        self.active = self.crop or self.flip or self.jitter > 0

    def params(self, group: int, it: int) -> tuple:
        """((i, j, h, w) or None, flip, (dy, dx)) for one group at one iteration."""
        rng = py_rng(self.seed, "scdd-aug", self.first, self.ipc_start + group, it)
        box = crop_params(rng, self.size, self.size, self.scale, self.ratio) if self.crop else None
        flip = self.flip and rng.random() < 0.5
        j = self.jitter
        shift = (rng.randint(-j, j), rng.randint(-j, j)) if j > 0 else (0, 0)
        return box, flip, shift

    def __call__(self, x: torch.Tensor, it: int) -> torch.Tensor:
        if not self.active:
            return x
        parts = []
        s, b = self.size, self.b
        for g in range(self.groups):
            box, flip, shift = self.params(g, it)
            xg = x[g * b:(g + 1) * b]
            if box is not None and box != (0, 0, s, s):
                i, j, h, w = box
                # Crops never exceed the image, so this is always an upsampling
                # (antialiasing would change nothing): torchvision's resized_crop.
                xg = F.interpolate(xg[:, :, i:i + h, j:j + w], size=(s, s), mode="bilinear",
                                   align_corners=False)
            if flip:
                xg = xg.flip(3)
            if shift != (0, 0):
                xg = torch.roll(xg, shifts=shift, dims=(2, 3))
            parts.append(xg)
        return parts[0] if len(parts) == 1 else torch.cat(parts)


# ---------------------------------------------------------------------------
# Recovery
# ---------------------------------------------------------------------------

def teacher_num_classes(model: nn.Module) -> int | None:
    """The teacher's class count: its `num_classes` attribute, else its last Linear's out_features."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    last = last_linear(model)
    return last.out_features if last is not None else None


def last_linear(model: nn.Module) -> nn.Linear | None:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last


def feature_similarity(feats: torch.Tensor, groups: int, per_group: int) -> torch.Tensor:
    """Mean cosine similarity between the features of different IPC indices of one class, over
    classes. `feats`: (groups * per_group, D), group-major (row g * per_group + b = class b, IPC g)."""
    G, B = groups, per_group
    f = F.normalize(feats.reshape(G, B, -1), dim=2)
    sim = torch.einsum("gbd,hbd->bgh", f, f)  # (B, G, G) per class
    off = sim.sum((1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(1)
    return off.sum() / (B * G * (G - 1))


def _describe(classes: list[int], ipc_start: int, ipc_end: int) -> str:
    return (f"class block {classes[0]}..{classes[-1]} ({len(classes)} classes), "
            f"IPC {ipc_start}..{ipc_end - 1}")


def _validate(teacher, classes, ipc_range, cfg, mean, std, image_size, channels, init_images):
    try:
        classes = [int(c) for c in classes]
    except (TypeError, ValueError):
        raise EngineError(f"SC-DD recovery: classes must be a list of integers, got {classes!r}") from None
    if not classes:
        raise EngineError("SC-DD recovery: the class block is empty")
    if len(set(classes)) != len(classes):
        raise EngineError(f"SC-DD recovery: class block {classes[0]}..{classes[-1]} repeats a class")
    n_classes = teacher_num_classes(teacher)
    bad = [c for c in classes if c < 0 or (n_classes is not None and c >= n_classes)]
    if bad:
        limit = f"0..{n_classes - 1}" if n_classes is not None else ">= 0"
        raise EngineError(f"SC-DD recovery: class {bad[0]} is out of range for a teacher with "
                          f"{n_classes} classes (expected {limit})")
    try:
        ipc_start, ipc_end = (int(v) for v in ipc_range)
    except (TypeError, ValueError):
        raise EngineError(f"SC-DD recovery: ipc_range must be (start, end), got {ipc_range!r}") from None
    if not 0 <= ipc_start < ipc_end:
        raise EngineError(f"SC-DD recovery: IPC range ({ipc_start}, {ipc_end}) is invalid "
                          "(expected 0 <= start < end)")
    if float(getattr(cfg, "r_div", 0.0)) < 0:
        raise EngineError(f"synth.scdd.r_div: expected >= 0, got {cfg.r_div}")
    if int(cfg.iterations) < 0:
        raise EngineError(f"synth.scdd.iterations: expected >= 0, got {cfg.iterations}")
    if len(mean) != channels or len(std) != channels:
        raise EngineError(f"SC-DD recovery: mean/std have {len(mean)}/{len(std)} entries for "
                          f"{channels} channels")
    if any(float(s) <= 0 for s in std):
        raise EngineError(f"SC-DD recovery: std must be positive, got {list(std)}")
    if init_images is not None:
        n = len(classes) * (ipc_end - ipc_start)
        want = (n, channels, image_size, image_size)
        if not isinstance(init_images, torch.Tensor) or init_images.dtype != torch.uint8 \
                or tuple(init_images.shape) != want:
            got = (f"{init_images.dtype} {tuple(init_images.shape)}" if isinstance(init_images, torch.Tensor)
                   else type(init_images).__name__)
            raise EngineError(f"SC-DD recovery: init_images for {_describe(classes, ipc_start, ipc_end)} "
                              f"must be uint8 {want}, got {got}")
    return classes, ipc_start, ipc_end


def recover(teacher: nn.Module, classes: list[int], ipc_range: tuple[int, int], cfg, mean, std,
            image_size: int, channels: int, seed: int, device, init_images: torch.Tensor | None = None,
            log: Callable[[dict], None] | None = None) -> dict:
    """Recover the images of one unit (class block x IPC index range).

    `cfg`: an ScddConfig (dataclass or OmegaConf node). `mean`/`std`: the
    teacher's input normalisation. `init_images`: optional uint8
    (len(classes) * n_ipc, C, H, W), class-major, to start from (Adam lr
    cfg.init_lr instead of cfg.lr). `log`: called with each logged loss record.
    The teacher is moved to `device`, frozen and put in eval mode for the call
    (its mode and requires_grad flags are restored afterwards; on CUDA with
    cfg.channels_last it stays channels_last).

    Returns dict(images=uint8 (len(classes) * n_ipc, C, H, W) class-major,
    labels=int64, losses=[{iter, ce, bn, total}] every cfg.log_every iterations
    and at the last one (the loss computed at that iteration, before its step;
    averaged over IPC groups; bn is before r_bn), stats=dict)."""
    classes, ipc_start, ipc_end = _validate(teacher, classes, ipc_range, cfg, mean, std, image_size,
                                            channels, init_images)
    device = torch.device(device)
    B, G = len(classes), ipc_end - ipc_start
    N, S, C = B * G, int(image_size), int(channels)
    iterations = int(cfg.iterations)
    r_bn = float(cfg.r_bn)
    log_every = int(cfg.log_every)
    use_amp = bool(cfg.amp) and supports_bf16(device)
    use_cl = bool(cfg.channels_last) and device.type == "cuda"
    fmt = torch.channels_last if use_cl else torch.contiguous_format
    where = _describe(classes, ipc_start, ipc_end)

    mean_t = torch.tensor([float(m) for m in mean]).view(1, C, 1, 1)
    std_t = torch.tensor([float(s) for s in std]).view(1, C, 1, 1)
    lo, hi = ((0 - mean_t) / std_t).to(device), ((1 - mean_t) / std_t).to(device)

    # Batch rows are group-major: row g * B + b = (classes[b], ipc_start + g).
    if init_images is None:
        x0 = torch.stack([initial_noise(seed, c, ipc_start + g, C, S) for g in range(G) for c in classes])
        lr = float(cfg.lr)
    else:
        x0 = init_images.view(B, G, C, S, S).transpose(0, 1).reshape(N, C, S, S).float() / 255
        x0 = (x0 - mean_t) / std_t
        lr = float(cfg.init_lr)
    x = x0.to(device, copy=True).contiguous(memory_format=fmt).requires_grad_(True)  # x0 stays the start
    y = torch.tensor(classes, dtype=torch.long).repeat(G).to(device)
    augment = _Augment(cfg, seed, classes[0], ipc_start, G, B, S)
    opt = torch.optim.Adam([x], lr=lr, betas=tuple(float(b) for b in cfg.adam_betas))
    group = opt.param_groups[0]
    # per iteration: ce, bn, total (summed over groups), diversity term (before r_div)
    hist = torch.zeros(max(iterations, 1), 4, device=device)
    losses: list[dict] = []

    modes = [(m, m.training) for m in teacher.modules()]
    grad_flags = [p.requires_grad for p in teacher.parameters()]
    teacher.to(device=device)
    if use_cl:
        teacher.to(memory_format=torch.channels_last)
    teacher.eval()
    teacher.requires_grad_(False)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else None
    r_div = float(getattr(cfg, "r_div", 0.0))
    feats: list[torch.Tensor] = []
    head = last_linear(teacher) if r_div > 0 and G > 1 else None
    if r_div > 0 and G > 1 and head is None:
        raise EngineError("synth.scdd.r_div: the teacher has no final Linear layer to take features from")
    feat_hook = head.register_forward_hook(lambda m, i, o: feats.append(i[0])) if head is not None else None
    try:
        t0 = time.perf_counter()
        checked = 0  # iterations [0, checked) are known finite
        with GroupedBNStats(teacher, G, float(cfg.first_bn_multiplier)) as bn:
            for it in range(iterations):
                group["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * it / iterations))
                xa = augment(x, it)
                bn.clear()
                if autocast is None:
                    logits = teacher(xa)
                else:
                    with autocast():
                        logits = teacher(xa)
                # Sums over groups (of per-group means): each image gets the
                # gradient of its own group's loss, as in a separate run.
                ce = F.cross_entropy(logits.float(), y, reduction="sum") * (1.0 / B)
                bn_loss = bn.loss()[0].sum()
                loss = ce + r_bn * bn_loss
                if head is not None:
                    # Diversity: mean cosine similarity of the teacher's features between the IPC
                    # indices of each class (x G so that r_div weighs it like one group's CE).
                    div = G * feature_similarity(feats.pop().float(), G, B)
                    loss = loss + r_div * div
                    hist[it, 3] = div.detach()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    x.clamp_(lo, hi)
                    hist[it, :3] = torch.stack((ce, bn_loss, loss))
                if (log_every > 0 and it % log_every == 0) or it == iterations - 1:
                    _check_finite(hist, checked, it + 1, where)
                    checked = it + 1
                    ce_v, bn_v, tot_v, div_v = (v / G for v in hist[it].tolist())
                    rec = {"iter": it, "ce": ce_v, "bn": bn_v, "total": tot_v}
                    if head is not None:
                        rec["similarity"] = div_v
                    losses.append(rec)
                    if log is not None:
                        log(rec)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0

        with torch.no_grad():
            pixels = (x.detach().float() * std_t.to(device) + mean_t.to(device)).clamp_(0, 1)
            images = torch.round(pixels * 255).to(torch.uint8)
            # Teacher agreement on the saved (quantised) images, un-augmented.
            xq = ((images.float() / 255 - mean_t.to(device)) / std_t.to(device)).contiguous(memory_format=fmt)
            if autocast is None:
                pred = teacher(xq).argmax(1)
            else:
                with autocast():
                    pred = teacher(xq).argmax(1)
            agreement = (pred == y).float().mean().item()
            # how far the saved images moved from their start, in 0..255 pixel units (the start
            # clipped to the valid range, as it would be saved)
            start = (x0.to(device) * std_t.to(device) + mean_t.to(device)).clamp_(0, 1).mul_(255).round_()
            moved = (images.float() - start).abs().mean().item()
    finally:
        if feat_hook is not None:
            feat_hook.remove()
        for m, mode in modes:
            m.training = mode
        for p, flag in zip(teacher.parameters(), grad_flags):
            p.requires_grad_(flag)

    images = images.view(G, B, C, S, S).transpose(0, 1).reshape(N, C, S, S).contiguous().cpu()
    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(G)
    stats = {
        "classes": [classes[0], classes[-1]], "num_classes": B, "ipc_range": [ipc_start, ipc_end],
        "groups": G, "batch": N, "iterations": iterations, "images": N, "lr": lr,
        "init": "noise" if init_images is None else "images",
        "seconds": seconds, "img_it_per_s": N * iterations / seconds if seconds > 0 else 0.0,
        "teacher_agreement": agreement, "mean_abs_pixel_change": moved,
        "device": str(device), "amp": use_amp, "channels_last": use_cl,
        "threads": torch.get_num_threads(), "augment_per": "group", "r_div": r_div if head is not None else 0.0,
    }
    return {"images": images, "labels": labels, "losses": losses, "stats": stats}


def _check_finite(hist: torch.Tensor, start: int, end: int, where: str) -> None:
    window = hist[start:end]
    ok = torch.isfinite(window).all(1)
    if not bool(ok.all()):
        it = start + int((~ok).nonzero()[0, 0])
        raise EngineError(f"SC-DD recovery: non-finite loss at iteration {it} for {where} "
                          "(lower synth.scdd.lr or synth.scdd.r_bn, or check the teacher)")
