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


def unit_dir(out: str, unit: Unit) -> str:
    return store.join(out, "units", unit.stage, unit.id)


def is_done(out: str, unit: Unit) -> bool:
    d = unit_dir(out, unit)
    if not store.exists(store.join(d, store.MANIFEST)):
        return False
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


def load_unit(out: str, unit: Unit) -> tuple[dict, dict]:
    d = unit_dir(out, unit)
    try:
        manifest = store.read_manifest(d, verify=True)
    except StoreError as exc:
        raise EngineError(f"unit {unit.id}: missing or corrupt ({exc})") from None
    result = torch.load(io.BytesIO(store.read_bytes(store.join(d, RESULT))), map_location="cpu", weights_only=True)
    return result, manifest
