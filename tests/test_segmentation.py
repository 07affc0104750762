"""Linear segmentation (DINOv2's protocol): mIoU against hand counts, the augmentation's rules, bad layouts
named, the synth VOC set, and a seeded run that repeats exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from distillery.errors import DistilleryError
from distillery.evaluate.segmentation import (IGNORE_INDEX, LabelledImage, SegmentationSettings, TrainCrops,
                                              confusion_matrix, crop_box, pixel_loss, read_pair, read_settings,
                                              read_split, rescaled_size, segmentation_scores)
from distillery.train.schedules import warmup_poly

TINY = {"crop_size": 32, "scale": (64, 32), "stride": 21, "iterations": 6, "batch_size": 4, "warmup_iters": 2,
        "workers": 0}


def test_miou_macc_and_aacc_against_a_confusion_matrix_by_hand():
    label = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255]])
    prediction = np.array([[0, 1, 1, 1], [0, 0, 1, 0], [2, 0, 2, 0]])
    confusion = confusion_matrix(prediction, label, 4)
    # rows the truth, columns the prediction; the two 255 pixels are left out whatever is predicted there
    expected = np.zeros((4, 4), np.int64)
    expected[0, 0], expected[0, 1] = 3, 1
    expected[1, 1], expected[1, 0] = 3, 1
    expected[2, 2], expected[2, 0] = 1, 1
    assert np.array_equal(confusion, expected)
    scores = segmentation_scores(confusion, ("a", "b", "c", "d"))
    iou = [3 / (4 + 5 - 3), 3 / (4 + 4 - 3), 1 / (2 + 1 - 1)]  # TP / (row + column - TP); class d: no union, NaN
    assert scores["mIoU"] == pytest.approx(np.mean(iou))
    assert np.isnan(scores["per_class"]["d"]["IoU"])
    assert scores["aAcc"] == pytest.approx(7 / 10)
    assert scores["mAcc"] == pytest.approx(np.mean([3 / 4, 3 / 4, 1 / 2]))


def test_loss_averages_over_labelled_pixels_only():
    logits = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 4, 4))
    labels[0, :2] = IGNORE_INDEX
    assert torch.allclose(pixel_loss(logits, labels), torch.nn.functional.cross_entropy(logits, labels, ignore_index=255))
    assert pixel_loss(logits, torch.full_like(labels, IGNORE_INDEX)) == 0  # nothing labelled: 0, not NaN


def test_the_poly_schedule_and_its_warmup_follow_mmcv():
    assert warmup_poly(0, 100, 1e-3, warmup_steps=10, warmup_ratio=1e-6) == pytest.approx(1e-3 * 1e-6)
    assert warmup_poly(5, 100, 1e-3, warmup_steps=10, warmup_ratio=1e-6) == pytest.approx(
        1e-3 * 0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert warmup_poly(10, 100, 1e-3, warmup_steps=10) == pytest.approx(1e-3 * 0.9)
    assert warmup_poly(100, 100, 1e-3) == 0


def test_rescale_keeps_the_ratio_within_both_bounds():
    assert rescaled_size((500, 375), (2048, 512)) == (683, 512)  # the short side binds
    assert rescaled_size((2000, 100), (2048, 512)) == (2048, 102)  # the long side binds
    assert rescaled_size((500, 375), (2048, 512), 0.5) == (341, 256)


def test_random_crops_are_redrawn_while_one_class_dominates():
    label = np.zeros((40, 40), np.uint8)
    label[:, 30:] = 1  # only crops reaching x >= 30 hold two classes
    rng = np.random.default_rng(0)
    boxes = [crop_box(label, 20, 0.75, rng) for _ in range(50)]
    balanced = [(t, l) for t, l in boxes if (label[t:t + 20, l:l + 20] == 1).mean() > 0.25]
    assert len(balanced) > 40  # a plain uniform draw would find such a crop about 1/4 of the time
    assert crop_box(label, 64, 0.75, rng) == (0, 0)  # a crop larger than the image keeps all of it


def test_train_crops_are_seeded_per_crop_and_padded_with_the_ignore_index(tmp_path):
    from distillery.data.synth_seg import SegConfig, generate_segmentation

    generate_segmentation(SegConfig(size=16, train=3, val=2), tmp_path / "seg")
    items = read_split(tmp_path / "seg", "train")
    settings = read_settings(overrides=tuple(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in TINY.items()))
    crops = TrainCrops(items, 11, settings)
    first, again = crops[5], TrainCrops(items, 11, settings)[5]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert first[0].shape == (3, 32, 32) and first[1].shape == (32, 32)
    values = set(torch.cat([crops[i][1].flatten() for i in range(8)]).tolist())
    assert IGNORE_INDEX in values and values - {IGNORE_INDEX} <= set(range(11))


def test_bad_layouts_and_labels_are_named(tmp_path):
    with pytest.raises(DistilleryError, match="ImageSets/Segmentation/train.txt: no such file"):
        read_split(tmp_path, "train")
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("a\n")
    with pytest.raises(DistilleryError, match="JPEGImages/a.jpg: listed in .* but missing"):
        read_split(tmp_path, "train")
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "SegmentationClass").mkdir()
    Image.new("RGB", (8, 6)).save(tmp_path / "JPEGImages" / "a.jpg")
    Image.fromarray(np.full((6, 8), 30, np.uint8), "L").save(tmp_path / "SegmentationClass" / "a.png")
    item = read_split(tmp_path, "train")[0]
    with pytest.raises(DistilleryError, match="a.png: label value 30 is neither a class"):
        read_pair(item, 21)
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(tmp_path / "SegmentationClass" / "a.png")
    with pytest.raises(DistilleryError, match="a.png: label is 8x8, its image 8x6"):
        read_pair(LabelledImage(item.image, item.label), 21)
    with pytest.raises(DistilleryError, match="warmup_iters"):
        SegmentationSettings(iterations=10, warmup_iters=10)


def test_the_synth_set_is_deterministic_and_voc_shaped(tmp_path):
    from distillery.data.synth_seg import CLASSES, SegConfig, generate_segmentation
    from distillery.evaluate.segmentation import class_names

    generate_segmentation(SegConfig(size=16, train=4, val=2), tmp_path / "a")
    generate_segmentation(SegConfig(size=16, train=4, val=2), tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 2 * 6 + 3
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert class_names(tmp_path / "a") == CLASSES
    label = Image.open(tmp_path / "a" / "SegmentationClass" / "train_00000.png")
    values = set(np.unique(np.array(label)).tolist())
    assert label.mode == "P" and label.size == (32, 32) and 0 in values and IGNORE_INDEX in values
    assert values - {0, IGNORE_INDEX}  # at least one object's class


def test_eval_segmentation_runs_repeatably_on_the_synth_set(tmp_path, teacher_specs):
    from distillery.data.synth_seg import SegConfig, generate_segmentation
    from distillery.evaluate.results import jsonable
    from distillery.evaluate.segmentation import segmentation_task

    generate_segmentation(SegConfig(size=16, train=6, val=3), tmp_path / "seg")
    settings = SegmentationSettings(**TINY)
    first, path = segmentation_task(teacher_specs[0], tmp_path / "seg", settings, tmp_path / "a.json", "cpu")
    again, _ = segmentation_task(teacher_specs[0], tmp_path / "seg", settings, tmp_path / "b.json", "cpu")
    assert path.exists() and jsonable(first.metrics) == jsonable(again.metrics)  # NaN (absent classes) as null
    assert 0 <= first.metrics["mIoU"] <= 1 and set(first.metrics["per_class"]) == set(first.data["segmentation"]["classes"])


def test_the_suite_runs_segmentation_with_its_settings_from_a_file(tmp_path, tiny_synth, teacher_specs):
    import yaml

    from distillery.data.synth_seg import SegConfig, generate_segmentation
    from distillery.evaluate.suite import run_suite, suite_config_values, write_suite_config

    generate_segmentation(SegConfig(size=16, train=4, val=2), tmp_path / "seg")
    (tmp_path / "seg.yaml").write_text(yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}))
    values = suite_config_values({"a": teacher_specs[0]}, str(tiny_synth / "train"), str(tiny_synth / "val"),
                                 ["segmentation"], {"segmentation": str(tmp_path / "seg.yaml")},
                                 str(tmp_path / "eval"), segmentation=str(tmp_path / "seg"))
    summary = run_suite(write_suite_config(tmp_path / "suite.yaml", values), show_progress=False)
    assert summary.columns == ("model", "seg mIoU")
    (tmp_path / "seg.yaml").write_text("iterations: many\n")
    with pytest.raises(DistilleryError, match="seg.yaml: settings.segmentation: iterations must be int"):
        run_suite(tmp_path / "suite.yaml", show_progress=False)
