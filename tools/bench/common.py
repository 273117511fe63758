"""Shared by the benchmarks: the machine description and the printed table."""
from __future__ import annotations

import os
import platform

import torch


def machine_info(**extra) -> dict:
    from engine.runtime import available_cpus

    return {"cpu_count": os.cpu_count(), "available_cpus": available_cpus(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, **extra}


def markdown_table(columns: list[tuple], rows: list[dict]) -> str:
    """columns: (header, row key, format spec[, suffix]); a spec starting with '>' right-aligns."""
    cols = [(c[0], c[1], c[2], c[3] if len(c) > 3 else "") for c in columns]
    head = "| " + " | ".join(h for h, _, _, _ in cols) + " |"
    rule = "|" + "|".join("---:" if f.startswith(">") else "---" for _, _, f, _ in cols) + "|"
    body = ["| " + " | ".join(format(r[k], f.lstrip(">")) + sfx for _, k, f, sfx in cols) + " |" for r in rows]
    return "\n".join([head, rule, *body])
