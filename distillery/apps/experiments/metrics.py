"""The metrics an experiment's report shows, by the names its `paper_results` use.

`distillery eval suite` writes `<results>/eval/<model>/<task>.json` with the numbers under "metrics", as
fractions; evaluate/results.py says where each one is.
"""

from __future__ import annotations

from distillery.evaluate.robustness import COLUMNS as ROBUSTNESS_COLUMNS
from distillery.evaluate.results import (LINEAR_TOP1, MetricPath, davis_score, knn_top1, ood_metric, retrieval_map,
                                         segmentation_score)

PERCENT = 100  # the evaluation writes fractions; the papers report percent
TASKS = ("knn", "linear", "robustness", "retrieval", "ood", "davis", "segmentation")  # the tasks the report can read


def metric_paths(tasks: tuple[str, ...], ood_sets: list[str], retrieval: str | None,
                 robustness: tuple[str, ...] = ()) -> dict[str, MetricPath]:
    """Every metric the report shows, by its name in an experiment's `paper_results`, for these tasks."""
    paths: dict[str, MetricPath] = {}
    if "knn" in tasks:
        paths |= {f"knn top-1 (k={k})": knn_top1(k) for k in (10, 20)}
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
