"""Train (supervised or SimCLR + linear probe) or import the teacher; validate; save."""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from .. import store
from ..config import config_hash
from ..data import create_loader, loader_from_config, shard_info
from ..data.transforms import normalizer
from ..errors import EngineError
from ..metrics import accuracy
from ..models import create_model, load_checkpoint, save_checkpoint
from ..models.checkpoint import read_checkpoint
from ..progress import progress
from ..seeding import derive_seed
from .simclr import ProjectionHead, feature_dim, nt_xent, pooled_features, view_augment

MODES = ("ssl", "supervised", "checkpoint")


def teacher_dir(out: str) -> str:
    return store.join(out, "teacher")


def teacher_model_args(cfg, num_classes: int) -> dict:
    m = cfg.teacher.model
    return {"name": m.name, "num_classes": num_classes, "in_chans": cfg.data.channels,
            "small_input": m.small_input, "width": m.width, "image_size": cfg.data.image_size}


def _build(args: dict):
    return create_model(args["name"], args["num_classes"], in_chans=args["in_chans"],
                        small_input=args["small_input"], width=args["width"], image_size=args["image_size"])


def _steps(n: int, limit: int, batch: int) -> int:
    return math.ceil((min(n, limit) if limit else n) / batch)


def _cosine(opt, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))


