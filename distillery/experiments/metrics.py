"""Where the evaluation JSON files keep each metric the report shows.

`distillery eval suite` writes `<results>/eval/<model>/<task>.json` with the numbers under "metrics", as
fractions. This is the only place that knows that layout: if a key name changes, this is the one edit.
"""

from __future__ import annotations

from distillery.evaluate.results import MetricPath

PERCENT = 100  # the evaluation writes fractions; the papers report percent
TASKS = ("knn", "linear", "retrieval", "ood")  # the tasks the report can read


def metric_paths(tasks: tuple[str, ...], ood_sets: list[str], retrieval: str | None) -> dict[str, MetricPath]:
    """Every metric the report shows, by its name in an experiment's `paper_results`, for these tasks."""
    paths: dict[str, MetricPath] = {}
    if "knn" in tasks:
        paths |= {f"knn top-1 (k={k})": MetricPath("knn", (f"k={k}", "top1")) for k in (10, 20)}
    if "linear" in tasks:
        paths["linear top-1"] = MetricPath("linear", ("val", "top1"))
    if "retrieval" in tasks and retrieval:
        paths |= {f"{retrieval} mAP ({level})": MetricPath("retrieval", (level, "map")) for level in ("medium", "hard")}
    if "ood" in tasks:
        paths |= {f"ood AUROC ({name})": MetricPath("ood", ("sets", name, "auroc")) for name in ood_sets}
    return paths
