"""The TESLA stages (issue 5): expert trajectories, IPC-slice synthesis and the evaluation inputs.

    experts     OUT/experts/expert_0000.pt ...: {"snapshots": {epoch: flat parameters}, ...} per expert,
                trained as units on the coordinator (one expert per unit), + manifest.json
                (architecture, class count, saved epochs, val accuracy and seconds per expert)
    synthesize  IPC slices (all classes, a range of IPC indices each) as units; each loads the experts
                once per worker, starts from real images (distinct per class and IPC index) or noise,
                runs engine.synth.tesla.distill and returns uint8 images, their soft labels and its
                learned step size. The merge writes OUT/distilled/ (as SC-DD does) and
                OUT/labels/tesla_soft.pt (soft labels in distilled order + every slice's alpha).
    evaluate    `tesla_eval_inputs` gives engine.evaluate.evaluate_sets its arguments: protocol `tesla`
                (the stored soft labels, SGD at the mean learned alpha, DSA; the random-real control
                labelled by the same expert) or `kd` (the labelling expert as an online teacher).

Pure PyTorch: the coordinator (engine.cluster) runs the unit factories `experts_worker` and
`tesla_worker` in this process or on Ray actors. Seeds derive from content: expert k from
(seed, "expert", k); a slice's iterations, batches and DSA draws from (seed, "tesla", its class and
IPC range); initial noise from (seed, "tesla-noise", class, IPC index).

Memory: a synthesis worker holds every expert's snapshots 0 .. max_start_epoch - 1 + expert_epochs
(num_experts x that many x |theta| x 4 bytes: 20 experts x 13 x 10 MB = 2.6 GB for ConvNetD4 at 64 px
with 1000 classes). The experts stage holds its training images as one float tensor (Fashion-MNIST:
190 MB; ImageNet-1K at 64 px would need ~63 GB: use experts.train_limit or a streaming trainer).
"""
from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass

import torch

from .. import store
from ..errors import ConfigError, EngineError

EXPERTS = "experts"
SOFT_LABELS = "labels/tesla_soft.pt"
SOFT_FORMAT = "tesla-soft-labels-v1"
CONVNETS = ("convnetd3", "convnetd4", "convnetd5")
PROTOCOLS = ("kd", "tesla")


@dataclass(frozen=True)
class ExpertUnit:
    """One expert trajectory as a unit of work on the coordinator."""
    stage: str
    index: int
    num_images: int  # training images x epochs (the coordinator's images/s)

    @property
    def id(self) -> str:
        return f"expert{self.index:04d}"


# ---------------------------------------------------------------------------
# settings, model, data
# ---------------------------------------------------------------------------

def _plain(v):
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(v, resolve=True)
    except ValueError:
        return v


def expert_model_args(cfg, num_classes: int) -> dict:
    m = cfg.experts.model
    return {"name": str(m.name).lower(), "num_classes": int(num_classes), "in_chans": int(cfg.data.channels),
            "width": int(m.width), "norm": str(m.norm), "image_size": int(cfg.data.image_size)}


def build_expert_model(args: dict):
    from ..models import create_model

    if args["name"] not in CONVNETS:
        raise ConfigError(f"config key 'experts.model.name' is '{args['name']}': trajectory matching runs a "
                          f"ConvNet ({', '.join(CONVNETS)})")
    return create_model(args["name"], args["num_classes"], in_chans=args["in_chans"], width=args["width"],
                        image_size=args["image_size"], norm=args["norm"])


def _describe(args: dict) -> str:
    return (f"{args['name']} (width {args['width']}, {args['norm']} norm, {args['in_chans']} channel(s), "
            f"{args['image_size']} px) for {args['num_classes']} classes")


def experts_settings(cfg) -> dict:
    """What the expert trajectories depend on (a different value means other experts)."""
    ex = {k: v for k, v in _plain(cfg.experts).items() if k != "location"}
    data = {k: _plain(getattr(cfg.data, k)) for k in ("source", "train", "train_split", "channels", "image_size",
                                                       "crop_pct", "mean", "std")}
    return {"experts": ex, "data": data, "seed": int(cfg.seed)}


def synth_settings(cfg) -> dict:
    return {"tesla": _plain(cfg.synth.tesla), "ipc": int(cfg.synth.ipc), "ipc_per_unit": int(cfg.synth.ipc_per_unit),
            "seed": int(cfg.seed), "method": "tesla", "experts": experts_settings(cfg)}


def experts_dir(cfg, out: str) -> str:
    return cfg.experts.location or store.join(out, EXPERTS)


def _classes(cfg, locs) -> list[str]:
    from ..data import shard_info

    return shard_info(locs["train"], cfg.data.train_split)["classes"]


