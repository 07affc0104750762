"""TinTeM's Table 3: how well the teacher head's projection of the teacher's features classifies by kNN.

TinTeM trains a head LayerNorm -> Linear that maps the teacher's tokens into the student's width while
keeping their similarity structure (its SNE loss), and the student copies that projection. Scoring the
projection itself, beside the teacher and the student, separates what the head keeps of the teacher from
what the student then inherits. The teacher's CLS features are the same files every other task of the
teacher reads (raw, cached by fingerprint), mapped by the head of the run's last checkpoint, L2-normalised
and classified by the weighted kNN of `knn`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from distillery.evaluate.features import Extraction
from distillery.evaluate.results import TEACHER_HEAD_KNN, TaskResult, labelled_task
from distillery.evaluate.tasks import EvalData, EvalModel, KnnSettings, labelled_features, score_knn
from distillery.train import checkpoint as ckpt
from distillery.train.methods.tintem import combine_teachers, teacher_head_from_state


def teacher_head_knn(run_dir: Path, teachers: list[EvalModel], data: EvalData, settings: KnnSettings,
                     extractions: list[Extraction]) -> TaskResult:
    """kNN of head(teachers' CLS) for a TinTeM run; `teachers` in the order the run combined them, each read
    through its own `extractions` entry (its feature cache)."""
    data.require("knn")
    path = ckpt.latest_checkpoint(run_dir)
    head = teacher_head_from_state(ckpt.load_checkpoint(path), str(path))

    def projected(split: Path):
        labelled = [labelled_features(t, split, e, normalized=False, label=settings.label) for t, e in zip(teachers, extractions, strict=True)]
        with torch.inference_mode():
            mapped = head(combine_teachers([torch.from_numpy(f.features) for _, f in labelled])).numpy()
        classes, features = labelled[0]
        return classes, features._replace(features=mapped)

    train, val = projected(data.train), projected(data.val)
    metrics, rows = score_knn(data, settings, train, val)
    models = {t.name: {"spec": t.spec, "fingerprint": t.teacher.fingerprint()} for t in teachers}
    return TaskResult(labelled_task(TEACHER_HEAD_KNN, settings.label), {**models, "head": {"checkpoint": str(path)}},
                      {"train": train[1].fingerprint["data"], "val": val[1].fingerprint["data"]},
                      {**dataclasses.asdict(settings), "features": "TinTeM teacher head of the teachers' raw CLS, "
                       "L2-normalised"}, metrics, ("k", "top-1 %", "top-5 %"), rows)
