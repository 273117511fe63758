#!/usr/bin/env python
"""Describe a WebDataset shard directory or an FFCV .beton; --verify decodes every record.

    python tools/inspect_shards.py /shards/fmnist --verify
    python tools/inspect_shards.py /ffcv/train.beton --json
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.data.inspect import format_report, inspect_shards  # noqa: E402
from engine.errors import run_guarded  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="shard directory (path or URL) or .beton file")
    p.add_argument("--json", action="store_true", help="print JSON instead of the summary")
    p.add_argument("--verify", action="store_true", help="decode every record; a corrupt one fails (exit 2)")
    a = p.parse_args(argv)
    info = inspect_shards(a.path, verify=a.verify, show_progress=not a.json)
    print(json.dumps(info, indent=2) if a.json else format_report(info))


if __name__ == "__main__":
    sys.exit(run_guarded(main))
