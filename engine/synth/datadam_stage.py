"""DataDAM as engine stages (issue 8): class-block synthesis units and the two evaluation protocols.

    synthesize  class blocks as units (synth.class_block classes, all synth.ipc IPC indices each;
                synth.ipc_per_unit is not used: a class's images are optimised together). A unit
                reads, per class, its real pool from the training shards (every image of the class,
                or a seeded subset of synth.datadam.real_per_class) and its starting images (real:
                distinct per class and IPC index, a seeded choice; or N(0, 1) noise per (class, IPC
                index)), runs engine.synth.datadam.distill_block and returns uint8 images. The merge
                writes OUT/distilled/ + manifest and OUT/preview.png, as SC-DD does.
    evaluate    `run_evaluate_datadam`: DataDAM's hard-label protocol (eval.datadam: a ConvNet
                student, class labels, DSA, SGD) and, with eval.datadam.soft, the soft-label protocol
                of every method (eval.*, relabel.mode, the squeeze teacher), each against the
                random-real control with the same student; results.json holds the soft keys of
                DESIGN.md plus distilled.hard / random_real.hard and protocol_hard.

Seeds: the network of iteration t from (seed, t); the real batch and the DSA draw of class c at
iteration t from (seed, t, c); nothing from the block. A block run alone therefore gives the same
bytes as the same classes inside a whole-dataset run (same hardware, same thread count).

Pure PyTorch: the coordinator (engine.cluster) runs the unit factory `datadam_worker` in this process
or on Ray actors.
"""
from __future__ import annotations

import copy
import time

import torch

from .. import store
from ..errors import ConfigError, EngineError

CONVNET_DEPTHS = {"convnetd3": 3, "convnetd4": 4, "convnetd5": 5}
INIT_PURPOSE = "datadam-init"
POOL_PURPOSE = "datadam-real-pool"


# ---------------------------------------------------------------------------
# settings and checks
# ---------------------------------------------------------------------------

def net_depth(net_cfg) -> int:
    name = str(net_cfg.name).lower()
    if name == "convnet":
        return int(net_cfg.depth)
    if name not in CONVNET_DEPTHS:
        raise ConfigError(f"config key 'synth.datadam.net.name' is '{net_cfg.name}': expected one of "
                          f"{', '.join([*CONVNET_DEPTHS, 'convnet'])}")
    d = CONVNET_DEPTHS[name]
    if int(net_cfg.depth) not in (0, d):
        raise ConfigError(f"config key 'synth.datadam.net.depth' is {net_cfg.depth}, but net.name {name} has "
                          f"{d} blocks (use name convnet for another depth)")
    return d


def build_net(cfg, num_classes: int):
    """The DataDAM ConvNet (its parameters are replaced every iteration)."""
    from ..models.convnet import ConvNet

    n = cfg.synth.datadam.net
    depth = net_depth(n)
    if depth < 1 or int(n.width) < 1:
        raise ConfigError(f"config keys 'synth.datadam.net.depth' / 'width': expected at least 1, got depth "
                          f"{depth}, width {n.width}")
    return ConvNet(int(cfg.data.channels), int(num_classes), depth=depth, width=int(n.width),
                   image_size=int(cfg.data.image_size), norm=str(n.norm))


def check_datadam_config(cfg, num_classes: int = 2):
    """Every setting, checked before any worker starts (one line naming the key)."""
    import math

    from .datadam import check_power, check_spatial
    from .dsa import parse_strategy

    d = cfg.synth.datadam
    check_power(d.power)
    for key in ("iterations",):
        if int(getattr(d, key)) < 0:
            raise ConfigError(f"config key 'synth.datadam.{key}': expected 0 or more, got {getattr(d, key)}")
    if int(d.real_batch) < 1:
        raise ConfigError(f"config key 'synth.datadam.real_batch': expected at least 1, got {d.real_batch}")
    if int(d.real_per_class) < 0:
        raise ConfigError(f"config key 'synth.datadam.real_per_class': expected 0 (all) or more, "
                          f"got {d.real_per_class}")
    for key in ("lr", "lam", "loss_scale"):
        v = float(getattr(d, key))
        if not (math.isfinite(v) and v >= 0):
            raise ConfigError(f"config key 'synth.datadam.{key}': expected a finite number of 0 or more, got {v}")
    if not 0 <= float(d.momentum) < 1:
        raise ConfigError(f"config key 'synth.datadam.momentum': expected a value in [0, 1), got {d.momentum}")
    if d.init not in ("real", "noise"):
        raise ConfigError(f"config key 'synth.datadam.init' is '{d.init}': expected real or noise")
    parse_strategy(d.dsa_strategy)
    if int(cfg.synth.ipc) < 1:
        raise ConfigError(f"config key 'synth.ipc': expected at least 1, got {cfg.synth.ipc}")
    net = build_net(cfg, num_classes)
    check_spatial(net, (int(cfg.data.channels), int(cfg.data.image_size), int(cfg.data.image_size)))
    return d


