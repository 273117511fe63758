"""The stages after prepare/squeeze, as plain functions of (config, out):
synthesize -> relabel -> evaluate. Each reads its inputs from the store and
writes its artifact there; `run` chains them and skips finished ones."""
from __future__ import annotations

import json
import time

import torch

from . import store
from .cluster.coordinator import run_and_merge
from .cluster.merge import DISTILLED, merge_distilled, read_distilled
from .cluster.plan import plan_units
from .config import config_hash, to_dict
from .data import loader_from_config, shard_info
from .data.realsets import cached_labels, load_images, pick_per_class, scan_labels
from .errors import EngineError
from .preview import preview_grid
from .teacher import load_teacher

METHODS = ("scdd", "tesla", "rded", "datadam")


def _classes(cfg, locs) -> list[str]:
    return shard_info(locs["train"], cfg.data.train_split)["classes"]


def scdd_worker(config: dict, out: str, locs: dict):
    """Unit factory (engine.cluster.workers): load the teacher once, return `work(unit)`."""
    from .config import from_dict
    from .runtime import pick_device
    from .synth.realinit import real_init
    from .synth.scdd import recover

    cfg = from_dict(config)
    device = pick_device(cfg.device)
    classes = _classes(cfg, locs)
    teacher, _ = load_teacher(out, len(classes), device)
    labels_cache = cached_labels(locs["train"], cfg.data.train_split)

    def work(unit):
        init, init_keys, init_scores = (None, None, None)
        if cfg.synth.scdd.init == "real":
            init, init_keys, init_scores = real_init(cfg, locs, unit, labels_cache, teacher, device)
        res = recover(teacher, unit.classes, (unit.ipc_start, unit.ipc_end), cfg.synth.scdd, list(cfg.data.mean),
                      list(cfg.data.std), cfg.data.image_size, cfg.data.channels, cfg.seed, device,
                      init_images=init)
        st = res["stats"]
        info = {"seed": cfg.seed, "losses": res["losses"], "init_keys": init_keys, "init_scores": init_scores,
                "init_select": cfg.synth.scdd.init_select if init is not None else None,
                "teacher_agreement": round(st["teacher_agreement"], 4), "img_it_per_s": round(st["img_it_per_s"], 1),
                "threads": st["threads"], "device": st["device"]}
        info["mean_abs_pixel_change"] = round(st["mean_abs_pixel_change"], 3)  # from the start, 0..255 units
        return {"images": res["images"], "labels": res["labels"]}, info

    return work


def run_synthesize(cfg, out: str, locs: dict, device, show_progress: bool = True) -> dict:
    if cfg.method not in METHODS:
        raise EngineError(f"config key 'method': expected one of {', '.join(METHODS)}, got '{cfg.method}'")
    if cfg.method == "tesla":  # IPC slices against expert trajectories (engine.synth.tesla_stage)
        from .synth.tesla_stage import run_synthesize_tesla

        return run_synthesize_tesla(cfg, out, locs, device, show_progress)
    if cfg.method == "datadam":  # attention matching, class blocks as units (engine.synth.datadam_stage)
        from .synth.datadam_stage import run_synthesize_datadam

        return run_synthesize_datadam(cfg, out, locs, device, show_progress)
    classes = _classes(cfg, locs)
    dest = store.join(out, DISTILLED)
    if cfg.method == "rded":  # real patches picked by the teacher (engine.synth.rded_stage)
        from .synth.rded_stage import check_rded_config, rded_worker, settings_for_hash

        check_rded_config(cfg)
        factory, settings_hash = rded_worker, config_hash(settings_for_hash(cfg))
    else:
        # only what decides SC-DD's images (other methods' sections leave its hash alone)
        scdd_synth = {k: cfg.synth[k] for k in ("ipc", "class_block", "ipc_per_unit", "scdd")}
        from .synth.realinit import check_init

        check_init(cfg.synth.scdd)
        factory = scdd_worker
        settings_hash = config_hash({"synth": scdd_synth, "seed": cfg.seed, "method": cfg.method})
    if store.exists(store.join(dest, store.MANIFEST)):
        m = store.read_json(store.join(dest, store.MANIFEST))
        if m.get("settings_hash") == settings_hash:
            return {"skipped": True, "manifest": m}
        raise EngineError(f"{dest}: made with other synthesis settings; use another --out or delete it")
    _, tman = load_teacher(out, len(classes), "cpu")  # fails here, before any worker starts, if it is unusable
    units = plan_units("synthesize", len(classes), cfg.synth.ipc, cfg.synth.class_block, cfg.synth.ipc_per_unit)
    t0 = time.time()
    ran, merged = run_and_merge(out, units, factory, {"config": to_dict(cfg), "out": out, "locs": locs}, cfg,
                                lambda stats: merge_distilled(out, units, classes, cfg.synth.ipc, {
                                    "method": cfg.method, "settings_hash": settings_hash, "seed": cfg.seed,
                                    "channels": cfg.data.channels, "teacher": tman["model"],
                                    "units": stats, "timing_s": round(time.time() - t0, 1), "config_hash": config_hash(cfg)}),
                                desc="synthesize", show_progress=show_progress)
    images, labels, names = read_distilled(out)
    preview_grid(images, labels, names, store.join(out, "preview.png"), per_class=min(cfg.synth.ipc, 8),
                 title=f"{cfg.method}: IPC {cfg.synth.ipc}")
    return {"skipped": False, **merged, "units": ran,
            "manifest": store.read_json(store.join(dest, store.MANIFEST))}


