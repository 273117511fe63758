"""The work of one unit, the same in this process and in a Ray actor.

A method supplies a *factory*: a picklable module-level function that, called
once per worker process with the given keyword arguments, loads what the method
needs (the teacher, the distilled images) and returns `work(unit) -> (result,
info)`. The worker runs units through `execute_unit`, which skips a unit whose
output is already in the store (a retried unit after a worker died having saved
it) and writes each result atomically. Nothing here imports Ray: the actor class
is this module's `UnitWorker` wrapped by `ray.remote` in the coordinator.
"""
from __future__ import annotations

import os
import time

from .unitstore import is_done, save_unit


def execute_unit(out: str, unit, work) -> dict:
    """Run one unit unless its output exists; returns what the coordinator reports."""
    if is_done(out, unit, verify=False):
        return {"unit": unit.id, "skipped": True, "images": 0, "seconds": 0.0}
    t0 = time.perf_counter()
    result, info = work(unit)
    seconds = round(time.perf_counter() - t0, 3)
    save_unit(out, unit, result, {**info, "seconds": seconds, "pid": os.getpid()})
    return {"unit": unit.id, "skipped": False, "images": unit.num_images, "seconds": seconds}


class UnitWorker:
    """One per GPU or CPU slot: builds the method's work function once, then runs the units it is handed."""

    def __init__(self, out: str, factory, factory_kwargs: dict, threads: int):
        from ..runtime import set_threads

        os.environ.setdefault("ENGINE_NO_PROGRESS", "1")  # the driver shows the progress
        set_threads(threads)
        self.out = out
        self.work = factory(**factory_kwargs)

    def pid(self) -> int:
        return os.getpid()

    def run(self, unit) -> dict:
        return execute_unit(self.out, unit, self.work)