def check_class_sizes(cfg, per_class: dict, classes: list[str]) -> None:
    """The real batch against each class's pool, from the shard index (before any worker starts)."""
    d = cfg.synth.datadam
    for k, name in enumerate(classes):
        have = per_class.get(name, per_class.get(str(k), per_class.get(k)))
        if have is None:
            continue
        have = int(have)
        pool = min(have, int(d.real_per_class)) if int(d.real_per_class) else have
        if int(cfg.synth.ipc) > have and d.init == "real":
            raise ConfigError(f"config key 'synth.ipc' ({cfg.synth.ipc}): class {k} has {have} training images "
                              f"for synth.datadam.init real")
        if int(d.real_batch) > pool and not d.sample_with_replacement:
            raise ConfigError(f"config key 'synth.datadam.real_batch' ({d.real_batch}): class {k} has {pool} real "
                              "images (set synth.datadam.sample_with_replacement: true to draw with replacement)")


def settings_for_hash(cfg) -> dict:
    """What decides DataDAM's images: IPC, the class blocks, synth.datadam, the seed and the data geometry."""
    from ..config import to_dict

    data = {k: to_dict(cfg.data)[k] for k in ("channels", "image_size", "crop_pct", "mean", "std")}
    return {"synth": {"ipc": int(cfg.synth.ipc), "class_block": int(cfg.synth.class_block),
                      "datadam": to_dict(cfg.synth.datadam)}, "data": data, "seed": int(cfg.seed),
            "method": "datadam"}


def plan(cfg, num_classes: int):
    from ..cluster.plan import plan_units

    ipc = int(cfg.synth.ipc)
    return plan_units("synthesize", num_classes, ipc, int(cfg.synth.class_block), ipc)


# ---------------------------------------------------------------------------
# real images
# ---------------------------------------------------------------------------

def class_keys(labels, keys: list[str], classes: list[int], real_per_class: int, seed: int) -> dict[int, list[str]]:
    """Each class's real pool: every training key of the class in shard order, or a seeded subset."""
    import numpy as np

    from ..data.realsets import pick_per_class

    out = {}
    for c in classes:
        pos = np.flatnonzero(labels == c)
        if real_per_class and real_per_class < len(pos):
            pos = sorted(pick_per_class(labels, [c], int(real_per_class), seed, POOL_PURPOSE)[c])
        out[c] = [keys[i] for i in pos]
    return out


def initial_images(cfg, locs, unit, labels_cache) -> tuple[dict[int, torch.Tensor], list[str] | None]:
    """{class: normalised float (IPC, C, H, W)}: real images distinct per (class, IPC index) (a seeded
    choice), or N(0, 1) noise per (class, IPC index)."""
    from ..data.realsets import pick_per_class
    from ..seeding import torch_gen
    from .tesla_stage import normalise, real_images

    d, ipc = cfg.synth.datadam, int(cfg.synth.ipc)
    if d.init == "real":
        keys, labels = labels_cache()
        picks = pick_per_class(labels, unit.classes, ipc, cfg.seed, INIT_PURPOSE)
        chosen = [keys[picks[c][i]] for c in unit.classes for i in range(ipc)]
        x = normalise(real_images(cfg, locs["train"], cfg.data.train_split, chosen), cfg)
        return {c: x[k * ipc:(k + 1) * ipc] for k, c in enumerate(unit.classes)}, chosen
    shape = (int(cfg.data.channels), int(cfg.data.image_size), int(cfg.data.image_size))
    return {c: torch.stack([torch.randn(shape, generator=torch_gen(cfg.seed, "datadam-noise", c, i))
                            for i in range(ipc)]) for c in unit.classes}, None


# ---------------------------------------------------------------------------
# synthesis
# ---------------------------------------------------------------------------

