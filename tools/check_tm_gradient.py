#!/usr/bin/env python
"""Check trajectory-matching gradients against full back-propagation (METHODS.md section 2).

    python tools/check_tm_gradient.py --steps 10 --alpha 1.0 --seed 0 [--json]

Builds a small random problem in float64 (a tiny ConvNet; a target reached by
N steps of size alpha on other random labelled images, as an expert would move;
random synthetic images with the target's soft labels; one DSA draw per inner
step),
computes the gradient of the matching loss with respect to the images and the
learned learning rate in the three modes, and prints the relative error
||g - g_unrolled|| / ||g_unrolled|| and the cosine of `exact` and `tesla`
against `unrolled`. `exact` should agree to rounding (the exit code is 1 if its
relative error exceeds --tol); `tesla` drops the Hessian chain through later
steps, so its error grows with --steps and --alpha.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine.errors import run_guarded  # noqa: E402
from engine.models.convnet import ConvNet  # noqa: E402
from engine.models.functional import functional_forward, init_flat_params  # noqa: E402
from engine.seeding import torch_gen  # noqa: E402
from engine.synth.dsa import DEFAULT_STRATEGY  # noqa: E402
from engine.synth.tesla import expert_soft_labels, matching_gradients, step_batches, step_draws  # noqa: E402


def compare(g: torch.Tensor, ref: torch.Tensor) -> dict:
    g, ref = g.reshape(-1), ref.reshape(-1)
    rel = float((g - ref).norm() / ref.norm()) if ref.norm() > 0 else float((g - ref).norm())
    den = float(g.norm() * ref.norm())
    cos = float(g @ ref) / den if den > 0 else float("nan")
    return {"rel_error": rel, "cosine": cos}


def check(steps=10, alpha=1.0, seed=0, images=8, batch=4, classes=4, channels=3, size=8, depth=2, width=8,
          strategy=DEFAULT_STRATEGY) -> dict:
    model = ConvNet(channels, classes, depth=depth, width=width, image_size=size)
    theta0 = init_flat_params(model, seed, "check-start", dtype=torch.float64)
    g = torch_gen("check-problem", seed)
    # the target: where `steps` SGD steps of size alpha on other random labelled images lead (an expert's move)
    real = torch.randn(4 * images, channels, size, size, generator=g, dtype=torch.float64)
    real_y = torch.randint(classes, (4 * images,), generator=g)
    target = theta0.clone().requires_grad_(True)
    for idx in step_batches(4 * images, steps, 4 * batch, seed, "check-target"):
        ce = F.cross_entropy(functional_forward(model, target, real[idx]), real_y[idx])
        target = (target - alpha * torch.autograd.grad(ce, target)[0]).detach().requires_grad_(True)
    target = target.detach()
    x = torch.randn(images, channels, size, size, generator=g, dtype=torch.float64)
    labels = expert_soft_labels(model, target, x)
    batches = step_batches(images, steps, batch, seed)
    draws = step_draws(strategy, batches, size, seed, "check-dsa")
    out = {"config": {"steps": steps, "alpha": alpha, "seed": seed, "images": images, "batch": batch,
                      "classes": classes, "image_shape": [channels, size, size], "depth": depth, "width": width,
                      "dsa_strategy": strategy, "dsa_families": [d.family for d in draws], "dtype": "float64",
                      "labels": "soft (target softmax)"}}
    res = {}
    for mode in ("unrolled", "exact", "tesla"):
        t0 = time.perf_counter()
        res[mode] = matching_gradients(model, theta0, target, x, labels, alpha, syn_steps=steps, draws=draws,
                                       batches=batches, mode=mode)
        out.setdefault("seconds", {})[mode] = time.perf_counter() - t0
    ref = res["unrolled"]
    out["loss"] = ref.loss
    out["unrolled"] = {"grad_lr": float(ref.grad_lr), "grad_images_norm": float(ref.grad_images.norm())}
    for mode in ("exact", "tesla"):
        r = res[mode]
        out[mode] = {"images": compare(r.grad_images, ref.grad_images), "lr": compare(r.grad_lr, ref.grad_lr),
                     "grad_lr": float(r.grad_lr), "loss": r.loss}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="inner student steps N (syn_steps)")
    p.add_argument("--alpha", type=float, default=1.0, help="student learning rate (syn_lr)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=8, help="synthetic images")
    p.add_argument("--batch", type=int, default=4, help="images per inner step (batch_syn)")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--size", type=int, default=8, help="image side in pixels")
    p.add_argument("--depth", type=int, default=2, help="ConvNet blocks")
    p.add_argument("--width", type=int, default=8, help="ConvNet channels")
    p.add_argument("--strategy", default=DEFAULT_STRATEGY, help="DSA strategy ('none' for no augmentation)")
    p.add_argument("--tol", type=float, default=1e-8, help="largest relative error accepted for exact")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    r = check(a.steps, a.alpha, a.seed, a.images, a.batch, a.classes, 3, a.size, a.depth, a.width, a.strategy)
    ok = r["exact"]["images"]["rel_error"] <= a.tol and r["exact"]["lr"]["rel_error"] <= a.tol
    r["exact_ok"] = ok
    if a.json:
        print(json.dumps(r, indent=1))
    else:
        c = r["config"]
        print(f"trajectory-matching gradients vs unrolled: N={c['steps']} alpha={c['alpha']} seed={c['seed']}, "
              f"{c['images']} images {'x'.join(map(str, c['image_shape']))} in batches of {c['batch']}, "
              f"ConvNet depth {c['depth']} width {c['width']}, float64, soft labels, DSA {c['dsa_strategy']}")
        print(f"matching loss {r['loss']:.6g}; unrolled dL/dalpha {r['unrolled']['grad_lr']:.6g}")
        print(f"{'mode':8} {'images rel.err':>15} {'images cosine':>14} {'lr rel.err':>11} {'lr cosine':>10} "
              f"{'seconds':>8}")
        for mode in ("exact", "tesla"):
            m = r[mode]
            print(f"{mode:8} {m['images']['rel_error']:15.3e} {m['images']['cosine']:14.6f} "
                  f"{m['lr']['rel_error']:11.3e} {m['lr']['cosine']:10.0f} {r['seconds'][mode]:8.3f}")
        print(f"{'unrolled':8} {'':15} {'':14} {'':11} {'':10} {r['seconds']['unrolled']:8.3f}")
        if not ok:
            print(f"exact disagrees with unrolled beyond --tol {a.tol}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_guarded(main))
