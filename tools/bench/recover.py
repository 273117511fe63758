"""SC-DD recovery throughput: the published loop vs the engine's `recover`, same run.

    python tools/bench/recover.py [--iterations 50] [--image-size 32] [--classes 10] [--ipc 10]
                                  [--warmup 3] [--threads 0] [--device auto] [--skip-per-ipc]
                                  [--out tools/bench/results/recover.json]

Teacher: a small-input ResNet-18 at full width (create_model('resnet18',
classes, in_chans=3, small_input=True, width=64)), random weights, its BN
running statistics set to realistic values by forward passes in train mode on
random images first. One unit of work = all --classes x --ipc images.

Variants, each timed after --warmup untimed iterations at its own batch size:
  a. reference  the published SRe2L/SC-DD loop written inline below: fp32, NCHW,
                frozen teacher (requires_grad False, eval), a forward hook per BN
                layer (torch.mean / torch.var(unbiased=False) over [0, 2, 3]; the
                published hook's permute + contiguous copy before var is left out,
                which only makes this baseline faster), Adam(0.5, 0.9), cosine lr,
                RandomResizedCrop + flip (torchvision, one crop per batch) + random
                roll, per-channel clamp, no compile, no per-iteration .item() (the
                published loop syncs on loss.item() every iteration; also left out);
                one IPC index per batch (batch = classes), looping over the IPC indices.
  b. engine     engine.synth.scdd.recover with all IPC indices in one grouped
                forward (batch = classes x ipc); its default, fastest setting on
                the device (bf16 autocast + channels_last on CUDA, fp32 NCHW on CPU).
  c. engine-per-ipc  the same function called once per IPC index (batch = classes),
                which separates the grouping gain from the rest (--skip-per-ipc drops it).
Throughput is images x iterations per second of the optimisation loop;
speedup is relative to (a) from the same run. Runs must be alone on the
machine (METHODS section 6: two threads slow down ~10x when a core is busy).
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the repo root, for `python tools/bench/recover.py`

import torch  # noqa: E402
from torch import nn  # noqa: E402

from engine import store  # noqa: E402
from engine.config import ScddConfig  # noqa: E402
from engine.errors import EngineError  # noqa: E402
from engine.models import create_model  # noqa: E402
from engine.runtime import available_cpus, pick_device, set_threads  # noqa: E402
from engine.synth.scdd import recover  # noqa: E402
from tools.bench.common import machine_info, markdown_table  # noqa: E402

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
SEED = 0


def make_teacher(classes: int, size: int, device: torch.device) -> nn.Module:
    torch.manual_seed(SEED)
    model = create_model("resnet18", classes, in_chans=3, small_input=True, width=64)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average of the passes below
    model.train()
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        for _ in range(4):
            model((torch.rand(32, 3, size, size) - mean) / std)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    return model.eval().to(device)


# --- (a) the reference loop ---------------------------------------------------

class BNFeatureHook:
    """The published hook: mean and biased variance of the BN input, and its loss term."""

    def __init__(self, module: nn.BatchNorm2d):
        self.hook = module.register_forward_hook(self.hook_fn)
        self.r_feature = None

    def hook_fn(self, module, inputs, output):
        x = inputs[0]
        mean = torch.mean(x, dim=[0, 2, 3])
        var = torch.var(x, dim=[0, 2, 3], unbiased=False)
        self.r_feature = (torch.norm(module.running_var.data - var, 2)
                          + torch.norm(module.running_mean.data - mean, 2))

    def close(self):
        self.hook.remove()


def clip(image_tensor: torch.Tensor) -> torch.Tensor:
    for c in range(3):
        m, s = MEAN[c], STD[c]
        image_tensor[:, c] = torch.clamp(image_tensor[:, c], -m / s, (1 - m) / s)
    return image_tensor


def reference_recover(model, classes: int, ipc: int, iterations: int, cfg: ScddConfig, size: int,
                      device: torch.device, sync) -> tuple[float, list[float]]:
    """The published loop, one IPC index per batch. Returns (loop seconds, [first, last] loss)."""
    from torchvision import transforms

    model.eval()
    for p in model.parameters():  # as the published main_syn does
        p.requires_grad = False

    hooks = [BNFeatureHook(m) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    crop = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio)),
        transforms.RandomHorizontalFlip(),
    ])
    criterion = nn.CrossEntropyLoss()
    targets = torch.arange(classes, device=device)
    rescale = [cfg.first_bn_multiplier] + [1.0] * (len(hooks) - 1)
    first = last = None
    sync()
    t0 = time.perf_counter()
    try:
        for _ in range(ipc):
            inputs = torch.randn((classes, 3, size, size), device=device, requires_grad=True)
            optimizer = torch.optim.Adam([inputs], lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=1e-8)
            for iteration in range(iterations):
                lr = 0.5 * (1 + math.cos(math.pi * iteration / iterations)) * cfg.lr
                for group in optimizer.param_groups:
                    group["lr"] = lr
                inputs_jit = crop(inputs)
                off1, off2 = random.randint(0, cfg.jitter), random.randint(0, cfg.jitter)
                inputs_jit = torch.roll(inputs_jit, shifts=(off1, off2), dims=(2, 3))
                optimizer.zero_grad()
                outputs = model(inputs_jit)
                loss_ce = criterion(outputs, targets)
                loss_r_bn_feature = sum(h.r_feature * rescale[i] for i, h in enumerate(hooks))
                loss = loss_ce + cfg.r_bn * loss_r_bn_feature
                loss.backward()
                optimizer.step()
                inputs.data = clip(inputs.data)
                if first is None:
                    first = loss.detach()
                last = loss.detach()
            images = torch.round((inputs.detach() * torch.tensor(STD, device=device).view(1, 3, 1, 1)
                                  + torch.tensor(MEAN, device=device).view(1, 3, 1, 1)).clamp(0, 1) * 255)
            images.to(torch.uint8).cpu()
        sync()
        seconds = time.perf_counter() - t0
    finally:
        for h in hooks:
            h.close()
    return seconds, [float(first), float(last)] if first is not None else []


# --- the engine -----------------------------------------------------------------

def engine_recover(model, classes: int, ipc: int, iterations: int, cfg: ScddConfig, size: int,
                   device: torch.device, per_ipc: bool) -> tuple[float, list[float], dict]:
    c = ScddConfig(**{**cfg.__dict__, "iterations": iterations, "log_every": max(iterations, 1)})
    ranges = [(i, i + 1) for i in range(ipc)] if per_ipc else [(0, ipc)]
    seconds, first, last, stats = 0.0, None, None, {}
    for r in ranges:
        out = recover(model, list(range(classes)), r, c, MEAN, STD, size, 3, SEED, device)
        seconds += out["stats"]["seconds"]
        if out["losses"]:
            first = out["losses"][0]["total"] if first is None else first
            last = out["losses"][-1]["total"]
        stats = out["stats"]
    return seconds, [first, last] if first is not None else [], stats


def markdown(rows: list[dict]) -> str:
    return markdown_table([("variant", "variant", ""), ("batch", "batch", ">"), ("calls", "calls", ">"),
                           ("img*it/s", "img_it_per_s", ">,.1f"), ("vs reference", "speedup_vs_reference", ">.2f", "x"),
                           ("loop s", "seconds", ">.2f")], rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="recover.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=50, help="timed iterations per batch")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10, help="classes in the block (one image each per IPC)")
    ap.add_argument("--ipc", type=int, default=10, help="IPC indices in the unit")
    ap.add_argument("--warmup", type=int, default=3, help="untimed iterations per variant first")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: the CPUs this process may use)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    ap.add_argument("--skip-per-ipc", action="store_true", help="skip variant (c), the engine one IPC per call")
    ap.add_argument("--out", default=str(REPO / "tools/bench/results/recover.json"))
    args = ap.parse_args(argv)
    if min(args.iterations, args.image_size, args.classes, args.ipc) < 1 or args.warmup < 0:
        ap.error("--iterations, --image-size, --classes and --ipc must be positive, --warmup >= 0")

    try:
        device = pick_device(args.device)
        threads = set_threads(args.threads)
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        model = make_teacher(args.classes, args.image_size, device)
        # The scdd defaults (METHODS section 1) with the jitter of 32-64 px images.
        cfg = ScddConfig(iterations=args.iterations)
        n_img = args.classes * args.ipc
        rows = []

        def add(variant, batch, calls, seconds, loss, extra=None):
            rate = n_img * args.iterations / seconds
            base = rows[0]["img_it_per_s"] if rows else rate
            rows.append({"variant": variant, "batch": batch, "calls": calls, "img_it_per_s": round(rate, 2),
                         "speedup_vs_reference": round(rate / base, 3), "seconds": round(seconds, 3),
                         "loss_first_last": [round(v, 4) for v in loss], **(extra or {})})
            print(f"{variant}: {rate:,.1f} img*it/s ({seconds:.2f} s)", file=sys.stderr, flush=True)

        random.seed(SEED)
        torch.manual_seed(SEED)
        if args.warmup:
            reference_recover(model, args.classes, 1, args.warmup, cfg, args.image_size, device, sync)
        s, loss = reference_recover(model, args.classes, args.ipc, args.iterations, cfg, args.image_size,
                                    device, sync)
        add("reference (published loop, one IPC per batch)", args.classes, args.ipc, s, loss,
            {"precision": "fp32", "memory_format": "NCHW"})

        if args.warmup:
            engine_recover(model, args.classes, args.ipc, args.warmup, cfg, args.image_size, device, False)
        s, loss, st = engine_recover(model, args.classes, args.ipc, args.iterations, cfg, args.image_size,
                                     device, False)
        add("engine (grouped, all IPC in one forward)", n_img, 1, s, loss,
            {"precision": "bf16" if st["amp"] else "fp32", "memory_format": "NHWC" if st["channels_last"] else "NCHW"})

        if not args.skip_per_ipc:
            if args.warmup:
                engine_recover(model, args.classes, 1, args.warmup, cfg, args.image_size, device, True)
            s, loss, st = engine_recover(model, args.classes, args.ipc, args.iterations, cfg, args.image_size,
                                         device, True)
            add("engine-per-ipc (one IPC per call)", args.classes, args.ipc, s, loss,
                {"precision": "bf16" if st["amp"] else "fp32",
                 "memory_format": "NHWC" if st["channels_last"] else "NCHW"})

        machine = machine_info(device=str(device), torch_threads=threads,
                               device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
        result = {
            "benchmark": "recover",
            "machine": machine,
            "config": {"teacher": "resnet18 small_input width=64 (random weights, BN stats from 4 train-mode "
                                  "passes on random images)",
                       "iterations": args.iterations, "warmup": args.warmup, "image_size": args.image_size,
                       "classes": args.classes, "ipc": args.ipc, "images": n_img, "seed": SEED,
                       "scdd": {k: v for k, v in cfg.__dict__.items()},
                       "metric": "images x iterations / seconds of the optimisation loop"},
            "rows": rows,
            "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        store.write_json(args.out, result)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown(rows))
    print(f"\n{args.classes} classes x {args.ipc} IPC at {args.image_size} px, {args.iterations} iterations, "
          f"device {device}, torch threads {threads}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
