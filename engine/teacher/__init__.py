"""Squeeze: the teacher artifact (OUT/teacher/teacher.pt + manifest.json).

Three ways to the same artifact: `supervised` training, SC-DD's `ssl`
(SimCLR pretraining without labels, then a linear probe, optionally a short
fine-tune), or a user's `checkpoint` (path or URL: backbone + head, `module.`
prefixes allowed), checked against the data's class count and validated.
"""
from __future__ import annotations

from .squeeze import load_teacher, run_squeeze, teacher_model_args  # noqa: F401
