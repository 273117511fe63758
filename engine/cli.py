"""`python -m engine <stage> --config FILE [key=value ...] --out DIR_OR_URL`.

Stages run alone or chained by `run`; each reads and writes artifacts under
--out and saves the resolved config there (config.yaml).
"""
from __future__ import annotations

import argparse
import sys
import time

from . import __version__, store
from .config import load_config, to_yaml
from .errors import EngineError, run_guarded

# stage -> (what it does, the issue that brings it, or None when it is implemented)
STAGES = {
    "prepare": ("build train/val shards (WebDataset + FFCV) from the configured raw source", None),
    "squeeze": ("train or load the teacher (supervised or self-supervised + probe)", None),
    "experts": ("train expert trajectories for trajectory matching (TESLA) into experts/", None),
    "synthesize": ("distil images (SC-DD recovery, TESLA, RDED or DataDAM) into distilled/", None),
    "relabel": ("soft labels for the distilled images (stored mode)", None),
    "evaluate": ("train students on distilled and random-real sets, write results.json", None),
    "run": ("the whole pipeline, skipping stages whose artifacts exist", None),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine", description="Dataset distillation engine.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="stages:\n" + "\n".join(
                                    f"  {k:<11} {v[0]}" + (f"  [issue {v[1]}, not yet built]" if v[1] else "")
                                    for k, v in STAGES.items()))
    p.add_argument("--version", action="version", version=f"engine {__version__}")
    sub = p.add_subparsers(dest="stage", metavar="STAGE")
    for name, (help_, _) in STAGES.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--config", help="YAML recipe (e.g. configs/demo/fashion_scdd.yaml)")
        sp.add_argument("--out", required=True, help="output root: a directory or an fsspec URL")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        sp.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.channels=3")
    return p


def save_resolved_config(cfg, out: str) -> None:
    store.makedirs(out)
    store.write_text(store.join(out, "config.yaml"), to_yaml(cfg))


def stage_prepare(cfg, out: str, quiet: bool) -> dict:
    from .data.inspect import format_report, inspect_shards
    from .prepare import prepared_locations, run_prepare

    res = run_prepare(cfg, out, show_progress=not quiet)
    print("prepare: " + ("skipped, " + res["reason"] if res["skipped"] else "done"))
    locs = prepared_locations(cfg, out)
    for role, uri in locs.items():
        print(f"{role}: {uri}")
    # Freshly written artifacts are decoded record by record once; a skipped prepare is only described.
    artifacts = set(locs.values())
    if not res["skipped"]:
        artifacts |= {store.join(out, "data", k) for k in res["manifest"]["inspect"]}
    for uri in sorted(artifacts):
        print(format_report(inspect_shards(uri, verify=not res["skipped"], show_progress=not quiet)))
    return res


def stage_squeeze(cfg, out: str, quiet: bool) -> dict:
    from .teacher import run_squeeze

    locs, device = _env(cfg, out)
    res = run_squeeze(cfg, out, locs, device, show_progress=not quiet)
    m = res["manifest"]
    print(f"squeeze: {'skipped, exists' if res['skipped'] else 'done'}; teacher {m['model']['name']} "
          f"({m['mode']}): val top-1 {m['val']['top1']:.2f}%, top-5 {m['val']['top5']:.2f}% "
          f"[{m['timing_s']} s]")
    return res


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if not args.stage:
        _parser().print_help()
        return 2
    try:
        return run_guarded(_dispatch, args)
    finally:
        from .cluster.session import disconnect

        disconnect()


def _dispatch(args) -> None:
    what, issue = STAGES[args.stage]
    if issue is not None:
        raise EngineError(f"stage '{args.stage}' is not built yet (issue {issue}: {what})")
    cfg = load_config(args.config, args.overrides)
    # workers (Ray actors, Ray Train) run in other directories: every local location becomes absolute
    out = store.absolute(args.out)
    _absolute_locations(cfg)
    store.check_writable(out)
    save_resolved_config(cfg, out)
    quiet = args.quiet
    if args.stage == "prepare":
        stage_prepare(cfg, out, quiet)
    elif args.stage == "squeeze":
        stage_squeeze(cfg, out, quiet)
    elif args.stage == "experts":
        stage_experts(cfg, out, quiet)
    elif args.stage in ("synthesize", "relabel", "evaluate"):
        STAGE_FUNCS[args.stage](cfg, out, quiet)
    elif args.stage == "run":
        t0 = time.time()
        stage_prepare(cfg, out, quiet)
        if cfg.method == "tesla":  # experts instead of a teacher: an expert labels the images and the control
            stage_experts(cfg, out, quiet)
        else:
            stage_squeeze(cfg, out, quiet)
        for name in ("synthesize", "relabel", "evaluate"):
            STAGE_FUNCS[name](cfg, out, quiet)
        print(f"run: done in {time.time() - t0:.0f} s; results in {store.join(out, 'results.json')}, "
              f"preview in {store.join(out, 'preview.png')}")


