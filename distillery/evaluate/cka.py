"""Linear centred kernel alignment between feature sets (Kornblith et al. 2019, "Similarity of Neural Network
Representations Revisited"; google-research `representation_similarity/Demo.ipynb`).

What is exact about it:
- Linear CKA = |Yc^T Xc|_F^2 / (|Xc^T Xc|_F |Yc^T Yc|_F) with column-centred Xc [n, p1] and Yc [n, p2]: the
  feature-space form of HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with K = X X^T, L = Y Y^T. It is 1 for
  X against itself and invariant to orthogonal maps and isotropic scaling of either input, not to general
  linear maps.
- Debiased CKA replaces each HSIC with its unbiased U-statistic (Song et al. 2012), written in feature space
  as the notebook does, so nothing n x n is built. It can be slightly negative.
- Rows are samples and must correspond across the two inputs; which tokens make a row (CLS, or flattened
  patch tokens) is the caller's choice and should be stated with the result. Everything runs in float64.
SeFA (multi-teacher distillation) reports that teacher pairs with CKA near 0.5 distil best, which is what
`rank_teacher_pairs` sorts by.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np

from distillery.errors import DistilleryError

SEFA_TARGET = 0.5


def _centred(features) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise DistilleryError(f"CKA takes [samples, features] arrays, got shape {x.shape}")
    return x - x.mean(axis=0, keepdims=True)


def _hsic(x: np.ndarray, y: np.ndarray, debiased: bool) -> float:
    """HSIC of linear kernels on centred x, y, up to a factor that cancels in CKA: |y^T x|_F^2, or its
    unbiased U-statistic form (needs n >= 4)."""
    dot = float(np.linalg.norm(x.T @ y) ** 2)
    if not debiased:
        return dot
    n = x.shape[0]
    row_x, row_y = np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", y, y)
    # tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1, with K~ = K minus its diagonal,
    # expanded for centred features, where 1'K = 0.
    return dot - n / (n - 2) * float(row_x @ row_y) + float(row_x.sum() * row_y.sum()) / ((n - 1) * (n - 2))


def _cka_centred(x: np.ndarray, y: np.ndarray, debiased: bool) -> float:
    if x.shape[0] != y.shape[0]:
        raise DistilleryError(f"CKA compares the same samples in both feature sets: got {x.shape[0]} and "
                              f"{y.shape[0]} rows")
    if debiased and x.shape[0] < 4:
        raise DistilleryError(f"debiased CKA needs at least 4 samples, got {x.shape[0]}")
    return _hsic(x, y, debiased) / np.sqrt(_hsic(x, x, debiased) * _hsic(y, y, debiased))


def linear_cka(x, y, debiased: bool = False) -> float:
    """Linear CKA between x [n, p1] and y [n, p2] (rows are the same n samples), or its debiased form."""
    return float(_cka_centred(_centred(x), _centred(y), debiased))


def cka_matrix(features: dict[str, np.ndarray], debiased: bool = False) -> tuple[list[str], np.ndarray]:
    """(names, symmetric [m, m] CKA matrix) over every pair of the named feature sets."""
    names = list(features)
    centred = [_centred(features[name]) for name in names]
    matrix = np.eye(len(names))  # CKA of a set with itself is 1
    for i, j in combinations(range(len(names)), 2):
        matrix[i, j] = matrix[j, i] = _cka_centred(centred[i], centred[j], debiased)
    return names, matrix


def plot_cka_heatmap(names: list[str], matrix: np.ndarray, path: str | Path, title: str = "Linear CKA") -> Path:
    """Write the CKA matrix as an annotated heatmap PNG; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    size = 1.5 + 0.9 * len(names)
    figure = Figure(figsize=(size + 1.0, size))
    FigureCanvasAgg(figure)  # a figure of its own on Agg: no pyplot state, no display needed
    axes = figure.add_subplot()
    image = axes.imshow(matrix, vmin=min(0.0, float(np.min(matrix))), vmax=1.0, cmap="viridis")
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axes.set_yticks(range(len(names)), names)
    for (i, j), value in np.ndenumerate(matrix):
        axes.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    axes.set_title(title)
    figure.colorbar(image, ax=axes)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150, bbox_inches="tight")
    return path


def rank_teacher_pairs(names: list[str], matrix: np.ndarray, target: float = SEFA_TARGET,
                       tolerance: float = 0.1) -> list[dict]:
    """Every pair of distinct sets, closest to `target` CKA first; `near_target` marks |cka - target| <= tolerance."""
    pairs = [{"pair": (names[i], names[j]), "cka": float(matrix[i, j]),
              "distance": abs(float(matrix[i, j]) - target)} for i, j in combinations(range(len(names)), 2)]
    pairs.sort(key=lambda pair: pair["distance"])
    return [{**pair, "near_target": pair["distance"] <= tolerance} for pair in pairs]
