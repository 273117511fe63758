"""The coordinator on a real local Ray cluster, with a trivial method (tests/cluster_methods.py):
planning, resume, worker death, merge-time re-runs, method errors, resource errors."""
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from engine.cluster.coordinator import run_and_merge, run_units
from engine.cluster.merge import gather_units
from engine.cluster.plan import plan_label_parts, plan_units
from engine.cluster.unitstore import is_done, unit_dir
from engine.config import load_config
from engine.errors import EngineError

TESTS = str(Path(__file__).resolve().parent)


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    # Workers import the trivial method from tests/ (they do not inherit the driver's sys.path).
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": TESTS, "ENGINE_NO_PROGRESS": "1"}})
    yield ray
    ray.shutdown()


def cfg(*overrides):
    return load_config(None, ["device=cpu", "threads=1", "cluster.cpus_per_worker=0.5", *overrides])


def check_exactly_once(out, units, ipc, num_classes):
    images, labels, prov = gather_units(str(out), units)
    assert sorted((p["class"], p["ipc"]) for p in prov) == [(c, i) for c in range(num_classes) for i in range(ipc)]
    from cluster_methods import image

    assert torch.equal(images, torch.stack([image(0, p["class"], p["ipc"]) for p in prov]))
    assert labels.tolist() == [p["class"] for p in prov]


def test_plan_imagenet_ipc50_is_500_content_named_units():
    units = plan_units("synthesize", 1000, 50, 100, 1)
    assert len(units) == 500 and len({u.id for u in units}) == 500
    assert sum(u.num_images for u in units) == 50_000
    assert units[0].id == "c00000-00099_i0000-0001" and units[-1].id == "c00900-00999_i0049-0050"
    # an id names its content, not its position in the schedule
    assert {u.id for u in plan_units("synthesize", 1000, 50, 100, 1)[::-1]} == {u.id for u in units}


def test_label_parts_cover_every_image_epoch_once():
    parts = plan_label_parts(103, 7, 4, 3)
    count = torch.zeros(7, 103, dtype=torch.int32)
    for p in parts:
        count[p.epoch_start:p.epoch_end, p.image_start:p.image_end] += 1
    assert len(parts) == 12 and bool((count == 1).all())


def test_units_run_on_actors_and_resume(ray_cluster, tmp_path):
    units = plan_units("synthesize", 6, 4, 2, 1)  # 3 blocks x 4 slices = 12 units
    from cluster_methods import trivial_worker

    stats = run_units(str(tmp_path), units, trivial_worker, {}, cfg(), show_progress=False)
    assert stats["ran"] == 12 and stats["skipped"] == 0 and stats["workers"] == 4 and stats["backend"] == "ray"
    check_exactly_once(tmp_path, units, 4, 6)
    # resume: a second run finds every unit in the store and starts no worker
    again = run_units(str(tmp_path), units, trivial_worker, {}, cfg(), show_progress=False)
    assert again["ran"] == 0 and again["skipped"] == 12 and again["workers"] == 0


def test_ray_and_local_backends_give_the_same_bytes(ray_cluster, tmp_path):
    from cluster_methods import trivial_worker

    units = plan_units("synthesize", 4, 3, 3, 2)
    for backend in ("ray", "local"):
        run_units(str(tmp_path / backend), units, trivial_worker, {"seed": 3}, cfg(f"cluster.backend={backend}"),
                  show_progress=False)
    for u in units:
        a = (Path(unit_dir(str(tmp_path / "ray"), u)) / "result.pt").read_bytes()
        b = (Path(unit_dir(str(tmp_path / "local"), u)) / "result.pt").read_bytes()
        assert a == b


