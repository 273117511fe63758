"""Export a data source as an ImageFolder tree: DEST/<class folder>/<index>.jpg|png.

    python tools/export_imagefolder.py fashion-mnist:/usr/share/datasets/fashion-mnist /tmp/fmnist \\
        --split train --size 64 --format jpg --limit 20000

SRC is any engine source URI (imagefolder:DIR | DIR, fashion-mnist:DIR, digits:).
Class folder names are made filesystem-safe; DEST/classes.json keeps the
original names. --limit takes the first N samples round-robin over classes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `python tools/...`

from engine.data.export import FORMATS, export_imagefolder  # noqa: E402
from engine.data.sources import create_source  # noqa: E402
from engine.errors import EngineError  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="export_imagefolder.py",
                                 description="Export a data source as an ImageFolder tree.")
    ap.add_argument("src", metavar="SRC", help="source URI: imagefolder:DIR | DIR, fashion-mnist:DIR, digits:")
    ap.add_argument("dest", metavar="DEST", help="output folder (must be absent or empty unless --overwrite)")
    ap.add_argument("--split", default="train", help="split of multi-split sources (default: train)")
    ap.add_argument("--size", type=int, default=None, help="resize every image to N x N (bicubic)")
    ap.add_argument("--format", default="jpg", choices=FORMATS, help="image format (default: jpg)")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality 1-100 (default: 90)")
    ap.add_argument("--limit", type=int, default=None, help="export the first N samples, class-balanced")
    ap.add_argument("--per-class", type=int, default=None, help="at most N samples of each class")
    ap.add_argument("--overwrite", action="store_true", help="replace a previous export in DEST")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        source = create_source(args.src, args.split)
        res = export_imagefolder(source, args.dest, size=args.size, fmt=args.format, quality=args.quality,
                                 limit=args.limit, per_class=args.per_class, overwrite=args.overwrite,
                                 show_progress=not args.no_progress)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = f"{res['size']}x{res['size']}" if res["size"] else "original size"
    print(f"wrote {res['num_samples']} images in {res['num_classes']} classes ({res['format']}, {size}) "
          f"to {res['dest']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
