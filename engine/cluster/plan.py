"""Plan units of work: (class block, IPC index range), named by their content."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import EngineError


@dataclass(frozen=True)
class Unit:
    stage: str
    first_class: int
    last_class: int  # inclusive
    ipc_start: int
    ipc_end: int  # exclusive

    @property
    def id(self) -> str:
        return f"c{self.first_class:05d}-{self.last_class:05d}_i{self.ipc_start:04d}-{self.ipc_end:04d}"

    @property
    def classes(self) -> list[int]:
        return list(range(self.first_class, self.last_class + 1))

    @property
    def num_images(self) -> int:
        return len(self.classes) * (self.ipc_end - self.ipc_start)


def plan_units(stage: str, num_classes: int, ipc: int, class_block: int, ipc_per_unit: int) -> list[Unit]:
    """Class blocks x IPC slices, in class-major order; the last block/slice may be smaller."""
    for key, v in (("synth.ipc", ipc), ("synth.class_block", class_block), ("synth.ipc_per_unit", ipc_per_unit),
                   ("number of classes", num_classes)):
        if v < 1:
            raise EngineError(f"{key}: expected a positive number, got {v}")
    units = []
    for c0 in range(0, num_classes, class_block):
        c1 = min(c0 + class_block, num_classes) - 1
        for i0 in range(0, ipc, ipc_per_unit):
            units.append(Unit(stage, c0, c1, i0, min(i0 + ipc_per_unit, ipc)))
    return units


@dataclass(frozen=True)
class LabelPart:
    """Stored relabelling of images [image_start, image_end) over epochs [epoch_start, epoch_end)."""
    stage: str
    image_start: int
    image_end: int  # exclusive
    epoch_start: int
    epoch_end: int  # exclusive

    @property
    def id(self) -> str:
        return f"n{self.image_start:07d}-{self.image_end:07d}_e{self.epoch_start:04d}-{self.epoch_end:04d}"

    @property
    def num_images(self) -> int:
        return self.image_end - self.image_start


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    parts = max(1, min(parts, n))
    bounds = [round(k * n / parts) for k in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:])]


def plan_label_parts(num_images: int, epochs: int, image_parts: int, epoch_parts: int = 1,
                     stage: str = "relabel") -> list[LabelPart]:
    """Disjoint image ranges x epoch ranges covering every (image, epoch) once."""
    if num_images < 1 or epochs < 1:
        raise EngineError(f"relabel: nothing to label ({num_images} images, {epochs} epochs)")
    return [LabelPart(stage, a, b, e0, e1) for a, b in _split(num_images, image_parts)
            for e0, e1 in _split(epochs, epoch_parts)]
