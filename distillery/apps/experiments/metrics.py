"""The metrics an experiment's report shows, by the names its `paper_results` use.

`distillery eval suite` writes `<results>/eval/<model>/<task>.json` with the numbers under "metrics", as
fractions; evaluate/results.py says where each one is.
"""

from __future__ import annotations

from distillery.evaluate.robustness import COLUMNS as ROBUSTNESS_COLUMNS
from distillery.evaluate.results import (LINEAR_TOP1, MetricPath, davis_score, knn_top1, ood_metric, retrieval_map,
                                         segmentation_score, student_head_top1, teacher_head_top1)

PERCENT = 100  # the evaluation writes fractions; the papers report percent
# The tasks the report can read. The suite runs all but the heads: `teacher_head` (a TinTeM run) and
# `student_head` (a Proteus run) are the plan's analyze step, scored for the student only (TinTeM Table 3).
TASKS = ("knn", "linear", "robustness", "transfer", "retrieval", "ood", "davis", "segmentation", "teacher_head",
         "student_head")
HEAD_TASKS = {"teacher_head": "tintem", "student_head": "proteus"}  # -> the method whose run has that head
STUDENT_ONLY = {"teacher_head_knn", "student_head_knn"}  # result files only the student has


def metric_paths(tasks: tuple[str, ...], ood_sets: list[str], retrieval: str | None,
                 robustness: tuple[str, ...] = (), transfer: tuple[str, ...] = ()) -> dict[str, MetricPath]:
    """Every metric the report shows, by its name in an experiment's `paper_results`, for these tasks."""
    paths: dict[str, MetricPath] = {}
    if "knn" in tasks:
        paths |= {f"knn top-1 (k={k})": knn_top1(k) for k in (10, 20)}
    if "teacher_head" in tasks:
        paths |= {f"teacher-head knn top-1 (k={k})": teacher_head_top1(k) for k in (10, 20)}
    if "student_head" in tasks:
        paths |= {f"student-head knn top-1 (k={k})": student_head_top1(k) for k in (10, 20)}
    if "transfer" in tasks:
        paths |= {f"transfer {name} top-1": MetricPath("transfer", ("sets", name, "top1")) for name in transfer}
        paths["transfer mean top-1"] = MetricPath("transfer", ("mean", "top1"))
    if "linear" in tasks:
        paths["linear top-1"] = LINEAR_TOP1
    if "retrieval" in tasks and retrieval:
        paths |= {f"{retrieval} mAP ({level})": retrieval_map(level) for level in ("medium", "hard")}
    if "ood" in tasks:
        paths |= {f"ood AUROC ({name})": ood_metric(name, "auroc", grouped=False) for name in ood_sets}
    if "davis" in tasks:
        paths |= {f"davis {name}": davis_score(name) for name in ("J&F-Mean", "J-Mean", "F-Mean")}
    if "robustness" in tasks:
        paths |= {f"robustness {title}": MetricPath("robustness", keys) for name, title, keys in ROBUSTNESS_COLUMNS
                  if name in robustness}
    if "segmentation" in tasks:
        paths |= {f"segmentation {name}": segmentation_score(name) for name in ("mIoU", "mAcc", "aAcc")}
    return paths
