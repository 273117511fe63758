"""Data-parallel evaluation on Ray Train: post-train students over N workers.

`evaluate_on_ray` runs `engine.evaluate.evaluate_sets` on a Ray Train
`TorchTrainer` (Ray 2.60 runs Ray Train V2): one worker per rank, a
torch.distributed group of gloo on CPU or NCCL on GPU, the student wrapped in
DistributedDataParallel by evaluate_sets itself. This module is the only place
that touches Ray here; what data parallelism means for the batches, the drop rule
for uneven batches, validation counts and `eval.val_limit` is documented in
engine.evaluate and engine.metrics (plain torch.distributed).

Each worker loads its own inputs by calling `inputs_fn(rank=, world_size=,
device=, **inputs_args)`, a picklable module-level function (nothing large
travels through the trainer's config): it returns the keyword arguments of
evaluate_sets other than cfg / device / rank / world_size / progress --
distilled_images, distilled_labels, teacher, val_loader_fn (giving this rank's
shard of the val set, e.g. engine.data.loader_from_config(..., rank=rank,
world_size=world_size)), random_real, num_classes, label_mode, stored, method,
ipc, hard_control as needed.

Rank 0's results dict comes back as the training function's return value
(`Result.return_value`, Ray Train V2), not through `ray.train.report`: V2 keeps
reported metrics only together with a checkpoint.

Failures: `FailureConfig(max_failures=0)`, so a worker's exception ends the run
at once (Ray Train tears the worker group down, which also frees a rank left
waiting in a collective) and `fit()` raises. A worker's EngineError is re-raised
as it was (one clear line for the CLI); any other failure surfaces as Ray's
WorkerGroupError, whose message carries the workers' tracebacks.
"""
from __future__ import annotations

import os
import tempfile
import uuid
from typing import Any, Callable

from ..config import from_dict, to_dict
from ..errors import ConfigError, EngineError


def _evaluate_worker(config: dict) -> dict | None:
    """Ray Train training function: one rank of the data-parallel evaluation."""
    import ray.train
    import ray.train.torch
    import torch

    from ..evaluate import evaluate_sets

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cfg = from_dict(config["cfg"])
    kwargs = config["inputs_fn"](rank=rank, world_size=world, device=device, **config["inputs_args"])
    results = evaluate_sets(cfg=cfg, device=device, rank=rank, world_size=world,
                            progress=(config["progress"] and rank == 0), **kwargs)
    return results if rank == 0 else None


def _raise_worker_failure(exc: Exception) -> None:
    """Re-raise a worker's EngineError as it was; otherwise let Ray's error through."""
    failures = getattr(exc, "worker_failures", None) or {}
    for rank in sorted(failures):
        if isinstance(failures[rank], EngineError):
            raise failures[rank] from exc
    raise exc


def evaluate_on_ray(inputs_fn: Callable[..., dict], inputs_args: dict, cfg, num_workers: int, use_gpu: bool,
                    cpus_per_worker: float, storage_path: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run evaluate_sets data parallel on `num_workers` Ray Train workers and return
    rank 0's results dict (every rank computes the same one).

    `inputs_fn(rank=, world_size=, device=, **inputs_args)`: a picklable module-level
    function run on every worker that returns evaluate_sets' keyword arguments (module
    docstring). `cfg`: the engine config (OmegaConf or EngineConfig), sent as a plain
    dict and rebuilt on the workers against the EngineConfig schema. Each worker holds
    `cpus_per_worker` CPUs (fractions allowed; torch threads pinned to max(1, int(...)))
    and, with `use_gpu`, one GPU; the group is gloo on CPU, NCCL on GPU.
    `storage_path`: Ray Train's run storage (default: a temporary directory removed
    afterwards; a multi-node cluster needs storage every node reaches).

    The caller owns the Ray connection (ray.init / ray.shutdown). A worker's
    EngineError is raised here as it was; other worker failures raise Ray's
    TrainingFailedError with the workers' messages. No retries."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    try:
        from ray.train.v2.api.exceptions import TrainingFailedError
    except ImportError:  # pragma: no cover - Ray without Train V2
        from ray.train.base_trainer import TrainingFailedError

    if not ray.is_initialized():
        raise EngineError("evaluate on Ray: not connected to a Ray cluster (call ray.init first)")
    if int(num_workers) < 1:
        raise ConfigError(f"evaluate on Ray: expected at least 1 worker, got {num_workers}")
    if float(cpus_per_worker) <= 0:
        raise ConfigError(f"evaluate on Ray: cpus per worker must be positive, got {cpus_per_worker}")
    resources = {"CPU": float(cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = 1.0
    loop_config = {"inputs_fn": inputs_fn, "inputs_args": dict(inputs_args), "cfg": to_dict(cfg),
                   "cpus_per_worker": float(cpus_per_worker), "progress": bool(progress)}
    with tempfile.TemporaryDirectory(prefix="engine-ray-eval-") as tmp:
        trainer = TorchTrainer(
            _evaluate_worker,
            train_loop_config=loop_config,
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=int(num_workers), use_gpu=bool(use_gpu),
                                         resources_per_worker=resources),
            run_config=RunConfig(name=f"evaluate-{uuid.uuid4().hex[:8]}",
                                 storage_path=storage_path or os.path.join(tmp, "ray_train"),
                                 failure_config=FailureConfig(max_failures=0)),
        )
        try:
            result = trainer.fit()
        except TrainingFailedError as exc:
            _raise_worker_failure(exc)
    if not isinstance(result.return_value, dict):
        raise EngineError("evaluate on Ray: rank 0 returned no results")
    return result.return_value
