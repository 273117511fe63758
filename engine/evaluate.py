"""Post-training of students on distilled (or random real) images, and validation
(METHODS.md section 1, "Post-train and evaluate").

A fresh student, seeded from (seed, "student"), is trained from scratch on the
given images only. Each epoch iterates `epoch_batches` and augments every batch
with the replayable stream of engine.labels (random resized crop + flip,
optional CutMix/Mixup), so the student sees exactly the batches a stored-label
run recorded. Targets:

- `online`: the frozen teacher's logits on exactly the augmented batch;
- `stored`: the recorded crops are replayed and the recorded top-k logits
  expanded to dense logits (see engine.labels.relabel);
- `hard`:   cross-entropy with the images' own labels (mixed like the images).

KD loss convention: `F.kl_div(log_softmax(s / T), softmax(t / T), "batchmean")`,
i.e. KL(softmax(t/T) || softmax(s/T)) summed over classes and averaged over the
batch, *without* the T^2 factor -- as in the SRe2L / SC-DD reference
post-training code. With Adam(W) a constant loss scale leaves the updates
unchanged (up to eps), so T^2 would only change the logged loss values.

Optimiser: AdamW(lr, weight_decay) (or SGD momentum 0.9 with `optimizer: sgd`),
no weight decay on parameters with ndim <= 1 (BN weights/biases, all biases),
learning rate cosine from lr to 0 over all steps (per step, no warm-up).
Validation: top-1 / top-5 in percent over the val loader, the first
`eval.val_limit` samples only when it is > 0.

The functions take tensors and config only (no file I/O) so a Ray Train worker
can run them; `rank` / `world_size` are accepted for that and must be a single
process for now.
"""
from __future__ import annotations

import math
import statistics
import time
from types import SimpleNamespace
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .errors import ConfigError, EngineError
from .labels import OnlineLabeler, StoredLabeler, augment_batch, epoch_batches, normalise_images, relabel_stored
from .labels.crops import check_relabel_config
from .metrics import accuracy
from .progress import progress as progress_bar
from .seeding import derive_seed, torch_gen

