"""Soft labels: the replayable crop stream, online vs stored labels, merging parts,
stored size, save/load."""
import pytest
import torch

from engine.config import RelabelConfig
from engine.errors import EngineError
from engine.labels import (FILL_VALUE, OnlineLabeler, StoredLabeler, augment_batch, crop_box, crop_boxes,
                           epoch_batches, full_logits_bytes_per_image_epoch, load_labels,
                           measured_bytes_per_image_epoch, merge_labels, normalise_images, relabel_stored,
                           save_labels, stored_bytes_per_image_epoch)
from engine.models import create_model

MEAN, STD = [0.5], [0.25]
N, SIZE, CLASSES, BATCH, EPOCHS = 12, 12, 4, 5, 2


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    model = create_model("resnet18", CLASSES, in_chans=1, small_input=True, width=8)
    # Non-trivial BN running statistics, so eval mode differs from batch statistics.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, SIZE, SIZE))
    return model.eval()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (N, 1, SIZE, SIZE), dtype=torch.uint8, generator=g)


def relabel_cfg(**kw):
    return RelabelConfig(**{"top_k": 2, **kw})


def online_batches(teacher, images, cfg, seed=0, epochs=EPOCHS):
    """(epoch, batch_idx, indices, augmented batch, mix, teacher logits) the way a student sees them."""
    labeler = OnlineLabeler(teacher)
    for e in range(epochs):
        for b, idx in enumerate(epoch_batches(N, BATCH, seed, e)):
            x = normalise_images(images[idx], MEAN, STD)
            aug, mix = augment_batch(x, idx, seed, e, b, cfg)
            yield e, b, idx, aug, mix, labeler.labels(aug)


# (a) ------------------------------------------------------------------------------------------
def test_crop_stream_is_deterministic_and_differs_across_epochs():
    cfg = relabel_cfg()
    assert crop_box(7, 3, 1, 32, 32) == crop_box(7, 3, 1, 32, 32)
    per_epoch = [crop_boxes(7, torch.arange(20), e, 32, 32, cfg) for e in range(3)]
    again = crop_boxes(7, torch.arange(20), 1, 32, 32, cfg)
    assert torch.equal(per_epoch[1][0], again[0]) and torch.equal(per_epoch[1][1], again[1])
    assert not torch.equal(per_epoch[0][0], per_epoch[1][0])
    assert not torch.equal(per_epoch[1][0], per_epoch[2][0])
    assert not torch.equal(per_epoch[0][0], crop_boxes(8, torch.arange(20), 0, 32, 32, cfg)[0])  # seed matters
    flips = torch.cat([f for _, f in per_epoch])
    assert 0 < int(flips.sum()) < len(flips)
    # A crop depends on (seed, image, epoch) only, not on the batch it lands in.
    b1, _ = crop_boxes(7, torch.tensor([5, 2, 9]), 1, 32, 32, cfg)
    assert torch.equal(b1, per_epoch[1][0][[5, 2, 9]])
    # Boxes: relative coordinates inside the image, scale within crop_scale (up to rounding).
    boxes = torch.cat([b for b, _ in per_epoch])
    assert bool(((boxes >= 0) & (boxes <= 1)).all())
    assert bool((boxes[:, 0] + boxes[:, 2] <= 1 + 1e-6).all()) and bool((boxes[:, 1] + boxes[:, 3] <= 1 + 1e-6).all())
    area = boxes[:, 2] * boxes[:, 3]
    assert float(area.min()) > 0.05 and float(area.max()) <= 1.0
    assert not any(crop_box(7, i, 0, 32, 32, flip=False)[1] for i in range(20))


def test_epoch_batches_and_augment_batch_are_replayable():
    batches = epoch_batches(11, 4, 3, 0)
    assert [len(b) for b in batches] == [4, 4, 3]
    assert sorted(torch.cat(batches).tolist()) == list(range(11))
    assert all(torch.equal(a, b) for a, b in zip(batches, epoch_batches(11, 4, 3, 0)))
    assert not torch.equal(torch.cat(batches), torch.cat(epoch_batches(11, 4, 3, 1)))
    assert [len(b) for b in epoch_batches(9, 8, 0, 0)] == [5, 4]  # never a lone image
    x = torch.randn(6, 1, 10, 10)
    idx = torch.tensor([4, 0, 7, 1, 9, 2])
    for mix in ("none", "cutmix", "mixup"):
        cfg = relabel_cfg(mix=mix)
        a, m1 = augment_batch(x, idx, 1, 2, 3, cfg)
        b, m2 = augment_batch(x, idx, 1, 2, 3, cfg)
        assert a.shape == x.shape and torch.equal(a, b)
        c, m3 = augment_batch(x, idx, 1, 2, 4, cfg)  # another batch index: another mix draw
        if mix == "none":
            assert m1 is None and torch.equal(a, c)
        else:
            assert m1["lam"] == m2["lam"] and torch.equal(m1["perm"], m2["perm"])
            assert (m1["lam"], m1["perm"].tolist()) != (m3["lam"], m3["perm"].tolist())
            assert sorted(m1["perm"].tolist()) == list(range(6))