def fit_size(images, size: int, crop_pct: float) -> torch.Tensor:
    """uint8 (C, H, W) images to size x size: unchanged when they are, else the eval geometry
    (short side to size / crop_pct, centre crop), as the readers' eval preset."""
    from ..data.transforms import build_transform

    tf = None
    out = []
    for im in images:
        if tuple(im.shape[-2:]) != (size, size):
            tf = tf or build_transform("eval", size, crop_pct, normalize=False)
            im = tf(im)
        out.append(im)
    return torch.stack(out)


def real_images(cfg, uri: str, split: str, keys: list[str]) -> torch.Tensor:
    """uint8 (N, C, S, S) images for `keys`, in that order."""
    from ..data.realsets import load_images

    found = load_images(uri, split, keys, cfg.data.channels)
    return fit_size([found[k] for k in keys], int(cfg.data.image_size), float(cfg.data.crop_pct))


def training_set(cfg, locs) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts' training images (uint8) and labels: the whole split, or a seeded class-balanced
    subset of experts.train_limit images (the same in every worker)."""
    import numpy as np

    from ..data.realsets import pick_per_class, scan_labels

    keys, labels = scan_labels(locs["train"], cfg.data.train_split)
    limit = int(cfg.experts.train_limit)
    if limit:
        num_classes = int(labels.max()) + 1
        per = max(1, limit // num_classes)
        picks = pick_per_class(labels, list(range(num_classes)), per, cfg.seed, "experts-subset")
        pos = sorted(i for c in picks for i in picks[c])
    else:
        pos = list(range(len(keys)))
    images = real_images(cfg, locs["train"], cfg.data.train_split, [keys[i] for i in pos])
    return images, torch.from_numpy(np.asarray(labels[pos], dtype=np.int64))


def normalise(images_uint8: torch.Tensor, cfg) -> torch.Tensor:
    from ..labels import normalise_images

    return normalise_images(images_uint8, list(cfg.data.mean), list(cfg.data.std))


def to_uint8(x: torch.Tensor, cfg) -> torch.Tensor:
    """Normalised float images -> uint8 pixels (denormalise, clamp to [0, 1], round)."""
    c = x.shape[1]
    mean = torch.tensor(list(cfg.data.mean), dtype=torch.float32).view(1, c, 1, 1)
    std = torch.tensor(list(cfg.data.std), dtype=torch.float32).view(1, c, 1, 1)
    pixels = (x.detach().float().cpu() * std + mean).clamp_(0, 1)
    return torch.round(pixels * 255).to(torch.uint8)


def _save_pt(url: str, obj) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    store.write_bytes(url, buf.getvalue())


def _load_pt(url: str):
    return torch.load(io.BytesIO(store.read_bytes(url)), map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------
# config checks (before any worker starts)
# ---------------------------------------------------------------------------

def check_experts_config(cfg) -> None:
    e = cfg.experts
    for key, v in (("num_experts", e.num_experts), ("epochs", e.epochs), ("batch_size", e.batch_size),
                   ("model.width", e.model.width)):
        if int(v) < 1:
            raise ConfigError(f"config key 'experts.{key}': expected at least 1, got {v}")
    if not (math.isfinite(e.lr) and e.lr > 0):
        raise ConfigError(f"config key 'experts.lr': expected a positive number, got {e.lr}")
    if int(e.train_limit) < 0:
        raise ConfigError(f"config key 'experts.train_limit': expected 0 (all) or more, got {e.train_limit}")
    bad = [s for s in e.save_epochs if not 0 <= int(s) <= int(e.epochs)]
    if bad:
        raise ConfigError(f"config key 'experts.save_epochs': epoch {bad[0]} outside 0..{e.epochs}")
    build_expert_model(expert_model_args(cfg, 2))


def needed_epochs(cfg) -> int:
    """The last expert epoch distillation reads: max_start_epoch - 1 + expert_epochs."""
    t = cfg.synth.tesla
    return int(t.max_start_epoch) - 1 + int(t.expert_epochs)


def check_tesla_config(cfg) -> None:
    """Every distill setting, checked up front with the config key in the message."""
    from ..synth.tesla import LABEL_MODES, MODES
    from .dsa import parse_strategy

    t = cfg.synth.tesla
    if t.mode not in MODES:
        raise ConfigError(f"config key 'synth.tesla.mode' is '{t.mode}': expected one of {', '.join(MODES)}")
    if t.label_mode not in LABEL_MODES:
        raise ConfigError(f"config key 'synth.tesla.label_mode' is '{t.label_mode}': expected one of "
                          f"{', '.join(LABEL_MODES)}")
    if t.init not in ("real", "noise"):
        raise ConfigError(f"config key 'synth.tesla.init' is '{t.init}': expected real or noise")
    for key in ("syn_steps", "expert_epochs", "max_start_epoch"):
        v = getattr(t, key)
        if int(v) < 1:
            raise ConfigError(f"config key 'synth.tesla.{key}': expected at least 1, got {v}")
    if int(t.iterations) < 0 or int(t.batch_syn) < 0:
        raise ConfigError("config keys 'synth.tesla.iterations' and 'synth.tesla.batch_syn': expected 0 or more")
    for key in ("lr_img", "lr_lr"):
        v = float(getattr(t, key))
        if not (math.isfinite(v) and v >= 0):
            raise ConfigError(f"config key 'synth.tesla.{key}': expected a finite number of 0 or more, got {v}")
    if not (math.isfinite(float(t.syn_lr_init)) and t.syn_lr_init > 0):
        raise ConfigError(f"config key 'synth.tesla.syn_lr_init': expected a finite positive learning rate, "
                          f"got {t.syn_lr_init}")
    for key in ("momentum_img", "momentum_lr"):
        v = float(getattr(t, key))
        if not 0 <= v < 1:
            raise ConfigError(f"config key 'synth.tesla.{key}': expected a value in [0, 1), got {v}")
    if int(t.label_expert) < 0 or int(t.label_expert) >= int(cfg.experts.num_experts):
        raise ConfigError(f"config key 'synth.tesla.label_expert' is {t.label_expert}: expected an expert index "
                          f"below experts.num_experts ({cfg.experts.num_experts})")
    parse_strategy(t.dsa_strategy)
    parse_strategy(cfg.eval.tesla.dsa_strategy)


def check_experts_manifest(cfg, manifest: dict, num_classes: int, where: str) -> None:
    """The saved experts must be of the configured architecture and class count, and hold every
    snapshot distillation needs."""
    want = expert_model_args(cfg, num_classes)
    got = manifest.get("model", {})
    if int(got.get("num_classes", -1)) != num_classes:
        raise ConfigError(f"{where}: the experts were trained for {got.get('num_classes')} classes, the data has "
                          f"{num_classes}")
    keys = ("name", "width", "norm", "in_chans", "image_size")
    if any(got.get(k) != want[k] for k in keys):
        raise ConfigError(f"{where}: the experts are {_describe(got)}, the config asks for {_describe(want)} "
                          f"(experts.model, data.channels, data.image_size)")
    last = needed_epochs(cfg)
    saved = [int(e) for e in manifest.get("saved_epochs", [])]
    missing = [e for e in range(last + 1) if e not in saved]
    if missing:
        span = f"{min(saved)}..{max(saved)}" if saved else "none"
        raise ConfigError(f"{where}: the experts hold epochs {span}, but synth.tesla.max_start_epoch "
                          f"({cfg.synth.tesla.max_start_epoch}) + expert_epochs ({cfg.synth.tesla.expert_epochs}) "
                          f"needs epoch {missing[0]} (a start epoch beyond the saved snapshots)")
    n = len(manifest.get("experts", []))
    if int(cfg.synth.tesla.label_expert) >= n:
        raise ConfigError(f"config key 'synth.tesla.label_expert' is {cfg.synth.tesla.label_expert}: {where} "
                          f"holds {n} experts")


def read_experts_manifest(cfg, out: str, num_classes: int) -> tuple[str, dict]:
    d = experts_dir(cfg, out)
    url = store.join(d, store.MANIFEST)
    if not store.exists(url):
        raise EngineError(f"{url}: no experts (run `python -m engine experts` first, or set experts.location)")
    m = store.read_json(url)
    check_experts_manifest(cfg, m, num_classes, url)
    return d, m


def load_experts(d: str, manifest: dict, epochs: range) -> list[dict[int, torch.Tensor]]:
    """Every expert's snapshots for `epochs`, as {epoch: flat CPU tensor}."""
    out = []
    for e in manifest["experts"]:
        snaps = _load_pt(store.join(d, e["file"]))["snapshots"]
        out.append({int(k): snaps[k] for k in epochs})
    return out


