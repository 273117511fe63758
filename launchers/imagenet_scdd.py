"""SC-DD on ImageNet-1K (or any recipe given with --config) on a Ray cluster.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python launchers/imagenet_scdd.py --config configs/demo/fashion_scdd.yaml --out /abs/dir

Runs squeeze (or loads the given teacher), synthesis as units on Ray actors,
merge, stored relabelling and evaluation; re-running the same command resumes.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the uploaded working directory's engine, not an installed one

from engine.launch import launch  # noqa: E402

if __name__ == "__main__":
    sys.exit(launch(sys.argv[1:], "configs/imagenet1k/scdd_r18_ipc50.yaml", __doc__.splitlines()[0]))
