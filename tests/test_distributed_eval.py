"""Data-parallel post-training and validation: every val sample counted once, 2-way
data parallel == one process (online and stored labels), the drop rule for uneven
batches, val_limit as a global count, and worker errors surfacing from Ray Train.

Two harnesses: engine.cluster.train_eval.evaluate_on_ray on a private 2-CPU local Ray
cluster (2 gloo workers), and -- for the rules that live in engine.evaluate /
engine.metrics, which use torch.distributed only -- two spawned processes in a gloo
group on 127.0.0.1, which start several times faster than a Ray Train run and let
the test see every rank's result. Each Ray Train run costs ~10-15 s on a busy
2-core machine (worker start-up), so the stored-mode Ray run is marked slow (the gloo
harness checks the same scenario)."""
import os
import socket
import sys
import traceback
from datetime import timedelta

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported: node on 127.0.0.1

import pytest
import torch
import torch.nn.functional as F

from engine.config import load_config
from engine.data import loader_from_config
from engine.data.sources import create_source
from engine.data.wds_writer import write_wds
from engine.errors import ConfigError, DataError
from engine.evaluate import create_student, evaluate_sets, pick_random_real, train_student
from engine.labels import augment_batch, epoch_batches, normalise_images
from engine.metrics import accuracy

ray = pytest.importorskip("ray")
from engine.cluster.train_eval import evaluate_on_ray  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
WORLD = 2
VAL_SAMPLES = 360  # sklearn digits val split


# --------------------------------------------------------------------------- data, config, inputs
def digits_arrays():
    """sklearn digits train/val as uint8 (N, 1, 8, 8) + int64 labels, and the train mean/std."""
    tr, va = create_source("digits:", "train"), create_source("digits:", "val")
    xt, yt = torch.from_numpy(tr.images)[:, None], torch.from_numpy(tr.labels).long()
    xv, yv = torch.from_numpy(va.images)[:, None], torch.from_numpy(va.labels).long()
    return xt, yt, xv, yv, float(xt.float().div(255).mean()), float(xt.float().div(255).std())


def make_cfg(*overrides):
    *_, mean, std = digits_arrays()
    return load_config(overrides=[
        "data.channels=1", "data.image_size=8", f"data.mean=[{mean}]", f"data.std=[{std}]", "data.batch_size=64",
        "data.crop_pct=1.0", "eval.student.name=convnetd3", "eval.student.width=128", "eval.batch_size=50",
        "eval.epochs=2", "eval.lr=0.003", "relabel.flip=false", "relabel.top_k=10", "eval.random_real=false", *overrides])


def load_teacher(path):
    cfg = make_cfg()
    model = create_student(cfg, 10, 0, 8)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def digits_inputs(rank, world_size, device, val_url, teacher_path, overrides=(), ipc=8, mode="online",
                  store_distilled=False, fail_on_rank=None):
    """inputs_fn for evaluate_on_ray (and the single-process reference with rank 0 of 1):
    distilled = `ipc` real images per class, control = another pick, val = this rank's
    shard of the WebDataset val split. `fail_on_rank`: that rank raises a DataError."""
    if rank == fail_on_rank:
        raise DataError(f"{val_url}: rank {rank} cannot read its val shards (test failure)")
    cfg = make_cfg(*overrides)
    xt, yt, *_ = digits_arrays()
    teacher = load_teacher(teacher_path)
    d, c = pick_random_real(yt, ipc, seed=10), pick_random_real(yt, ipc, seed=0)
    stored = {}
    if store_distilled:  # "distilled" from relabel_stored here; "random_real" left to evaluate_sets
        from engine.labels import relabel_stored

        stored["distilled"] = relabel_stored(teacher, xt[d], list(cfg.data.mean), list(cfg.data.std),
                                             int(cfg.eval.epochs), int(cfg.eval.batch_size), int(cfg.seed),
                                             cfg.relabel, device, progress=False)
    return {"distilled_images": xt[d], "distilled_labels": yt[d], "teacher": teacher,
            "val_loader_fn": lambda: loader_from_config(cfg.data, val_url, "val", train=False, rank=rank,
                                                        world_size=world_size),
            "random_real": (xt[c], yt[c]), "num_classes": 10, "label_mode": mode, "stored": stored}


