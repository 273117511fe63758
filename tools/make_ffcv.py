#!/usr/bin/env python
"""Write a source (ImageFolder tree, fashion-mnist:DIR, digits:) as an FFCV .beton file.

    python tools/make_ffcv.py /data/imagenet/train /ffcv/imagenet_train.beton --max-res 256 --jpeg-quality 90
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.data.ffcv_io import WRITE_MODES, write_ffcv  # noqa: E402
from engine.data.sources import create_source  # noqa: E402
from engine.errors import run_guarded  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="ImageFolder directory, fashion-mnist:DIR or digits:")
    p.add_argument("dest", help="output .beton path (local)")
    p.add_argument("--split", default="train", help="split of multi-split sources")
    p.add_argument("--max-res", type=int, default=None, help="resize so the longer side is at most R")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--write-mode", choices=WRITE_MODES, default="auto",
                   help="auto: raw pixels for PNG/array sources, jpg for JPEG sources")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    src = create_source(a.src, a.split)
    m = write_ffcv(src, a.dest, a.max_res, a.jpeg_quality, a.write_mode, a.workers, a.overwrite)
    print(f"{a.dest}: {m['num_samples']} samples, {len(m['classes'])} classes, mode {m['write_mode']}, "
          f"{m['write_seconds']} s")


if __name__ == "__main__":
    sys.exit(run_guarded(main))
