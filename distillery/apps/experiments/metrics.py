"""The metrics an experiment's report shows, by the names its `paper_results` use.

`distillery eval suite` writes `<results>/eval/<model>/<task>.json` with the numbers under "metrics", as
fractions; evaluate/results.py says where each one is.
"""

from __future__ import annotations

from distillery.evaluate.robustness import COLUMNS as ROBUSTNESS_COLUMNS
from distillery.evaluate.results import (HEAD_KNN_TASKS, LINEAR_TOP1, MetricPath, davis_score, head_top1, knn_top1,
                                         ood_metric, retrieval_map, segmentation_score)

PERCENT = 100  # the evaluation writes fractions; the papers report percent
# The tasks the report can read. The suite runs all but the heads: `teacher_head` (a TinTeM run) and
# `student_head` (a Proteus run) are the plan's analyze step, scored for the student only (TinTeM Table 3).
TASKS = ("knn", "linear", "robustness", "transfer", "retrieval", "ood", "davis", "segmentation", "teacher_head",
         "student_head")
# experiment task (`teacher_head`) -> the method whose run has that head; its result is `<task>_knn`
HEAD_TASKS = {task.removesuffix("_knn"): method for method, task in HEAD_KNN_TASKS.items()}
STUDENT_ONLY = set(HEAD_KNN_TASKS.values())  # result files only the student has


def metric_paths(tasks: tuple[str, ...], ood_sets: list[str], retrieval: str | None,
                 robustness: tuple[str, ...] = (), transfer: tuple[str, ...] = ()) -> dict[str, MetricPath]:
    """Every metric the report shows, by its name in an experiment's `paper_results`, for these tasks."""
    paths: dict[str, MetricPath] = {}
    if "knn" in tasks:
        paths |= {f"knn top-1 (k={k})": knn_top1(k) for k in (10, 20)}
    for head in (task for task in HEAD_TASKS if task in tasks):  # "teacher-head knn top-1 (k=20)"
        paths |= {f"{head.replace('_', '-')} knn top-1 (k={k})": head_top1(f"{head}_knn", k) for k in (10, 20)}
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