# (b) ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mix", ["none", "cutmix"])
def test_stored_replays_the_online_crops_and_logits(teacher, images, mix):
    """Same batches (full image range): the stored top-k equals the online teacher's
    top-k on the identical augmented batch, to fp16 rounding."""
    cfg = relabel_cfg(mix=mix)
    stored = relabel_stored(teacher, images, MEAN, STD, EPOCHS, BATCH, 0, cfg, "cpu", progress=False)
    assert stored["values"].dtype == torch.float16 and stored["indices"].dtype == torch.int16
    replay = StoredLabeler(stored)
    for e, b, idx, aug, mix_info, logits in online_batches(teacher, images, cfg):
        assert torch.equal(replay.batches(e)[b], idx)
        x = normalise_images(images[idx], MEAN, STD)
        replayed, replayed_mix = replay.augment(x, idx, e, b)
        assert torch.equal(replayed, aug)  # identical crops (and mixing)
        if mix_info is not None:
            assert replayed_mix["lam"] == pytest.approx(mix_info["lam"])
            assert torch.equal(replayed_mix["perm"], mix_info["perm"])
        top_v, top_i = logits.topk(2, dim=1)
        assert torch.equal(stored["indices"][e, idx].long(), top_i)
        assert torch.equal(stored["values"][e, idx].float(), top_v.half().float())  # same batch: exact up to fp16
        dense = replay.labels(e, b)
        assert torch.equal(dense.topk(2, dim=1).indices, top_i)
        others = torch.ones_like(dense, dtype=torch.bool).scatter_(1, top_i, False)
        assert bool((dense[others] == FILL_VALUE).all())
        # The fill makes softmax(dense / T) the top-k softmax renormalised, for any T used here.
        for t in (1.0, 4.0, 30.0):
            p = torch.softmax(dense / t, 1)
            expect = torch.softmax(top_v.half().float() / t, 1)
            torch.testing.assert_close(p.gather(1, top_i), expect)
            assert float(p[others].max()) == 0.0


def test_stored_part_with_other_batch_composition_matches_online(teacher, images):
    """A part owning images [3, 9) runs the teacher on fewer images per batch: the
    crops are identical, the logits agree with the online ones to 1e-5 relative
    (ISSUE-NOTES, issue 3), here compared unquantised (values_dtype float32)."""
    cfg = relabel_cfg(top_k=CLASSES)
    part = relabel_stored(teacher, images, MEAN, STD, EPOCHS, BATCH, 0, cfg, "cpu", image_range=(3, 9),
                          values_dtype=torch.float32, progress=False)
    assert part["indices"] is None  # top_k == num_classes: the full logits, no indices
    for e, b, idx, aug, _, logits in online_batches(teacher, images, cfg):
        own = (idx >= 3) & (idx < 9)
        rows = idx[own] - 3
        boxes, flips = crop_boxes(0, idx[own], e, SIZE, SIZE, cfg)
        assert torch.equal(part["boxes"][e, rows], boxes) and torch.equal(part["flips"][e, rows], flips)
        torch.testing.assert_close(part["values"][e, rows], logits[own], rtol=1e-5, atol=1e-6)