def _step(opt, sched, loss) -> float:
    """One optimiser + scheduler step; returns the loss value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def _limited(loader, limit: int):
    seen = 0
    for x, y in loader:
        if limit and seen >= limit:
            return
        yield x, y
        seen += len(y)


def train_supervised(model, cfg, locs, device, show_progress=True) -> list[dict]:
    t = cfg.teacher
    n = shard_info(locs["train"], cfg.data.train_split)["num_samples"]
    steps = _steps(n, 0, t.batch_size) * t.epochs
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=0.9, nesterov=True, weight_decay=t.weight_decay)
    sched = _cosine(opt, steps)
    history = []
    model.train()
    for epoch in range(t.epochs):
        loader = create_loader(locs["train"], t.batch_size, split=cfg.data.train_split, preset=cfg.data.train_preset,
                               image_size=cfg.data.image_size, crop_pct=cfg.data.crop_pct, channels=cfg.data.channels,
                               mean=list(cfg.data.mean), std=list(cfg.data.std), shuffle=True,
                               shuffle_buffer=cfg.data.shuffle_buffer, seed=derive_seed(cfg.seed, "teacher", epoch),
                               num_workers=cfg.data.num_workers, scale=tuple(cfg.data.train_scale))
        bar = progress(loader, total=_steps(n, 0, t.batch_size),
                       desc=f"teacher supervised {epoch + 1}/{t.epochs}", unit="batch", disable=not show_progress)
        total, count = 0.0, 0
        for x, y in bar:
            loss = _step(opt, sched, F.cross_entropy(model(x.to(device)), y.to(device)))
            total, count = total + loss * len(y), count + len(y)
            bar.set_postfix(loss=f"{total / count:.3f}")
        history.append({"epoch": epoch, "phase": "supervised", "loss": round(total / max(count, 1), 4)})
    return history


def train_simclr(model, cfg, locs, device, show_progress=True) -> list[dict]:
    """Self-supervised pretraining of the backbone: no labels are read."""
    t = cfg.teacher
    n = shard_info(locs["train"], cfg.data.train_split)["num_samples"]
    head = ProjectionHead(feature_dim(model), t.ssl_proj_dim).to(device)
    params = list(model.parameters()) + list(head.parameters())
    steps = _steps(n, t.ssl_train_limit, t.batch_size) * t.ssl_epochs
    opt = torch.optim.SGD(params, lr=t.ssl_lr, momentum=0.9, weight_decay=t.weight_decay)
    sched = _cosine(opt, steps)
    aug = view_augment(cfg.data.image_size, cfg.data.channels)
    norm = normalizer(list(cfg.data.mean), list(cfg.data.std))
    history = []
    model.train()
    for epoch in range(t.ssl_epochs):
        torch.manual_seed(derive_seed(cfg.seed, "simclr-views", epoch))
        loader = create_loader(locs["train"], t.batch_size, split=cfg.data.train_split, preset="raw",
                               channels=cfg.data.channels, normalize=False, shuffle=True,
                               shuffle_buffer=cfg.data.shuffle_buffer, seed=derive_seed(cfg.seed, "ssl", epoch),
                               num_workers=cfg.data.num_workers, image_size=cfg.data.image_size)
        bar = progress(_limited(loader, t.ssl_train_limit), total=_steps(n, t.ssl_train_limit, t.batch_size),
                       desc=f"teacher simclr {epoch + 1}/{t.ssl_epochs}", unit="batch", disable=not show_progress)
        total, count = 0.0, 0
        for x, _ in bar:  # labels deliberately unused
            v1 = norm(torch.stack([aug(im) for im in x])).to(device)
            v2_ = norm(torch.stack([aug(im) for im in x])).to(device)
            loss = _step(opt, sched, nt_xent(head(pooled_features(model, v1)), head(pooled_features(model, v2_)),
                                             t.ssl_temperature))
            total, count = total + loss * len(x), count + len(x)
            bar.set_postfix(loss=f"{total / count:.3f}")
        history.append({"epoch": epoch, "phase": "simclr", "loss": round(total / max(count, 1), 4)})
    return history


def linear_probe(model, cfg, locs, device, show_progress=True) -> list[dict]:
    """Train only the classifier head on frozen features (features computed once, eval mode)."""
    t = cfg.teacher
    model.eval()
    loader = loader_from_config(cfg.data, locs["train"], cfg.data.train_split, train=False)
    feats, labels = [], []
    with torch.no_grad():
        for x, y in progress(loader, desc="probe features", unit="batch",
                             disable=not show_progress):
            feats.append(pooled_features(model, x.to(device)).cpu())
            labels.append(y)
    f, y = torch.cat(feats), torch.cat(labels)
    head = model.fc if hasattr(model, "fc") else model.get_classifier()
    head.reset_parameters()
    opt = torch.optim.SGD(head.parameters(), lr=t.probe_lr, momentum=0.9)
    bs = t.batch_size
    steps = math.ceil(len(y) / bs) * t.probe_epochs
    sched = _cosine(opt, steps)
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, "probe"))
    history = []
    for epoch in range(t.probe_epochs):
        perm = torch.randperm(len(y), generator=g)
        total = 0.0
        for i in range(0, len(y), bs):
            idx = perm[i:i + bs]
            total += _step(opt, sched, F.cross_entropy(head(f[idx].to(device)), y[idx].to(device))) * len(idx)
        history.append({"epoch": epoch, "phase": "probe", "loss": round(total / len(y), 4)})
    return history


def run_squeeze(cfg, out: str, locs: dict, device, show_progress: bool = True) -> dict:
    """Produce OUT/teacher/{teacher.pt, manifest.json}; skipped when it exists for this config."""
    t = cfg.teacher
    if t.mode not in MODES:
        raise EngineError(f"config key 'teacher.mode': expected one of {', '.join(MODES)}, got '{t.mode}'")
    tdir = teacher_dir(out)
    settings = {"teacher": _plain(t), "data": {k: _plain(getattr(cfg.data, k)) for k in
                                               ("channels", "image_size", "mean", "std", "train", "source")}}
    if store.exists(store.join(tdir, store.MANIFEST)):
        m = store.read_json(store.join(tdir, store.MANIFEST))
        if m.get("settings") == settings:
            return {"skipped": True, "manifest": m}
        raise EngineError(f"{tdir}: holds a teacher made with other settings; use another --out or delete it")
    info = shard_info(locs["train"], cfg.data.train_split)
    num_classes = len(info["classes"])
    args = teacher_model_args(cfg, num_classes)
    torch.manual_seed(derive_seed(cfg.seed, "teacher-init"))
    model = _build(args).to(device)
    t0 = time.time()
    history: list[dict] = []
    if t.mode == "checkpoint":
        if not t.checkpoint:
            raise EngineError("config key 'teacher.checkpoint': needed with teacher.mode=checkpoint")
        ck = read_checkpoint(t.checkpoint)
        got = ck.get("model", {}).get("num_classes")
        if got is not None and got != num_classes:
            raise EngineError(f"{t.checkpoint}: teacher has {got} classes but the data has {num_classes}")
        load_checkpoint(t.checkpoint, model)
    elif t.mode == "supervised":
        history += train_supervised(model, cfg, locs, device, show_progress)
    else:
        history += train_simclr(model, cfg, locs, device, show_progress)
        history += linear_probe(model, cfg, locs, device, show_progress)
        if t.finetune_epochs:
            sup = cfg.copy()
            sup.teacher.epochs, sup.teacher.lr = t.finetune_epochs, t.finetune_lr
            history += train_supervised(model, sup, locs, device, show_progress)
    train_s = time.time() - t0
    val = accuracy(model, loader_from_config(cfg.data, locs["val"], cfg.data.val_split, train=False), device,
                   limit=cfg.eval.val_limit)
    save_checkpoint(store.join(tdir, "teacher.pt"), model, args, {"val": val})
    manifest = {"stage": "squeeze", "mode": t.mode, "model": args, "val": val, "history": history,
                "settings": settings, "config_hash": config_hash(cfg), "seed": cfg.seed,
                "timing_s": round(train_s, 1), "classes": info["classes"]}
    store.write_manifest(tdir, manifest, files=["teacher.pt"])
    return {"skipped": False, "manifest": store.read_json(store.join(tdir, store.MANIFEST))}


def load_teacher(out_or_dir: str, num_classes: int | None = None, device="cpu"):
    """The frozen teacher (eval mode) and its manifest from OUT/teacher or a teacher directory."""
    tdir = out_or_dir if store.exists(store.join(out_or_dir, "teacher.pt")) else teacher_dir(out_or_dir)
    manifest = store.read_manifest(tdir, verify=True)
    args = manifest["model"]
    if num_classes is not None and args["num_classes"] != num_classes:
        raise EngineError(f"{tdir}: teacher has {args['num_classes']} classes but the data has {num_classes}")
    model = _build(args)
    load_checkpoint(store.join(tdir, "teacher.pt"), model)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, manifest


def _plain(v):
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(v, resolve=True)
    except ValueError:
        return v
