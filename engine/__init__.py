"""Distillation engine: squeeze -> synthesize -> relabel -> evaluate, on Ray."""

__version__ = "0.1.0"
