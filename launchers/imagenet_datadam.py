"""DataDAM attention matching on ImageNet-1K (or any recipe given with --config) on a Ray cluster.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python launchers/imagenet_datadam.py --config configs/demo/fashion_datadam.yaml --out /abs/dir

Runs prepare (if data.train is empty), squeeze (the soft-label protocol's teacher: a checkpoint at
ImageNet scale), synthesis as class blocks on Ray actors, the merge, and both evaluation protocols on
Ray Train; re-running the same command resumes. The generic launcher engine.launch takes any method's
recipe; this file only names DataDAM's default recipe.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the uploaded working directory's engine, not an installed one

from engine.launch import launch  # noqa: E402

if __name__ == "__main__":
    sys.exit(launch(sys.argv[1:], "configs/imagenet1k/datadam_convd4_ipc50.yaml", __doc__.splitlines()[0]))