# ---------------------------------------------------------------------------
# experts stage
# ---------------------------------------------------------------------------

def experts_worker(config: dict, out: str, locs: dict):
    """Unit factory: load the training images once, return `work(unit)` that trains one expert,
    writes OUT/experts/expert_XXXX.pt and returns its summary."""
    from ..config import from_dict
    from ..data import loader_from_config
    from ..metrics import accuracy
    from ..models.functional import load_flat_params, num_params
    from ..runtime import pick_device
    from .experts import train_expert

    cfg = from_dict(config)
    device = pick_device(cfg.device)
    classes = _classes(cfg, locs)
    images_u8, labels = training_set(cfg, locs)
    images = normalise(images_u8, cfg).to(device)
    labels = labels.to(device)
    args = expert_model_args(cfg, len(classes))
    model = build_expert_model(args)
    e = cfg.experts
    save = None if not len(e.save_epochs) else [int(v) for v in e.save_epochs]
    dest = experts_dir(cfg, out)
    settings = experts_settings(cfg)

    def work(unit: ExpertUnit):
        t0 = time.perf_counter()
        seed = (int(cfg.seed), "expert", unit.index)
        traj = train_expert(model, images, labels, epochs=int(e.epochs), lr=float(e.lr), momentum=float(e.momentum),
                            weight_decay=float(e.weight_decay), batch_size=int(e.batch_size),
                            lr_decay_epochs=[int(v) for v in e.lr_decay_epochs],
                            lr_decay_factor=float(e.lr_decay_factor), dsa_strategy=e.dsa_strategy or None,
                            ce_scale_schedule=[float(v) for v in e.ce_scale_schedule],
                            grad_penalty=float(e.grad_penalty), save_epochs=save, seed=seed)
        name = f"expert_{unit.index:04d}.pt"
        _save_pt(store.join(dest, name), {"snapshots": traj.snapshots, "index": unit.index, "model": args,
                                          "seed": list(seed)})
        last = max(traj.snapshots)
        net = build_expert_model(args)
        load_flat_params(net, traj.snapshots[last])
        val = accuracy(net.to(device), loader_from_config(cfg.data, locs["val"], cfg.data.val_split, train=False),
                       device, limit=int(e.val_limit))
        summary = {"index": unit.index, "file": name, "seed": list(seed), "val_epoch": last,
                   "val_top1": round(val["top1"], 3), "val_top5": round(val["top5"], 3), "val_count": val["count"],
                   "train_accuracy": [round(a, 3) for a in traj.train_accuracy],
                   "train_loss": [round(v, 5) for v in traj.train_loss], "train_seconds": round(traj.seconds, 2),
                   "seconds": round(time.perf_counter() - t0, 2), "num_params": num_params(model)}
        return {"summary": summary, "settings": settings}, {**summary,
                                                            "train_images": int(len(labels)),
                                                            "threads": torch.get_num_threads(), "device": str(device)}

    return work


