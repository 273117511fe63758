#!/usr/bin/env python
"""Write a source (ImageFolder tree, fashion-mnist:DIR, digits:) as WebDataset shards.

    python tools/make_wds.py /data/imagenet/train /shards/imagenet --split train --workers 32 --shuffle
    python tools/make_wds.py fashion-mnist:/usr/share/datasets/fashion-mnist /shards/fmnist --split val
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.data.sources import create_source  # noqa: E402
from engine.data.wds_writer import write_wds  # noqa: E402
from engine.errors import run_guarded  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="ImageFolder directory, fashion-mnist:DIR or digits:")
    p.add_argument("dest", help="output shard directory (path or fsspec URL)")
    p.add_argument("--split", default="train", help="split name of the output (and of multi-split sources)")
    p.add_argument("--source-split", default=None, help="split of the source, if it differs from --split")
    p.add_argument("--shard-size", type=int, default=5000, help="samples per shard")
    p.add_argument("--workers", type=int, default=1, help="parallel writer processes")
    p.add_argument("--shuffle", action="store_true", help="write samples in a seeded random order")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace the split if DEST already holds it")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) unreadable images instead of failing")
    p.add_argument("--no-metadata", action="store_true", help="do not write per-sample .json metadata")
    a = p.parse_args(argv)
    src = create_source(a.src, a.source_split or a.split)
    e = write_wds(src, a.dest, a.split, a.shard_size, a.workers, a.shuffle, a.seed, a.overwrite, a.skip_bad,
                  metadata=not a.no_metadata)
    print(f"{a.dest}: split {a.split}: {e['num_samples']} samples, {len(src.classes)} classes, "
          f"{e['num_shards']} shards, {e['skipped']['count']} skipped, {e['write_seconds']} s")


if __name__ == "__main__":
    sys.exit(run_guarded(main))
