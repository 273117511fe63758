"""Real starting images for SC-DD recovery: which training images a unit starts from.

    images, keys, scores = real_init(cfg, locs, unit, labels_cache, teacher, device)

`synth.scdd.init_select`:
  random     a seeded choice of `synth.ipc` distinct images per class (purpose "scdd-init");
  confident  a seeded pool of `init_pool x ipc` images per class (purpose "scdd-init-pool"),
             ranked by the teacher's probability of the class on the un-augmented image; IPC
             index i starts from the i-th most confident one.
  kmeans     the same pool clustered into `ipc` groups by k-means on the teacher's penultimate
             features (seeded); each IPC index starts from the image nearest one centroid, the
             largest cluster first: starts that cover the class rather than repeat its mode
             (the prototype choice of D4M / herding-style coresets).
Either way the choice is made for the whole class, whatever the unit, and the unit takes its IPC
slice of it: two IPC indices of a class never share an image, and a unit run alone starts from
the same images as inside a whole run. Images are read through the shard reader by key.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data.realsets import load_images, pick_per_class
from ..errors import ConfigError
from ..seeding import derive_seed

SELECTS = ("random", "confident", "kmeans")


def check_init(scfg) -> None:
    """One line for a bad synth.scdd init setting, before any worker starts."""
    if scfg.init not in ("noise", "real"):
        raise ConfigError(f"synth.scdd.init: expected noise or real, got '{scfg.init}'")
    if scfg.init_select not in SELECTS:
        raise ConfigError(f"synth.scdd.init_select: expected one of {', '.join(SELECTS)}, got '{scfg.init_select}'")
    if int(scfg.init_pool) < 1:
        raise ConfigError(f"synth.scdd.init_pool: expected >= 1, got {scfg.init_pool}")
    if float(scfg.r_div) < 0:
        raise ConfigError(f"synth.scdd.r_div: expected >= 0, got {scfg.r_div}")


@torch.no_grad()
def teacher_outputs(teacher, images: torch.Tensor, mean, std, device, batch: int = 256):
    """(softmax probabilities, penultimate features) of uint8 images (N, C, H, W), eval mode."""
    from .scdd import last_linear

    was = teacher.training
    teacher.eval()
    C = images.shape[1]
    m = torch.tensor([float(v) for v in mean]).view(1, C, 1, 1)
    s = torch.tensor([float(v) for v in std]).view(1, C, 1, 1)
    probs, feats = [], []
    hook = last_linear(teacher).register_forward_hook(lambda mod, i, o: feats.append(i[0].float().cpu()))
    try:
        for i in range(0, len(images), batch):
            x = ((images[i:i + batch].float() / 255 - m) / s).to(device)
            probs.append(teacher(x).float().softmax(1).cpu())
    finally:
        hook.remove()
        teacher.train(was)
    return torch.cat(probs), torch.cat(feats)


def class_confidence(teacher, images: torch.Tensor, cls: int, mean, std, device) -> torch.Tensor:
    """The teacher's softmax probability of `cls` for uint8 images (N, C, H, W), eval mode."""
    return teacher_outputs(teacher, images, mean, std, device)[0][:, cls]


def kmeans_order(feats: torch.Tensor, k: int, seed: int) -> list[int]:
    """Indices of the `k` rows nearest the centroids of a seeded k-means of `feats`, one per
    cluster, largest cluster first (ties: lower cluster id)."""
    from sklearn.cluster import KMeans

    x = feats.double().numpy()
    km = KMeans(n_clusters=k, n_init=3, random_state=seed % (2 ** 32)).fit(x)
    # (N, k) squared distances, one centre at a time: no (N, k, D) temporary (at ImageNet scale
    # 1000 pool images x 50 centres x 512 features would be 200 MB per class)
    d = np.stack([((x - c) ** 2).sum(1) for c in km.cluster_centers_], axis=1)
    sizes = np.bincount(km.labels_, minlength=k)
    chosen, taken = [], set()
    for j in sorted(range(k), key=lambda j: (-sizes[j], j)):
        for i in np.argsort(d[:, j], kind="stable"):
            if int(i) not in taken:  # two centroids never share their nearest image
                chosen.append(int(i))
                taken.add(int(i))
                break
    return chosen


def class_picks(cfg, locs, classes, labels_cache, teacher=None, device="cpu") -> dict:
    """Per class: (keys, scores) of the images IPC indices 0 .. ipc-1 start from (scores None for random)."""
    return _choose(cfg, locs, classes, labels_cache, teacher, device)[0]


def _choose(cfg, locs, classes, labels_cache, teacher, device) -> tuple[dict, dict | None]:
    """(class_picks' answer, the images the choice decoded by key, or None when it decoded none)."""
    keys, labels = labels_cache()
    ipc, scfg = int(cfg.synth.ipc), cfg.synth.scdd
    if scfg.init_select == "random":
        picks = pick_per_class(labels, classes, ipc, cfg.seed, "scdd-init")
        return {c: ([keys[i] for i in picks[c]], None) for c in classes}, None
    pools = {}
    for c in classes:
        size = max(ipc, min(int(scfg.init_pool) * ipc, int(np.sum(labels == c))))
        pools[c] = [keys[i] for i in pick_per_class(labels, [c], size, cfg.seed, "scdd-init-pool")[c]]
    imgs = load_images(locs["train"], cfg.data.train_split, [k for c in classes for k in pools[c]],
                       cfg.data.channels)  # one pass over the shards for the whole unit
    out = {}
    for c in classes:
        pool = pools[c]
        probs, feats = teacher_outputs(teacher, torch.stack([imgs[k] for k in pool]), cfg.data.mean, cfg.data.std,
                                       device)
        conf = probs[:, c]
        if scfg.init_select == "kmeans":
            order = kmeans_order(feats, ipc, derive_seed(cfg.seed, "scdd-init-kmeans", c))
        else:
            order = torch.argsort(-conf, stable=True)[:ipc].tolist()  # ties: pool order
        out[c] = ([pool[i] for i in order], [round(float(conf[i]), 6) for i in order])
    return out, imgs


def real_init(cfg, locs, unit, labels_cache, teacher=None, device="cpu"):
    """(uint8 images class-major (len(classes) * n_ipc, C, H, W), their keys, their scores or None)."""
    per_class, imgs = _choose(cfg, locs, unit.classes, labels_cache, teacher, device)
    sl = slice(unit.ipc_start, unit.ipc_end)
    chosen = [k for c in unit.classes for k in per_class[c][0][sl]]
    scored = per_class[unit.classes[0]][1] is not None
    scores = [s for c in unit.classes for s in per_class[c][1][sl]] if scored else None
    if imgs is None:  # a random choice decoded nothing yet; a scored one decoded its whole pool
        imgs = load_images(locs["train"], cfg.data.train_split, chosen, cfg.data.channels)
    return torch.stack([imgs[k] for k in chosen]), chosen, scores