def relabel_worker(config: dict, out: str):
    """Unit factory for stored relabelling: load the teacher and the distilled images once."""
    from .config import from_dict
    from .labels.relabel import relabel_stored
    from .runtime import pick_device

    cfg = from_dict(config)
    device = pick_device(cfg.device)
    images, _, names = read_distilled(out)
    teacher, _ = load_teacher(out, len(names), device)

    def work(part):
        lab = relabel_stored(teacher, images, list(cfg.data.mean), list(cfg.data.std), cfg.eval.epochs,
                             cfg.eval.batch_size, cfg.seed, cfg.relabel, device,
                             image_range=(part.image_start, part.image_end),
                             epoch_range=(part.epoch_start, part.epoch_end), progress=False)
        return lab, {"images": [part.image_start, part.image_end], "epochs": [part.epoch_start, part.epoch_end]}

    return work


def run_relabel(cfg, out: str, locs: dict, device, show_progress: bool = True) -> dict:
    """Stored mode: per epoch crop parameters + top-k logits of the distilled set, computed as
    disjoint (image range x epoch range) units on the workers and merged exactly once."""
    from .cluster.plan import plan_label_parts
    from .cluster.session import worker_slots
    from .cluster.unitstore import load_unit
    from .labels.relabel import (full_logits_bytes_per_image_epoch, load_labels, measured_bytes_per_image_epoch,
                                 merge_labels, save_labels)

    if cfg.relabel.mode != "stored":
        return {"skipped": True, "reason": f"relabel.mode={cfg.relabel.mode}: the teacher runs online"}
    url = store.join(out, "labels", "distilled.pt")
    if store.exists(url):
        return {"skipped": True, "reason": "exists", "url": url}
    dman = store.read_manifest(store.join(out, DISTILLED))
    n_img, num_classes = int(dman["num_images"]), int(dman["num_classes"])
    parts = plan_label_parts(n_img, int(cfg.eval.epochs), int(cfg.cluster.relabel_parts) or worker_slots(cfg),
                             int(cfg.cluster.relabel_epoch_parts))

    def merge(stats):
        lab = merge_labels([load_unit(out, p)[0] for p in parts])  # every (image, epoch) exactly once
        save_labels(url, lab)
        return stats

    stats, _ = run_and_merge(out, parts, relabel_worker, {"config": to_dict(cfg), "out": out}, cfg, merge,
                             desc="relabel", show_progress=show_progress)
    back = load_labels(url)  # read back: the artifact is usable
    return {"skipped": False, "url": url, "parts": stats,
            "bytes_per_image_epoch": round(measured_bytes_per_image_epoch(back), 2),
            "full_fp16_bytes_per_image_epoch": full_logits_bytes_per_image_epoch(num_classes),
            "full_fp16_bytes_per_image_epoch_1000_classes": full_logits_bytes_per_image_epoch(1000)}


def random_real_set(cfg, locs, num_classes: int, keys_only: bool = False):
    """(images, labels, keys) of the random-real control: IPC real images per class, a seeded choice."""
    keys, labels = scan_labels(locs["train"], cfg.data.train_split)
    picks = pick_per_class(labels, list(range(num_classes)), cfg.synth.ipc, cfg.seed, "random_real")
    chosen = [keys[i] for c in range(num_classes) for i in picks[c]]
    if keys_only:
        return chosen
    imgs = load_images(locs["train"], cfg.data.train_split, chosen, cfg.data.channels)
    return (torch.stack([imgs[k] for k in chosen]),
            torch.tensor([c for c in range(num_classes) for _ in picks[c]]), chosen)


def evaluate_inputs(rank: int | None, world_size: int | None, device, config: dict, out: str, locs: dict) -> dict:
    """evaluate_sets' inputs, read from the store by each evaluation worker (or this process):
    the distilled set, the teacher, the random-real control, stored labels, and this rank's
    share of the validation shards."""
    from .config import from_dict
    from .labels.relabel import load_labels

    cfg = from_dict(config)
    images, labels, names = read_distilled(out)
    teacher, _ = load_teacher(out, len(names), device)
    real = random_real_set(cfg, locs, len(names)) if cfg.eval.random_real else None
    stored = {"distilled": load_labels(store.join(out, "labels", "distilled.pt"))} \
        if cfg.relabel.mode == "stored" else None

    def val_loader():
        return loader_from_config(cfg.data, locs["val"], cfg.data.val_split, train=False, rank=rank,
                                  world_size=world_size)

    return {"distilled_images": images, "distilled_labels": labels, "teacher": teacher, "val_loader_fn": val_loader,
            "random_real": (real[0], real[1]) if real else None, "num_classes": len(names),
            "label_mode": cfg.relabel.mode, "stored": stored, "method": cfg.method, "ipc": cfg.synth.ipc}


