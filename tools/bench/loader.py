"""Data-loader benchmark: torchvision ImageFolder vs the engine's WebDataset and FFCV readers.

    python tools/bench/loader.py [--n 20000] [--size 64] [--batch 256] [--epochs 2] [--workers 0,2]
                                 [--out tools/bench/results/loader.json] [--workdir DIR] [--keep]

One run: export N Fashion-MNIST training images (class-balanced) as a SIZE px
JPEG ImageFolder tree, build WebDataset shards (JPEG bytes passed through) and
an FFCV .beton (write mode auto -> jpg) from that tree, then time full passes
of each reader for both presets (train: RandomResizedCrop + flip, shuffled;
eval: Resize + CenterCrop, in order) and each DataLoader worker count. Every
reader yields float32 (3, SIZE, SIZE) tensors normalised with mean = std = 0.5.

A warm-up pass is timed on its own (FFCV compiles its pipeline with numba
there) and excluded from the throughput, which is samples / seconds over
--epochs further passes. FFCV uses its own threads: num_workers = max(1, w).
torch runs with one intra-op thread (torch.set_num_threads(1)), reset before
every reader since FFCV sets torch's thread count to its num_workers while it
runs (rows record the count seen: FFCV's rows max(1, w), the others 1).
speedup_vs_imagefolder compares with the torchvision ImageFolder row of the
same preset and worker count from the same run.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the repo root, for `python tools/bench/loader.py`

import torch  # noqa: E402

from engine import store  # noqa: E402
from engine.data import create_loader  # noqa: E402
from engine.data.export import export_imagefolder  # noqa: E402
from engine.data.ffcv_io import write_ffcv  # noqa: E402
from engine.data.sources import create_source  # noqa: E402
from engine.data.transforms import eval_resize  # noqa: E402
from engine.data.wds_writer import write_wds  # noqa: E402
from engine.errors import DataError, EngineError  # noqa: E402
from tools.bench.common import machine_info, markdown_table  # noqa: E402

SOURCE = "fashion-mnist:/usr/share/datasets/fashion-mnist"
PRESETS = ("train", "eval")
READERS = ("torchvision-imagefolder", "engine-wds", "engine-ffcv")
BASELINE = READERS[0]
CHANNELS = 3
MEAN = STD = [0.5] * CHANNELS
CROP_PCT = 0.875


def imagefolder_loader(tree: str, preset: str, size: int, batch: int, workers: int):
    """The baseline: torchvision's ImageFolder (PIL loader, RGB) + DataLoader, same geometry as the engine."""
    from torchvision import datasets
    from torchvision.transforms import v2

    if preset == "train":
        geo = [v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    else:
        geo = [v2.Resize(eval_resize(size, CROP_PCT), antialias=True), v2.CenterCrop(size)]
    tf = v2.Compose([v2.PILToTensor(), *geo, v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    ds = datasets.ImageFolder(tree, transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=preset == "train", num_workers=workers)


def make_loader(reader: str, paths: dict, preset: str, size: int, batch: int, workers: int):
    if reader == BASELINE:
        return imagefolder_loader(paths["tree"], preset, size, batch, workers)
    uri = paths["wds"] if reader == "engine-wds" else paths["beton"]
    return create_loader(uri, batch, split="train", preset=preset, image_size=size, crop_pct=CROP_PCT,
                         channels=CHANNELS, mean=MEAN, std=STD, shuffle=preset == "train", num_workers=workers)


def one_pass(loader, n: int, size: int, what: str) -> float:
    """Seconds for one full pass; checks it delivered exactly n samples of the expected shape."""
    seen = 0
    t0 = time.perf_counter()
    for x, y in loader:
        if x.shape[1:] != (CHANNELS, size, size) or x.dtype != torch.float32 or len(y) != len(x):
            raise AssertionError(f"{what}: batch of shape {tuple(x.shape)} {x.dtype}, {len(y)} labels")
        seen += len(y)
    dt_s = time.perf_counter() - t0
    assert seen == n, f"{what}: a pass delivered {seen} samples, expected {n}"
    return dt_s


def dir_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def prepare(work: str, n: int, size: int, quality: int, shard_size: int) -> tuple[dict, dict]:
    paths = {"tree": os.path.join(work, "imagefolder"), "wds": os.path.join(work, "wds"),
             "beton": os.path.join(work, "fmnist_train.beton")}
    prep: dict = {}
    src = create_source(SOURCE, "train")
    if n > len(src):
        raise DataError(f"--n: {n} exceeds the {len(src)} Fashion-MNIST training images")
    t0 = time.perf_counter()
    res = export_imagefolder(src, paths["tree"], size=size, fmt="jpg", quality=quality, limit=n, overwrite=True)
    prep["export_s"] = round(time.perf_counter() - t0, 2)
    assert res["num_samples"] == n, res
    tree = create_source(paths["tree"])
    t0 = time.perf_counter()
    entry = write_wds(tree, paths["wds"], split="train", shard_size=shard_size, overwrite=True)
    prep["wds_write_s"] = round(time.perf_counter() - t0, 2)
    assert entry["num_samples"] == n, entry
    t0 = time.perf_counter()
    meta = write_ffcv(tree, paths["beton"], jpeg_quality=quality, write_mode="auto", overwrite=True)
    prep["ffcv_write_s"] = round(time.perf_counter() - t0, 2)
    assert meta["num_samples"] == n and meta["write_mode"] == "jpg", meta
    prep.update(wds_shards=entry["num_shards"], ffcv_write_mode=meta["write_mode"],
                bytes={k: dir_bytes(p) for k, p in paths.items()})
    return paths, prep


def markdown(rows: list[dict]) -> str:
    return markdown_table([("reader", "reader", ""), ("preset", "preset", ""), ("workers", "workers", ">"),
                           ("samples/s", "samples_per_s", ">,.0f"), ("vs ImageFolder", "speedup_vs_imagefolder", ">.2f", "x"),
                           ("first pass (s)", "first_pass_s", ">.2f")], rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="loader.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="training images to export (class-balanced)")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels, stored and read")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2, help="timed passes after the warm-up pass")
    ap.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality of the export and the .beton")
    ap.add_argument("--shard-size", type=int, default=1000, help="samples per WebDataset shard")
    ap.add_argument("--out", default=str(REPO / "tools/bench/results/loader.json"))
    ap.add_argument("--workdir", default=None,
                    help="where to build the data (in a fresh subfolder; default: the system temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the built data")
    args = ap.parse_args(argv)
    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        ap.error(f"--workers: expected comma-separated integers, got '{args.workers}'")
    if not workers or min(workers) < 0:
        ap.error(f"--workers: expected non-negative integers, got '{args.workers}'")
    if args.n < 1 or args.epochs < 1 or args.batch < 1 or args.size < 1:
        ap.error("--n, --epochs, --batch and --size must be positive")

    torch.set_num_threads(1)
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="bench_loader_", dir=args.workdir)
    try:
        paths, prep = prepare(work, args.n, args.size, args.quality, args.shard_size)
        rows, keep_alive = [], []
        for preset in PRESETS:
            for w in workers:
                base = None
                for reader in READERS:
                    what = f"{reader} {preset} workers={w}"
                    torch.set_num_threads(1)  # again: FFCV sets torch's threads to its num_workers
                    loader = make_loader(reader, paths, preset, args.size, args.batch, w)
                    first = one_pass(loader, args.n, args.size, what)
                    times = [one_pass(loader, args.n, args.size, what) for _ in range(args.epochs)]
                    threads = torch.get_num_threads()
                    rate = args.n * args.epochs / sum(times)
                    base = rate if reader == BASELINE else base
                    row = {"reader": reader, "preset": preset, "workers": w,
                           "samples_per_s": round(rate, 1), "speedup_vs_imagefolder": round(rate / base, 3),
                           "first_pass_s": round(first, 3), "samples": args.n, "epochs": args.epochs,
                           "epoch_s": [round(t, 3) for t in times], "torch_threads": threads}
                    if reader == "engine-ffcv":
                        row["ffcv_threads"] = max(1, w)
                    rows.append(row)
                    print(f"{what}: {rate:,.0f} samples/s (first pass {first:.2f} s)", file=sys.stderr, flush=True)
                    if reader == "engine-ffcv":
                        # Freeing an FFCV loader mid-run can make numba print a spurious KeyError from a
                        # dispatcher finalizer (during the next loader's compile): keep them to the end.
                        keep_alive.append(loader)
                    del loader
        torch.set_num_threads(1)
        import torchvision

        result = {
            "benchmark": "loader",
            "machine": machine_info(torchvision=torchvision.__version__),
            "config": {"source": SOURCE, "split": "train", "n": args.n, "size": args.size, "batch": args.batch,
                       "epochs": args.epochs, "workers": workers, "channels": CHANNELS, "mean": MEAN, "std": STD,
                       "crop_pct": CROP_PCT, "jpeg_quality": args.quality, "shard_size": args.shard_size,
                       "shuffle": {"train": True, "eval": False}, "torch_num_threads": 1,
                       "ffcv_threads": "max(1, workers); FFCV also sets torch's threads to this while it runs",
                       "baseline": "torchvision.datasets.ImageFolder (PIL loader, RGB) + v2 transforms "
                                   "+ DataLoader",
                       "prep": prep},
            "rows": rows,
            "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        store.write_json(args.out, result)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"kept the data in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(rows))
    print(f"\n{args.n} samples x {args.epochs} timed passes, {os.cpu_count()} CPUs, torch threads 1; "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
