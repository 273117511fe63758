"""Stage-level behaviour on sklearn digits (fast) and the real demo recipe (slow)."""
import json

import pytest

from conftest import run_tool
from engine import store
from engine.cli import main
from tests_digits import DIGITS


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "run"
    assert main(["run", "--config", "configs/demo/fashion_scdd.yaml", "--out", str(out), "--quiet", *DIGITS]) == 0
    return out


def test_run_writes_every_artifact(digits_run):
    out = digits_run
    for rel in ("config.yaml", "teacher/teacher.pt", "teacher/manifest.json", "distilled/manifest.json",
                "distilled/index.json", "preview.png", "results.json"):
        assert (out / rel).exists(), rel
    r = json.loads((out / "results.json").read_text())
    assert r["ipc"] == 2 and r["num_classes"] == 10 and r["method"] == "scdd"
    for key in ("teacher", "distilled", "random_real"):
        assert 0 <= r[key]["top1"] <= 100
    assert r["protocol"]["label_mode"] == "online" and r["protocol"]["epochs"] == 2
    m = store.read_manifest(str(out / "distilled"), verify=True)
    # 10 classes x IPC 2 = 20 images from 2 class blocks x 2 IPC slices = 4 units, each image once.
    assert len(m["images"]) == 20 and m["units"]["units"] == 4
    assert sorted((e["class"], e["ipc"]) for e in m["images"]) == [(c, i) for c in range(10) for i in range(2)]


def test_rerun_skips_finished_stages_and_units(digits_run, capsys):
    before = (digits_run / "distilled" / "train-000000.tar").read_bytes()
    assert main(["run", "--config", "configs/demo/fashion_scdd.yaml", "--out", str(digits_run), "--quiet", *DIGITS]) == 0
    text = capsys.readouterr().out
    assert "prepare: skipped" in text and "squeeze: skipped" in text and "synthesize: skipped" in text
    assert (digits_run / "distilled" / "train-000000.tar").read_bytes() == before


def test_resynthesis_reuses_finished_units(digits_run, tmp_path, capsys):
    """Delete the merged set and one unit: only that unit runs again, and the bytes come back identical."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(digits_run, out)
    before = (out / "distilled" / "train-000000.tar").read_bytes()
    shutil.rmtree(out / "distilled")
    units = sorted((out / "units" / "synthesize").iterdir())
    shutil.rmtree(units[1])
    assert main(["synthesize", "--config", "configs/demo/fashion_scdd.yaml", "--out", str(out), "--quiet", *DIGITS]) == 0
    assert "(1 run, 3 already done)" in capsys.readouterr().out
    assert (out / "distilled" / "train-000000.tar").read_bytes() == before


@pytest.mark.parametrize("overrides,needle", [
    (["synth.ipc=0"], "synth.ipc"),
    (["synth.class_block=0"], "synth.class_block"),
    # more IPC than a class has real images to start from
    (["synth.ipc=500", "synth.ipc_per_unit=500", "synth.scdd.init=real"], "training images, 500 requested"),
    (["teacher.model.name=resnet19"], "unknown model"),
])
def test_bad_settings_fail_with_one_line(digits_run, tmp_path, overrides, needle):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(digits_run, out)
    teacher = any(o.startswith("teacher.") for o in overrides)
    for d in ("distilled", "units", "teacher") if teacher else ("distilled", "units"):
        shutil.rmtree(out / d)
    r = run_tool("-m", "engine", "squeeze" if teacher else "run", "--config", "configs/demo/fashion_scdd.yaml",
                 "--out", out, "--quiet", *DIGITS, *overrides)
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_stored_relabel_reports_its_size(digits_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(digits_run, out)
    assert main(["relabel", "--config", "configs/demo/fashion_scdd.yaml", "--out", str(out), "--quiet", *DIGITS,
                 "relabel.mode=stored", "relabel.top_k=3"]) == 0
    text = capsys.readouterr().out
    # top-3 fp16 values + int16 indices + 17 B of crop = 29 B, against 10 fp16 logits = 20 B
    assert "29.0 B per image-epoch" in text and "20 B here" in text and "2000 B at 1000 classes" in text
    assert (out / "labels" / "distilled.pt").exists()


def test_teacher_class_count_must_match_the_data(digits_run, tmp_path):
    from engine.teacher import load_teacher
    from engine.errors import EngineError

    with pytest.raises(EngineError, match="teacher has 10 classes but the data has 7"):
        load_teacher(str(digits_run), num_classes=7)


@pytest.mark.slow
def test_demo_recipe_end_to_end_small(tmp_path):
    """The real Fashion-MNIST recipe with size overrides: one SimCLR epoch on 4k images, 200 recovery
    iterations, 30 student epochs, a 1-epoch full-data reference, validation on 2,000 test images."""
    out = tmp_path / "demo"
    r = run_tool("-m", "engine", "run", "--config", "configs/demo/fashion_scdd.yaml", "--out", out, "--quiet",
                 "teacher.ssl_epochs=1", "teacher.ssl_train_limit=4000", "teacher.probe_epochs=2",
                 "teacher.finetune_epochs=0", "synth.scdd.iterations=200", "eval.epochs=30",
                 "eval.seeds=[0]", "eval.val_limit=2000", "eval.full_data_epochs=1", timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["teacher"]["top1"] > 50  # a weak but real SSL teacher on Fashion-MNIST
    assert res["distilled"]["top1"] > 10 and res["random_real"]["top1"] > 10  # above chance
    assert res["full_data"]["top1"] > 50 and res["full_data"]["epochs"] == 1
    assert res["synthesis"]["teacher_agreement"] > 0.3  # 3x chance, from a weak one-epoch teacher
    assert (out / "preview.png").stat().st_size > 10_000
    assert "| distilled |" in r.stdout


def test_rded_method_runs_as_units_and_merges(digits_run, tmp_path, capsys):
    """method=rded plugs into the same stage: units, merge, distilled/ with every (class, IPC index) once."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(digits_run, out, ignore=shutil.ignore_patterns("distilled", "units", "results.json"))
    rded = ["method=rded", "synth.rded.num_real=20", "synth.rded.candidates_per_image=2"]
    assert main(["synthesize", "--config", "configs/demo/fashion_scdd.yaml", "--out", str(out), "--quiet", *DIGITS,
                 *rded]) == 0
    m = store.read_manifest(str(out / "distilled"), verify=True)
    assert m["method"] == "rded" and m["units"]["units"] == 4
    assert sorted((e["class"], e["ipc"]) for e in m["images"]) == [(c, i) for c in range(10) for i in range(2)]
    unit = json.loads(next((out / "units" / "synthesize").glob("*/manifest.json")).read_text())
    assert unit["method"] == "rded" and len(unit["images"][0]["patches"]) == 4  # factor 2: 2 x 2 patches
