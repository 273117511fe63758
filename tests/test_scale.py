"""ImageNet-1K's unit count on this machine: 1000 classes x IPC 50 at 8 px with a tiny teacher and
3 recovery iterations, through the Ray coordinator (tools/bench/cluster.py --backends ray)."""
import json

import pytest

from conftest import run_tool


@pytest.mark.slow
def test_1000_classes_ipc50_is_500_units_merged_into_50000_images(tmp_path):
    out = tmp_path / "cluster.json"
    r = run_tool("tools/bench/cluster.py", "--backends", "ray", "--work", tmp_path / "work", "--out", out,
                 timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())["results"]["ray"]
    assert res["units"] == 500 and res["ran"] == 500 and res["workers"] == 2
    assert res["num_images"] == 50_000 and res["per_class_min"] == res["per_class_max"] == 50
    assert res["every_class_ipc_once"]