def single_process(inputs_args, cfg):
    return evaluate_sets(cfg=cfg, device="cpu", rank=0, world_size=1, progress=False,
                         **digits_inputs(rank=0, world_size=1, device="cpu", **inputs_args))


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ray_cluster():
    """A private 2-CPU cluster on 127.0.0.1, with its dashboard on 127.0.0.1 and the State API
    pointed at it. Ray Train V2's PlacementGroupCleaner polls the controller through the State
    API; without a dashboard that call hangs (it even goes looking for other clusters on the
    machine) and every run waits ~12 s at shutdown for the cleaner to give up."""
    port = free_port()
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"  # inherited by the cluster's processes
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, _node_ip_address="127.0.0.1", configure_logging=False)
        # Workers cannot import this test module: ship its functions by value.
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        yield
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory, one_thread):
    """Val shards (4 shards: whole shards per rank; 1 shard: samples dealt round-robin) and a
    teacher trained on hard labels (a convnetd3 that reaches ~90 % on digits)."""
    root = tmp_path_factory.mktemp("digits")
    val = create_source("digits:", "val")
    write_wds(val, str(root / "val4"), split="val", shard_size=100, show_progress=False)
    write_wds(val, str(root / "val1"), split="val", shard_size=VAL_SAMPLES, show_progress=False)
    xt, yt, *_ = digits_arrays()
    idx = pick_random_real(yt, 30, seed=1)
    cfg = make_cfg("eval.epochs=15", "eval.lr=0.01", "relabel.crop_scale=[0.5, 1.0]")
    teacher = train_student(xt[idx], yt[idx], None, cfg, 1, "cpu", labeler="hard", progress=False,
                            return_model=True)["model"]
    torch.save(teacher.state_dict(), root / "teacher.pt")
    return {"val4": str(root / "val4"), "val1": str(root / "val1"), "teacher": str(root / "teacher.pt")}


def run_both(digits_store, val="val4", **kw):
    args = {"val_url": digits_store[val], "teacher_path": digits_store["teacher"], **kw}
    cfg = make_cfg(*kw.get("overrides", ()))
    dp = evaluate_on_ray(digits_inputs, args, cfg, num_workers=WORLD, use_gpu=False, cpus_per_worker=1)
    return dp, single_process(args, cfg)


@pytest.fixture(scope="module")
def online_runs(ray_cluster, digits_store):
    return run_both(digits_store, mode="online", overrides=("eval.random_real=true",))


def assert_same_training(dp, one, sets=("distilled", "random_real")):
    for name in sets:
        for a, b in zip(dp[name]["runs"], one[name]["runs"], strict=True):
            assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-4), name
            # Same student to float tolerance: at most one val sample may flip.
            assert abs(a["top1"] - b["top1"]) <= 100.0 / VAL_SAMPLES + 1e-9, name


# --------------------------------------------------------------------------- tests
def test_val_counted_exactly_once_over_2_workers(online_runs, digits_store):
    """4 shards over 2 ranks (160 + 200 samples): the all-reduced counts cover the val
    split once, and top-1/top-5 are those of one process over the whole loader."""
    dp, one = online_runs
    assert dp["protocol"]["val_count"] == one["protocol"]["val_count"] == VAL_SAMPLES
    cfg = make_cfg()
    whole = accuracy(load_teacher(digits_store["teacher"]),
                     loader_from_config(cfg.data, digits_store["val4"], "val", train=False), "cpu")
    assert whole["count"] == VAL_SAMPLES and whole["top1"] > 50.0  # a trained teacher, not chance
    assert dp["teacher"] == {"top1": whole["top1"], "top5": whole["top5"]}
    assert dp["protocol"]["data_parallel"]["world_size"] == WORLD and "data_parallel" not in one["protocol"]


def test_online_data_parallel_matches_one_process(online_runs):
    """convnetd3 (instance norm, no BN), 80 images in batches of 40: nothing dropped, so 2-way
    DDP follows the single-process run (same batches, crops and teacher targets)."""
    dp, one = online_runs
    assert dp["protocol"]["data_parallel"]["dropped_per_epoch"] == {"distilled": 0, "random_real": 0}
    assert_same_training(dp, one)
    assert dp["gain_over_random"] == pytest.approx(one["gain_over_random"], abs=2 * 100.0 / VAL_SAMPLES + 1e-9)


# --------------------------------------------------------------------------- torch.distributed, no Ray
DROP_OVERRIDES = ("eval.lr=0", "eval.epochs=1", "eval.val_limit=101")
STORED_OVERRIDES = ("eval.random_real=true", "relabel.mix=cutmix")