def datadam_worker(config: dict, out: str, locs: dict):
    """Unit factory (engine.cluster.workers): build the net once, return `work(unit)` that distils one
    class block and returns ({"images": uint8, "labels"}, info)."""
    from ..config import from_dict
    from ..data import shard_info
    from ..data.realsets import cached_labels
    from ..runtime import pick_device
    from .datadam import distill_block
    from .tesla_stage import real_images, to_uint8

    cfg = from_dict(config)
    d = check_datadam_config(cfg)
    device = pick_device(cfg.device)
    classes = shard_info(locs["train"], cfg.data.train_split)["classes"]
    net = build_net(cfg, len(classes))
    labels_cache = cached_labels(locs["train"], cfg.data.train_split)

    def work(unit):
        t0 = time.perf_counter()
        keys, labels = labels_cache()
        pool = class_keys(labels, keys, unit.classes, int(d.real_per_class), int(cfg.seed))
        flat = [k for c in unit.classes for k in pool[c]]
        imgs = real_images(cfg, locs["train"], cfg.data.train_split, flat)
        real, k0 = {}, 0
        for c in unit.classes:
            real[c] = imgs[k0:k0 + len(pool[c])]
            k0 += len(pool[c])
        init, init_keys = initial_images(cfg, locs, unit, labels_cache)
        t1 = time.perf_counter()
        res = distill_block(net, real, init, iterations=int(d.iterations), lr=float(d.lr),
                            momentum=float(d.momentum), power=float(d.power), lam=float(d.lam),
                            loss_scale=float(d.loss_scale), real_batch=int(d.real_batch),
                            sample_with_replacement=bool(d.sample_with_replacement),
                            dsa_strategy=d.dsa_strategy or None, seed=int(cfg.seed), mean=list(cfg.data.mean),
                            std=list(cfg.data.std), device=device, block=unit.id, log_every=int(d.log_every))
        images = to_uint8(res.images, cfg)
        labels_out = torch.tensor([c for c in unit.classes for _ in range(int(cfg.synth.ipc))])
        every = max(1, int(d.log_every))
        hist = res.history
        n_it = len(hist)
        info = {"method": "datadam", "seed": int(cfg.seed), "block": unit.id, "iterations": n_it,
                "losses": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in h.items() if k != "seconds"}
                           for h in hist if h["iteration"] % every == 0 or h["iteration"] == n_it - 1],
                "seconds_per_iteration": round(res.seconds / max(1, n_it), 4),
                "seconds_per_class_iteration": round(res.seconds / max(1, n_it) / len(unit.classes), 5),
                "load_seconds": round(t1 - t0, 3), "real_pool": {str(c): len(pool[c]) for c in unit.classes},
                "init": d.init, "init_keys": init_keys, "threads": torch.get_num_threads(), "device": str(device)}
        if d.init == "real":
            start = torch.cat([to_uint8(init[c], cfg) for c in unit.classes])
            info["mean_abs_pixel_change"] = round(float((images.float() - start.float()).abs().mean()), 3)
        return {"images": images, "labels": labels_out}, info

    return work


