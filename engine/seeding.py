"""Seeds derived from content, never from scheduling order (DESIGN principle 5).

`derive_seed(run_seed, "stage", class_index, ipc_index)` hashes its parts with
SHA-256, so the same parts give the same seed in every process (Python's own
hash() of strings is salted per process and must not be used for this).
"""
from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(*parts) -> int:
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def py_rng(*parts) -> random.Random:
    return random.Random(derive_seed(*parts))


def np_rng(*parts) -> np.random.Generator:
    return np.random.default_rng(derive_seed(*parts))


def torch_gen(*parts, device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*parts))
    return g
