"""TinTeM's Table 3: how well the heads of a label-free run classify by kNN, beside the backbone and the teacher.

TinTeM trains a teacher head LayerNorm -> Linear that maps the teacher's tokens into the student's width while
keeping their similarity structure (its SNE loss), and the student copies that projection. Proteus, its
baseline, trains student heads that map the student's tokens into the teacher's space. Scoring the heads'
output beside the backbone's CLS (the `knn` task) and the teacher's separates what a head keeps of the teacher
from what the backbone then holds:

- `teacher_head_knn` (a TinTeM run): head(teachers' CLS), the teachers read through their own feature caches;
- `student_head_knn` (a Proteus run): token_head(the student's CLS), the student being the run's export.

Features are the same raw post-norm CLS files every other task of the model reads (cached by fingerprint),
mapped by the head of the run's newest checkpoint (whose config names the method), L2-normalised and
classified by the weighted kNN of `knn`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch

from distillery.errors import DistilleryError
from distillery.evaluate.features import Extraction
from distillery.evaluate.results import HEAD_KNN_TASKS, STUDENT_HEAD_KNN, TEACHER_HEAD_KNN, TaskResult, labelled_task
from distillery.evaluate.tasks import EvalData, EvalModel, KnnSettings, labelled_features, score_knn
from distillery.train import checkpoint as ckpt

def head_knn(run_dir: Path, student: EvalModel | None, teachers: list[EvalModel], data: EvalData,
             settings: KnnSettings, extraction: Callable[[EvalModel], Extraction]) -> TaskResult:
    """The kNN of the head in the run's newest checkpoint: TinTeM's teacher head over `teachers` (in the order
    the run combined them), or Proteus' student head over `student` (the run's export). `extraction(model)`
    says where each model's features are cached."""
    from distillery.train.methods.proteus import token_head_from_state
    from distillery.train.methods.tintem import combine_teachers, teacher_head_from_state

    path = ckpt.latest_checkpoint(run_dir)
    state = ckpt.load_checkpoint(path)
    method = state.get("config", {}).get("method")
    if method == "tintem":
        if not teachers:
            raise DistilleryError(f"{run_dir}: a TinTeM run's teacher head maps its teachers' features; give --teacher")
        head = teacher_head_from_state(state, str(path))
        return _head_knn(TEACHER_HEAD_KNN, lambda cls: head(combine_teachers(cls)), teachers, data, settings,
                         extraction, path, "TinTeM teacher head of the teachers' raw CLS, L2-normalised")
    if method == "proteus":
        if student is None:
            raise DistilleryError(f"{run_dir}: a Proteus run's student head maps its student's features; give --student")
        head = token_head_from_state(state, str(path))
        return _head_knn(STUDENT_HEAD_KNN, lambda cls: head(cls[0]), [student], data, settings, extraction, path,
                         "Proteus token head of the student's raw CLS, L2-normalised")
    raise DistilleryError(f"{run_dir}: method {method} has no head to score; runs of {', '.join(HEAD_KNN_TASKS)} do")


def _head_knn(task: str, head: Callable[[list[torch.Tensor]], torch.Tensor], models: list[EvalModel], data: EvalData,
              settings: KnnSettings, extraction: Callable[[EvalModel], Extraction], checkpoint: Path,
              features: str) -> TaskResult:
    data.require("knn")

    def projected(split: Path):
        labelled = [labelled_features(m, split, extraction(m), normalized=False, label=settings.label) for m in models]
        with torch.inference_mode():
            mapped = head([torch.from_numpy(f.features) for _, f in labelled]).numpy()
        classes, first = labelled[0]
        return classes, first._replace(features=mapped)

    train, val = projected(data.train), projected(data.val)
    metrics, rows = score_knn(data, settings, train, val)
    described = {m.name: {"spec": m.spec, "fingerprint": m.teacher.fingerprint()} for m in models}
    return TaskResult(labelled_task(task, settings.label), {**described, "head": {"checkpoint": str(checkpoint)}},
                      {"train": train[1].fingerprint["data"], "val": val[1].fingerprint["data"]},
                      {**dataclasses.asdict(settings), "features": features}, metrics, ("k", "top-1 %", "top-5 %"), rows)
