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
can run them (engine.cluster.train_eval). Data parallel (`world_size` W > 1,
`rank` r; a torch.distributed process group of W processes must be initialised,
gloo on CPU, NCCL on GPU):

- every rank walks the same global batches (`epoch_batches`, or the stored
  replay, same stream seed) and augments them exactly as one process would
  (without mixing only its own rows, since crops are per image; with mixing the
  whole batch, since a mixed image needs its partner), then trains on its own
  rows: a batch of n images is trimmed to n - n % W (the **drop rule**: the last
  n % W images of the batch, in batch order, are left out of that step; which
  images that is changes every epoch with the batch order) and rank r takes rows
  [r * n' / W, (r + 1) * n' / W) of the n' kept. Every rank therefore takes one
  optimizer step per global batch -- equal step counts -- and the number of steps
  and the cosine schedule are those of a single process. When W divides every
  batch size nothing is dropped. A batch too small to give every rank a row is an
  error (ConfigError), never a silent skip.
- targets are those of the rank's rows: the online teacher runs on them, stored
  logits are replayed for them, hard labels (and mix partners' labels) are sliced
  the same way.
- the student is wrapped in DistributedDataParallel; the loss is the mean over
  the rank's rows and the rows are split equally, so DDP's gradient average is
  the gradient of the mean over the whole (trimmed) batch, and a student without
  BatchNorm (convnetd*, instance norm) follows the single-process run to float
  tolerance. BatchNorm layers normalise over each rank's rows (plain DDP;
  SyncBatchNorm runs on GPUs only), so a BN student differs from a single
  process run, as in any data-parallel BN training. The logged loss of an epoch
  is all-reduced (sum of loss x rows over sum of rows), the same on every rank.
- validation: the caller gives each rank its shard of the val set (e.g.
  engine.data.loader_from_config(..., rank=r, world_size=W)); correct/count sums
  are all-reduced (engine.metrics.accuracy), so top-1/top-5 and val_count are
  global, every val sample counted once. `eval.val_limit` stays a global sample
  count: rank r counts its first val_limit // W (+1 on the first val_limit % W
  ranks) samples -- exactly the first val_limit samples of the single-process
  order when the reader deals samples round-robin (see engine.metrics.accuracy).
- stored mode without given stored labels: the ranks compute disjoint epoch
  ranges with relabel_stored and all-gather them (merge_labels); an epoch range
  over all images gives exactly the full run's labels.
- only rank 0 shows progress bars. With W = 1 (or None) nothing of this runs and
  the results are those of a plain single-process run.

Label mode `soft` (`train_student_soft`, TESLA's protocol `tesla`, METHODS.md
section 2): fixed per-image soft labels given by the caller (TESLA stores the
labelling expert's softmax; the random-real control is labelled by the same
expert), soft-target cross-entropy (no temperature), one DSA draw per batch
(engine.synth.dsa, per-sample parameters from (seed, epoch, batch)), SGD with
momentum and weight decay on every parameter at a given lr (TESLA: the learned
step size), lr x factor from a fraction of the epochs on (eval.tesla). Data
parallel exactly as above (every rank augments the whole batch, trains on its
rows under the drop rule).
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
from .labels.relabel import merge_labels
from .metrics import accuracy, all_reduce_sum
from .report import compare
from .progress import progress as progress_bar
from .seeding import derive_seed, torch_gen

