"""Robustness with the saved probe: mCE, the subset restriction and BG-gap by hand, ImageNet-V2's index
folders, the shipped lists, bad layouts named, and the synth sets end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distillery.errors import DistilleryError
from distillery.evaluate.linear import LinearHeads, accuracy
from distillery.evaluate.features import Pooling
from distillery.evaluate.robustness import (Probe, bg_gap, corruption_errors, in9_accuracy, probe_label_space,
                                            read_data_file, shipped, subset_mask)


def _probe(classes):
    return Probe(LinearHeads(torch.zeros(1, len(classes), 2), torch.zeros(1, len(classes))), tuple(classes), Pooling(),
                 "probe.safetensors")


def test_mce_from_given_errors_and_normalisers_by_hand():
    top1 = {"noise": {1: 0.9, 2: 0.8, 3: 0.7, 4: 0.6, 5: 0.5}, "blur": {s: 0.6 for s in range(1, 6)}}
    scores = corruption_errors(top1, {"noise": 0.6, "blur": 0.8})
    assert scores["ce"]["noise"] == pytest.approx(0.3 / 0.6)  # mean error 0.3 over severities, / the baseline's
    assert scores["ce"]["blur"] == pytest.approx(0.4 / 0.8)
    assert scores["mCE"] == pytest.approx(0.5)


def test_a_logit_outside_the_subset_never_wins():
    logits = torch.tensor([[9.0, 1.0, 2.0], [0.0, 5.0, 9.0]])
    mask = np.array([False, True, True])
    assert accuracy(logits, np.array([2, 1]), mask)["top1"] == 0.5  # row 0: class 0 is masked, so 2 wins
    assert accuracy(logits, np.array([2, 1]))["top1"] == 0.0


def test_bg_gap_and_the_in9_mapping():
    assert bg_gap({"mixed_same": 0.8, "mixed_rand": 0.65, "original": 0.9}) == pytest.approx(0.15)
    assert bg_gap({"original": 0.9}) is None
    mapping = np.array([0, 0, 1, -1])
    assert in9_accuracy(np.array([0, 1, 2, 3]), np.array([0, 0, 1, 2]), mapping) == 0.75  # -1 never matches


def test_v2_index_folders_are_read_by_number_not_by_sorted_name():
    probe = _probe([f"n{i:08d}" for i in range(12)])
    classes = tuple(sorted(str(i) for i in range(12)))  # "0", "1", "10", "11", "2", ...
    labels = np.arange(12)
    assert list(probe_label_space(probe, "v2", classes, labels)) == [int(c) for c in classes]
    named = probe_label_space(probe, "v2", ("n00000003", "n00000007"), np.array([0, 1]))
    assert list(named) == [3, 7]
    with pytest.raises(DistilleryError, match="class folder 'cat' is not a class of the probe"):
        probe_label_space(probe, "v2", ("cat",), np.array([0]))


def test_the_shipped_lists_match_their_sources(tmp_path):
    r, a = read_data_file(shipped("imagenet_r_classes.json"), "classes"), read_data_file(shipped("imagenet_a_classes.json"), "classes")
    assert len(set(r)) == len(set(a)) == 200 and r == sorted(r) and a == sorted(a)
    assert r[:3] == ["n01443537", "n01484850", "n01494475"] and a[:2] == ["n01498041", "n01531178"]
    in9 = read_data_file(shipped("imagenet9.json"), "in_to_in9")
    assert len(in9) == 1000 and sum(v >= 0 for v in in9.values()) == 370 and in9["151"] == 0
    assert len(read_data_file(shipped("imagenet_c_alexnet.json"), "errors")) == 15
    probe = _probe(r[:3])
    listing = tmp_path / "subset.json"
    listing.write_text(json.dumps({"classes": r[:2]}))
    assert list(subset_mask(probe, "r", (r[0],), listing)) == [True, True, False]
    with pytest.raises(DistilleryError, match=f"class folder '{r[2]}' is not in the subset list"):
        subset_mask(probe, "r", (r[2],), listing)


@pytest.fixture(scope="module")
def robust_sets(tmp_path_factory, tiny_synth):
    from distillery.data.synth_robust import RobustConfig, generate_robustness_sets

    out = tmp_path_factory.mktemp("robust")
    counts = generate_robustness_sets(RobustConfig(images=10), out, tiny_synth / "train")
    return out, counts


def test_the_synth_sets_have_the_real_layouts(robust_sets):
    out, counts = robust_sets
    assert counts == {"val-v2": 10, "val-r": 10, "val-c": 300, "val-9": 80}
    assert sorted(p.name for p in (out / "val-v2").iterdir()) == [str(i) for i in range(10)]
    assert json.loads((out / "val-r" / "classes.json").read_text())["classes"][0] == "disc"
    assert (out / "val-c" / "pixelate" / "5" / "disc").is_dir()
    assert set(json.loads((out / "val-c" / "normaliser.json").read_text())["errors"]) == {
        p.name for p in (out / "val-c").iterdir() if p.is_dir()}
    assert (out / "val-9" / "only_bg_t" / "val" / "00_disc").is_dir()


def test_robustness_reuses_the_saved_probe_and_refuses_another_models(tmp_path, tiny_synth, teacher_specs, robust_sets):
    from distillery.evaluate.features import Extraction
    from distillery.evaluate.robustness import RobustnessSettings
    from distillery.evaluate.suite import run_task
    from distillery.evaluate.tasks import EvalData, LinearSettings

    out, _ = robust_sets
    extraction = Extraction(32, 0, tmp_path / "features", show_progress=False)
    data = EvalData(train=tiny_synth / "train", val=tiny_synth / "val", probes=tmp_path / "results",
                    robustness={"v2": out / "val-v2", "r": out / "val-r", "c": out / "val-c", "in9": out / "val-9"})
    linear = LinearSettings(epochs=2, batch_size=32, holdout=0.2)
    run_task("linear", teacher_specs[0], data, linear, extraction, "cpu", results_root=tmp_path / "results")
    assert (tmp_path / "results" / "teacher_a" / "linear.safetensors").exists()
    result, _ = run_task("robustness", teacher_specs[0], data, RobustnessSettings(), extraction, "cpu",
                         results_root=tmp_path / "results")
    metrics = result.metrics
    assert metrics["r"]["classes"] == 6 and 0 <= metrics["v2"]["top1"] <= 1
    assert metrics["c"]["baseline"] == "raw-pixel kNN" and set(metrics["c"]["ce"]) == set(metrics["c"]["top1"])
    assert metrics["in9"]["bg_gap"] == pytest.approx(metrics["in9"]["variants"]["mixed_same"]
                                                      - metrics["in9"]["variants"]["mixed_rand"])
    other = tmp_path / "results" / "teacher_b"
    other.mkdir()
    (tmp_path / "results" / "teacher_a" / "linear.safetensors").rename(other / "linear.safetensors")
    with pytest.raises(DistilleryError, match="linear.safetensors: a probe of teacher_a"):
        run_task("robustness", teacher_specs[1], data, RobustnessSettings(), extraction, "cpu",
                 results_root=tmp_path / "results")


def test_a_missing_severity_or_an_unnormalised_corruption_is_named(tmp_path, robust_sets):
    import shutil

    from distillery.evaluate.robustness import corruption_dirs

    out, _ = robust_sets
    broken = tmp_path / "val-c"
    shutil.copytree(out / "val-c", broken)
    normaliser = read_data_file(broken / "normaliser.json", "errors")
    assert len(corruption_dirs(broken, normaliser, broken / "normaliser.json")) == len(normaliser)
    shutil.rmtree(broken / "contrast" / "3")
    with pytest.raises(DistilleryError, match="val-c: no contrast/3/"):
        corruption_dirs(broken, normaliser, broken / "normaliser.json")
    (broken / "frost").mkdir()
    with pytest.raises(DistilleryError, match="corruption 'frost' has no normaliser"):
        corruption_dirs(broken, normaliser, broken / "normaliser.json")