def run_experts(cfg, out: str, locs: dict, device=None, show_progress: bool = True) -> dict:
    """Train cfg.experts.num_experts expert trajectories as units; skipped when OUT/experts holds
    experts made with these settings, an error when it holds others."""
    from ..cluster.coordinator import run_and_merge
    from ..cluster.unitstore import UnitMissing, load_unit
    from ..config import config_hash, to_dict
    from ..data import shard_info
    from ..models.functional import num_params

    check_experts_config(cfg)
    if cfg.experts.location:
        raise ConfigError(f"config key 'experts.location' is '{cfg.experts.location}': the experts stage writes "
                          "OUT/experts; leave it empty here (it tells synthesis where experts made elsewhere are)")
    dest = experts_dir(cfg, out)
    settings = experts_settings(cfg)
    murl = store.join(dest, store.MANIFEST)
    if store.exists(murl):
        m = store.read_json(murl)
        if m.get("settings") == settings:
            return {"skipped": True, "manifest": m}
        raise EngineError(f"{dest}: holds experts made with other settings; use another --out or delete it")
    info = shard_info(locs["train"], cfg.data.train_split)
    classes = info["classes"]
    n_train = int(info["num_samples"])
    if int(cfg.experts.train_limit):
        per = max(1, int(cfg.experts.train_limit) // len(classes))
        short = {c: n for c, n in (info.get("labels_per_class") or {}).items() if int(n) < per}
        if short:
            c = sorted(short)[0]
            raise ConfigError(f"config key 'experts.train_limit' ({cfg.experts.train_limit}): class {c} has "
                              f"{short[c]} training images, {per} per class requested")
        n_train = per * len(classes)
    e = cfg.experts
    units = [ExpertUnit(EXPERTS, k, n_train * int(e.epochs)) for k in range(int(e.num_experts))]
    args = expert_model_args(cfg, len(classes))
    t0 = time.time()

    def merge(stats):
        entries = []
        for u in units:
            res, _ = load_unit(out, u)
            if res.get("settings") != settings:
                raise EngineError(f"{store.join(out, 'units', u.stage, u.id)}: an expert trained with other settings; "
                                  "delete OUT/units/experts or use another --out")
            if not store.exists(store.join(dest, res["summary"]["file"])):
                raise UnitMissing(u, f"{res['summary']['file']} is missing")
            entries.append(res["summary"])
        saved = sorted(int(v) for v in e.save_epochs) if len(e.save_epochs) else list(range(int(e.epochs) + 1))
        top1 = [x["val_top1"] for x in entries]
        manifest = {"stage": "experts", "model": {**args, "num_params": num_params(build_expert_model(args))},
                    "num_classes": len(classes), "classes": classes, "epochs": int(e.epochs),
                    "saved_epochs": saved, "num_experts": len(entries), "train_images": n_train,
                    "val_top1_mean": round(sum(top1) / len(top1), 3), "experts": entries, "settings": settings,
                    "units": stats, "timing_s": round(time.time() - t0, 1), "config_hash": config_hash(cfg),
                    "seed": int(cfg.seed)}
        store.write_manifest(dest, manifest, files=[x["file"] for x in entries])
        return manifest

    stats, manifest = run_and_merge(out, units, experts_worker, {"config": to_dict(cfg), "out": out, "locs": locs},
                                    cfg, merge, desc="experts", show_progress=show_progress)
    return {"skipped": False, "manifest": manifest, "units": stats}


# ---------------------------------------------------------------------------
# synthesis: IPC slices
# ---------------------------------------------------------------------------

def slice_seed(cfg, unit) -> tuple:
    return (int(cfg.seed), "tesla", unit.first_class, unit.last_class, unit.ipc_start, unit.ipc_end)


def initial_images(cfg, locs, unit, labels_cache) -> tuple[torch.Tensor, list[str] | None]:
    """Normalised float starting images of a slice, class-major (for c: for IPC index): real images
    of their class, distinct per (class, IPC index) and a seeded choice, or N(0, 1) noise per
    (class, IPC index)."""
    from ..data.realsets import pick_per_class

    t = cfg.synth.tesla
    if t.init == "real":
        keys, labels = labels_cache()
        picks = pick_per_class(labels, unit.classes, int(cfg.synth.ipc), cfg.seed, "tesla-init")
        chosen = [keys[picks[c][i]] for c in unit.classes for i in range(unit.ipc_start, unit.ipc_end)]
        return normalise(real_images(cfg, locs["train"], cfg.data.train_split, chosen), cfg), chosen
    from ..seeding import torch_gen

    shape = (int(cfg.data.channels), int(cfg.data.image_size), int(cfg.data.image_size))
    return torch.stack([torch.randn(shape, generator=torch_gen(cfg.seed, "tesla-noise", c, i))
                        for c in unit.classes for i in range(unit.ipc_start, unit.ipc_end)]), None


def tesla_worker(config: dict, out: str, locs: dict):
    """Unit factory: load the experts once, return `work(unit)` that distils one IPC slice."""
    from ..config import from_dict
    from ..data.realsets import cached_labels
    from ..runtime import pick_device
    from .tesla import class_agreement, distill, expert_soft_labels

    cfg = from_dict(config)
    device = pick_device(cfg.device)
    classes = _classes(cfg, locs)
    d, manifest = read_experts_manifest(cfg, out, len(classes))
    last = needed_epochs(cfg)
    experts = load_experts(d, manifest, range(last + 1))
    model = build_expert_model(expert_model_args(cfg, len(classes))).to(device)
    t = cfg.synth.tesla
    label_expert = (int(t.label_expert), last)
    settings = synth_settings(cfg)
    labels_cache = cached_labels(locs["train"], cfg.data.train_split)

    def work(unit):
        init, init_keys = initial_images(cfg, locs, unit, labels_cache)
        cls = torch.tensor([c for c in unit.classes for _ in range(unit.ipc_start, unit.ipc_end)])
        res = distill(model, experts, init.to(device), cls.to(device), iterations=int(t.iterations),
                      syn_steps=int(t.syn_steps), expert_epochs=int(t.expert_epochs),
                      max_start_epoch=int(t.max_start_epoch), batch_syn=int(t.batch_syn) or None,
                      lr_img=float(t.lr_img), lr_lr=float(t.lr_lr), syn_lr_init=float(t.syn_lr_init),
                      momentum_img=float(t.momentum_img), momentum_lr=float(t.momentum_lr), mode=t.mode,
                      label_mode=t.label_mode, label_expert=label_expert, dsa_strategy=t.dsa_strategy or None,
                      seed=slice_seed(cfg, unit))
        images = to_uint8(res.images, cfg)
        # What the student will see: the stored uint8 images. The per_iteration mode stores the labelling
        # expert's soft labels of exactly those; frozen (initial images) and hard labels are kept as made.
        stored_float = normalise(images, cfg).to(device)
        params = experts[label_expert[0]][label_expert[1]].to(stored_float)
        soft = (expert_soft_labels(model, params, stored_float) if t.label_mode == "per_iteration"
                else res.labels).float().cpu()
        agree = class_agreement(model, params, stored_float, cls)
        n = len(cls)
        hist = res.history
        every = max(1, int(t.log_every))
        info = {"seed": list(slice_seed(cfg, unit)), "syn_lr": res.syn_lr,
                "label_mode": t.label_mode, "label_expert": list(label_expert), "mode": t.mode,
                "num_images": n, "iterations": len(hist),
                "agreement_initial": round(res.agreement_initial, 4),
                "agreement_final_float": round(res.agreement_final, 4),
                "agreement_final": round(agree, 4), "agreement_final_count": int(round(agree * n)),
                "losses": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in h.items()
                            if k in ("iteration", "loss", "syn_lr", "expert", "start_epoch")}
                           for h in hist if h["iteration"] % every == 0 or h["iteration"] == len(hist) - 1],
                "seconds_per_iteration": round(sum(h["seconds"] for h in hist) / max(1, len(hist)), 4),
                "init": t.init, "init_keys": init_keys, "threads": torch.get_num_threads(), "device": str(device)}
        if t.init == "real":
            start = to_uint8(init, cfg)
            info["mean_abs_pixel_change"] = round(float((images.float() - start.float()).abs().mean()), 3)
        return {"images": images, "labels": cls, "soft_labels": soft, "syn_lr": res.syn_lr,
                "settings": settings}, info

    return work


