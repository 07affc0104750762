"""DAVIS-2017 label propagation and J&F: exactness against hand-computed cases, and bad layouts named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from distillery.errors import DistilleryError
from distillery.evaluate.davis import (DavisSettings, boundary_f, frame_size, global_scores, iou, one_hot, propagate,
                                       read_sequences, score_sequence, seg2bmap, statistics)


def _square(shape, top, left, side):
    mask = np.zeros(shape, bool)
    mask[top:top + side, left:left + side] = True
    return mask


def test_j_and_f_edge_cases_by_hand():
    empty, square = np.zeros((20, 20), bool), _square((20, 20), 5, 5, 6)
    assert iou(empty, empty) == 1.0 and boundary_f(empty, empty) == 1.0  # nothing to find, nothing found
    assert iou(empty, square) == 0.0 and boundary_f(empty, square) == 0.0  # found what is not there: P 0, R 1
    assert iou(square, empty) == 0.0 and boundary_f(square, empty) == 0.0  # missed it: P 1, R 0
    assert iou(square, square) == 1.0 and boundary_f(square, square) == 1.0
    assert iou(square, _square((20, 20), 5, 8, 6)) == pytest.approx(18 / 54)  # 3 of 6 columns overlap


def test_boundary_tolerance_is_ceil_of_0008_times_the_diagonal():
    shape = (300, 400)  # diagonal 500: tolerance ceil(4.0) = 4 px
    gt = _square(shape, 100, 100, 80)
    assert boundary_f(gt, _square(shape, 100, 104, 80)) == 1.0  # every boundary pixel within 4 px
    shifted = boundary_f(gt, _square(shape, 100, 105, 80))  # the two vertical edges are 5 px off
    assert 0 < shifted < 1
    # seg2bmap marks where a pixel differs from its east, south or south-east neighbour: the column and row
    # just outside the top-left edges (80 + 80 + the corner), the inside right column and bottom row (80 + 80 - 1)
    boundary = seg2bmap(gt)
    assert boundary.sum() == 320 and boundary[99, 99] and boundary[99, 100] and boundary[179, 150]
    assert not boundary[100, 100] and not boundary[140, 140]


def test_per_object_statistics_and_the_mean_over_objects_not_sequences():
    values = np.array([1.0, 0.9, 0.8, 0.2, 0.1, 0.0, 0.6, 0.4])
    stats = statistics(values)
    edges = [0, 2, 4, 5, 7]  # round(linspace(1, 8, 5)) - 1, bins inclusive at both ends
    assert edges == list((np.round(np.linspace(1, 8, 5) + 1e-10) - 1).astype(int))
    assert stats["mean"] == pytest.approx(values.mean())
    assert stats["recall"] == pytest.approx(4 / 8)
    assert stats["decay"] == pytest.approx(values[0:3].mean() - values[5:8].mean())
    one = {"J": {"mean": 1.0, "recall": 1.0, "decay": 0.0}, "F": {"mean": 1.0, "recall": 1.0, "decay": 0.0}}
    zero = {"J": {"mean": 0.0, "recall": 0.0, "decay": 0.0}, "F": {"mean": 0.5, "recall": 0.0, "decay": 0.0}}
    scores = global_scores({"a": {"1": one, "2": one}, "b": {"1": zero}})
    assert scores["J-Mean"] == pytest.approx(2 / 3)  # over the three objects; over sequences it would be 1/2
    assert scores["J&F-Mean"] == pytest.approx((2 / 3 + 2.5 / 3) / 2)


def test_scoring_leaves_out_the_first_and_last_frames():
    frames = [np.zeros((10, 10), np.uint8) for _ in range(4)]
    for f in frames:
        f[2:6, 2:6] = 1
    wrong = [f.copy() for f in frames]
    wrong[0][:] = 0
    wrong[3][:] = 0  # only the scored middle frames are right
    result = score_sequence(frames, wrong, 1)
    assert result["1"]["J"]["mean"] == 1.0 and result["1"]["F"]["mean"] == 1.0


def test_one_hot_object_features_propagate_perfectly():
    """Patches whose features are one-hot object identities: every frame's labels come back exactly."""
    grid, objects = (10, 12), 2
    truth = []
    for t in range(8):
        labels = np.zeros(grid, np.int64)
        labels[2:5, 1 + t // 2:4 + t // 2] = 1  # object 1 drifts right, half a patch per frame
        labels[6:9, 8 - t // 3:11 - t // 3] = 2  # object 2 drifts left
        truth.append(labels)
    features = [torch.nn.functional.one_hot(torch.from_numpy(lab).flatten(), objects + 1).float() for lab in truth]
    first = torch.nn.functional.one_hot(torch.from_numpy(truth[0]), objects + 1).permute(2, 0, 1).float()
    soft = propagate(features, first, grid, DavisSettings(neighbourhood=3))
    for t, labels in enumerate(truth):
        assert torch.equal(soft[t].argmax(0), torch.from_numpy(labels)), t


def test_first_frame_labels_reach_the_grid_by_nearest_resize_and_void_is_background():
    mask = np.zeros((8, 8), np.uint8)
    mask[0:4, 0:4], mask[4:, 4:] = 1, 255
    labels = one_hot(mask, (2, 2), 1)
    assert labels.shape == (2, 2, 2) and labels[1, 0, 0] == 1 and labels[0, 1, 1] == 1


def test_frames_are_resized_as_dino_does():
    assert frame_size(854, 480, DavisSettings()) == (832, 480)
    assert frame_size(480, 854, DavisSettings()) == (480, 832)


def _layout(root, frames=4, size=(16, 12), mask_size=None, bad_index=False):
    for sub in ("JPEGImages/480p/seq", "Annotations/480p/seq", "ImageSets/2017"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "ImageSets/2017/val.txt").write_text("seq\n")
    for i in range(frames):
        Image.new("RGB", size).save(root / f"JPEGImages/480p/seq/{i:05d}.jpg")
        mask = np.zeros(((mask_size or size)[1], (mask_size or size)[0]), np.uint8)
        mask[2:6, 2:6] = 1
        if bad_index and i == 2:
            mask[8:10, 8:10] = 3
        Image.fromarray(mask, "L").convert("P").save(root / f"Annotations/480p/seq/{i:05d}.png")


def test_malformed_sequences_are_named(tmp_path):
    from distillery.evaluate.davis import segment_sequence

    missing = tmp_path / "missing"
    _layout(missing)
    (missing / "JPEGImages/480p/seq/00002.jpg").unlink()
    with pytest.raises(DistilleryError, match=r"JPEGImages/480p/seq: frame 00002 of sequence seq has no counterpart"):
        read_sequences(missing)
    for name, kwargs, message in (("index", {"bad_index": True}, r"00002.png: object index 3 is not in the first frame"),
                                  ("size", {"mask_size": (8, 8)}, r"00000.png: annotation is 8x8, its frame 16x12")):
        _layout(tmp_path / name, **kwargs)
        sequence = read_sequences(tmp_path / name)[0]
        with pytest.raises(DistilleryError, match=message):
            segment_sequence(None, sequence, DavisSettings(short_side=12, multiple=4))
    with pytest.raises(DistilleryError, match="val.txt: no such file"):
        read_sequences(tmp_path / "nowhere")


def test_the_synth_davis_set_is_deterministic_and_its_annotations_follow_the_objects(tmp_path):
    from distillery.data.synth_video import VideoConfig, generate_davis, render_sequence

    config = VideoConfig(seed=3, size=16, sequences=2, frames=(5, 8))
    generate_davis(config, tmp_path / "a")
    generate_davis(config, tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    sequences = read_sequences(tmp_path / "a")
    assert [s.name for s in sequences] == ["synth000", "synth001"] and all(5 <= len(s.frames) <= 8 for s in sequences)
    frames, masks = render_sequence(config, 0)
    objects = int(masks[0].max())
    assert 1 <= objects <= 3 and frames[0].size == (48, 32) and masks[0].shape == (32, 48)
    assert any(not np.array_equal(masks[0], m) for m in masks[1:])  # the objects move
    stored = np.array(Image.open(sequences[0].annotations[0]))
    assert np.array_equal(stored, masks[0]) and Image.open(sequences[0].annotations[0]).mode == "P"


def test_eval_davis_scores_a_model_and_writes_its_masks(tmp_path, teacher_specs):
    from distillery.data.synth_video import VideoConfig, generate_davis
    from distillery.evaluate.davis import davis_task

    generate_davis(VideoConfig(size=16, sequences=2, frames=(4, 6)), tmp_path / "davis")
    result, path = davis_task(teacher_specs[0], tmp_path / "davis", DavisSettings(short_side=32, multiple=16),
                              tmp_path / "davis.json", tmp_path / "masks", "cpu")
    scores = result.metrics["global"]
    assert 0 <= scores["J-Mean"] <= 1 and scores["J&F-Mean"] == pytest.approx((scores["J-Mean"] + scores["F-Mean"]) / 2)
    assert set(result.metrics["sequences"]) == {"synth000", "synth001"} and path.exists()
    written = sorted((tmp_path / "masks" / "synth000").glob("*.png"))
    assert len(written) == len(read_sequences(tmp_path / "davis")[0].frames)


def test_the_suite_runs_davis_beside_the_other_tasks(tmp_path, tiny_synth, teacher_specs):
    import json

    from distillery.data.synth_video import VideoConfig, generate_davis
    from distillery.evaluate.suite import run_suite, suite_config_values, write_suite_config

    generate_davis(VideoConfig(size=16, sequences=1, frames=(4, 4)), tmp_path / "davis")
    values = suite_config_values({"a": teacher_specs[0]}, str(tiny_synth / "train"), str(tiny_synth / "val"),
                                 ["knn", "davis"], {"davis": {"short_side": 32, "multiple": 16}, "knn": {"ks": [5]}},
                                 str(tmp_path / "eval"), davis=str(tmp_path / "davis"))
    summary = run_suite(write_suite_config(tmp_path / "suite.yaml", values), show_progress=False)
    assert "DAVIS J&F" in summary.columns and "kNN top-1 (k=5)" in summary.columns
    stored = json.loads((tmp_path / "eval" / "a" / "davis.json").read_text())
    row = summary.rows[0]
    assert row[summary.columns.index("DAVIS J&F")] == f"{100 * stored['metrics']['global']['J&F-Mean']:.2f}"
