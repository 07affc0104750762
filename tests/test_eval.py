"""The evaluation runners end to end on the small embedded set: the suite, its feature cache, the commands."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from distillery.cli import app
from distillery.errors import DistilleryError
from distillery.evaluate import suite as suite_module
from distillery.evaluate.features import Extraction, extract_features, load_model, open_images
from distillery.evaluate.linear import LabelledSet, LinearConfig, linear_probe
from distillery.evaluate.suite import read_suite_config, run_suite

LIGHT_SETTINGS = {"knn": {"ks": [5, 20]}, "linear": {"epochs": 5, "batch_size": 64}, "ood": {"k": 5}}


def _suite_file(tmp_path, synth_dir, teacher_specs, **changes):
    values = {"models": {"a": teacher_specs[0], "b": teacher_specs[1]},
              "data": {"train": str(synth_dir / "train"), "val": str(synth_dir / "val"),
                       "ood": {"near": str(synth_dir / "ood" / "near"), "far": str(synth_dir / "ood" / "far")},
                       "retrieval": {"dataset": "synth", "root": str(synth_dir / "retrieval")}},
              "tasks": ["knn", "linear", "retrieval", "ood", "cka"], "settings": LIGHT_SETTINGS,
              "out": str(tmp_path / "eval"), "workers": 0, "device": "cpu", **changes}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_suite_writes_every_result_and_a_rerun_reuses_the_features(tmp_path, synth_dir, teacher_specs, monkeypatch):
    summary = run_suite(_suite_file(tmp_path, synth_dir, teacher_specs), show_progress=False)
    out = tmp_path / "eval"
    for model in ("a", "b"):
        for task in ("knn", "linear", "retrieval", "ood"):
            result = json.loads((out / model / f"{task}.json").read_text())
            assert result["task"] == task and result["models"][model]["fingerprint"]
    knn = json.loads((out / "a" / "knn.json").read_text())["metrics"]
    assert 0 <= knn["k=20"]["top1"] <= 1 and set(knn) >= {"k=5", "k=20"}
    ood = json.loads((out / "a" / "ood.json").read_text())["metrics"]
    assert set(ood["groups"]) == {"near", "far"}
    cka = json.loads((out / "cka.json").read_text())["metrics"]
    assert cka["names"] == ["a", "b"] and cka["linear"][0][0] == pytest.approx(1.0)
    assert (out / "cka.png").stat().st_size > 1000
    assert [row[0] for row in summary.rows] == ["a", "b"] and "-" not in {c for row in summary.rows for c in row}
    assert "| a |" in summary.markdown.read_text()

    def no_forward(*args, **kwargs):
        raise AssertionError("features recomputed although model, data and settings are unchanged")

    monkeypatch.setattr("distillery.evaluate.features._compute", no_forward)
    again = run_suite(_suite_file(tmp_path, synth_dir, teacher_specs), show_progress=False)
    assert again.rows == summary.rows


def test_a_rerun_reuses_results_whose_inputs_are_unchanged_and_recomputes_the_rest(tmp_path, synth_dir, teacher_specs,
                                                                                    monkeypatch):
    data = tmp_path / "data"
    for split in ("train", "val"):
        shutil.copytree(synth_dir / split, data / split)
    path = _suite_file(tmp_path, data, teacher_specs, tasks=["knn", "linear"],
                       data={"train": str(data / "train"), "val": str(data / "val")})
    first = run_suite(path, show_progress=False)
    calls = []

    def counted(task, run):
        def counting(model, *args):
            calls.append((model.name, task))
            return run(model, *args)
        return counting

    for task in ("knn", "linear"):
        monkeypatch.setitem(suite_module.SINGLE_MODEL_TASKS, task, counted(task, suite_module.SINGLE_MODEL_TASKS[task]))
    assert run_suite(path, show_progress=False).rows == first.rows and calls == []
    run_suite(_suite_file(tmp_path, data, teacher_specs, tasks=["knn", "linear"], settings={**LIGHT_SETTINGS, "knn": {"ks": [5, 10, 20]}},
                          data={"train": str(data / "train"), "val": str(data / "val")}), show_progress=False)
    assert calls == [("a", "knn"), ("b", "knn")]  # the changed settings only
    calls.clear()
    (data / "val" / "notes.txt").write_text("a file beside the shards changes the data's bytes\n")
    assert run_suite(path, show_progress=False).rows == first.rows
    assert sorted(calls) == [("a", "knn"), ("a", "linear"), ("b", "knn"), ("b", "linear")]
    calls.clear()
    run_suite(path, show_progress=False, recompute=True)
    assert len(calls) == 4
    calls.clear()
    assert run_suite(path, show_progress=False).rows == first.rows and calls == []  # recomputed results keep their key


def test_cached_features_are_recomputed_when_the_model_changes(tmp_path, synth_dir, teacher_specs):
    source = open_images(synth_dir / "val")
    extraction = Extraction(batch_size=64, workers=0, cache_dir=tmp_path, show_progress=False)
    first = extract_features(load_model(teacher_specs[0], "cpu"), source, extraction)
    assert first.features.shape == (200, 48) and np.allclose(np.linalg.norm(first.features, axis=1), 1, atol=1e-5)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    other = extract_features(load_model(teacher_specs[1], "cpu"), source, extraction)
    assert other.features.shape == (200, 64) and other.fingerprint["model"] != first.fingerprint["model"]


def test_linear_probe_chooses_a_learning_rate_on_held_out_train_and_separates_separable_data():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 60)
    centres = rng.normal(size=(3, 16)) * 4
    features = (centres[labels] + rng.normal(size=(180, 16))).astype(np.float32)
    train, val = LabelledSet(features[::2], labels[::2]), LabelledSet(features[1::2], labels[1::2])
    result, head = linear_probe(train, val, 3, LinearConfig(epochs=20, batch_size=32))
    assert result["val"]["top1"] == pytest.approx(1.0)
    assert result["chosen_lr"] in [s["lr"] for s in result["sweep"]]
    again, again_head = linear_probe(train, val, 3, LinearConfig(epochs=20, batch_size=32))
    assert result == again and torch.equal(head.weight, again_head.weight)  # seeded
    assert head.weight.shape == (1, 3, train.features.shape[1])


def test_suite_config_errors_name_the_file_and_the_key(tmp_path, synth_dir, teacher_specs):
    with pytest.raises(DistilleryError, match=r"suite\.yaml: settings: unknown key 'knnn'"):
        read_suite_config(_suite_file(tmp_path, synth_dir, teacher_specs, settings={"knnn": {}}))
    with pytest.raises(DistilleryError, match=r"suite\.yaml: unknown task 'top1'"):
        read_suite_config(_suite_file(tmp_path, synth_dir, teacher_specs, tasks=["top1"]))
    with pytest.raises(DistilleryError, match="cka task compares models"):
        read_suite_config(_suite_file(tmp_path, synth_dir, teacher_specs, models={"a": teacher_specs[0]}))


def test_eval_commands_write_their_results(tmp_path, synth_dir, teacher_specs, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    knn = runner.invoke(app, ["eval", "knn", "--model", teacher_specs[0], "--train", str(synth_dir / "train"),
                              "--val", str(synth_dir / "val"), "--k", "5", "--workers", "0", "--device", "cpu",
                              "--out", "knn.json"])
    assert knn.exit_code == 0, knn.output
    assert set(json.loads((tmp_path / "knn.json").read_text())["metrics"]) == {"k=5", "predictions"}
    ood = runner.invoke(app, ["eval", "ood", "--model", teacher_specs[0], "--id-train", str(synth_dir / "train"),
                              "--id-test", str(synth_dir / "val"), "--ood", f"far={synth_dir / 'ood' / 'far'}",
                              "--workers", "0", "--device", "cpu", "--out", "ood.json"])
    assert ood.exit_code == 0, ood.output
    assert "far" in json.loads((tmp_path / "ood.json").read_text())["metrics"]["sets"]
    rank = runner.invoke(app, ["teachers", "rank", "--teacher", teacher_specs[0], "--teacher", teacher_specs[1],
                               "--data", str(synth_dir / "val"), "--workers", "0", "--device", "cpu", "--out", "rank.json"])
    assert rank.exit_code == 0, rank.output
    pairs = json.loads((tmp_path / "rank.json").read_text())["metrics"]["pairs"]
    assert len(pairs) == 1 and (tmp_path / "rank.png").exists()


def test_export_init_is_the_seeded_starting_point(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"method": "dino", "student": "vit_tiny_patch16_224", "seed": 3,
                                      "student_args": {"img_size": 32, "patch_size": 8, "depth": 2}}))
    runner = CliRunner()
    for name, seed in (("one", []), ("two", []), ("other", ["--seed", "4"])):
        result = runner.invoke(app, ["export-init", str(config), "--out", str(tmp_path / name), *seed])
        assert result.exit_code == 0, result.output
    read = lambda name: (tmp_path / name / "model.safetensors").read_bytes()  # noqa: E731
    assert read("one") == read("two") != read("other")
    assert load_model(f"local-dir:{tmp_path / 'one'}", "cpu").preprocessing.input_size == (32, 32)


def test_missing_suite_data_is_named_before_any_model_runs(tmp_path, synth_dir, teacher_specs, monkeypatch):
    monkeypatch.setattr(suite_module.EvalModel, "load", lambda *a, **k: pytest.fail("loaded a model"))
    path = _suite_file(tmp_path, synth_dir, teacher_specs, tasks=["retrieval"])
    values = yaml.safe_load(path.read_text())
    del values["data"]["retrieval"]
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(DistilleryError, match="retrieval"):
        run_suite(path, show_progress=False)


@pytest.mark.slow
def test_demo_runs_every_step_then_reuses_them(tmp_path, monkeypatch):
    from distillery.apps import demo

    short = {"epochs": 1, "max_steps": 2, "batch_size": 32, "workers": 0}
    config = tmp_path / "demo.yaml"
    shipped = tmp_path / "shipped" / "shape"
    config.write_text(yaml.safe_dump({
        "synth": {"train": 200, "val": 100, "ood_near": 50, "ood_far": 50, "landmarks": 2, "distractors": 8,
                  "shard_size": 100, "workers": 1},
        "teachers": {"shape": {"config": "configs/teachers/shape_cnn.yaml", "overrides": short, "expertise": "shape",
                               "shipped": str(shipped)},
                     "pattern": {"config": "configs/teachers/pattern_cnn.yaml", "overrides": short, "expertise": "pattern"}},
        "cache": {"views": 1, "batch_size": 64, "workers": 0},
        "students": {"unic": {"config": "configs/unic_synth.yaml", "overrides": short},
                     "unic_shape": {"config": "configs/unic_synth.yaml", "overrides": {**short, "cache_teachers": ["shape"]}},
                     "tintem_shape": {"config": "configs/tintem_synth.yaml", "overrides": {**short, "cache_teachers": ["shape"]}}},
        "alone": {"config": "configs/supervised_synth.yaml", "overrides": {**short, "supervised": {"label": "shape"}}},
        "baselines": {"random": "configs/unic_synth.yaml"},
        "eval": {"tasks": ["knn:shape", "knn:pattern", "linear:shape", "retrieval", "ood", "cka"], "settings": LIGHT_SETTINGS},
        "pca_images": 2}))
    loaded = demo.DemoConfig.load(config, tmp_path / "work", tmp_path / "report")
    with pytest.raises(DistilleryError, match="shipped teacher shape is missing; `make teachers` trains it"):
        demo.run_demo(loaded)
    assert demo.train_shipped_teachers(loaded) == [shipped]
    report = demo.run_demo(loaded)
    text = report.read_text()
    for model in ("random", "shape", "pattern", "best teacher", "unic", "unic_shape", "tintem_shape", "alone (student alone)"):
        assert f"| {model} |" in text or f"| **{model}** |" in text
    for figure in ("losses.png", "metrics.png", "cka.png", "patch_pca.png"):
        assert (tmp_path / "report" / figure).exists() and f"({figure})" in text
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert {f["baseline"] for f in saved["floors"]} == {"raw_pixels", "colour_histogram"}
    rules = {c["rule"] for c in saved["claims"]}
    assert {"student ≥ best teacher", "TinTeM > UNIC", "head ≥ teacher − 1 pt", "distilled ≥ alone"} <= rules
    assert len(saved["inheritance"]) == 2 + 1 + 1 and all(c["verdict"] in text for c in saved["claims"])

    monkeypatch.setattr("distillery.train.loop.train", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr("distillery.cache.writer.cache_teachers", lambda *a, **k: pytest.fail("cached again"))
    monkeypatch.setattr("distillery.evaluate.features._compute", lambda *a, **k: pytest.fail("features recomputed"))
    for task in suite_module.SINGLE_MODEL_TASKS:
        monkeypatch.setitem(suite_module.SINGLE_MODEL_TASKS, task, lambda *a, **k: pytest.fail("evaluated again"))
    assert demo.run_demo(loaded).read_text() == text

    record = json.loads((shipped / demo.PROVENANCE).read_text())
    (shipped / demo.PROVENANCE).write_text(json.dumps({**record, "weights_sha256": "0" * 64}))
    with pytest.raises(DistilleryError, match="weights differ from those recorded"):
        demo.run_demo(loaded)
    (shipped / demo.PROVENANCE).write_text(json.dumps({**record, "synth": {**record["synth"], "train_sha256": "0"}}))
    with pytest.raises(DistilleryError, match="was trained on other synth train images"):
        demo.run_demo(loaded)


def test_any_factor_the_shards_record_can_be_the_label(tmp_path, synth_dir, teacher_specs):
    """`knn:pattern` scores the pattern factor from the features the class kNN already extracted."""
    path = _suite_file(tmp_path, synth_dir, teacher_specs, tasks=["knn", "knn:pattern", "linear:colour"])
    run_suite(path, show_progress=False)
    out = tmp_path / "eval" / "a"
    by_class, by_pattern = (json.loads((out / f"{task}.json").read_text()) for task in ("knn", "knn-pattern"))
    assert by_pattern["task"] == "knn-pattern" and by_pattern["settings"]["label"] == "pattern"
    predictions = by_pattern["metrics"]["predictions"]["k=20"]
    assert len(predictions) == 200 and set(predictions) <= {0, 1, 2, 3}  # four patterns
    assert max(by_class["metrics"]["predictions"]["k=20"]) > 3  # ten shapes
    assert json.loads((out / "linear-colour.json").read_text())["metrics"]["val"]["top1"] >= 0
    with pytest.raises(DistilleryError, match="no label 'texture' here"):
        run_suite(_suite_file(tmp_path, synth_dir, teacher_specs, tasks=["knn:texture"]), show_progress=False)
    with pytest.raises(DistilleryError, match="only knn and linear take a :label"):
        read_suite_config(_suite_file(tmp_path, synth_dir, teacher_specs, tasks=["ood:pattern"]))


def test_model_free_baselines_score_pixels_and_colour_histograms(tmp_path, synth_dir):
    result = CliRunner().invoke(app, ["eval", "baselines", "--train", str(synth_dir / "train"), "--val",
                                      str(synth_dir / "val"), "--label", "class", "--label", "pattern",
                                      "--dataset", "synth", "--data-root", str(synth_dir / "retrieval"),
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    pixels = json.loads((tmp_path / "raw_pixels" / "knn.json").read_text())["metrics"]
    assert 0.1 < pixels["k=20"]["top1"] < 0.5  # above chance (10 shapes), far from solved
    assert (tmp_path / "raw_pixels" / "knn-pattern.json").exists()
    colour = json.loads((tmp_path / "colour_histogram" / "retrieval.json").read_text())["metrics"]
    assert 0 < colour["hard"]["map"] <= colour["medium"]["map"] < 1