def gather_soft_labels(out: str, units: list, settings: dict) -> dict:
    """Soft labels, learned step sizes and class agreement of every slice, in (class, IPC index)
    order (the distilled order), each image exactly once."""
    from ..cluster.unitstore import load_unit

    rows: dict[tuple[int, int], torch.Tensor] = {}
    lrs: dict[str, float] = {}
    agree = {"count": 0, "images": 0}
    for u in units:
        res, man = load_unit(out, u)
        if res.get("settings") != settings:
            raise EngineError(f"{store.join(out, 'units', u.stage, u.id)}: made with other synthesis settings "
                              "(another method or TESLA config); delete OUT/units/synthesize or use another --out")
        soft = res["soft_labels"]
        if not torch.isfinite(soft).all():
            raise EngineError(f"unit {u.id}: non-finite soft labels")
        k = 0
        for c in u.classes:
            for i in range(u.ipc_start, u.ipc_end):
                if (c, i) in rows:
                    raise EngineError(f"unit {u.id}: class {c} IPC index {i} already made by another unit")
                rows[(c, i)] = soft[k]
                k += 1
        lrs[u.id] = float(res["syn_lr"])
        agree["count"] += int(man["agreement_final_count"])
        agree["images"] += int(man["num_images"])
    keys = sorted(rows)
    return {"soft_labels": torch.stack([rows[k] for k in keys]), "keys": keys, "syn_lrs": lrs,
            "syn_lr_mean": sum(lrs.values()) / len(lrs), "agreement": agree}


