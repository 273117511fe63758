"""Checkpoints: save a model with its construction arguments; load strictly from a path or URL.

A checkpoint file is a torch pickle {"model": {name, num_classes, ...}, "state_dict": ...};
a bare state dict (e.g. a user's backbone + head) is accepted too. `module.`
prefixes (DataParallel/DDP) are stripped. Loading is strict: missing and
unexpected keys are listed in the error.
"""
from __future__ import annotations

import io

import torch
from torch import nn

from .. import store
from ..errors import EngineError


def save_checkpoint(url: str, model: nn.Module, model_args: dict, extra: dict | None = None) -> None:
    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"model": dict(model_args), "state_dict": state, **(extra or {})}, buf)
    store.write_bytes(url, buf.getvalue())


def read_checkpoint(url: str) -> dict:
    if not store.exists(url):
        raise EngineError(f"{url}: checkpoint not found")
    try:
        obj = torch.load(io.BytesIO(store.read_bytes(url)), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EngineError(f"{url}: not a readable torch checkpoint ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise EngineError(f"{url}: expected a dict checkpoint, got {type(obj).__name__}")
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        return obj
    return {"model": {}, "state_dict": obj}


def strip_prefix(state: dict, prefix: str = "module.") -> dict:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_checkpoint(url: str, model: nn.Module) -> dict:
    """Load `url` into `model` strictly; returns the checkpoint's metadata."""
    ckpt = read_checkpoint(url)
    state = strip_prefix(ckpt["state_dict"])
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        if shape:
            parts.append(f"shape mismatch {_few(shape)}")
        raise EngineError(f"{url}: checkpoint does not fit the architecture: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    return {k: v for k, v in ckpt.items() if k != "state_dict"}


def _few(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")
