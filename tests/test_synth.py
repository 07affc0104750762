import hashlib
import pickle
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from distillery.data.shards import ShardSet, decode_image
from distillery.data.synth import FACTORS, ID_CLASSES, NEAR_OOD_CLASSES, generate
from distillery.errors import DistilleryError
from tests.conftest import SMALL_SYNTH


def _checksums(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    config = replace(SMALL_SYNTH, train=60, val=20, ood_near=10, ood_far=10, landmarks=2, distractors=4, shard_size=25)
    generate(config, tmp_path / "a")
    generate(replace(config, workers=1), tmp_path / "b")  # the split of work across processes must not matter
    generate(replace(config, seed=1), tmp_path / "c")
    a, b, c = (_checksums(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[name] != c[name] for name in a if name.endswith(".tar"))


def test_splits_have_the_requested_counts_and_labels(synth_dir):
    train = ShardSet.open(synth_dir / "train")
    assert (len(train), train.num_samples) == (4, 400)
    assert train.classes == ID_CLASSES
    labels = [r.label for shard in range(len(train)) for r in train.records(shard)]
    assert np.bincount(labels).tolist() == [40] * 10  # balanced
    near = ShardSet.open(synth_dir / "ood" / "near")
    assert near.classes == NEAR_OOD_CLASSES and near.num_samples == 100
    far = ShardSet.open(synth_dir / "ood" / "far")
    assert far.classes is None and all(r.label is None for r in far.records(0))
    image = decode_image(next(train.records(0)).image_bytes, "first sample")
    assert image.size == (32, 32) and image.mode == "RGB"


def test_retrieval_ground_truth_is_well_formed(synth_dir):
    root = synth_dir / "retrieval"
    with open(root / "gnd_synth.pkl", "rb") as f:
        cfg = pickle.load(f)
    assert set(cfg) == {"imlist", "qimlist", "gnd"}
    n = len(cfg["imlist"])
    assert len(cfg["gnd"]) == len(cfg["qimlist"]) == 2 * SMALL_SYNTH.landmarks
    for name in cfg["imlist"] + cfg["qimlist"]:
        assert (root / "jpg" / f"{name}.jpg").exists()
    for query, entry in zip(cfg["qimlist"], cfg["gnd"]):
        groups = [entry["easy"], entry["hard"], entry["junk"]]
        assert entry["easy"] or entry["hard"], f"{query} has no positives"
        for group in groups:
            assert all(isinstance(i, int) and 0 <= i < n for i in group)
        flat = [i for g in groups for i in g]
        assert len(flat) == len(set(flat)), "an image is in two groups of one query"
        width, height = Image.open(root / "jpg" / f"{query}.jpg").size
        x1, y1, x2, y2 = entry["bbx"]
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height


def test_raw_pixels_are_a_weak_classifier(synth_dir):
    """The classes must need learned features: a pixel kNN stays far below 50% top-1 (README figure)."""
    def pixels(split):
        shard_set = ShardSet.open(synth_dir / split)
        records = [r for s in range(len(shard_set)) for r in shard_set.records(s)]
        x = np.stack([np.asarray(decode_image(r.image_bytes, r.key), np.float32).ravel() for r in records])
        return x / np.linalg.norm(x, axis=1, keepdims=True), np.array([r.label for r in records])

    train_x, train_y = pixels("train")
    val_x, val_y = pixels("val")
    nearest = np.argsort(-(val_x @ train_x.T), axis=1)[:, :20]
    votes = np.array([np.bincount(train_y[row], minlength=10) for row in nearest])
    accuracy = (votes.argmax(1) == val_y).mean()
    assert accuracy < 0.35  # README: 30.5% on the default set


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 16"):
        replace(SMALL_SYNTH, size=8)


def test_every_id_image_records_the_factors_it_was_drawn_from(synth_dir):
    train = ShardSet.open(synth_dir / "train")
    assert train.factors == FACTORS and train.label_sizes() == {"class": 10, "shape": 10, "pattern": 4,
                                                                "background": 4, "colour": 6}
    records = [r for shard in range(len(train)) for r in train.records(shard)]
    for record in records:
        assert record.meta["factors"]["shape"] == record.label
        assert ID_CLASSES[record.label] == record.meta["name"]
    for factor, values in FACTORS.items():  # every value occurs, drawn independently of the shape
        assert {train.label_of(r, factor) for r in records} == set(range(len(values)))
    near = ShardSet.open(synth_dir / "ood" / "near")
    assert "shape" not in near.factors and "pattern" in near.factors  # held-out shapes have no ID shape
    with pytest.raises(DistilleryError, match="no label 'texture' here"):
        train.label_names("texture")