def run_synthesize_tesla(cfg, out: str, locs: dict, device=None, show_progress: bool = True) -> dict:
    """IPC slices over all classes as units, merged into OUT/distilled/ + OUT/labels/tesla_soft.pt."""
    from ..cluster.coordinator import run_and_merge
    from ..cluster.merge import DISTILLED, merge_distilled, read_distilled
    from ..cluster.plan import plan_units
    from ..config import config_hash, to_dict
    from ..preview import preview_grid

    check_tesla_config(cfg)
    classes = _classes(cfg, locs)
    dest = store.join(out, DISTILLED)
    settings = synth_settings(cfg)
    settings_hash = config_hash(settings)
    if store.exists(store.join(dest, store.MANIFEST)):
        m = store.read_json(store.join(dest, store.MANIFEST))
        if m.get("settings_hash") != settings_hash:
            raise EngineError(f"{dest}: made with other synthesis settings; use another --out or delete it")
        if not store.exists(store.join(out, SOFT_LABELS)):
            raise EngineError(f"{store.join(out, SOFT_LABELS)}: missing beside {dest}; delete {dest} to merge again")
        return {"skipped": True, "manifest": m}
    _, eman = read_experts_manifest(cfg, out, len(classes))  # fails here, before any worker starts
    units = plan_units("synthesize", len(classes), int(cfg.synth.ipc), len(classes), int(cfg.synth.ipc_per_unit))
    t = cfg.synth.tesla
    t0 = time.time()

    def merge(stats):
        g = gather_soft_labels(out, units, settings)
        a = g["agreement"]
        summary = {"syn_lr_per_unit": g["syn_lrs"], "syn_lr_mean": g["syn_lr_mean"], "label_mode": t.label_mode,
                   "label_expert": [int(t.label_expert), needed_epochs(cfg)], "mode": t.mode,
                   "iterations": int(t.iterations), "agreement_final": round(a["count"] / a["images"], 4),
                   "agreement_final_count": a["count"], "soft_labels": SOFT_LABELS}
        # The labels first: a distilled/ manifest then always has its soft labels beside it.
        _save_pt(store.join(out, SOFT_LABELS), {
            "format": SOFT_FORMAT, "soft_labels": g["soft_labels"],
            "classes": torch.tensor([c for c, _ in g["keys"]]), "ipc_index": torch.tensor([i for _, i in g["keys"]]),
            "class_names": classes, "syn_lrs": g["syn_lrs"], "syn_lr_mean": g["syn_lr_mean"],
            "label_mode": t.label_mode, "label_expert": summary["label_expert"], "settings_hash": settings_hash})
        return merge_distilled(out, units, classes, int(cfg.synth.ipc), {
            "method": "tesla", "settings_hash": settings_hash, "seed": int(cfg.seed), "channels": cfg.data.channels,
            "experts": {"model": eman["model"], "num_experts": eman["num_experts"],
                        "val_top1_mean": eman.get("val_top1_mean")},
            "tesla": summary, "units": stats, "timing_s": round(time.time() - t0, 1),
            "config_hash": config_hash(cfg)})

    ran, merged = run_and_merge(out, units, tesla_worker, {"config": to_dict(cfg), "out": out, "locs": locs}, cfg,
                                merge, desc="synthesize", show_progress=show_progress)
    images, labels, names = read_distilled(out)
    preview_grid(images, labels, names, store.join(out, "preview.png"), per_class=min(int(cfg.synth.ipc), 8),
                 title=f"tesla: IPC {cfg.synth.ipc}")
    return {"skipped": False, **merged, "units": ran, "manifest": store.read_json(store.join(dest, store.MANIFEST))}