# (c) ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mix", ["none", "mixup"])
def test_merge_parts_covers_every_image_epoch_once(teacher, images, mix):
    cfg = relabel_cfg(mix=mix)
    full = relabel_stored(teacher, images, MEAN, STD, EPOCHS, BATCH, 0, cfg, "cpu", progress=False)
    parts = [relabel_stored(teacher, images, MEAN, STD, EPOCHS, BATCH, 0, cfg, "cpu", image_range=ir,
                            epoch_range=er, progress=False)
             for ir in ((0, 5), (5, 12)) for er in ((0, 1), (1, 2))]
    merged = merge_labels(parts[::-1])  # order does not matter
    assert merged["image_range"] == [0, N] and merged["epoch_range"] == [0, EPOCHS]
    for key in ("boxes", "flips", "indices"):
        assert torch.equal(merged[key], full[key]), key
    # Same crops, other batch composition: fp16 values equal up to one rounding step.
    torch.testing.assert_close(merged["values"].float(), full["values"].float(), rtol=2e-3, atol=1e-3)
    if mix != "none":
        for key in ("lam", "boxes", "partner"):
            assert torch.equal(merged["mix"][key], full["mix"][key]), key
    StoredLabeler(merged).labels(1, 0)

    with pytest.raises(EngineError, match="7 \\(image, epoch\\) pairs missing"):
        merge_labels(parts[:3])  # image range [5, 12) x epoch 1 missing: 7 images
    with pytest.raises(EngineError, match="covered more than once"):
        merge_labels(parts + [parts[0]])
    overlap = relabel_stored(teacher, images, MEAN, STD, EPOCHS, BATCH, 0, cfg, "cpu", image_range=(4, 6),
                             epoch_range=(0, 1), progress=False)
    with pytest.raises(EngineError, match="covered more than once"):
        merge_labels(parts + [overlap])
    other_seed = relabel_stored(teacher, images, MEAN, STD, EPOCHS, BATCH, 1, cfg, "cpu", image_range=(5, 12),
                                epoch_range=(1, 2), progress=False)
    with pytest.raises(EngineError, match="seed"):
        merge_labels(parts[:3] + [other_seed])
    with pytest.raises(EngineError, match="merge the parts first"):
        StoredLabeler(parts[0])
    with pytest.raises(EngineError, match="out of bounds"):
        relabel_stored(teacher, images, MEAN, STD, EPOCHS, BATCH, 0, cfg, "cpu", image_range=(0, 13))


# (d) ------------------------------------------------------------------------------------------
def test_stored_bytes_per_image_epoch(teacher, images, tmp_path, capsys):
    # Formula: 2k fp16 values + 2k int16 indices (none when k == classes) + 17 (box + flip).
    assert stored_bytes_per_image_epoch(10, 10) == 2 * 10 + 17
    assert stored_bytes_per_image_epoch(1000, 10) == 2 * 10 + 2 * 10 + 17
    assert stored_bytes_per_image_epoch(1000, 100) == 2 * 100 + 2 * 100 + 17
    assert full_logits_bytes_per_image_epoch(10) == 20 and full_logits_bytes_per_image_epoch(1000) == 2000
    assert stored_bytes_per_image_epoch(1000, 10, include_crop=False) == 40
    cfg = relabel_cfg()
    stored = relabel_stored(teacher, images, MEAN, STD, EPOCHS, BATCH, 0, cfg, "cpu", progress=False)
    measured = measured_bytes_per_image_epoch(stored)
    assert measured == stored_bytes_per_image_epoch(CLASSES, 2)
    path = tmp_path / "labels" / "labels.pt"
    save_labels(str(path), stored)
    file_bytes = path.stat().st_size / (N * EPOCHS)
    with capsys.disabled():
        print(f"\nstored labels bytes/image-epoch: {CLASSES} classes top-2 measured {measured:.1f} "
              f"(file {file_bytes:.1f} incl. torch.save overhead at this tiny size) vs full "
              f"{full_logits_bytes_per_image_epoch(CLASSES)}; 10 cls top-10 {stored_bytes_per_image_epoch(10, 10)} "
              f"vs {full_logits_bytes_per_image_epoch(10)}; 1000 cls top-10 {stored_bytes_per_image_epoch(1000, 10)}, "
              f"top-100 {stored_bytes_per_image_epoch(1000, 100)} vs {full_logits_bytes_per_image_epoch(1000)}")


def test_save_and_load_labels(teacher, images, tmp_path):
    stored = relabel_stored(teacher, images, MEAN, STD, 1, BATCH, 0, relabel_cfg(mix="cutmix"), "cpu",
                            progress=False)
    for url in (str(tmp_path / "l.pt"), "memory://labels-test/l.pt"):
        save_labels(url, stored)
        back = load_labels(url)
        assert back["num_classes"] == CLASSES and back["relabel"]["mix"] == "cutmix"
        for key in ("values", "indices", "boxes", "flips"):
            assert torch.equal(back[key], stored[key])
        assert torch.equal(back["mix"]["partner"], stored["mix"]["partner"])
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(EngineError, match="cannot read stored labels"):
        load_labels(str(tmp_path / "bad.pt"))
    with pytest.raises(EngineError, match="no such file"):
        load_labels(str(tmp_path / "missing.pt"))