def run_evaluate(cfg, out: str, locs: dict, device, show_progress: bool = True) -> dict:
    """Students on the distilled set and the random-real control: data parallel on Ray Train
    (cluster.eval_workers workers) with the Ray backend, in this process with the local one."""
    from .cluster.session import check_backend

    if cfg.method == "datadam":  # its hard-label protocol + the soft-label one (engine.synth.datadam_stage)
        from .synth.datadam_stage import run_evaluate_datadam

        return run_evaluate_datadam(cfg, out, locs, device, show_progress)
    t0 = time.time()
    args = {"config": to_dict(cfg), "out": out, "locs": locs}
    inputs_fn = evaluate_inputs
    if cfg.method == "tesla":  # experts label the sets, soft labels from synthesis (engine.synth.tesla_stage)
        from .synth.tesla_stage import tesla_eval_inputs as inputs_fn
    if check_backend(cfg.cluster) == "ray":
        from .cluster.session import connect, wants_gpu
        from .cluster.train_eval import evaluate_on_ray

        resources = connect(cfg.cluster)
        results = evaluate_on_ray(inputs_fn, args, cfg, int(cfg.cluster.eval_workers),
                                  wants_gpu(str(cfg.device), resources), float(cfg.cluster.cpus_per_worker),
                                  progress=show_progress)
    else:
        from .evaluate import evaluate_sets

        results = evaluate_sets(cfg=cfg, device=device, progress=show_progress,
                                **inputs_fn(None, None, device, **args))
    if cfg.method == "tesla":
        from .synth.tesla_stage import finish_tesla_results

        return finish_tesla_results(cfg, out, locs, device, results, t0, show_progress)
    n = results["num_classes"]
    if cfg.eval.full_data_epochs:
        results["full_data"] = full_data_reference(cfg, locs, n, device, show_progress)
    tman = store.read_manifest(store.join(out, "teacher"))
    results["teacher"] = {**results.get("teacher", {}), **{k: tman["val"][k] for k in ("top1", "top5")},
                          "mode": tman["mode"], "model": tman["model"]["name"]}
    dman = store.read_json(store.join(out, DISTILLED, store.MANIFEST))
    results["synthesis"] = {"teacher_agreement": _mean_unit(out, "teacher_agreement"),
                            "mean_abs_pixel_change": _mean_unit(out, "mean_abs_pixel_change"),
                            "units": dman.get("units")}
    results["random_real_keys"] = random_real_set(cfg, locs, n, keys_only=True) if cfg.eval.random_real else None
    timing = results.setdefault("timing_s", {})
    timing["evaluate"] = round(time.time() - t0, 1)
    for stage, path in (("squeeze", "teacher"), ("synthesize", DISTILLED)):
        m = store.read_json(store.join(out, path, store.MANIFEST))
        timing[stage] = m.get("timing_s")
    store.write_json(store.join(out, "results.json"), results)
    return results


def full_data_reference(cfg, locs, num_classes: int, device, show_progress: bool = True) -> dict:
    """The student architecture trained on all training data with hard labels (the teacher's recipe)."""
    from .metrics import accuracy
    from .models import create_model
    from .seeding import derive_seed
    from .teacher.squeeze import train_supervised

    ref = cfg.copy()
    ref.teacher.epochs = cfg.eval.full_data_epochs
    s = cfg.eval.student
    torch.manual_seed(derive_seed(cfg.seed, "full-data-student"))
    model = create_model(s.name, num_classes, in_chans=cfg.data.channels, small_input=s.small_input,
                         width=s.width, image_size=cfg.data.image_size).to(device)
    t0 = time.time()
    train_supervised(model, ref, locs, device, show_progress)
    val = accuracy(model, loader_from_config(cfg.data, locs["val"], cfg.data.val_split, train=False), device,
                   limit=cfg.eval.val_limit)
    return {"top1": val["top1"], "top5": val["top5"], "epochs": cfg.eval.full_data_epochs,
            "labels": "hard", "seconds": round(time.time() - t0, 1)}


def _mean_unit(out: str, key: str):
    base = store.join(out, "units", "synthesize")
    vals = []
    for name in store.listdir(base):
        m = store.read_json(store.join(base, name, store.MANIFEST))
        if m.get(key) is not None:
            vals.append(m[key])
    return round(sum(vals) / len(vals), 4) if vals else None
