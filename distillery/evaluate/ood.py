"""Out-of-distribution detection with the KNN score (Sun et al. 2022, "Out-of-Distribution Detection with Deep
Nearest Neighbors"; deeplearning-wisc/knn-ood) and the metrics of OpenOOD v1.5 (Zhang et al. 2023).

What is exact about it:
- Score = -(Euclidean distance to the k-th nearest neighbour) among L2-normalised ID-train features, as the
  paper defines it; higher means more in-distribution. knn-ood and OpenOOD negate the *squared* distance
  instead; the two are monotone in each other, so every metric below is unchanged, only raw scores differ.
  The papers' settings: k = 1000 on all of ImageNet, k = 10 on a random 1% of it, k = 50 on CIFAR.
- `auroc`: ID as the positive class (the value is the same with OOD positive and negated scores).
- `aupr_in` / `aupr_out`: trapezoid area under sklearn's precision-recall curve with ID / OOD positive
  (OpenOOD's `auc_and_fpr_recall`; sklearn's average_precision would differ in the third decimal).
- Two FPR@95 conventions that give different numbers, so both are reported under explicit names:
  `fpr95_id_tpr`: share of OOD samples accepted when 95% of ID samples are kept (knn-ood's `cal_metric`,
  the classic ODIN / Sun et al. number); `fpr95_ood_tpr`: share of ID samples rejected when 95% of OOD
  samples are caught (OpenOOD v1.5, which treats OOD as positive; OpenOOD issue #308).
OpenOOD averages each metric over the OOD sets of a group (near / far), which `group_means` does.
All values are fractions; the papers print 100 x these.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics

from distillery.errors import DistilleryError
from distillery.evaluate.knn import l2_normalize, nearest_neighbours

TPR = 0.95


def _scores(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _labelled(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    """(is_ood indicator, scores) over ID followed by OOD samples."""
    id_scores, ood_scores = _scores(id_scores), _scores(ood_scores)
    is_ood = np.concatenate([np.zeros(len(id_scores), np.int64), np.ones(len(ood_scores), np.int64)])
    return is_ood, np.concatenate([id_scores, ood_scores])


def fpr_at_id_tpr(id_scores, ood_scores) -> float:
    """Share of OOD scores strictly above the threshold that keeps 95% of ID scores (knn-ood's cal_metric:
    the threshold is the ascending ID score at index round(0.05 n), with Python's rounding)."""
    id_scores, ood_scores = _scores(id_scores), _scores(ood_scores)
    threshold = np.sort(id_scores)[round(0.05 * len(id_scores))]
    return float(np.mean(ood_scores > threshold))


def fpr_at_ood_tpr(id_scores, ood_scores) -> float:
    """OpenOOD v1.5: with OOD positive and the negated score, the FPR at the first ROC point whose TPR
    reaches 95%, i.e. the share of ID samples flagged as OOD once 95% of OOD samples are caught."""
    is_ood, scores = _labelled(id_scores, ood_scores)
    fpr, tpr, _ = metrics.roc_curve(is_ood, -scores)
    return float(fpr[np.argmax(tpr >= TPR)])


def _aupr(positive: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = metrics.precision_recall_curve(positive, scores)
    return float(metrics.auc(recall, precision))


def ood_metrics(id_scores, ood_scores) -> dict[str, float]:
    """AUROC, AUPR-In, AUPR-Out and both FPR@95 conventions (fractions) for scores where higher = more ID."""
    is_ood, scores = _labelled(id_scores, ood_scores)
    return {"auroc": float(metrics.roc_auc_score(1 - is_ood, scores)),
            "aupr_in": _aupr(1 - is_ood, scores),
            "aupr_out": _aupr(is_ood, -scores),
            "fpr95_id_tpr": fpr_at_id_tpr(id_scores, ood_scores),
            "fpr95_ood_tpr": fpr_at_ood_tpr(id_scores, ood_scores)}


def _subsample(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random `fraction` of n rows, without replacement (knn-ood keeps
    int(n * fraction) of the train set)."""
    if not 0.0 < fraction <= 1.0:
        raise DistilleryError(f"the ID-train fraction must be in (0, 1], got {fraction}")
    return np.sort(np.random.default_rng(seed).choice(n, size=max(1, int(n * fraction)), replace=False))


def knn_ood_scores(train_features, test_features, k: int, train_fraction: float = 1.0, seed: int = 0) -> np.ndarray:
    """Per test sample, -(Euclidean distance to its k-th nearest L2-normalised ID-train feature), searched in
    all of train or in a seeded random `train_fraction` of it."""
    train = l2_normalize(train_features)
    if train_fraction < 1.0:
        train = train[_subsample(len(train), train_fraction, seed)]
    if not 1 <= k <= len(train):
        raise DistilleryError(f"KNN OOD needs 1 <= k <= the {len(train)} ID-train features searched, got k={k}")
    similarities, _ = nearest_neighbours(train, l2_normalize(test_features), k)
    # For unit vectors |a - b|^2 = 2 - 2 a.b; rounding can push the inner product just above 1.
    return -np.sqrt(np.maximum(0.0, 2.0 - 2.0 * similarities[:, k - 1].astype(np.float64)))


def group_means(per_set: dict[str, dict[str, float]], groups: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Each metric averaged over the OOD sets of each group (e.g. near / far), as OpenOOD reports them.
    A group with no sets is left out."""
    out = {}
    for group, names in groups.items():
        unknown = [name for name in names if name not in per_set]
        if unknown:
            raise DistilleryError(f"OOD group {group!r} lists {unknown[0]!r}, which has no results; "
                                  f"sets with results: {', '.join(per_set) or 'none'}")
        if names:
            out[group] = {metric: float(np.mean([per_set[name][metric] for name in names]))
                          for metric in per_set[names[0]]}
    return out
