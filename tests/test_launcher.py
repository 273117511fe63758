"""The `ray job submit` entry point and driver-kill resume, end to end on this machine.

Slow tests start their own Ray head on free ports bound to 127.0.0.1 and stop it
(the whole process group) afterwards."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_tool
from tests_digits import DIGITS

LAUNCHER = "launchers/imagenet_scdd.py"


@pytest.mark.parametrize("args,needle", [
    (["--out", "runs/rel"], "--out 'runs/rel': expected an absolute path or a URL"),
    (["--out", "/tmp/x", "data.train=wds:shards/train"], "config key 'data.train' is 'wds:shards/train'"),
    (["--out", "/tmp/x", "data.source=fashion-mnist:data/fm"], "config key 'data.source'"),
    (["--out", "/tmp/x", "teacher.checkpoint=ckpt/t.pt"], "config key 'teacher.checkpoint'"),
])
def test_launcher_rejects_relative_locations(args, needle, tmp_path):
    r = run_tool(LAUNCHER, "--config", "configs/demo/fashion_scdd.yaml", *args)
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not Path("/tmp/x").exists() or not (Path("/tmp/x") / "config.yaml").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_env() -> dict:
    venv_bin = str(Path(sys.executable).parent)
    # RAY_AUTH_MODE=token: Ray 2.60 enables token auth on a `ray start` head; the job client must be told.
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
            "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""), "ENGINE_NO_PROGRESS": "1"}


@pytest.fixture
def ray_head():
    """`ray start --head --block` on free ports, from this venv's PATH; yields the dashboard URL."""
    env = _ray_env()
    port, dash = _free_port(), _free_port()
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--port={port}",
                             f"--dashboard-port={dash}", "--num-cpus=2", "--disable-usage-stats",
                             # free ports for the head's agents too: another Ray on the machine holds the defaults
                             *(f"--{name}={_free_port()}" for name in (
                                 "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                                 "runtime-env-agent-port", "ray-client-server-port"))],
                            env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            r = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "list", "--address", url],
                               env=env, capture_output=True, text=True)
            if r.returncode == 0:
                break
            time.sleep(2)
        else:
            pytest.fail("the Ray head did not come up")
        yield url, env
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(3)


@pytest.mark.slow
def test_ray_job_submit_runs_the_demo_recipe(ray_head, tmp_path):
    """The issue's exact command against a local head, with the demo recipe at small sizes."""
    url, env = ray_head
    out = tmp_path / "job"
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", url, "--working-dir", ".", "--",
           "python", LAUNCHER, "--config", "configs/demo/fashion_scdd.yaml", "--out", str(out), "--quiet",
           "data.ffcv=false", "teacher.ssl_epochs=1", "teacher.ssl_train_limit=2000", "teacher.probe_epochs=1",
           "teacher.finetune_epochs=0", "synth.scdd.iterations=20", "eval.epochs=3", "eval.val_limit=1000",
           "eval.full_data_epochs=0", "relabel.mode=stored", "cluster.eval_workers=2"]
    for _ in range(12):  # the head's job agent can come up after its dashboard answers: Ray says "try again"
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
        if "No available agent to submit job" not in r.stderr:
            break
        time.sleep(5)
    assert r.returncode == 0 and "succeeded" in r.stdout, (r.stdout + r.stderr)[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["num_classes"] == 10 and res["ipc"] == 10 and res["protocol"]["label_mode"] == "stored"
    man = json.loads((out / "distilled" / "manifest.json").read_text())
    assert man["units"]["backend"] == "ray" and man["units"]["ran"] == man["units"]["units"] == 2  # 2 IPC slices
    assert res["protocol"]["data_parallel"]["world_size"] == 2  # Ray Train, 2 workers
    assert res["protocol"]["val_count"] == 1000  # val_limit: each validation sample counted once
    assert (out / "labels" / "distilled.pt").exists() and (out / "preview.png").exists()


def _synthesize(out, *extra, **kw):
    return subprocess.Popen([sys.executable, "-m", "engine", "synthesize", "--config", "configs/demo/fashion_scdd.yaml",
                             "--out", str(out), "--quiet", *DIGITS, *SLOW_UNITS, *extra], cwd=ROOT, env=_ray_env(),
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


# 10 classes x IPC 4 in blocks of 5, one IPC index per unit: 8 units of a few seconds on the Ray backend
SLOW_UNITS = ["synth.ipc=4", "synth.scdd.iterations=300", "cluster.backend=ray", "cluster.cpus_per_worker=1"]


@pytest.mark.slow
def test_driver_killed_mid_run_resumes_to_identical_bytes(tmp_path):
    import shutil

    base = tmp_path / "base"
    for stage in ("prepare", "squeeze"):
        r = run_tool("-m", "engine", stage, "--config", "configs/demo/fashion_scdd.yaml", "--out", base, "--quiet",
                     *DIGITS)
        assert r.returncode == 0, r.stderr
    ref, run = tmp_path / "ref", tmp_path / "run"
    shutil.copytree(base, ref)
    shutil.copytree(base, run)
    p = _synthesize(ref)
    assert p.wait(timeout=600) == 0, p.stderr.read()[-2000:]

    p = _synthesize(run)
    units = run / "units" / "synthesize"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(units.glob("*/manifest.json"))) < 3:
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGKILL)  # the driver and the local cluster it started
    p.wait()
    # a worker may finish the unit it was writing before Ray's fate-sharing takes it down: wait for quiet
    done, quiet_since = -1, time.time()
    while time.time() - quiet_since < 5:
        now = len(list(units.glob("*/manifest.json")))
        if now != done:
            done, quiet_since = now, time.time()
        time.sleep(0.2)
    assert 3 <= done < 8 and not (run / "distilled" / "manifest.json").exists()

    p = _synthesize(run)
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-2000:]
    assert f"({8 - done} run, {done} already done)" in stdout
    assert (run / "distilled" / "train-000000.tar").read_bytes() == (ref / "distilled" / "train-000000.tar").read_bytes()


@pytest.mark.slow
def test_relative_out_works_with_ray_workers_in_other_directories(tmp_path):
    """`make demo` passes a relative --out; Ray Train workers run elsewhere, so the CLI makes it absolute."""
    r = subprocess.run([sys.executable, "-m", "engine", "run", "--config", str(ROOT / "configs/demo/fashion_scdd.yaml"),
                        "--out", "rel/run", "--quiet", *DIGITS, "cluster.backend=ray", "cluster.eval_workers=2"],
                       cwd=tmp_path, env=_ray_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "rel" / "run" / "results.json").read_text())
    assert res["protocol"]["data_parallel"]["world_size"] == 2
