"""preview.png: a few images per class in a grid, class names as captions."""
from __future__ import annotations

import io

import numpy as np
import torch

from . import store


def preview_grid(images: torch.Tensor, labels: torch.Tensor, classes: list[str], url: str,
                 per_class: int = 5, max_classes: int = 20, title: str = "") -> None:
    """images: uint8 (N, C, H, W). Writes a PNG to `url` atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = sorted(set(int(c) for c in labels.tolist()))[:max_classes]
    fig, axes = plt.subplots(len(shown), per_class, figsize=(per_class * 1.2, len(shown) * 1.25 + 0.4),
                             squeeze=False)
    for row, c in enumerate(shown):
        idx = (labels == c).nonzero().flatten()[:per_class].tolist()
        for col in range(per_class):
            ax = axes[row][col]
            ax.axis("off")
            if col < len(idx):
                im = images[idx[col]].permute(1, 2, 0).numpy()
                ax.imshow(im[..., 0] if im.shape[2] == 1 else im, cmap="gray" if im.shape[2] == 1 else None,
                          vmin=0, vmax=255, interpolation="nearest")
            if col == 0:
                ax.set_title(classes[c], fontsize=8, loc="left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    store.write_bytes(url, buf.getvalue())