LABEL_MODES = ("online", "stored", "hard")
SOFT_MODE = "soft"  # fixed per-image soft labels, protocol `tesla` (train_student_soft)
OPTIMIZERS = ("adamw", "sgd")
KD_LOSS = "kl_batchmean"  # KL(softmax(t/T) || softmax(s/T)), batchmean, no T^2 factor


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)), batchmean, no T^2 (see the module docstring)."""
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    p = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_q, p, reduction="batchmean")


def hard_loss(student_logits: torch.Tensor, labels: torch.Tensor, mix: dict | None,
              rows: slice = slice(None)) -> torch.Tensor:
    """Cross-entropy with the batch's labels (mixed like the images). `labels` are the
    whole batch's; `student_logits` are for `rows` of it (data parallel: this rank's rows;
    mix partners are looked up in the whole batch)."""
    if mix is None:
        return F.cross_entropy(student_logits, labels[rows])
    lam = mix["lam"]
    partner = labels[mix["perm"].to(labels.device)]
    return (lam * F.cross_entropy(student_logits, labels[rows])
            + (1.0 - lam) * F.cross_entropy(student_logits, partner[rows]))


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


def _check_world(rank, world_size) -> tuple[int, int]:
    """(rank, world size); W > 1 needs an initialised process group of exactly W ranks."""
    world = 1 if world_size is None else int(world_size)
    rank = 0 if rank is None else int(rank)
    if world < 1 or not 0 <= rank < world:
        raise EngineError(f"evaluate: rank {rank} of world size {world}: expected 0 <= rank < world size")
    if world > 1:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise EngineError(f"evaluate: world size {world} needs an initialised torch.distributed process group")
        if (dist.get_rank(), dist.get_world_size()) != (rank, world):
            raise EngineError(f"evaluate: rank {rank} of {world} given, but the process group says rank "
                              f"{dist.get_rank()} of {dist.get_world_size()}")
    return rank, world


def _rows(batch_len: int, rank: int, world: int) -> slice:
    """This rank's rows of a global batch under the drop rule (module docstring)."""
    kept = batch_len - batch_len % world
    return slice(rank * kept // world, (rank + 1) * kept // world)


def _wrap_data_parallel(student: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        return DistributedDataParallel(student, device_ids=[device.index if device.index is not None
                                                            else torch.cuda.current_device()])
    return DistributedDataParallel(student)


def _batch_plan(n_img: int, batch_size: int, world: int, key: str) -> tuple[int, int]:
    """(steps per epoch, images dropped per epoch) for the batches of epoch_batches: sizes
    n_img // steps or one more, the same every epoch; each trimmed to a multiple of `world`."""
    steps_per_epoch = math.ceil(n_img / batch_size)
    sizes = [len(b) for b in torch.tensor_split(torch.arange(n_img), steps_per_epoch)]
    if world > 1 and min(sizes) < world:
        raise ConfigError(f"{key} {batch_size}: with {n_img} images the smallest batch holds "
                          f"{min(sizes)} images, fewer than the {world} data-parallel workers")
    return steps_per_epoch, sum(n % world for n in sizes)


def _epoch_record(epoch: int, total: float, seen: int, optimizer, world: int, device) -> dict:
    """One history entry; the loss is all-reduced so every rank logs the same value."""
    if world > 1:
        total, seen = all_reduce_sum([total, seen], torch.float64, device)
    return {"epoch": epoch, "loss": total / seen, "lr": optimizer.param_groups[0]["lr"]}


def _validated(student, val_loader_fn, device, val_limit: int, world: int) -> dict[str, Any]:
    """Top-1/top-5 and the global val count of the unwrapped student (no DDP collectives)."""
    if val_loader_fn is None:
        return {"top1": None, "top5": None, "val_count": 0}
    result = validate(student, val_loader_fn(), device, val_limit, distributed=world > 1)
    result["val_count"] = result.pop("count")
    return result


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
    Also: steps (optimizer steps taken, the same on every rank), world_size and
    dropped_per_epoch (images left out of each epoch by the drop rule, 0 in one
    process). `return_model`: also return the trained student under "model"
    (unwrapped, not the DDP wrapper).

    `rank` / `world_size`: data parallel over an initialised torch.distributed
    process group (module docstring); `val_loader_fn` then gives this rank's shard
    of the val set. Only rank 0 shows a progress bar."""
    rank, world = _check_world(rank, world_size)
    progress = progress and rank == 0
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
    # Whole-batch augmentation is needed only when images are mixed with partners.
    mixing = (replay.stored["mix"] is not None) if replay is not None else rl.mix != "none"

    steps_per_epoch, dropped = _batch_plan(n_img, batch_size, world, "eval.batch_size")
    student = create_student(cfg, num_classes, seed, int(images_uint8.shape[-1])).to(device)
    model = _wrap_data_parallel(student, device) if world > 1 else student
    optimizer = make_optimizer(student, ev)
    scheduler = cosine_schedule(optimizer, epochs * steps_per_epoch)
    mean, std = list(cfg.data.mean), list(cfg.data.std)
    history = []
    steps = 0
    start = time.perf_counter()
    bar = progress_bar(range(epochs), desc=desc, unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        total, seen = 0.0, 0
        if replay is not None:
            batches = replay.batches(epoch)
        else:
            batches = epoch_batches(n_img, batch_size, stream_seed, epoch)
        for b, idx in enumerate(batches):
            rows = _rows(len(idx), rank, world)
            # The rows this rank augments: all of the batch when mixing (partners), else its own.
            run = idx if mixing else idx[rows]
            x = normalise_images(images_uint8[run].to(device), mean, std)
            if replay is not None:
                aug, mix = replay.augment(x, run, epoch, b)
            else:
                aug, mix = augment_batch(x, run, stream_seed, epoch, b, rl)
            if mixing:
                aug = aug[rows]
            out = model(aug)
            if labeler == "hard":
                loss = hard_loss(out, labels_int[idx].to(device), mix, rows)
            else:
                target = online.labels(aug) if online is not None else replay.labels(epoch, b, idx[rows])
                loss = kd_loss(out, target, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            steps += 1
            n_rows = rows.stop - rows.start
            total += float(loss.detach()) * n_rows
            seen += n_rows
        history.append(_epoch_record(epoch, total, seen, optimizer, world, device))
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
    bar.close()
    result = _validated(student, val_loader_fn, device, int(ev.val_limit), world)
    result.update(epochs=epochs, seconds=time.perf_counter() - start, history=history, seed=seed,
                  label_mode=labeler, steps=steps, world_size=world, dropped_per_epoch=dropped)
    if return_model:
        result["model"] = student
    return result


def train_student_soft(images_uint8: torch.Tensor, soft_labels: torch.Tensor, cfg, seed: int, device, lr: float,
                       val_loader_fn: Callable[[], Any] | None = None, num_classes: int | None = None,
                       rank: int | None = None, world_size: int | None = None, progress: bool = True,
                       desc: str = "student") -> dict[str, Any]:
    """Train a fresh cfg.eval.student on images (uint8 or normalised float, (N, C, H, W)) with fixed
    per-image soft labels (N, num_classes) under TESLA's protocol (module docstring; settings in
    cfg.eval.tesla, the lr given) and validate it. Returns what train_student returns
    (label_mode 'soft', plus lr)."""
    from .synth.dsa import apply_dsa, parse_strategy, sample_dsa

    rank, world = _check_world(rank, world_size)
    progress = progress and rank == 0
    et = cfg.eval.tesla
    device = torch.device(device)
    n_img = len(images_uint8)
    if n_img == 0:
        raise EngineError("train_student_soft: no images to train on")
    soft_labels = torch.as_tensor(soft_labels)
    if soft_labels.dim() != 2 or len(soft_labels) != n_img:
        raise EngineError(f"train_student_soft: soft labels of shape {tuple(soft_labels.shape)} for {n_img} images "
                          "(expected one probability row per image)")
    if not bool(torch.isfinite(soft_labels).all()):
        raise EngineError("train_student_soft: non-finite soft labels")
    if num_classes is None:
        num_classes = soft_labels.shape[1]
    if soft_labels.shape[1] != num_classes:
        raise EngineError(f"train_student_soft: soft labels over {soft_labels.shape[1]} classes, "
                          f"the student has {num_classes}")
    epochs, batch_size, lr = int(et.epochs), int(et.batch_size), float(lr)
    if epochs < 1:
        raise ConfigError(f"eval.tesla.epochs: expected a positive number, got {epochs}")
    if batch_size < 1:
        raise ConfigError(f"eval.tesla.batch_size: expected a positive number, got {batch_size}")
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"evaluate: the student lr (the learned step size, or eval.tesla.lr) must be a finite "
                          f"positive number, got {lr}")
    strategy = et.dsa_strategy or None
    parse_strategy(strategy)
    _, dropped = _batch_plan(n_img, batch_size, world, "eval.tesla.batch_size")
    student = create_student(cfg, num_classes, seed, int(images_uint8.shape[-1])).to(device)
    model = _wrap_data_parallel(student, device) if world > 1 else student
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=float(et.momentum),
                                weight_decay=float(et.weight_decay))
    decay_epoch = int(epochs * float(et.lr_decay_at))
    x_all = normalise_images(images_uint8, list(cfg.data.mean), list(cfg.data.std)).to(device)
    targets = soft_labels.to(device=device, dtype=torch.float32)
    size = tuple(x_all.shape[-2:])
    history = []
    steps = 0
    start = time.perf_counter()
    bar = progress_bar(range(epochs), desc=desc, unit="epoch", disable=not progress)
    for epoch in bar:
        if epoch == decay_epoch and epoch > 0:
            for group in optimizer.param_groups:
                group["lr"] = lr * float(et.lr_decay_factor)
        model.train()
        total, seen = 0.0, 0
        for b, idx in enumerate(epoch_batches(n_img, batch_size, seed, epoch)):
            rows = _rows(len(idx), rank, world)
            draw = sample_dsa(strategy, len(idx), size, seed, "tesla-eval-dsa", epoch, b)
            aug = apply_dsa(x_all[idx.to(device)], draw)[rows]
            out = model(aug)
            loss = F.cross_entropy(out, targets[idx[rows].to(device)])  # soft targets: -sum p log q, batch mean
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            n_rows = rows.stop - rows.start
            total += float(loss.detach()) * n_rows
            seen += n_rows
        history.append(_epoch_record(epoch, total, seen, optimizer, world, device))
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
    bar.close()
    result = _validated(student, val_loader_fn, device, int(cfg.eval.val_limit), world)
    result.update(epochs=epochs, seconds=time.perf_counter() - start, history=history, seed=seed,
                  label_mode=SOFT_MODE, steps=steps, world_size=world, dropped_per_epoch=dropped, lr=lr)
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


def _relabel(teacher: torch.nn.Module, images: torch.Tensor, cfg, device, rank: int, world: int,
             progress: bool) -> dict:
    """Stored labels for `images` (stream seed cfg.seed). Data parallel: rank r records
    epochs [r * E / W, (r + 1) * E / W) over all images and the parts are all-gathered
    and merged -- the same labels as one process recording every epoch."""
    args = (teacher, images, list(cfg.data.mean), list(cfg.data.std), int(cfg.eval.epochs),
            int(cfg.eval.batch_size), int(cfg.seed), cfg.relabel, device)
    if world == 1:
        return relabel_stored(*args, progress=progress)
    import torch.distributed as dist

    epochs = int(cfg.eval.epochs)
    e0, e1 = rank * epochs // world, (rank + 1) * epochs // world
    part = relabel_stored(*args, epoch_range=(e0, e1), progress=progress) if e1 > e0 else None
    parts: list[dict | None] = [None] * world
    dist.all_gather_object(parts, part)
    return merge_labels([p for p in parts if p is not None])


def evaluate_sets(distilled_images: torch.Tensor, distilled_labels, teacher: torch.nn.Module | None, cfg, device,
                  val_loader_fn: Callable[[], Any], random_real: tuple[torch.Tensor, Any] | None = None,
                  num_classes: int | None = None, label_mode: str | None = None,
                  stored: dict[str, dict] | None = None, hard_control: bool | None = None, method: str | None = None,
                  ipc: int | None = None, rank: int | None = None, world_size: int | None = None,
                  progress: bool = True, soft: dict[str, torch.Tensor] | None = None,
                  soft_lr: float | None = None) -> dict[str, Any]:
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
    eval seed draws its own stream). `hard_control` (default cfg.eval.hard_control):
    also train with hard labels and report it under "hard" (with the per-seed "top1s"). Per set, top1/top5 are the first seed's run;
    top1_mean / top1_std (sample standard deviation) appear with several seeds;
    gain_over_random = distilled mean top-1 - random-real mean top-1 (engine.report.compare
    adds the hard-label gain and Welch t-tests).

    `rank` / `world_size`: data parallel (module docstring); every rank calls this
    with the same arguments except `val_loader_fn`, which gives the rank's val
    shard. Every rank returns the same dict; with W > 1 protocol.data_parallel
    holds the world size, the drop rule and the images each set drops per epoch.

    `label_mode='soft'` (TESLA's protocol): `soft` = {"distilled": (N, C) probabilities,
    "random_real": ...} per set and `soft_lr` the students' SGD lr; train_student_soft
    trains each set (the teacher, when given, is only validated and reported)."""
    rank, world = _check_world(rank, world_size)
    progress = progress and rank == 0
    start = time.perf_counter()
    mode = label_mode or cfg.relabel.mode
    if mode not in LABEL_MODES and mode != SOFT_MODE:
        raise ConfigError(f"relabel.mode '{mode}': expected one of {', '.join(LABEL_MODES)}")
    if mode == SOFT_MODE and (soft is None or soft_lr is None):
        raise EngineError("evaluate: label mode 'soft' needs the soft labels of every set and the student lr")
    if mode not in ("hard", SOFT_MODE) and teacher is None and not (mode == "stored" and stored):
        raise EngineError(f"evaluate: label mode '{mode}' needs a teacher")
    seeds = [int(s) for s in cfg.eval.seeds]
    if hard_control is None:
        hard_control = bool(cfg.eval.hard_control)
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
        t = validate(teacher.to(device), val_loader_fn(), device, int(cfg.eval.val_limit), distributed=world > 1)
        results["teacher"] = {"top1": t["top1"], "top5": t["top5"]}
    val_count = 0
    dropped: dict[str, int] = {}
    for name, (images, labels) in sets.items():
        if mode == "stored" and name not in stored:
            if teacher is None:
                raise EngineError(f"evaluate: label mode 'stored' has no stored labels for the {name} set "
                                  "and no teacher to compute them")
            stored[name] = _relabel(teacher, images, cfg, device, rank, world, progress)
        if mode == SOFT_MODE:
            if name not in soft:
                raise EngineError(f"evaluate: label mode 'soft' has no soft labels for the {name} set")
            runs = [train_student_soft(images, soft[name], cfg, s, device, soft_lr, val_loader_fn=val_loader_fn,
                                       num_classes=num_classes, rank=rank, world_size=world, progress=progress,
                                       desc=f"{name} seed {s}") for s in seeds]
        else:
            runs = [train_student(images, labels, teacher, cfg, s, device, labeler=mode, stored=stored.get(name),
                                  val_loader_fn=val_loader_fn, num_classes=num_classes, rank=rank,
                                  world_size=world, progress=progress, desc=f"{name} seed {s}") for s in seeds]
        val_count = runs[0]["val_count"]
        dropped[name] = runs[0]["dropped_per_epoch"]
        summary = _summary(runs)
        if hard_control and mode != "hard":
            hard_runs = [train_student(images, labels, None, cfg, s, device, labeler="hard",
                                       val_loader_fn=val_loader_fn, num_classes=num_classes, rank=rank,
                                       world_size=world, progress=progress, desc=f"{name} hard seed {s}")
                         for s in seeds]
            h = _summary(hard_runs)
            summary["hard"] = {k: h[k] for k in ("top1", "top1_mean", "top1_std") if k in h}
            summary["hard"]["top1s"] = [r["top1"] for r in hard_runs]
        results[name] = summary
    compare(results)  # gains (soft and hard labels) and Welch t-tests over the seeds
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
    if mode == SOFT_MODE:  # TESLA's protocol replaces the eval.* optimiser, schedule and crops
        et = cfg.eval.tesla
        results["protocol"] = {
            "name": "tesla", "label_mode": SOFT_MODE, "epochs": int(et.epochs), "batch": int(et.batch_size),
            "optimizer": "sgd", "lr": float(soft_lr), "momentum": float(et.momentum),
            "weight_decay": float(et.weight_decay), "weight_decay_on": "every parameter",
            "schedule": f"x{float(et.lr_decay_factor)} from epoch {int(int(et.epochs) * float(et.lr_decay_at))}",
            "loss": "soft-target cross-entropy, no temperature", "augment": f"dsa {et.dsa_strategy or 'none'}",
            "seeds": seeds, "stream_seed": "eval seed",
            "student": {"name": ev.student.name, "width": int(ev.student.width)},
            "val_limit": int(ev.val_limit), "val_count": val_count}
    if world > 1:
        results["protocol"]["data_parallel"] = {
            "world_size": world, "uneven_batches": "drop the last batch_size % world_size images of each batch",
            "dropped_per_epoch": dropped}
    results["timing_s"] = {"evaluate": round(time.perf_counter() - start, 3)}
    return results
