"""Joining or starting the Ray cluster, and checking it can do what the config asks.

Under `ray job submit` the job supervisor sets RAY_ADDRESS and `ray.init()`
joins that cluster. Otherwise a private local cluster is started with
`address="local"`: a bare `ray.init()` would silently join any head left
running on the machine. A local cluster binds to 127.0.0.1 only.
"""
from __future__ import annotations

import os

from ..errors import ConfigError, EngineError

BACKENDS = ("ray", "local")
_started_here = False  # this process started the local cluster it is connected to


def check_backend(cluster_cfg) -> str:
    if cluster_cfg.backend not in BACKENDS:
        raise ConfigError(f"config key 'cluster.backend': expected one of {', '.join(BACKENDS)}, "
                          f"got '{cluster_cfg.backend}'")
    for key in ("cpus_per_worker", "gpus_per_worker"):
        if float(getattr(cluster_cfg, key)) <= 0:
            raise ConfigError(f"config key 'cluster.{key}': expected a positive number, got {getattr(cluster_cfg, key)}")
    for key in ("max_in_flight", "eval_workers", "relabel_epoch_parts"):
        if int(getattr(cluster_cfg, key)) < 1:
            raise ConfigError(f"config key 'cluster.{key}': expected at least 1, got {getattr(cluster_cfg, key)}")
    for key in ("workers", "num_cpus", "max_retries", "relabel_parts"):
        if int(getattr(cluster_cfg, key)) < 0:
            raise ConfigError(f"config key 'cluster.{key}': expected 0 or more, got {getattr(cluster_cfg, key)}")
    return cluster_cfg.backend


def connect(cluster_cfg) -> dict:
    """ray.init as the config and environment say (once per process); returns the cluster's resources."""
    import ray

    global _started_here
    if not ray.is_initialized():
        # Without this Ray binds the node to the machine's routable address even when told 127.0.0.1.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        kw = {"log_to_driver": True, "configure_logging": False}
        if cluster_cfg.address:
            ray.init(address=cluster_cfg.address, **kw)
        elif os.environ.get("RAY_ADDRESS"):
            ray.init(**kw)  # joins the cluster `ray job submit` runs this job on
        else:
            from ..runtime import available_cpus

            # Ray Train's placement-group cleaner polls the State API, which needs the dashboard:
            # without one each evaluation waits ~12 s at shutdown. Both stay on 127.0.0.1.
            port = _free_port()
            os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
            ray.init(address="local", num_cpus=int(cluster_cfg.num_cpus) or available_cpus(),
                     include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                     _node_ip_address="127.0.0.1", **kw)
            _started_here = True
    return {k: float(v) for k, v in ray.cluster_resources().items()}


def disconnect() -> None:
    """Shut down the local cluster this process started (a joined cluster is left running)."""
    global _started_here
    if _started_here:
        import ray

        ray.shutdown()
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        _started_here = False


def _free_port() -> int:
    """A free 127.0.0.1 port that is none of Ray's default ports: the node's other components
    (e.g. the dashboard agent on 52365) still take those, and ray.init refuses a clash."""
    import socket

    from ray._private import ray_constants as rc

    taken = {rc.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT, rc.DEFAULT_DASHBOARD_PORT, rc.DEFAULT_PORT}
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port


def wants_gpu(device: str, resources: dict) -> bool:
    """Whether workers get GPUs: `cuda` demands them (error before any work when the
    cluster has none), `auto` uses them when the cluster has some, `cpu` never."""
    gpus = resources.get("GPU", 0.0)
    if device.startswith("cuda"):
        if gpus <= 0:
            raise EngineError(f"config key 'device' is '{device}' but the Ray cluster has no GPU "
                              f"(resources: {_fmt(resources)}); use device=cpu or add GPU nodes")
        return True
    if device == "auto":
        return gpus > 0
    if device != "cpu":
        raise ConfigError(f"config key 'device': expected auto, cpu or cuda[:N], got '{device}'")
    return False


def worker_count(cluster_cfg, resources: dict, use_gpu: bool, units: int) -> int:
    """Actors to start: the configured count, else as many as the cluster's CPUs or GPUs hold;
    never more than there are units. Error when not even one fits."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    per_cpu, per_gpu = float(cluster_cfg.cpus_per_worker), float(cluster_cfg.gpus_per_worker)
    fit = int(cpus // per_cpu + 1e-9)
    if use_gpu:
        fit = min(fit, int(gpus // per_gpu + 1e-9))
    if fit < 1:
        need = f"{per_cpu} CPU" + (f" + {per_gpu} GPU" if use_gpu else "")
        raise EngineError(f"cluster: one worker needs {need} but the Ray cluster has {_fmt(resources)}")
    n = int(cluster_cfg.workers) or fit
    if n > fit:
        raise EngineError(f"config key 'cluster.workers': {n} workers need {n * per_cpu:g} CPU"
                          + (f" + {n * per_gpu:g} GPU" if use_gpu else "") + f", the Ray cluster has {_fmt(resources)}")
    return max(1, min(n, units))


def worker_slots(cfg) -> int:
    """How many workers the run would get (1 with the local backend); connects to Ray if needed."""
    if check_backend(cfg.cluster) == "local":
        return 1
    resources = connect(cfg.cluster)
    return worker_count(cfg.cluster, resources, wants_gpu(str(cfg.device), resources), 1 << 30)


def _fmt(resources: dict) -> str:
    return ", ".join(f"{resources.get(k, 0.0):g} {k}" for k in ("CPU", "GPU"))
