"""Progress bars (tqdm) with rate and ETA; quiet when not on a terminal in CI logs."""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress(iterable=None, total=None, desc=None, unit="it", disable=False, **kw):
    # In CI / piped logs keep the bar but refresh it rarely.
    mininterval = 0.2 if sys.stderr.isatty() else 5.0
    if os.environ.get("ENGINE_NO_PROGRESS"):
        disable = True
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True,
                mininterval=mininterval, **kw)