def gloo_scenarios(rank, world, store):
    """What each rank of the spawned gloo group runs; the parent compares with one process."""
    out = {}
    # Stored labels: "distilled" given (relabel_stored), "random_real" recorded by the ranks
    # (epoch 0 on rank 0, epoch 1 on rank 1) and all-gathered.
    args = {"val_url": store["val4"], "teacher_path": store["teacher"], "mode": "stored",
            "store_distilled": True, "overrides": STORED_OVERRIDES}
    out["stored"] = evaluate_sets(cfg=make_cfg(*STORED_OVERRIDES), device="cpu", rank=rank, world_size=world,
                                  progress=False, **digits_inputs(rank=rank, world_size=world, device="cpu", **args))
    # Drop rule: 70 images, batch size 50 -> 2 batches of 35, 2 ranks -> 17 rows each, 1 dropped.
    kw = digits_inputs(rank=rank, world_size=world, device="cpu", val_url=store["val1"],
                       teacher_path=store["teacher"], ipc=7, overrides=DROP_OVERRIDES)
    drop = train_student(kw["distilled_images"], kw["distilled_labels"], kw["teacher"], make_cfg(*DROP_OVERRIDES),
                         0, "cpu", labeler="online", val_loader_fn=kw["val_loader_fn"], num_classes=10,
                         rank=rank, world_size=world, progress=False)
    out["drop"] = {k: drop[k] for k in ("history", "steps", "dropped_per_epoch", "world_size", "val_count")}
    # val_limit as a global count over a round-robin reader (1 shard, sample mode).
    out["limit"] = {n: accuracy(kw["teacher"], kw["val_loader_fn"](), "cpu", limit=n) for n in (1, 101)}
    out["unlimited"] = accuracy(kw["teacher"], kw["val_loader_fn"](), "cpu")
    # A batch with fewer images than ranks cannot be split: every rank raises the same error.
    tiny = digits_inputs(rank=rank, world_size=world, device="cpu", val_url=store["val1"],
                         teacher_path=store["teacher"], ipc=1)
    try:
        train_student(tiny["distilled_images"], tiny["distilled_labels"], None, make_cfg("eval.batch_size=1"), 0,
                      "cpu", labeler="hard", rank=rank, world_size=world, progress=False)
        out["too_small"] = None
    except ConfigError as exc:
        out["too_small"] = str(exc)
    return out


