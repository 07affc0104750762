"""Result files: one JSON per task and model, with everything needed to tell where a number came from.

A result holds the metrics (fractions, as the metric functions return them), the protocol settings, each
model's spec and fingerprint (weights hash + preprocessing), each data set's fingerprint, and the distillery
version. Files are written under a temporary name and renamed, so a result file is always complete.
Tables show percentages with two decimals, as the papers print them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

import distillery
from distillery.console import print_table
from distillery.data.shards import CLASS_LABEL
from distillery.errors import DistilleryError
from distillery.files import atomic_path, write_atomic

RESULTS_DIR = Path("results")


@dataclasses.dataclass
class TaskResult:
    task: str
    models: dict[str, dict[str, Any]]  # name -> {"spec", "fingerprint"}
    data: dict[str, Any]  # role (train, val, near, ...) -> fingerprint
    settings: dict[str, Any]
    metrics: dict[str, Any]
    columns: tuple[str, ...]  # the rich table printed for it (not saved)
    rows: list[tuple[Any, ...]]
    tensors: dict[str, Any] | None = None  # weights a later task reuses (the linear probe), saved beside the JSON
    inputs_sha256: str | None = None  # what decided it (the suite's key: model, data files, settings), for reuse

    def to_json(self) -> dict[str, Any]:
        extra = {"inputs_sha256": self.inputs_sha256} if self.inputs_sha256 else {}
        return jsonable({"task": self.task, "models": self.models, "data": self.data, "settings": self.settings,
                         "metrics": self.metrics, "distillery_version": distillery.__version__,
                         "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra})

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> TaskResult:
        """A result read back from its file (its printed table is not kept)."""
        return cls(values["task"], values["models"], values["data"], values["settings"], values["metrics"], (), [],
                   inputs_sha256=values.get("inputs_sha256"))

    def title(self) -> str:
        return f"{self.task}: {', '.join(self.models)}"


def default_path(model_name: str, task: str, root: Path = RESULTS_DIR) -> Path:
    """ROOT/<model>/<task>.json: where a model's result is written and read back."""
    return Path(root) / model_name / f"{task}.json"


def jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars and arrays become numbers and lists, paths and tuples too; NaN becomes null."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | os.PathLike, values: Any) -> Path:
    return write_atomic(path, json.dumps(jsonable(values), indent=1) + "\n")




def save_result(result: TaskResult, path: str | os.PathLike) -> Path:
    """The JSON, and first the result's tensors as `<name>.safetensors` beside it (with the model's fingerprint
    in its metadata), so a JSON on disk always has its weights."""
    if result.tensors:
        from safetensors.torch import save_file

        with atomic_path(tensors_path(path)) as partial:
            save_file({k: v.contiguous() for k, v in result.tensors.items()}, str(partial),
                      metadata={"result": json.dumps(jsonable({"task": result.task, "models": result.models,
                                                               "settings": result.settings}))})
    return write_json(path, result.to_json())


def tensors_path(result_path: str | os.PathLike) -> Path:
    return Path(result_path).with_suffix(".safetensors")


def show_result(result: TaskResult, path: Path | None = None) -> None:
    print_table(result.title() + (f" -> {path}" if path else ""), result.columns, result.rows)


def percent(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{100 * value:.2f}"


class MetricPath(NamedTuple):
    """Where a number lives: the file OUT/<model>/<task>.json, and the keys under its "metrics"."""

    task: str
    keys: tuple[str, ...]

    def describe(self) -> str:
        return f"metrics/{'/'.join(self.keys)}"

    def lookup(self, metrics: Any, source: str | os.PathLike) -> Any:
        """The value at these keys of a result's "metrics"; a missing key is an error naming `source`."""
        value = metrics
        for depth, key in enumerate(self.keys):
            if not isinstance(value, dict) or key not in value:
                found = ", ".join(value) if isinstance(value, dict) else type(value).__name__
                raise DistilleryError(f"{source}: no metrics/{'/'.join(self.keys[:depth + 1])} (found: {found})")
            value = value[key]
        return value


# Where the protocols keep their headline numbers (evaluate/tasks.py writes them): every table that shows
# one (the suite's summary, the demo report, the experiments report) asks here, so a renamed key is one edit.
def labelled_task(task: str, label: str = CLASS_LABEL) -> str:
    """The result name of a labelled task scored on `label`: `knn` for the class, `knn-pattern` for a factor."""
    return task if label == CLASS_LABEL else f"{task}-{label}"


def knn_top1(k: int, label: str = CLASS_LABEL) -> MetricPath:
    return MetricPath(labelled_task("knn", label), (f"k={k}", "top1"))


def linear_top1(label: str = CLASS_LABEL) -> MetricPath:
    return MetricPath(labelled_task("linear", label), ("val", "top1"))


LINEAR_TOP1 = linear_top1()
TEACHER_HEAD_KNN = "teacher_head_knn"  # TinTeM Table 3 (evaluate/heads.py)
STUDENT_HEAD_KNN = "student_head_knn"  # the same for Proteus' student head
HEAD_KNN_TASKS = {"tintem": TEACHER_HEAD_KNN, "proteus": STUDENT_HEAD_KNN}  # method -> its head's kNN result


def head_top1(task: str, k: int, label: str = CLASS_LABEL) -> MetricPath:
    """Top-1 at `k` of a head's kNN result (`TEACHER_HEAD_KNN` or `STUDENT_HEAD_KNN`)."""
    return MetricPath(labelled_task(task, label), (f"k={k}", "top1"))


def teacher_head_top1(k: int, label: str = CLASS_LABEL) -> MetricPath:
    return head_top1(TEACHER_HEAD_KNN, k, label)


def davis_score(name: str = "J&F-Mean") -> MetricPath:
    """`name`: J&F-Mean, J-Mean, F-Mean, J-Recall, ... (davis2017-evaluation's global table)."""
    return MetricPath("davis", ("global", name))


def segmentation_score(name: str = "mIoU") -> MetricPath:
    """`name`: mIoU, mAcc or aAcc (mmseg's summary)."""
    return MetricPath("segmentation", (name,))


def retrieval_map(protocol: str) -> MetricPath:
    """`protocol`: "medium" or "hard"."""
    return MetricPath("retrieval", (protocol, "map"))


def ood_metric(name: str, metric: str, grouped: bool) -> MetricPath:
    """`metric` of OOD set `name`, or of group `name` (the mean over its sets) when `grouped`."""
    return MetricPath("ood", ("groups" if grouped else "sets", name, metric))


LOWER_IS_BETTER = ("fpr95_id_tpr", "fpr95_ood_tpr", "mCE", "bg_gap")


def higher_is_better(where: MetricPath) -> bool:
    """Whether a larger number is the better one (error rates, FPRs and the background gap are not)."""
    return where.keys[-1] not in LOWER_IS_BETTER


def read_result(path: Path) -> dict[str, Any]:
    """A result file's contents; a missing or broken file is an error naming it (reports never leave a blank)."""
    if not path.exists():
        raise DistilleryError(f"{path}: result file missing; run the evaluation that writes it first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DistilleryError(f"{path}: not valid JSON ({error})") from error


def read_metric(eval_dir: Path, model: str, where: MetricPath) -> float:
    """The fraction at `where` in EVAL_DIR/<model>/<task>.json; anything but a finite number is an error."""
    path = default_path(model, where.task, eval_dir)
    value = where.lookup(read_result(path).get("metrics"), path)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DistilleryError(f"{path}: {where.describe()} is {value!r}, not a number")
    return float(value)