def test_killed_worker_process_still_yields_every_image_once(ray_cluster, tmp_path):
    """SIGKILL one actor process mid-run: Ray restarts it, its units are retried, nothing is lost or doubled."""
    from cluster_methods import trivial_worker

    units = plan_units("synthesize", 8, 4, 2, 1)  # 16 units of 0.4 s on 2 actors
    pids = tmp_path / "pids.txt"
    out = tmp_path / "run"
    result = {}

    def drive():
        try:
            result["stats"] = run_units(str(out), units, trivial_worker, {"sleep_s": 0.4, "pid_file": str(pids)},
                                        cfg("cluster.workers=2"), show_progress=False)
        except BaseException as exc:  # surfaced by the assertion below
            result["error"] = exc

    t = threading.Thread(target=drive)
    t.start()
    deadline = time.time() + 120
    while time.time() < deadline and not (pids.exists() and len(pids.read_text().split()) >= 2
                                          and sum(is_done(str(out), u, verify=False) for u in units) >= 2):
        time.sleep(0.05)
    victim = int(pids.read_text().split()[0])
    done_before = sum(is_done(str(out), u, verify=False) for u in units)
    os.kill(victim, signal.SIGKILL)
    t.join(timeout=180)
    assert not t.is_alive() and "error" not in result, result.get("error")
    assert done_before < len(units)  # the kill happened mid-run
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 3 and victim in started  # two actors + one restart of the killed one
    assert result["stats"]["ran"] == 16
    check_exactly_once(out, units, 4, 8)


def test_corrupt_or_missing_unit_is_rerun_at_merge(ray_cluster, tmp_path):
    from cluster_methods import trivial_worker

    units = plan_units("synthesize", 4, 2, 2, 1)
    c = cfg()
    run_units(str(tmp_path), units, trivial_worker, {}, c, show_progress=False)
    # corrupt one result after it was listed as finished: the merge finds the bad checksum
    (Path(unit_dir(str(tmp_path), units[1])) / "result.pt").write_bytes(b"garbage")
    merged = []

    def merge(stats):
        merged.append(stats)
        return gather_units(str(tmp_path), units)

    stats, _ = run_and_merge(str(tmp_path), units, trivial_worker, {}, c, merge, show_progress=False)
    assert stats["ran"] == 1 and merged[-1]["rerun_at_merge"] == 1
    check_exactly_once(tmp_path, units, 2, 4)


def test_method_error_stops_the_run_with_its_message(ray_cluster, tmp_path):
    from cluster_methods import trivial_worker

    units = plan_units("synthesize", 4, 2, 2, 1)
    with pytest.raises(EngineError, match="deliberate failure in the method"):
        run_units(str(tmp_path), units, trivial_worker, {"fail_unit": units[2].id}, cfg(), show_progress=False)
    assert not is_done(str(tmp_path), units[2])


@pytest.mark.parametrize("overrides,needle", [
    (["device=cuda"], "the Ray cluster has no GPU"),
    (["cluster.workers=9"], "9 workers need 4.5 CPU"),
    (["cluster.cpus_per_worker=4"], "one worker needs 4.0 CPU"),
    (["cluster.backend=slurm"], "cluster.backend"),
])
def test_impossible_resources_fail_before_any_work(ray_cluster, tmp_path, overrides, needle):
    from cluster_methods import trivial_worker

    units = plan_units("synthesize", 4, 2, 2, 1)
    with pytest.raises(EngineError, match=needle):
        run_units(str(tmp_path), units, trivial_worker, {}, cfg(*overrides), show_progress=False)
    assert not (tmp_path / "units").exists()


def test_read_distilled_reads_every_image_inside_a_data_parallel_rank(ray_cluster, tmp_path, monkeypatch):
    """An evaluation worker (rank 1 of 2) still reads the whole distilled set, not its rank's share."""
    from cluster_methods import trivial_worker
    from engine.cluster.merge import merge_distilled, read_distilled

    units = plan_units("synthesize", 4, 3, 2, 1)
    run_units(str(tmp_path), units, trivial_worker, {}, cfg("cluster.backend=local"), show_progress=False)
    merge_distilled(str(tmp_path), units, [f"k{c}" for c in range(4)], 3, {"channels": 1})
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    images, labels, names = read_distilled(str(tmp_path))
    assert len(images) == 12 and labels.tolist() == [c for c in range(4) for _ in range(3)]


def test_local_dashboard_port_avoids_rays_default_ports(monkeypatch):
    """The free port picked for a local cluster's dashboard must not be one Ray's agents take by default
    (a clean-clone CI run once drew 52365, the dashboard agent's, and ray.init refused it)."""
    import socket

    from engine.cluster import session

    draws = iter([52365, 8265, 6379, 40001])

    class FakeSocket:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, addr):
            self.port = next(draws)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(socket, "socket", FakeSocket)
    assert session._free_port() == 40001
