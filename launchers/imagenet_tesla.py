"""Soft-label TESLA on ImageNet-1K (or any recipe given with --config) on a Ray cluster.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python launchers/imagenet_tesla.py --config configs/demo/fashion_tesla.yaml --out /abs/dir

Runs the experts (one expert per unit on Ray actors), synthesis as IPC slices on
Ray actors, the merge with the soft labels and every slice's learned lr, and
evaluation on Ray Train; re-running the same command resumes.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the uploaded working directory's engine, not an installed one

from engine.launch import launch  # noqa: E402

if __name__ == "__main__":
    sys.exit(launch(sys.argv[1:], "configs/imagenet1k/tesla_convd4_ipc50.yaml", __doc__.splitlines()[0]))
