"""Run units in this process: skip finished ones, save each atomically, show progress."""
from __future__ import annotations

import time

from ..progress import progress
from .plan import Unit
from .unitstore import is_done, save_unit


def run_units_local(out: str, units: list[Unit], work, show_progress: bool = True) -> dict:
    """`work(unit) -> (result dict, info dict)`; returns counts of run and skipped units."""
    todo = [u for u in units if not is_done(out, u)]
    skipped = len(units) - len(todo)
    images = 0
    t0 = time.time()
    bar = progress(todo, desc="units", unit="unit", disable=not show_progress)
    for u in bar:
        t = time.time()
        result, info = work(u)
        save_unit(out, u, result, {**info, "seconds": round(time.time() - t, 2)})
        images += u.num_images
        bar.set_postfix(img_per_s=f"{images / (time.time() - t0):.2f}")
    return {"units": len(units), "ran": len(todo), "skipped": skipped, "seconds": round(time.time() - t0, 2)}