def load_soft_labels(out: str) -> dict:
    url = store.join(out, SOFT_LABELS)
    if not store.exists(url):
        raise EngineError(f"{url}: no TESLA soft labels (run the synthesize stage with method=tesla)")
    d = _load_pt(url)
    if d.get("format") != SOFT_FORMAT:
        raise EngineError(f"{url}: not a TESLA soft-label file (format {d.get('format')!r})")
    return d


# ---------------------------------------------------------------------------
# evaluation inputs
# ---------------------------------------------------------------------------

def label_expert_model(cfg, out: str, num_classes: int, device):
    """The labelling expert (synth.tesla.label_expert at its last target epoch) as a frozen module,
    and (expert index, epoch, its manifest entry)."""
    from ..models.functional import load_flat_params

    d, m = read_experts_manifest(cfg, out, num_classes)
    k, epoch = int(cfg.synth.tesla.label_expert), needed_epochs(cfg)
    entry = m["experts"][k]
    net = build_expert_model(expert_model_args(cfg, num_classes))
    load_flat_params(net, _load_pt(store.join(d, entry["file"]))["snapshots"][epoch])
    net.to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, (k, epoch, entry)


def random_real_keys(cfg, locs, num_classes: int) -> tuple[list[str], torch.Tensor]:
    """The random-real control's keys and classes: synth.ipc images per class, the same seeded picks
    as SC-DD's control (engine.pipeline.random_real_set)."""
    from ..data.realsets import pick_per_class, scan_labels

    keys, labels = scan_labels(locs["train"], cfg.data.train_split)
    picks = pick_per_class(labels, list(range(num_classes)), int(cfg.synth.ipc), cfg.seed, "random_real")
    return ([keys[i] for c in range(num_classes) for i in picks[c]],
            torch.tensor([c for c in range(num_classes) for _ in picks[c]]))


