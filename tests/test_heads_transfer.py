"""TinTeM Table 3 (the heads' kNN) and the transfer probes: each number is the protocol applied to what it says
it scores, recomputed here from the same features."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from distillery.errors import DistilleryError
from distillery.evaluate.features import Extraction
from distillery.evaluate.heads import head_knn
from distillery.evaluate.knn import knn_accuracy
from distillery.evaluate.suite import read_suite_config, run_suite
from distillery.evaluate.tasks import (EvalData, EvalModel, KnnSettings, LinearSettings, TransferSet, labelled_features,
                                       linear_task, transfer_task)
from distillery.train.distributed import DistInfo
from distillery.train.export import export_run
from distillery.train.loop import TrainConfig, Trainer

from tests.conftest import TINY_STUDENT

PROBE = LinearSettings(epochs=3, grid="sefa")


@pytest.fixture(scope="module")
def transfer_set(tmp_path_factory):
    from distillery.data.synth import SynthConfig, generate_transfer

    out = tmp_path_factory.mktemp("transfer") / "novel-shapes"
    generate_transfer(SynthConfig(workers=1), out, train=60, val=30)
    return out


def _run(tiny_synth, tiny_cache, out, method):
    config = TrainConfig(method=method, data=str(tiny_synth / "train"), out=str(out / "run"), student_args=TINY_STUDENT,
                         epochs=1, max_steps=2, batch_size=32, warmup_epochs=0, workers=0, seed=0,
                         cache=str(tiny_cache), cache_teachers=["teacher_a"])
    Trainer(config, DistInfo()).fit()
    export_run(out / "run", out / "export")
    return out / "run", f"local-dir:{out / 'export'}"


@pytest.mark.parametrize("method", ["tintem", "proteus"])
def test_the_head_knn_is_knn_of_the_checkpoints_head_on_the_models_features(tiny_synth, tiny_cache, teacher_specs,
                                                                            tmp_path, method):
    from distillery.train import checkpoint as ckpt
    from distillery.train.methods.proteus import token_head_from_state
    from distillery.train.methods.tintem import teacher_head_from_state

    run, spec = _run(tiny_synth, tiny_cache, tmp_path, method)
    student, teacher = EvalModel.load("student", spec, "cpu"), EvalModel.load("teacher_a", teacher_specs[0], "cpu")
    data, settings = EvalData(train=tiny_synth / "train", val=tiny_synth / "val"), KnnSettings(ks=(5,))
    extraction = lambda model: Extraction(workers=0, cache_dir=tmp_path / model.name, show_progress=False)  # noqa: E731
    result = head_knn(run, student, [teacher], data, settings, extraction)
    assert result.task == {"tintem": "teacher_head_knn", "proteus": "student_head_knn"}[method]

    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    head, source = ((teacher_head_from_state(state, "x"), teacher) if method == "tintem"
                    else (token_head_from_state(state, "x"), student))
    (_, train), (_, val) = (labelled_features(source, split, extraction(source), normalized=False)
                            for split in (data.train, data.val))
    with torch.inference_mode():
        mapped = [head(torch.from_numpy(f.features)).numpy() for f in (train, val)]
    expected = knn_accuracy(mapped[0], train.labels, mapped[1], val.labels, (5,), settings.temperature, 10)
    assert result.metrics["k=5"]["top1"] == pytest.approx(expected["k=5"]["top1"])
    with pytest.raises(DistilleryError, match="give --student" if method == "proteus" else "give --teacher"):
        head_knn(run, None, [], data, settings, extraction)


def test_a_run_without_a_head_is_refused_in_one_line(tiny_synth, tiny_cache, tmp_path):
    run, _ = _run(tiny_synth, tiny_cache, tmp_path, "unic")
    with pytest.raises(DistilleryError, match=r"method unic has no head to score; runs of tintem, proteus do"):
        head_knn(run, None, [], EvalData(train=tiny_synth / "train", val=tiny_synth / "val"), KnnSettings(), None)


def test_transfer_is_the_linear_probe_on_each_sets_own_classes(tmp_path, teacher_specs, transfer_set):
    model = EvalModel.load("a", teacher_specs[0], "cpu")
    extraction = Extraction(workers=0, cache_dir=tmp_path / "features", show_progress=False)
    sets = {"shapes": TransferSet.under(transfer_set), "again": TransferSet(transfer_set / "train", transfer_set / "val")}
    result = transfer_task(model, EvalData(transfer=sets), PROBE, extraction)
    alone = linear_task(model, EvalData(train=transfer_set / "train", val=transfer_set / "val"), PROBE, extraction)
    for name in sets:
        assert result.metrics["sets"][name]["top1"] == alone.metrics["val"]["top1"]
        assert result.metrics["sets"][name]["classes"] == 5  # the held-out shapes, not the 10 ID classes
    assert result.metrics["mean"]["top1"] == pytest.approx(alone.metrics["val"]["top1"])
    with pytest.raises(DistilleryError, match="eval transfer: no transfer data given"):
        transfer_task(model, EvalData(), PROBE, extraction)


def test_a_suite_names_transfer_sets_by_directory_or_by_split(tmp_path, synth_dir, teacher_specs, transfer_set):
    values = {"models": {"a": teacher_specs[0]}, "tasks": ["transfer"], "out": str(tmp_path / "eval"),
              "settings": {"transfer": {"epochs": 3, "grid": "sefa"}}, "workers": 0,
              "data": {"transfer": {"shapes": str(transfer_set),
                                    "split": {"train": str(transfer_set / "train"), "val": str(transfer_set / "val")}}}}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(values))
    config = read_suite_config(path)
    assert config.data.transfer["shapes"] == config.data.transfer["split"] == TransferSet.under(transfer_set)
    summary = run_suite(path, show_progress=False)
    assert summary.columns == ("model", "transfer top-1 (mean of 2)")
    saved = json.loads((tmp_path / "eval" / "a" / "transfer.json").read_text())
    assert np.isclose(float(summary.rows[0][1]), 100 * saved["metrics"]["mean"]["top1"], atol=0.01)
    values["data"]["transfer"]["split"] = {"train": str(transfer_set / "train")}
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(DistilleryError, match=r"suite.yaml: data.transfer.split: missing key 'val'|missing.*val"):
        read_suite_config(path)
