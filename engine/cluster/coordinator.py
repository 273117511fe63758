"""The coordinator: resume, dispatch units to a pool of actors, retry, report progress.

    run_units(out, units, factory, factory_kwargs, cfg)

lists the units whose output is already in the store and skips them (resume),
then runs the rest -- in this process (`cluster.backend=local`) or on Ray
actors, one per GPU or CPU slot, reserved together in a placement group
(`cluster.backend=ray`). At most `cluster.max_in_flight` units are queued per
actor. A dead worker process is restarted by Ray (`max_restarts`) and its
in-flight units retried (`max_task_retries`); a unit whose actor is gone for
good is handed to another one. Units are idempotent, so a retry does no harm.
An error raised by the method itself (bad input, a non-finite loss) is not
retried: it stops the run with the method's own message.
"""
from __future__ import annotations

import time
from collections import deque

from ..errors import EngineError
from ..progress import progress
from .session import check_backend, connect, wants_gpu, worker_count
from .unitstore import UnitMissing, is_done, remove_unit
from .workers import UnitWorker, execute_unit

PLACEMENT_TIMEOUT_S = 120


def run_units(out: str, units: list, factory, factory_kwargs: dict, cfg, desc: str = "units",
              show_progress: bool = True) -> dict:
    """Run every unit not yet in the store; returns counts and timing (units, ran, skipped, seconds, workers)."""
    backend = check_backend(cfg.cluster)
    todo = [u for u in units if not is_done(out, u, verify=False)]
    stats = {"units": len(units), "ran": 0, "skipped": len(units) - len(todo), "seconds": 0.0,
             "backend": backend, "workers": 0, "retries": 0}
    if not todo:
        return stats
    t0 = time.time()
    bar = progress(total=len(todo), desc=desc, unit="unit", disable=not show_progress)
    try:
        if backend == "local":
            from ..runtime import set_threads

            set_threads(int(cfg.threads))
            work = factory(**factory_kwargs)
            stats["workers"] = 1
            for u in todo:
                _account(stats, bar, execute_unit(out, u, work), t0)
        else:
            _run_on_ray(out, todo, factory, factory_kwargs, cfg, stats, bar, t0)
    finally:
        bar.close()
    stats["seconds"] = round(time.time() - t0, 2)
    return stats


def run_and_merge(out: str, units: list, factory, factory_kwargs: dict, cfg, merge, desc: str = "units",
                  show_progress: bool = True):
    """run_units, then `merge(stats)`. A unit found missing or corrupt while merging is
    deleted and run again (never dropped), up to cluster.max_retries times per merge."""
    stats = run_units(out, units, factory, factory_kwargs, cfg, desc, show_progress)
    rerun = 0
    while True:
        try:
            return stats, merge({**stats, "rerun_at_merge": rerun})
        except UnitMissing as exc:
            rerun += 1
            if rerun > int(cfg.cluster.max_retries) + 1:
                raise
            remove_unit(out, exc.unit)
            again = run_units(out, [exc.unit], factory, factory_kwargs, cfg, desc, show_progress)
            stats["ran"] += again["ran"]
            stats["skipped"] -= again["ran"]


def _account(stats: dict, bar, info: dict, t0: float) -> None:
    stats["ran"] += 0 if info["skipped"] else 1
    stats["skipped"] += 1 if info["skipped"] else 0
    stats["images"] = stats.get("images", 0) + info["images"]
    bar.update(1)
    bar.set_postfix(img_per_s=f"{stats['images'] / max(time.time() - t0, 1e-9):.2f}")


def _run_on_ray(out, todo, factory, factory_kwargs, cfg, stats, bar, t0) -> None:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cc = cfg.cluster
    resources = connect(cc)
    use_gpu = wants_gpu(str(cfg.device), resources)
    n = worker_count(cc, resources, use_gpu, len(todo))
    cpus, gpus = float(cc.cpus_per_worker), (float(cc.gpus_per_worker) if use_gpu else 0.0)
    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    pg = placement_group([bundle] * n, strategy="PACK")
    actors = []
    try:
        ready, _ = ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            raise EngineError(f"cluster: could not reserve {n} workers x {bundle} within {PLACEMENT_TIMEOUT_S} s "
                              f"(cluster: {resources}); lower cluster.workers or cluster.cpus_per_worker")
        # CPU float results depend on the thread count: pin it from the CPU share (DESIGN principle 5).
        threads = int(cfg.threads) or max(1, int(cpus))
        retries = int(cc.max_retries)
        remote_cls = ray.remote(UnitWorker)
        for i in range(n):
            actors.append(remote_cls.options(
                num_cpus=cpus, num_gpus=gpus, max_restarts=retries, max_task_retries=retries,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
            ).remote(out, factory, factory_kwargs, threads))
        stats["workers"] = n
        ray.get([a.pid.remote() for a in actors])  # every actor has loaded its method (e.g. the teacher)
        stats["startup_s"] = round(time.time() - t0, 2)
        _dispatch(actors, todo, int(cc.max_in_flight), retries, stats, bar, t0)
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
        remove_placement_group(pg)


def _dispatch(actors, todo, max_in_flight, retries, stats, bar, t0) -> None:
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    pending = deque(todo)
    inflight: dict = {}  # ObjectRef -> (actor index, unit)
    load = [0] * len(actors)
    alive = set(range(len(actors)))
    attempts: dict[str, int] = {}

    def submit():
        while pending:
            free = [i for i in alive if load[i] < max_in_flight]
            if not free:
                return
            i = min(free, key=lambda k: (load[k], k))
            u = pending.popleft()
            inflight[actors[i].run.remote(u)] = (i, u)
            load[i] += 1

    submit()
    while inflight:
        (ref,), _ = ray.wait(list(inflight), num_returns=1)
        i, u = inflight.pop(ref)
        load[i] -= 1
        try:
            info = ray.get(ref)
        except RayTaskError as exc:  # the method raised: deterministic, do not retry
            cause = getattr(exc, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise EngineError(f"unit {u.id}: {str(exc).strip().splitlines()[-1]}") from None
        except RayActorError as exc:  # the worker process died and Ray's own retries are spent
            attempts[u.id] = attempts.get(u.id, 0) + 1
            stats["retries"] += 1
            if attempts[u.id] > retries:
                raise EngineError(f"unit {u.id}: its worker died {attempts[u.id]} times "
                                  f"(cluster.max_retries={retries}); last: {_first_line(exc)}") from None
            if not _responds(actors[i]):
                alive.discard(i)
            if not alive:
                raise EngineError(f"cluster: every worker died; last: {_first_line(exc)}") from None
            pending.appendleft(u)
        else:
            _account(stats, bar, info, t0)
        submit()


def _responds(actor) -> bool:
    import ray

    try:
        ray.get(actor.pid.remote(), timeout=60)
        return True
    except Exception:
        return False


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