def _gloo_rank(rank, world, port, store, queue):
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=120))
        try:
            queue.put((rank, gloo_scenarios(rank, world, store)))
        finally:
            dist.destroy_process_group()
    except BaseException:
        queue.put((rank, traceback.format_exc()))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gloo_runs(digits_store):
    """Per-rank outputs of `gloo_scenarios` from 2 spawned processes in a gloo group."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_gloo_rank, args=(r, WORLD, port, digits_store, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        got = dict(queue.get(timeout=300) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    for rank, res in got.items():
        assert isinstance(res, dict), f"rank {rank} failed:\n{res}"
    return [got[r] for r in range(WORLD)]


def test_stored_data_parallel_matches_one_process(gloo_runs, digits_store):
    """Stored mode with CutMix: "distilled" replays relabel_stored labels, "random_real" the
    labels the ranks recorded between them; both follow the single-process run."""
    args = {"val_url": digits_store["val4"], "teacher_path": digits_store["teacher"], "mode": "stored",
            "store_distilled": True, "overrides": STORED_OVERRIDES}
    one = single_process(args, make_cfg(*STORED_OVERRIDES))
    for dp in (r["stored"] for r in gloo_runs):  # every rank returns the same dict
        assert dp["protocol"]["label_mode"] == "stored" and dp["protocol"]["mix"] == "cutmix"
        assert dp["protocol"]["val_count"] == VAL_SAMPLES
        assert dp["protocol"]["data_parallel"]["dropped_per_epoch"] == {"distilled": 0, "random_real": 0}
        assert_same_training(dp, one)
    for name in ("distilled", "random_real"):  # all-reduced loss and counts: identical on both ranks
        r0, r1 = ([(r["final_loss"], r["top1"], r["top5"]) for r in g["stored"][name]["runs"]] for g in gloo_runs)
        assert r0 == r1


def test_uneven_batches_follow_the_drop_rule(gloo_runs, digits_store):
    """Drop rule: 70 images in batch size 50 -> 2 batches of 35; with 2 ranks each batch loses
    its last image (batch order) and each rank trains on 17 rows; both ranks take 2 steps.
    With lr 0 the student stays at its initialisation, so the logged loss is the mean KD loss
    over exactly the kept rows -- not the single-process mean over all 70."""
    cfg = make_cfg(*DROP_OVERRIDES)
    for r in gloo_runs:
        assert r["drop"]["steps"] == 2 and r["drop"]["dropped_per_epoch"] == 2 and r["drop"]["world_size"] == 2
    assert gloo_runs[0]["drop"]["history"] == gloo_runs[1]["drop"]["history"]  # all-reduced: same on every rank
    xt, yt, *_ = digits_arrays()
    d = pick_random_real(yt, 7, seed=10)
    x = normalise_images(xt[d], cfg.data.mean, cfg.data.std)
    student, teacher = create_student(cfg, 10, 0, 8), load_teacher(digits_store["teacher"])
    kept_losses, all_losses = [], []
    with torch.no_grad():
        for b, idx in enumerate(epoch_batches(len(d), 50, 0, 0)):  # stream seed = student seed 0
            assert len(idx) == 35
            aug, _ = augment_batch(x[idx], idx, 0, 0, b, cfg.relabel)
            per_row = F.kl_div(F.log_softmax(student(aug) / 4, 1), F.softmax(teacher(aug) / 4, 1),
                               reduction="none").sum(1)
            kept_losses.append(per_row[:34])
            all_losses.append(per_row)
    kept, whole = float(torch.cat(kept_losses).mean()), float(torch.cat(all_losses).mean())
    one = train_student(xt[d], yt[d], teacher, cfg, 0, "cpu", labeler="online", progress=False)
    assert one["steps"] == 2 and one["dropped_per_epoch"] == 0
    assert one["history"][0]["loss"] == pytest.approx(whole, rel=1e-4)
    assert gloo_runs[0]["drop"]["history"][0]["loss"] == pytest.approx(kept, rel=1e-4)
    assert abs(kept - whole) > 1e-3 * whole  # the check can tell the two apart


def test_val_limit_is_a_global_count(gloo_runs, digits_store):
    """val_limit over 2 ranks with a round-robin reader (1 shard): rank shares 51 + 50 count
    exactly the first 101 samples of the single-process order; a limit of 1 leaves rank 1
    with nothing to count; no limit counts all 360 once. The training run reports the
    global val_count."""
    cfg = make_cfg()
    teacher = load_teacher(digits_store["teacher"])
    loader = lambda: loader_from_config(cfg.data, digits_store["val1"], "val", train=False)  # noqa: E731
    for r in gloo_runs:
        for n in (1, 101):
            assert r["limit"][n] == accuracy(teacher, loader(), "cpu", limit=n) and r["limit"][n]["count"] == n
        assert r["unlimited"] == accuracy(teacher, loader(), "cpu") and r["unlimited"]["count"] == VAL_SAMPLES
        assert r["drop"]["val_count"] == 101


# --------------------------------------------------------------------------- Ray: more runs
def test_batch_smaller_than_world_is_an_error(gloo_runs):
    for r in gloo_runs:
        assert r["too_small"] == ("eval.batch_size 1: with 10 images the smallest batch holds 1 images, "
                                  "fewer than the 2 data-parallel workers")


@pytest.mark.slow
def test_stored_on_ray_matches_one_process(ray_cluster, digits_store):
    """The stored-mode scenario through evaluate_on_ray."""
    dp, one = run_both(digits_store, mode="stored", store_distilled=True, overrides=STORED_OVERRIDES)
    assert dp["protocol"]["val_count"] == VAL_SAMPLES
    assert_same_training(dp, one)


def test_worker_error_surfaces_from_ray(ray_cluster, digits_store):
    """Rank 1 fails while loading its inputs and rank 0 waits for it in the teacher's
    validation all-reduce: Ray Train ends the run (no retries) instead of hanging, and
    evaluate_on_ray re-raises rank 1's DataError as it was."""
    args = {"val_url": digits_store["val4"], "teacher_path": digits_store["teacher"], "fail_on_rank": 1}
    with pytest.raises(DataError, match="rank 1 cannot read its val shards"):
        evaluate_on_ray(digits_inputs, args, make_cfg(), num_workers=WORLD, use_gpu=False, cpus_per_worker=1)
