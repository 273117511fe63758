"""Run a model from one flat parameter vector (trajectory matching, METHODS.md section 2).

    flat = flatten_params(model)                    # detached copy, parameters in named_parameters() order
    logits = functional_forward(model, flat, x)     # differentiable in flat and x
    load_flat_params(model, flat)                   # copy back into the module

The module only supplies the architecture (and its buffers): its own parameter
values, dtype and device are ignored by `functional_forward`, so a float32
skeleton runs a float64 vector. The order is that of `model.named_parameters()`,
the same as the reference code's `torch.cat([p.reshape(-1) for p in model.parameters()])`.
A BatchNorm model in train mode updates its running statistics in place on
every call (instance-norm ConvNets have no buffers).
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call

from ..errors import EngineError
from ..seeding import derive_seed


def param_layout(model: nn.Module) -> list[tuple[str, torch.Size]]:
    return [(name, p.shape) for name, p in model.named_parameters()]


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flatten_params(model: nn.Module) -> torch.Tensor:
    """A detached copy of all parameters as one vector."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def unflatten_params(model: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """{name: view of flat shaped like the parameter}; views keep flat's autograd graph."""
    layout = param_layout(model)
    total = sum(s.numel() for _, s in layout)
    if flat.dim() != 1 or flat.numel() != total:
        raise EngineError(f"flat parameters: expected a vector of {total} values for "
                          f"{type(model).__name__}, got shape {tuple(flat.shape)}")
    out, i = {}, 0
    for name, shape in layout:
        k = shape.numel()
        out[name] = flat[i:i + k].view(shape)
        i += k
    return out


def load_flat_params(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy a flat vector into the module's parameters (keeping their dtype and device)."""
    parts = unflatten_params(model, flat.detach())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(parts[name])


def check_flat_params(model: nn.Module, flat: torch.Tensor, what: str = "parameters") -> None:
    """A flat vector must fit the model: one clear line saying whether the class count (the size of a
    final `fc` Linear) or the architecture differs."""
    want = num_params(model)
    got = flat.numel() if flat.dim() == 1 else -1
    if got == want:
        return
    fc = getattr(model, "fc", None)
    if got > 0 and isinstance(fc, nn.Linear):
        per_class = fc.in_features + (1 if fc.bias is not None else 0)
        extra = got - want
        if extra % per_class == 0 and fc.out_features + extra // per_class >= 1:
            raise EngineError(f"{what}: parameters are for {fc.out_features + extra // per_class} classes, "
                              f"the model has {fc.out_features}")
    n = got if got > 0 else f"shape {tuple(flat.shape)} of"
    raise EngineError(f"{what}: {n} parameters do not fit the model ({type(model).__name__} with {want}): "
                      f"different architecture")


def functional_forward(model: nn.Module, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """model(x) with the parameters taken from `flat`."""
    return functional_call(model, unflatten_params(model, flat), (x,))


def init_flat_params(model: nn.Module, *seed, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The module's default initialisation (each layer's reset_parameters), drawn from a seed derived
    from `seed`, on the CPU (the same values whatever device the module is on); the module itself is
    left untouched. Returns a CPU vector."""
    m = copy.deepcopy(model).to("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed("init", *seed))
        for sub in m.modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
    flat = flatten_params(m)
    return flat if dtype is None else flat.to(dtype)