def run_synthesize_datadam(cfg, out: str, locs: dict, device=None, show_progress: bool = True) -> dict:
    """Class blocks as units on the coordinator, merged into OUT/distilled/ + preview.png."""
    from ..cluster.coordinator import run_and_merge
    from ..cluster.merge import DISTILLED, merge_distilled, read_distilled
    from ..config import config_hash, to_dict
    from ..data import shard_info
    from ..preview import preview_grid

    info = shard_info(locs["train"], cfg.data.train_split)
    classes = info["classes"]
    check_datadam_config(cfg, len(classes))
    check_class_sizes(cfg, info.get("labels_per_class") or {}, classes)
    dest = store.join(out, DISTILLED)
    settings_hash = config_hash(settings_for_hash(cfg))
    if store.exists(store.join(dest, store.MANIFEST)):
        m = store.read_json(store.join(dest, store.MANIFEST))
        if m.get("settings_hash") == settings_hash:
            return {"skipped": True, "manifest": m}
        raise EngineError(f"{dest}: made with other synthesis settings; use another --out or delete it")
    units = plan(cfg, len(classes))
    d = cfg.synth.datadam
    t0 = time.time()

    def merge(stats):
        from ..cluster.unitstore import load_unit

        per_class_it = [load_unit(out, u)[1].get("seconds_per_class_iteration") for u in units]
        per_class_it = [v for v in per_class_it if v is not None]
        summary = {"iterations": int(d.iterations), "class_block": int(cfg.synth.class_block),
                   "net": to_dict(d.net), "init": d.init, "real_batch": int(d.real_batch),
                   "seconds_per_class_iteration_mean": (round(sum(per_class_it) / len(per_class_it), 5)
                                                        if per_class_it else None)}
        return merge_distilled(out, units, classes, int(cfg.synth.ipc), {
            "method": "datadam", "settings_hash": settings_hash, "seed": int(cfg.seed),
            "channels": cfg.data.channels, "datadam": summary, "units": stats,
            "timing_s": round(time.time() - t0, 1), "config_hash": config_hash(cfg)})

    ran, merged = run_and_merge(out, units, datadam_worker, {"config": to_dict(cfg), "out": out, "locs": locs},
                                cfg, merge, desc="synthesize", show_progress=show_progress)
    images, labels, names = read_distilled(out)
    preview_grid(images, labels, names, store.join(out, "preview.png"), per_class=min(int(cfg.synth.ipc), 8),
                 title=f"datadam: IPC {cfg.synth.ipc}")
    return {"skipped": False, **merged, "units": ran, "manifest": store.read_json(store.join(dest, store.MANIFEST))}


# ---------------------------------------------------------------------------
# evaluation: hard-label protocol (DataDAM's own) and soft-label protocol
# ---------------------------------------------------------------------------

def hard_protocol_config(cfg):
    """A copy of cfg whose eval.tesla (the settings engine.evaluate.train_student_soft reads) and
    eval.student are DataDAM's hard-label protocol: a ConvNet of the DataDAM net's depth."""
    e = cfg.eval.datadam
    depth = net_depth(cfg.synth.datadam.net)
    name = next((k for k, v in CONVNET_DEPTHS.items() if v == depth), None)
    if name is None:
        raise ConfigError(f"eval.datadam: the hard-label student is a ConvNetD3-D5 of the DataDAM net's depth, "
                          f"synth.datadam.net has depth {depth}")
    h = copy.deepcopy(cfg)
    for k in ("epochs", "batch_size", "lr", "momentum", "weight_decay", "lr_decay_at", "lr_decay_factor",
              "dsa_strategy"):
        setattr(h.eval.tesla, k, getattr(e, k))
    h.eval.student.name = name
    h.eval.student.width = int(e.width) or int(cfg.synth.datadam.net.width)
    h.eval.student.small_input = False
    h.eval.hard_control = False
    return h


def datadam_eval_inputs(rank: int | None, world_size: int | None, device, config: dict, out: str, locs: dict,
                        protocol: str = "hard") -> dict:
    """engine.evaluate.evaluate_sets' inputs (an `inputs_fn` of engine.cluster.train_eval).
    `hard`: the class labels as one-hot rows (train_student_soft with one-hot targets is cross-entropy
    with the class labels) for the distilled set and the random-real control, no teacher; `soft`:
    engine.pipeline.evaluate_inputs (the squeeze teacher, relabel.mode)."""
    import torch.nn.functional as F

    from ..cluster.merge import read_distilled
    from ..config import from_dict
    from ..data import loader_from_config
    from ..pipeline import evaluate_inputs, random_real_set

    if protocol == "soft":
        return evaluate_inputs(rank, world_size, device, config, out, locs)
    cfg = from_dict(config) if isinstance(config, dict) else config
    images, labels, names = read_distilled(out)
    n = len(names)
    real = random_real_set(cfg, locs, n) if cfg.eval.random_real else None
    soft = {"distilled": F.one_hot(labels.long(), n).float()}
    if real is not None:
        soft["random_real"] = F.one_hot(real[1].long(), n).float()

    def val_loader():
        return loader_from_config(cfg.data, locs["val"], cfg.data.val_split, train=False, rank=rank,
                                  world_size=world_size)

    return {"distilled_images": images, "distilled_labels": labels, "teacher": None, "val_loader_fn": val_loader,
            "random_real": (real[0], real[1]) if real else None, "num_classes": n, "label_mode": "soft",
            "soft": soft, "soft_lr": float(cfg.eval.datadam.lr), "method": "datadam", "ipc": int(cfg.synth.ipc),
            "hard_control": False}