LABEL_MODES = ("online", "stored", "hard")
OPTIMIZERS = ("adamw", "sgd")
KD_LOSS = "kl_batchmean"  # KL(softmax(t/T) || softmax(s/T)), batchmean, no T^2 factor


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)), batchmean, no T^2 (see the module docstring)."""
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    p = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_q, p, reduction="batchmean")


def hard_loss(student_logits: torch.Tensor, labels: torch.Tensor, mix: dict | None) -> torch.Tensor:
    if mix is None:
        return F.cross_entropy(student_logits, labels)
    lam = mix["lam"]
    partner = labels[mix["perm"].to(labels.device)]
    return lam * F.cross_entropy(student_logits, labels) + (1.0 - lam) * F.cross_entropy(student_logits, partner)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights with ndim > 1 only (not on BN parameters and biases)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, eval_cfg) -> torch.optim.Optimizer:
    groups = param_groups(model, float(eval_cfg.weight_decay))
    if eval_cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=float(eval_cfg.lr))
    if eval_cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=float(eval_cfg.lr), momentum=0.9)
    raise ConfigError(f"eval.optimizer '{eval_cfg.optimizer}': expected one of {', '.join(OPTIMIZERS)}")


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(1, int(total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)))


def create_student(cfg, num_classes: int, seed: int, image_size: int) -> torch.nn.Module:
    """A fresh student from cfg.eval.student, initialised from (seed, "student")."""
    from .models import create_model

    s = cfg.eval.student
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "student"))
        return create_model(s.name, num_classes, in_chans=cfg.data.channels, small_input=s.small_input,
                            width=s.width, image_size=image_size)


validate = accuracy  # top-1 / top-5 in percent over the val loader (engine.metrics)


def _check_world(rank, world_size) -> None:
    if world_size not in (None, 1) or rank not in (None, 0):
        raise NotImplementedError("train_student: distributed training (world_size > 1) is not implemented yet")


def train_student(images_uint8: torch.Tensor, labels_int: torch.Tensor, teacher: torch.nn.Module | None, cfg,
                  seed: int, device, labeler: str = "online", stored: dict | None = None,
                  val_loader_fn: Callable[[], Any] | None = None, num_classes: int | None = None,
                  stream_seed: int | None = None, rank: int | None = None, world_size: int | None = None,
                  progress: bool = True, desc: str = "student", return_model: bool = False) -> dict[str, Any]:
    """Train a fresh student on `images_uint8` (N, C, H, W) (uint8, or already
    normalised float) and validate it.

    `cfg`: the full engine config (eval, relabel, data sections). `seed` seeds the
    student's initialisation and, in online/hard mode, the augmentation stream
    (`stream_seed` overrides the latter); in stored mode the stream is the stored
    one (its crops are replayed; batch size and image count must match). Returns
    {top1, top5, epochs, seconds, history, seed, label_mode, val_count}; history
    holds one {epoch, loss, lr} per epoch. top1/top5 are None without a val loader.
    `return_model`: also return the trained student under "model"."""
    _check_world(rank, world_size)
    if labeler not in LABEL_MODES:
        raise ConfigError(f"label mode '{labeler}': expected one of {', '.join(LABEL_MODES)}")
    ev, rl = cfg.eval, cfg.relabel
    check_relabel_config(rl)
    device = torch.device(device)
    n_img = len(images_uint8)
    labels_int = torch.as_tensor(labels_int).long()
    if len(labels_int) != n_img:
        raise EngineError(f"train_student: {n_img} images but {len(labels_int)} labels")
    if n_img == 0:
        raise EngineError("train_student: no images to train on")
    epochs, batch_size, temperature = int(ev.epochs), int(ev.batch_size), float(ev.temperature)
    if epochs < 1:
        raise ConfigError(f"eval.epochs: expected a positive number, got {epochs}")
    if temperature <= 0:
        raise ConfigError(f"eval.temperature: expected a positive number, got {temperature}")

    online = replay = None
    if labeler == "online":
        if teacher is None:
            raise EngineError("train_student: label mode 'online' needs a teacher")
        online = OnlineLabeler(teacher.to(device))
    elif labeler == "stored":
        if stored is None:
            raise EngineError("train_student: label mode 'stored' needs stored labels")
        replay = StoredLabeler(stored, device=device)
        if replay.num_images != n_img:
            raise EngineError(f"stored labels: made for {replay.num_images} images, got {n_img}")
        if replay.batch_size != batch_size:
            raise EngineError(f"stored labels: recorded with batch size {replay.batch_size}, "
                              f"eval.batch_size is {batch_size}")
        if list(stored["image_size"]) != list(images_uint8.shape[-2:]):
            raise EngineError(f"stored labels: recorded at {stored['image_size']} px, images are "
                              f"{list(images_uint8.shape[-2:])}")
        e0, e1 = replay.epoch_range
        if e0 != 0 or e1 < epochs:
            raise EngineError(f"stored labels: cover epochs [{e0}, {e1}), eval.epochs is {epochs}")
        stream_seed = replay.seed
    if stream_seed is None:
        stream_seed = seed
    if num_classes is None:
        num_classes = stored["num_classes"] if stored is not None else int(labels_int.max()) + 1

    student = create_student(cfg, num_classes, seed, int(images_uint8.shape[-1])).to(device)
    optimizer = make_optimizer(student, ev)
    steps_per_epoch = math.ceil(n_img / batch_size)
    scheduler = cosine_schedule(optimizer, epochs * steps_per_epoch)
    mean, std = list(cfg.data.mean), list(cfg.data.std)
    history = []
    start = time.perf_counter()
    bar = progress_bar(range(epochs), desc=desc, unit="epoch", disable=not progress)
    for epoch in bar:
        student.train()
        total, seen = 0.0, 0
        if replay is not None:
            batches = replay.batches(epoch)
        else:
            batches = epoch_batches(n_img, batch_size, stream_seed, epoch)
        for b, idx in enumerate(batches):
            x = normalise_images(images_uint8[idx].to(device), mean, std)
            if replay is not None:
                aug, mix = replay.augment(x, idx, epoch, b)
            else:
                aug, mix = augment_batch(x, idx, stream_seed, epoch, b, rl)
            out = student(aug)
            if labeler == "hard":
                loss = hard_loss(out, labels_int[idx].to(device), mix)
            else:
                target = online.labels(aug) if online is not None else replay.labels(epoch, b, idx)
                loss = kd_loss(out, target, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        history.append({"epoch": epoch, "loss": total / seen, "lr": optimizer.param_groups[0]["lr"]})
        bar.set_postfix(loss=f"{total / seen:.4f}")
    bar.close()
    result: dict[str, Any] = {"top1": None, "top5": None, "val_count": 0}
    if val_loader_fn is not None:
        result = validate(student, val_loader_fn(), device, int(ev.val_limit))
        result["val_count"] = result.pop("count")
    result.update(epochs=epochs, seconds=time.perf_counter() - start, history=history, seed=seed,
                  label_mode=labeler)
    if return_model:
        result["model"] = student
    return result


def pick_random_real(labels, ipc: int, seed: int, num_classes: int | None = None) -> torch.Tensor:
    """Indices of a random real subset: `ipc` distinct images of every class,
    chosen per class from (seed, "random_real", class); int64, class by class.

    `labels`: the label of every real training image (a list or tensor)."""
    labels = torch.as_tensor(labels).long().reshape(-1)
    if ipc < 1:
        raise ConfigError(f"synth.ipc: expected a positive number, got {ipc}")
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if len(labels) else 0
    picked = []
    for c in range(num_classes):
        pool = (labels == c).nonzero().flatten()
        if len(pool) < ipc:
            raise EngineError(f"random-real control: class {c} has {len(pool)} training images, IPC {ipc} needs more")
        order = torch.randperm(len(pool), generator=torch_gen(seed, "random_real", c))
        picked.append(pool[order[:ipc]])
    return torch.cat(picked) if picked else torch.zeros(0, dtype=torch.int64)


def _summary(runs: list[dict]) -> dict[str, Any]:
    top1 = [r["top1"] for r in runs]
    out: dict[str, Any] = {"top1": top1[0], "top5": runs[0]["top5"]}
    if len(runs) > 1:
        out["top1_mean"] = statistics.fmean(top1)
        out["top1_std"] = statistics.stdev(top1)
        out["top5_mean"] = statistics.fmean(r["top5"] for r in runs)
    out["seeds"] = [r["seed"] for r in runs]
    out["runs"] = [{"seed": r["seed"], "top1": r["top1"], "top5": r["top5"], "seconds": round(r["seconds"], 3),
                    "final_loss": r["history"][-1]["loss"]} for r in runs]
    return out


def _mean_top1(summary: dict) -> float:
    return summary.get("top1_mean", summary["top1"])


def evaluate_sets(distilled_images: torch.Tensor, distilled_labels, teacher: torch.nn.Module | None, cfg, device,
                  val_loader_fn: Callable[[], Any], random_real: tuple[torch.Tensor, Any] | None = None,
                  num_classes: int | None = None, label_mode: str | None = None,
                  stored: dict[str, dict] | None = None, hard_control: bool = False, method: str | None = None,
                  ipc: int | None = None, rank: int | None = None, world_size: int | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Train students on the distilled set and the random-real control under the
    same protocol, once per seed in cfg.eval.seeds, and build the results dict of
    DESIGN.md ("results.json"): method, ipc, num_classes, teacher (when given),
    distilled, random_real, gain_over_random, protocol, timing_s.

    `random_real`: (images, labels) of the control, picked by the caller with
    `pick_random_real(train_labels, ipc, cfg.seed)`; required when
    cfg.eval.random_real is on. `label_mode`: online | stored | hard (default
    cfg.relabel.mode). `stored`: {"distilled": labels, "random_real": labels} in
    stored mode; a missing entry is computed in memory with relabel_stored
    (stream seed cfg.seed, shared by every eval seed; in online and hard mode each
    eval seed draws its own stream). `hard_control`: also train with hard labels
    and report it under "hard". Per set, top1/top5 are the first seed's run;
    top1_mean / top1_std (sample standard deviation) appear with several seeds;
    gain_over_random = distilled mean top-1 - random-real mean top-1."""
    _check_world(rank, world_size)
    start = time.perf_counter()
    mode = label_mode or cfg.relabel.mode
    if mode not in LABEL_MODES:
        raise ConfigError(f"relabel.mode '{mode}': expected one of {', '.join(LABEL_MODES)}")
    if mode != "hard" and teacher is None and not (mode == "stored" and stored):
        raise EngineError(f"evaluate: label mode '{mode}' needs a teacher")
    seeds = [int(s) for s in cfg.eval.seeds]
    if not seeds:
        raise ConfigError("eval.seeds: expected at least one seed")
    distilled_labels = torch.as_tensor(distilled_labels).long()
    if num_classes is None:
        num_classes = int(distilled_labels.max()) + 1
    if ipc is None:
        ipc = int(torch.bincount(distilled_labels, minlength=num_classes).max())
    sets = {"distilled": (distilled_images, distilled_labels)}
    if cfg.eval.random_real:
        if random_real is None:
            raise EngineError("eval.random_real is on but no random-real images were given")
        sets["random_real"] = (random_real[0], torch.as_tensor(random_real[1]).long())
    stored = dict(stored or {})
    results: dict[str, Any] = {"method": method or cfg.method, "ipc": ipc, "num_classes": num_classes}
    if teacher is not None:
        t = validate(teacher.to(device), val_loader_fn(), device, int(cfg.eval.val_limit))
        results["teacher"] = {"top1": t["top1"], "top5": t["top5"]}
    val_count = 0
    for name, (images, labels) in sets.items():
        if mode == "stored" and name not in stored:
            if teacher is None:
                raise EngineError(f"evaluate: label mode 'stored' has no stored labels for the {name} set "
                                  "and no teacher to compute them")
            stored[name] = relabel_stored(teacher, images, list(cfg.data.mean), list(cfg.data.std),
                                          int(cfg.eval.epochs), int(cfg.eval.batch_size), int(cfg.seed),
                                          cfg.relabel, device, progress=progress)
        runs = [train_student(images, labels, teacher, cfg, s, device, labeler=mode, stored=stored.get(name),
                              val_loader_fn=val_loader_fn, num_classes=num_classes, progress=progress,
                              desc=f"{name} seed {s}") for s in seeds]
        val_count = runs[0]["val_count"]
        summary = _summary(runs)
        if hard_control and mode != "hard":
            hard_runs = [train_student(images, labels, None, cfg, s, device, labeler="hard",
                                       val_loader_fn=val_loader_fn, num_classes=num_classes, progress=progress,
                                       desc=f"{name} hard seed {s}") for s in seeds]
            h = _summary(hard_runs)
            summary["hard"] = {k: h[k] for k in ("top1", "top1_mean", "top1_std") if k in h}
        results[name] = summary
    if "random_real" in results:
        results["gain_over_random"] = _mean_top1(results["distilled"]) - _mean_top1(results["random_real"])
    ev, rl = cfg.eval, cfg.relabel
    if mode == "stored":  # the replayed crops are the stored ones
        rl = SimpleNamespace(**stored["distilled"]["relabel"])
    results["protocol"] = {
        "label_mode": mode, "epochs": int(ev.epochs), "batch": int(ev.batch_size), "optimizer": ev.optimizer,
        "lr": float(ev.lr), "weight_decay": float(ev.weight_decay), "temperature": float(ev.temperature),
        "seeds": seeds, "kd_loss": KD_LOSS, "schedule": "cosine per step, no warm-up",
        "student": {"name": ev.student.name, "width": int(ev.student.width),
                    "small_input": bool(ev.student.small_input)},
        "crop_scale": [float(v) for v in rl.crop_scale], "flip": bool(rl.flip), "mix": rl.mix,
        "top_k": int(stored["distilled"]["top_k"]) if mode == "stored" else None,
        "stream_seed": int(stored["distilled"]["seed"]) if mode == "stored" else "eval seed",
        "val_limit": int(ev.val_limit), "val_count": val_count,
    }
    results["timing_s"] = {"evaluate": round(time.perf_counter() - start, 3)}
    return results