def random_real_images(cfg, locs, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(uint8 images at data.image_size, classes, keys) of the random-real control."""
    chosen, classes = random_real_keys(cfg, locs, num_classes)
    return real_images(cfg, locs["train"], cfg.data.train_split, chosen), classes, chosen


def tesla_eval_inputs(rank: int | None, world_size: int | None, device, config: dict, out: str, locs: dict) -> dict:
    """engine.evaluate.evaluate_sets' inputs for a TESLA run, read from the store by each evaluation
    worker (or this process); the same signature as engine.pipeline.evaluate_inputs, so it is an
    `inputs_fn` of engine.cluster.train_eval. Protocol `tesla`: label mode `soft` with the stored
    soft labels, the control labelled by the same expert on its own images, the students' lr the
    mean learned step size (or eval.tesla.lr); `kd`: the labelling expert is the teacher of the
    relabel.mode labels (online, or stored computed in memory)."""
    from ..cluster.merge import read_distilled
    from ..config import from_dict
    from ..data import loader_from_config
    from ..models.functional import flatten_params
    from .tesla import expert_soft_labels

    cfg = from_dict(config) if isinstance(config, dict) else config
    device = torch.device(device)
    protocol = cfg.eval.protocol
    if protocol not in PROTOCOLS:
        raise ConfigError(f"config key 'eval.protocol' is '{protocol}': expected one of {', '.join(PROTOCOLS)}")
    images, labels, names = read_distilled(out)
    soft = load_soft_labels(out)
    n, num_classes = len(labels), len(names)
    if tuple(soft["soft_labels"].shape) != (n, num_classes) or not torch.equal(soft["classes"], labels):
        raise EngineError(f"{store.join(out, SOFT_LABELS)}: soft labels do not match distilled/ "
                          f"({tuple(soft['soft_labels'].shape)} for {n} images of {num_classes} classes)")
    expert, _ = label_expert_model(cfg, out, num_classes, device)
    real = random_real_images(cfg, locs, num_classes) if cfg.eval.random_real else None

    def val_loader():
        return loader_from_config(cfg.data, locs["val"], cfg.data.val_split, train=False, rank=rank,
                                  world_size=world_size)

    kwargs = {"distilled_images": images, "distilled_labels": labels, "teacher": expert,
              "val_loader_fn": val_loader, "random_real": (real[0], real[1]) if real else None,
              "num_classes": num_classes, "method": "tesla", "ipc": int(cfg.synth.ipc)}
    if protocol == "tesla":
        sets = {"distilled": soft["soft_labels"]}
        if real is not None:
            sets["random_real"] = expert_soft_labels(expert, flatten_params(expert),
                                                     normalise(real[0], cfg).to(device)).float().cpu()
        kwargs.update(label_mode="soft", soft=sets, soft_lr=eval_lr(cfg, soft))
    else:
        kwargs.update(label_mode=cfg.relabel.mode)
    return kwargs


def eval_lr(cfg, soft: dict) -> float:
    """The students' lr under protocol tesla: eval.tesla.lr, or (0) the mean learned step size."""
    return float(cfg.eval.tesla.lr) or float(soft["syn_lr_mean"])


def finish_tesla_results(cfg, out: str, locs: dict, device, results: dict, t0: float,
                         show_progress: bool = True) -> dict:
    """The rest of the evaluate stage for method tesla, after evaluate_sets: the full-data reference
    (when configured), the labelling expert, the learned step sizes, the class agreement, the
    experts and the timing; writes OUT/results.json."""
    from ..cluster.merge import DISTILLED

    n = results["num_classes"]
    if cfg.eval.full_data_epochs:
        from ..pipeline import full_data_reference

        results["full_data"] = full_data_reference(cfg, locs, n, device, show_progress)
    _, eman = read_experts_manifest(cfg, out, n)
    dman = store.read_json(store.join(out, DISTILLED, store.MANIFEST))
    soft = load_soft_labels(out)
    k, epoch = int(cfg.synth.tesla.label_expert), needed_epochs(cfg)
    results["teacher"] = {**results.get("teacher", {}), "model": eman["model"]["name"],
                          "mode": f"expert {k} at epoch {epoch} (the labelling expert)"}
    ts = dman.get("tesla", {})
    results["tesla"] = {"protocol": cfg.eval.protocol, "syn_lr_mean": float(soft["syn_lr_mean"]),
                        "syn_lr_per_unit": soft["syn_lrs"],
                        "eval_lr": eval_lr(cfg, soft) if cfg.eval.protocol == "tesla" else None,
                        "label_mode": soft["label_mode"], "label_expert": {"index": k, "epoch": epoch},
                        "mode": ts.get("mode"), "iterations": ts.get("iterations"),
                        "agreement_final": ts.get("agreement_final"),
                        "agreement_final_count": ts.get("agreement_final_count")}
    results["experts"] = {"num_experts": eman["num_experts"], "epochs": eman["epochs"],
                          "train_images": eman["train_images"], "model": eman["model"],
                          "val_top1_mean": eman.get("val_top1_mean"),
                          "val_top1": [x["val_top1"] for x in eman["experts"]]}
    results["synthesis"] = {"agreement_final": ts.get("agreement_final"), "units": dman.get("units")}
    results["random_real_keys"] = random_real_keys(cfg, locs, n)[0] if cfg.eval.random_real else None
    timing = results.setdefault("timing_s", {})
    timing["evaluate"] = round(time.time() - t0, 1)
    timing["experts"] = eman.get("timing_s")
    timing["synthesize"] = dman.get("timing_s")
    store.write_json(store.join(out, "results.json"), results)
    return results
