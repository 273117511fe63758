"""One finished unit per folder: OUT/units/<stage>/<unit id>/{result.pt, manifest.json}.

The manifest is written last, with the result's checksum: a unit counts as
finished only when its manifest exists and the checksum matches, so a unit
killed mid-write is simply run again.
"""
from __future__ import annotations

import io

import torch

from .. import store
from ..errors import EngineError, StoreError
from .plan import Unit

RESULT = "result.pt"


class UnitMissing(EngineError):
    """A unit's output is missing or fails its checksum (the coordinator re-runs it)."""

    def __init__(self, unit: Unit, reason: str):
        super().__init__(f"unit {unit.id}: missing or corrupt ({reason})")
        self.unit = unit


def unit_dir(out: str, unit: Unit) -> str:
    return store.join(out, "units", unit.stage, unit.id)


def is_done(out: str, unit: Unit, verify: bool = True) -> bool:
    """Finished: the manifest exists (and, with `verify`, the result matches its checksum)."""
    d = unit_dir(out, unit)
    if not store.exists(store.join(d, store.MANIFEST)):
        return False
    if not verify:
        return True
    try:
        store.read_manifest(d, verify=True)
        return True
    except StoreError:
        return False


def save_unit(out: str, unit: Unit, result: dict, info: dict) -> None:
    d = unit_dir(out, unit)
    buf = io.BytesIO()
    torch.save(result, buf)
    store.write_bytes(store.join(d, RESULT), buf.getvalue())
    store.write_manifest(d, {"stage": unit.stage, "unit": unit.id, **info}, files=[RESULT])


def remove_unit(out: str, unit: Unit) -> None:
    store.remove(unit_dir(out, unit), recursive=True)


def load_unit(out: str, unit: Unit) -> tuple[dict, dict]:
    d = unit_dir(out, unit)
    try:
        manifest = store.read_manifest(d, verify=True)
    except StoreError as exc:
        raise UnitMissing(unit, str(exc)) from None
    result = torch.load(io.BytesIO(store.read_bytes(store.join(d, RESULT))), map_location="cpu", weights_only=True)
    return result, manifest
