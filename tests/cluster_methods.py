"""A trivial method for the cluster tests: each unit's images are a pure function of
(seed, class, IPC index), so any schedule, retry or restart must give the same bytes."""
import os
import time

import torch

from engine.errors import EngineError
from engine.seeding import torch_gen


def image(seed: int, c: int, i: int, size: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (1, size, size), generator=torch_gen(seed, "trivial", c, i), dtype=torch.uint8)


def trivial_worker(seed: int = 0, sleep_s: float = 0.0, fail_unit: str = "", pid_file: str = ""):
    """Unit factory: `work(unit)` returns deterministic images; optionally sleeps, or fails on one unit."""
    if pid_file:  # lets a test find (and kill) the worker processes
        with open(pid_file, "a") as f:
            f.write(f"{os.getpid()}\n")

    def work(unit):
        if unit.id == fail_unit:
            raise EngineError(f"unit {unit.id}: deliberate failure in the method")
        time.sleep(sleep_s)
        imgs = [image(seed, c, i) for c in unit.classes for i in range(unit.ipc_start, unit.ipc_end)]
        labels = [c for c in unit.classes for _ in range(unit.ipc_start, unit.ipc_end)]
        return {"images": torch.stack(imgs), "labels": torch.tensor(labels)}, {"seed": seed}

    return work