def _absolute_locations(cfg) -> None:
    from .data import FORMATS

    for section, key in (("data", "train"), ("data", "val"), ("teacher", "checkpoint"), ("experts", "location")):
        value = getattr(getattr(cfg, section), key)
        prefix = next((f + ":" for f in FORMATS if value.startswith(f + ":") and not value.startswith(f + "://")), "")
        if value:
            setattr(getattr(cfg, section), key, prefix + store.absolute(value[len(prefix):]))


def _env(cfg, out):
    from .prepare import prepared_locations
    from .runtime import pick_device, set_threads

    set_threads(cfg.threads)
    return prepared_locations(cfg, out), pick_device(cfg.device)


def stage_experts(cfg, out: str, quiet: bool) -> dict:
    from .synth.tesla_stage import run_experts

    locs, device = _env(cfg, out)
    res = run_experts(cfg, out, locs, device, show_progress=not quiet)
    m = res["manifest"]
    top1 = ", ".join(f"{x['val_top1']:.2f}" for x in m["experts"])
    how = "skipped, exists" if res["skipped"] else (f"done ({res['units']['ran']} trained, "
                                                     f"{res['units']['skipped']} already done)")
    print(f"experts: {how}; {m['num_experts']} x {m['model']['name']} (width {m['model']['width']}) for "
          f"{m['epochs']} epochs on {m['train_images']} images: val top-1 {top1} % [{m['timing_s']} s]")
    return res


def stage_synthesize(cfg, out: str, quiet: bool) -> dict:
    from .pipeline import run_synthesize

    locs, device = _env(cfg, out)
    res = run_synthesize(cfg, out, locs, device, show_progress=not quiet)
    if res["skipped"]:
        print("synthesize: skipped, distilled/ exists")
    else:
        u = res["units"]
        print(f"synthesize: {res['num_images']} images from {u['units']} units ({u['ran']} run, "
              f"{u['skipped']} already done) in {u['seconds']} s -> {res['dest']}")
        t = res["manifest"].get("tesla")
        if t:
            lrs = ", ".join(f"{v:.5f}" for v in t["syn_lr_per_unit"].values())
            print(f"synthesize: learned lr per IPC slice {lrs} (mean {t['syn_lr_mean']:.5f}); the labelling "
                  f"expert assigns {t['agreement_final_count']} of {res['num_images']} final images to their class; "
                  f"soft labels -> {t['soft_labels']}")
    return res


def stage_relabel(cfg, out: str, quiet: bool) -> dict:
    from .pipeline import run_relabel

    if cfg.method == "tesla":
        print("relabel: skipped (TESLA stores its soft labels at synthesis: labels/tesla_soft.pt)")
        return {"skipped": True, "reason": "method tesla"}
    locs, device = _env(cfg, out)
    res = run_relabel(cfg, out, locs, device, show_progress=not quiet)
    if res["skipped"]:
        print(f"relabel: skipped ({res['reason']})")
    else:
        print(f"relabel: stored labels -> {res['url']}: {res['bytes_per_image_epoch']} B per image-epoch "
              f"(full fp16 logits: {res['full_fp16_bytes_per_image_epoch']} B here, "
              f"{res['full_fp16_bytes_per_image_epoch_1000_classes']} B at 1000 classes)")
    return res


def stage_evaluate(cfg, out: str, quiet: bool) -> dict:
    from .pipeline import run_evaluate
    from .report import results_table

    locs, device = _env(cfg, out)
    res = run_evaluate(cfg, out, locs, device, show_progress=not quiet)
    print(results_table(res))
    return res


STAGE_FUNCS = {"synthesize": stage_synthesize, "relabel": stage_relabel, "evaluate": stage_evaluate}


if __name__ == "__main__":
    sys.exit(main())
