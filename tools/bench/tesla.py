"""Trajectory matching: peak memory and seconds per distillation iteration of `unrolled`, `tesla` and
`exact` over syn_steps, each configuration in a fresh process (METHODS.md section 2).

    python tools/bench/tesla.py [--steps 10 20 40 80] [--modes unrolled tesla exact] [--width 128]
                                [--image-size 32] [--classes 10] [--images 100] [--batch 20]
                                [--iterations 2] [--warmup 1] [--threads 0] [--device auto]
                                [--out tools/bench/results/tesla.json] [--plot tools/bench/results/tesla.png]

Problem (fixed, seeded): a ConvNetD3 (instance norm, --width channels) at --image-size px with 3
channels and --classes classes; theta_0 its seeded initialisation, the target 3 SGD steps away on
random labelled images; --images synthetic images with soft labels; each inner step takes
--batch of them with its own DSA draw (the default strategy). One matching_gradients call (the
loss, dL/dX and dL/dalpha; what a distillation iteration costs besides the two SGD steps) is
one iteration.

Each (mode, syn_steps) runs in fresh subprocesses that build the problem, record a baseline after
the model and data are loaded, then run iterations:
- time: --warmup untimed and --iterations timed iterations; seconds per iteration = their median.
- memory (CPU): a second fresh process runs one iteration with MALLOC_MMAP_THRESHOLD_=65536, so
  glibc serves every allocation above 64 KB by mmap and returns it to the OS when freed: the max RSS
  (getrusage) then follows the live tensors, and peak = max RSS at the end - max RSS at the
  baseline. (With the default malloc, freed blocks stay in the heap and the RSS of the timing run
  creeps up with the number of allocations; that figure is kept as rss_default_malloc_mib.)
- memory (CUDA): torch.cuda.max_memory_allocated - memory allocated at the baseline, in the timing run.
`exact` and `tesla` keep the N + 1 parameter vectors theta_0..theta_N ((N + 1) x |theta| x 4 bytes,
`stored_vectors_mib`) on top of one step's graph; activation_mib = peak - stored vectors is what
METHODS says stays flat. Run alone: the load average before the run goes into the JSON.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the repo root, for `python tools/bench/tesla.py`

MODES = ("unrolled", "tesla", "exact")
SEED = 0


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def other_pythons() -> list[str]:
    """Command lines of the other Python processes on the machine (is the benchmark alone?)."""
    me = {os.getpid(), os.getppid()}
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if int(d.name) in me:
                continue
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError):
            continue
        if "python" in cmd.split(" ")[0] and "tools/bench/tesla.py" not in cmd:
            found.append(cmd[:120])
    return sorted(found)


def child(args) -> dict:
    """One configuration, in this (fresh) process."""
    import torch
    import torch.nn.functional as F

    from engine.models import create_model
    from engine.models.functional import functional_forward, init_flat_params, num_params
    from engine.runtime import pick_device, set_threads
    from engine.seeding import torch_gen
    from engine.synth.dsa import DEFAULT_STRATEGY
    from engine.synth.tesla import matching_gradients, step_batches, step_draws

    device = pick_device(args.device)
    threads = set_threads(args.threads)
    model = create_model("convnetd3", args.classes, in_chans=3, image_size=args.image_size,
                         width=args.width).to(device)
    theta0 = init_flat_params(model, SEED, "bench-start").to(device)
    g = torch_gen("bench-problem", SEED)
    real = torch.randn(64, 3, args.image_size, args.image_size, generator=g).to(device)
    real_y = torch.randint(args.classes, (64,), generator=g).to(device)
    target = theta0.clone()
    for k in range(3):
        th = target.clone().requires_grad_(True)
        ce = F.cross_entropy(functional_forward(model, th, real[k * 16:(k + 1) * 16]), real_y[k * 16:(k + 1) * 16])
        target = (th - 0.01 * torch.autograd.grad(ce, th)[0]).detach()
    x = torch.randn(args.images, 3, args.image_size, args.image_size, generator=g).to(device)
    labels = torch.randn(args.images, args.classes, generator=g).softmax(1).to(device)
    batches = step_batches(args.images, args.steps, args.batch, SEED)
    draws = step_draws(DEFAULT_STRATEGY, batches, args.image_size, SEED, "bench-dsa")
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    base_rss = rss_mib()

    def once():
        r = matching_gradients(model, theta0, target, x, labels, 0.01, syn_steps=args.steps, draws=draws,
                               batches=batches, mode=args.mode)
        if cuda:
            torch.cuda.synchronize(device)
        return r

    for _ in range(args.warmup):
        once()
    times, loss = [], None
    for _ in range(args.iterations):
        t0 = time.perf_counter()
        loss = once().loss
        times.append(time.perf_counter() - t0)
    out = {"mode": args.mode, "syn_steps": args.steps, "seconds_per_iteration": statistics.median(times),
           "seconds": times, "loss": loss, "threads": threads, "device": str(device), "num_params": num_params(model),
           "stored_vectors_mib": (args.steps + 1) * num_params(model) * 4 / 2 ** 20 if args.mode != "unrolled" else 0.0}
    if cuda:
        out["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
        out["measure"] = "torch.cuda.max_memory_allocated - allocated after loading"
    else:
        out["peak_mib"] = rss_mib() - base_rss
        out["baseline_rss_mib"] = base_rss
        out["measure"] = "max RSS (getrusage) - max RSS after loading"
    return out


def _child(args, mode: str, steps: int, iterations: int, warmup: int, env: dict | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--mode", mode, "--steps", str(steps),
           "--width", str(args.width), "--image-size", str(args.image_size), "--classes", str(args.classes),
           "--images", str(args.images), "--batch", str(args.batch), "--iterations", str(iterations),
           "--warmup", str(warmup), "--threads", str(args.threads), "--device", args.device]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
        return {"error": f"exit code {r.returncode}: {tail}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_config(args, mode: str, steps: int) -> dict:
    """Time (and on CUDA memory) in one fresh process; CPU memory in another (module docstring)."""
    timed = _child(args, mode, steps, args.iterations, args.warmup)
    if "error" in timed:
        return {"mode": mode, "syn_steps": steps, **timed}
    if timed["device"].startswith("cuda"):
        row = timed
    else:
        mem = _child(args, mode, steps, 1, 0, {"MALLOC_MMAP_THRESHOLD_": "65536"})
        if "error" in mem:
            return {"mode": mode, "syn_steps": steps, **mem}
        row = {**timed, "peak_mib": mem["peak_mib"], "baseline_rss_mib": mem["baseline_rss_mib"],
               "rss_default_malloc_mib": timed["peak_mib"],
               "measure": "max RSS (getrusage) - max RSS after loading, one iteration, MALLOC_MMAP_THRESHOLD_=65536"}
    row["activation_mib"] = row["peak_mib"] - row["stored_vectors_mib"]
    return row


def plot(rows: list[dict], url: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        rs = [r for r in rows if r["mode"] == mode and "error" not in r]
        if not rs:
            continue
        steps = [r["syn_steps"] for r in rs]
        line, = axes[0].plot(steps, [r["peak_mib"] for r in rs], marker="o", label=f"{mode} peak")
        if mode != "unrolled":
            axes[0].plot(steps, [r["activation_mib"] for r in rs], marker="x", linestyle="--",
                         color=line.get_color(), label=f"{mode} peak - stored vectors")
        axes[1].plot(steps, [r["seconds_per_iteration"] for r in rs], marker="o", label=mode)
    axes[0].set(xlabel="syn_steps", ylabel="peak memory over baseline (MiB)", title="memory")
    axes[1].set(xlabel="syn_steps", ylabel="seconds per iteration", title="time")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(url, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tesla.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40, 80])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--images", type=int, default=100, help="synthetic images (e.g. 10 classes x IPC 10)")
    ap.add_argument("--batch", type=int, default=20, help="images per inner step (batch_syn)")
    ap.add_argument("--iterations", type=int, default=2, help="timed iterations per configuration")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: the CPUs this process may use)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(REPO / "tools/bench/results/tesla.json"))
    ap.add_argument("--plot", default=str(REPO / "tools/bench/results/tesla.png"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="exact", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if min(min(args.steps), args.width, args.image_size, args.classes, args.images, args.batch,
           args.iterations) < 1 or args.warmup < 0:
        ap.error("sizes, --steps and --iterations must be positive, --warmup >= 0")
    if args.child:
        args.steps = args.steps[0]
        print(json.dumps(child(args)))
        return 0

    from engine import store
    from tools.bench.common import machine_info, markdown_table

    load_before = os.getloadavg()
    others_before = other_pythons()
    rows = []
    t0 = time.time()
    for steps in args.steps:
        for mode in args.modes:
            r = run_config(args, mode, steps)
            rows.append(r)
            msg = r.get("error") or f"{r['peak_mib']:.1f} MiB, {r['seconds_per_iteration']:.3f} s/it"
            print(f"{mode:>8} syn_steps {steps:>3}: {msg}", file=sys.stderr, flush=True)
    ok = [r for r in rows if "error" not in r]
    lo, hi = min(args.steps), max(args.steps)

    def ratio(mode, key, a=lo, b=hi):
        ra = next((r for r in ok if r["mode"] == mode and r["syn_steps"] == a), None)
        rb = next((r for r in ok if r["mode"] == mode and r["syn_steps"] == b), None)
        return round(rb[key] / ra[key], 3) if ra and rb and ra[key] > 0 else None

    def time_vs(mode, other, steps):
        a = next((r for r in ok if r["mode"] == mode and r["syn_steps"] == steps), None)
        b = next((r for r in ok if r["mode"] == other and r["syn_steps"] == steps), None)
        return round(a["seconds_per_iteration"] / b["seconds_per_iteration"], 3) if a and b else None

    for r in ok:
        r["time_vs_tesla"] = time_vs(r["mode"], "tesla", r["syn_steps"])
    summary = {f"{m}_memory_{hi}_over_{lo}": ratio(m, "peak_mib") for m in args.modes}
    summary.update({f"{m}_activation_memory_{hi}_over_{lo}": ratio(m, "activation_mib") for m in args.modes})
    summary.update({f"{m}_time_{hi}_over_{lo}": ratio(m, "seconds_per_iteration") for m in args.modes})
    summary.update({f"exact_time_over_tesla_at_{s}": time_vs("exact", "tesla", s) for s in args.steps})
    device = ok[0]["device"] if ok else args.device
    others_after = other_pythons()
    machine = machine_info(device=device, torch_threads=ok[0]["threads"] if ok else None,
                           loadavg_before=[round(v, 2) for v in load_before],
                           other_python_processes_before=others_before, other_python_processes_after=others_after,
                           busy=bool(others_before or others_after))
    result = {"benchmark": "tesla", "machine": machine,
              "config": {"model": f"convnetd3 width {args.width}, instance norm, 3 channels",
                         "image_size": args.image_size, "classes": args.classes, "images": args.images,
                         "batch_syn": args.batch, "iterations": args.iterations, "warmup": args.warmup,
                         "steps": args.steps, "modes": args.modes, "seed": SEED,
                         "process": "fresh subprocesses per (mode, syn_steps): one timed, one for CPU memory"},
              "rows": rows, "summary": summary, "seconds": round(time.time() - t0, 1),
              "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    store.write_json(args.out, result)
    title = (f"convnetd3 w{args.width} {args.image_size}px, {args.classes} classes, {args.images} images, batch "
             f"{args.batch}, {device}")
    if args.plot:
        plot(rows, args.plot, title)
    print(markdown_table([("mode", "mode", ""), ("syn_steps", "syn_steps", ">d"),
                          ("peak MiB", "peak_mib", ">,.1f"), ("s / iteration", "seconds_per_iteration", ">.3f"),
                          ("vs tesla time", "time_vs_tesla", ">.2f", "x"),
                          ("stored vectors MiB", "stored_vectors_mib", ">.1f"),
                          ("activation MiB", "activation_mib", ">,.1f")],
                         sorted(ok, key=lambda r: (MODES.index(r["mode"]), r["syn_steps"]))))
    for r in rows:
        if "error" in r:
            print(f"{r['mode']} syn_steps {r['syn_steps']}: {r['error']}")
    if machine["busy"]:
        print(f"note: other Python processes ran beside the benchmark: {(others_before or others_after)[:3]}")
    print(f"\n{title}; load average before {load_before[0]:.2f}; wrote {args.out}" +
          (f" and {args.plot}" if args.plot else ""))
    print("summary: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
