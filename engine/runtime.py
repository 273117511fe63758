"""Device and thread selection shared by every stage."""
from __future__ import annotations

import os

import torch

from .errors import ConfigError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}': no CUDA device on this machine")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConfigError(f"device '{name}': expected auto, cpu or cuda[:N]")
    return torch.device(name)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def set_threads(n: int = 0) -> int:
    """Pin torch's intra-op threads (CPU float results depend on the count)."""
    n = n or available_cpus()
    torch.set_num_threads(n)
    return n


def supports_bf16(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()