def _evaluate(cfg, args: dict, device, protocol: str, show_progress: bool) -> dict:
    from ..cluster.session import check_backend

    args = {**args, "protocol": protocol}
    if check_backend(cfg.cluster) == "ray":
        from ..cluster.session import connect, wants_gpu
        from ..cluster.train_eval import evaluate_on_ray

        resources = connect(cfg.cluster)
        return evaluate_on_ray(datadam_eval_inputs, args, cfg, int(cfg.cluster.eval_workers),
                               wants_gpu(str(cfg.device), resources), float(cfg.cluster.cpus_per_worker),
                               progress=show_progress)
    from ..evaluate import evaluate_sets

    return evaluate_sets(cfg=cfg, device=device, progress=show_progress,
                         **datadam_eval_inputs(None, None, device, **args))


def hard_summary(summary: dict) -> dict:
    """The `hard` entry of a set from a hard-protocol summary (engine.evaluate._summary)."""
    keep = {k: summary[k] for k in ("top1", "top5", "top1_mean", "top1_std", "top5_mean", "seeds") if k in summary}
    keep["top1s"] = [r["top1"] for r in summary["runs"]]
    keep["runs"] = summary["runs"]
    return keep


def run_evaluate_datadam(cfg, out: str, locs: dict, device, show_progress: bool = True) -> dict:
    """Both protocols, each distilled vs random real with the same student; writes OUT/results.json."""
    from ..cluster.merge import DISTILLED
    from ..config import to_dict
    from ..report import compare

    t0 = time.time()
    hcfg = hard_protocol_config(cfg)
    hard = _evaluate(hcfg, {"config": to_dict(hcfg), "out": out, "locs": locs}, device, "hard", show_progress)
    t_hard = time.time() - t0
    hp = dict(hard["protocol"])
    hp.update(name="datadam-hard", label_mode="hard", loss="cross-entropy with the class labels",
              student={"name": hcfg.eval.student.name, "width": int(hcfg.eval.student.width)})
    if cfg.eval.datadam.soft:
        scfg = copy.deepcopy(cfg)
        scfg.eval.hard_control = False  # the hard labels are DataDAM's own protocol above
        results = _evaluate(scfg, {"config": to_dict(scfg), "out": out, "locs": locs}, device, "soft",
                            show_progress)
    else:
        results = {"method": "datadam", "ipc": hard["ipc"], "num_classes": hard["num_classes"],
                   "protocol": {"label_mode": None, "note": "eval.datadam.soft is off: hard-label protocol only"}}
    for name in ("distilled", "random_real"):
        if name in hard:
            results.setdefault(name, {})["hard"] = hard_summary(hard[name])
    results["protocol_hard"] = hp
    results["method"] = "datadam"
    for k in [k for k in results if k.startswith("gain_over_random")] + ["welch"]:
        results.pop(k, None)
    compare(results)  # soft gain from the soft protocol, hard gain from DataDAM's hard protocol, Welch tests
    n = results["num_classes"]
    if cfg.eval.full_data_epochs:
        from ..pipeline import full_data_reference

        results["full_data"] = full_data_reference(cfg, locs, n, device, show_progress)
    if cfg.eval.datadam.soft:
        tman = store.read_manifest(store.join(out, "teacher"))
        results["teacher"] = {**results.get("teacher", {}), **{k: tman["val"][k] for k in ("top1", "top5")},
                              "mode": tman["mode"], "model": tman["model"]["name"]}
    dman = store.read_json(store.join(out, DISTILLED, store.MANIFEST))
    results["datadam"] = dman.get("datadam")
    results["synthesis"] = {"units": dman.get("units")}
    if cfg.eval.random_real:
        from ..pipeline import random_real_set

        results["random_real_keys"] = random_real_set(cfg, locs, n, keys_only=True)
    timing = results.setdefault("timing_s", {})
    timing["evaluate"] = round(time.time() - t0, 1)
    timing["evaluate_hard"] = round(t_hard, 1)
    timing["synthesize"] = dman.get("timing_s")
    if cfg.eval.datadam.soft and store.exists(store.join(out, "teacher", store.MANIFEST)):
        timing["squeeze"] = store.read_json(store.join(out, "teacher", store.MANIFEST)).get("timing_s")
    store.write_json(store.join(out, "results.json"), results)
    return results
