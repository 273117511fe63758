"""Issue 7's seeded ablation: which recovery options beat the random-real control.

Each row is the demo recipe (configs/demo/fashion_scdd.yaml) with a few overrides, run through the
engine's own CLI (`python -m engine run`) into its own --out, against a prepared base run whose
data has a holdout split carved out of train (data.holdout_per_class) and whose teacher was
trained on the rest. A row shares the base's data (symlink) and teacher (copy), so only synthesis
and evaluation run; its results.json plus the row's overrides, split and wall time are stored as
tools/bench/results/ablation/<tag>_<row>.json, so the table can be built across sessions.

    # the bases (prepare + squeeze once per teacher), then rows, then the table
    python tools/bench/ablation.py base --out runs/abl/base
    python tools/bench/ablation.py base --out runs/abl/base_sup teacher.mode=supervised
    python tools/bench/ablation.py row --base runs/abl/base --work runs/abl --tag ipc10 noise real_random ...
    python tools/bench/ablation.py table

Settings are chosen on the holdout split (--split holdout); the chosen default is then evaluated
once on the test split (--split test).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, markdown_table  # noqa: E402

from engine.report import cell, top1s  # noqa: E402

RECIPE = "configs/demo/fashion_scdd.yaml"
RESULTS = ROOT / "tools" / "bench" / "results" / "ablation"
HOLDOUT = ["data.holdout_per_class=500"]  # 5,000 of the 60,000 training images, before the teacher
# Every row pins the recovery settings it is about, so that a row means the same thing whatever the
# demo recipe's own default becomes (the recipe itself moved to the chosen default, k-means starts).
NOISE = ["synth.scdd.init=noise", "synth.scdd.iterations=1000"]
REAL = ["synth.scdd.init=real", "synth.scdd.iterations=500", "synth.scdd.init_lr=0.05"]  # METHODS section 6
RANDOM = ["synth.scdd.init_select=random", "synth.scdd.init_pool=5"]
KMEANS = ["synth.scdd.init_select=kmeans", "synth.scdd.init_pool=20"]

# name -> (what it is, overrides on top of the recipe). The teacher comes from --base.
ROWS = {
    "noise": ("recovery from noise (1000 it)", NOISE + ["synth.scdd.r_div=0.0"]),
    "noise_div": ("from noise + feature-diversity term (r_div 1)", NOISE + ["synth.scdd.r_div=1.0"]),
    "real_random": ("from random real images (500 it, lr 0.05)", REAL + RANDOM + ["synth.scdd.r_div=0.0"]),
    "real_confident": ("from the teacher's most confident real images",
                       REAL + ["synth.scdd.init_select=confident", "synth.scdd.init_pool=5", "synth.scdd.r_div=0.0"]),
    "real_kmeans": ("from real images nearest k-means centroids of the teacher's features (pool 20 x IPC)",
                    REAL + KMEANS + ["synth.scdd.r_div=0.0"]),
    "real_kmeans_lr01": ("k-means real starts, image lr 0.01 instead of 0.05",
                         REAL + KMEANS + ["synth.scdd.init_lr=0.01", "synth.scdd.r_div=0.0"]),
    "kmeans_select": ("k-means selection alone, 0 iterations (not SC-DD: no pixel moves)",
                      KMEANS + ["synth.scdd.init=real", "synth.scdd.iterations=0", "synth.scdd.r_div=0.0"]),
    "real_random_div": ("from random real images + diversity term (r_div 1)", REAL + RANDOM + ["synth.scdd.r_div=1.0"]),
    "rded_f1": ("rded, factor 1 (whole best crop)", ["method=rded", "synth.rded.factor=1", "synth.ipc_per_unit=10"]),
    "rded_f2": ("rded, factor 2 (2x2 patches)", ["method=rded", "synth.rded.factor=2", "synth.ipc_per_unit=10"]),
}


def _engine(args: list[str], log: Path) -> float:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "ENGINE_NO_PROGRESS": "1"}
    t0 = time.time()
    with open(log, "a") as f:
        rc = subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                            env=env).returncode
    if rc:
        raise SystemExit(f"engine {' '.join(args[:3])} failed (exit {rc}); see {log}")
    return time.time() - t0


def cmd_base(a) -> None:
    """prepare (with the holdout carve) + squeeze into --out."""
    out = Path(a.out).resolve()
    # the teacher's reported accuracy is taken on the holdout too: the test split stays unread
    common = ["--config", RECIPE, "--out", str(out), *HOLDOUT, "data.val_split=holdout", *a.overrides]
    secs = {stage: round(_engine([stage, *common], out.with_suffix(".log")), 1) for stage in ("prepare", "squeeze")}
    # the rows repeat the base's overrides, so that the copied teacher matches their settings
    (out / "ablation_base.json").write_text(json.dumps({"overrides": a.overrides, "seconds": secs}) + "\n")
    print(json.dumps(secs))


def _link_base(base: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "data").exists():
        (out / "data").symlink_to(base / "data")
    if not (out / "teacher").exists():
        shutil.copytree(base / "teacher", out / "teacher")


def cmd_row(a) -> None:
    base = Path(a.base).resolve()
    teacher = json.loads((base / "teacher" / "manifest.json").read_text())
    made = base / "ablation_base.json"
    base_over = json.loads(made.read_text())["overrides"] if made.exists() else []
    seeds = "[" + ",".join(str(s) for s in a.seeds) + "]"
    split = "holdout" if a.split == "holdout" else "val"
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in a.rows:
        what, overrides = ROWS[name]
        out = Path(a.work).resolve() / f"{a.tag}_{name}"
        _link_base(base, out)
        over = [*HOLDOUT, f"data.val_split={split}", f"synth.ipc={a.ipc}", f"eval.seeds={seeds}",
                f"eval.random_real={str(a.control).lower()}", f"eval.hard_control={str(a.hard).lower()}",
                "eval.full_data_epochs=0", *base_over, *overrides, *a.overrides]
        wall = _engine(["run", "--config", RECIPE, "--out", str(out), *over], out.with_suffix(".log"))
        res = json.loads((out / "results.json").read_text())
        row = {"row": name, "what": what, "tag": a.tag, "ipc": a.ipc, "split": a.split, "teacher_mode": teacher["mode"],
               "recipe": RECIPE, "overrides": over, "wall_s": round(wall, 1), "machine": machine_info(),
               "results": res}
        dest = RESULTS / f"{a.tag}_{name}.json"
        dest.write_text(json.dumps(row, indent=1) + "\n")
        print(f"{name}: {_fmt(res.get('distilled'))} (random real {_fmt(res.get('random_real'))}), "
              f"{wall:.0f} s -> {dest.relative_to(ROOT)}", flush=True)


def _fmt(summary, hard=False) -> str:
    n = len(top1s(summary, hard))
    return cell(summary, hard) + (f" (n={n})" if n else "")


def cmd_table(a) -> None:
    rows = []
    for path in sorted(RESULTS.glob("*.json")):
        r = json.loads(path.read_text())
        res = r["results"]
        syn = res.get("synthesis") or {}
        timing = res.get("timing_s") or {}
        if res.get("random_real"):
            rows.append({"set": f"random real (control of {r['tag']}_{r['row']})", "tag": r["tag"],
                         "teacher": r["teacher_mode"], "split": r["split"], "kd": _fmt(res["random_real"]),
                         "hard": _fmt(res["random_real"], True), "moved": "-", "agree": "-", "wall": "-"})
        rows.append({"set": f"{r['row']}: {r['what']}", "tag": r["tag"], "teacher": r["teacher_mode"],
                     "split": r["split"], "kd": _fmt(res.get("distilled")), "hard": _fmt(res.get("distilled"), True),
                     "moved": "-" if syn.get("mean_abs_pixel_change") is None else f"{syn['mean_abs_pixel_change']:.1f}",
                     "agree": "-" if syn.get("teacher_agreement") is None else f"{syn['teacher_agreement']:.2f}",
                     "wall": f"{r['wall_s']:.0f} s (synth {timing.get('synthesize')}, eval {timing.get('evaluate')})"})
    cols = [("run", "tag", "s"), ("set", "set", "s"), ("teacher", "teacher", "s"), ("split", "split", "s"),
            ("top-1 % KD", "kd", "s"), ("top-1 % hard", "hard", "s"), ("pixel change", "moved", "s"),
            ("teacher agrees", "agree", "s"), ("wall", "wall", "s")]
    print(markdown_table(cols, rows))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("base", help="prepare (holdout carved) + squeeze")
    b.add_argument("--out", required=True)
    b.add_argument("overrides", nargs="*")
    r = sub.add_parser("row", help="run ablation rows against a base")
    r.add_argument("--base", required=True)
    r.add_argument("--work", required=True)
    r.add_argument("--tag", required=True)
    r.add_argument("--ipc", type=int, default=10)
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--split", choices=["holdout", "test"], default="holdout")
    r.add_argument("--control", action="store_true", help="also train the random-real control")
    r.add_argument("--hard", action="store_true", help="also train every set with hard labels")
    r.add_argument("--set", dest="overrides", action="append", default=[], help="extra override (repeatable)")
    r.add_argument("rows", nargs="+", choices=sorted(ROWS))
    sub.add_parser("table", help="print the table of every stored row")
    a = p.parse_args(argv)
    {"base": cmd_base, "row": cmd_row, "table": cmd_table}[a.cmd](a)


if __name__ == "__main__":
    main()
