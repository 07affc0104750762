"""Weighted kNN classification on frozen features (DINO's protocol, Wu et al. 2018).

Features are L2-normalised; each test sample takes its k most similar train samples (cosine), each voting
for its label with weight exp(sim / T), T = 0.07; k in {10, 20, 100, 200}. Top-1 is the argmax of the
class scores, top-5 the best five. Search is FAISS's exact inner-product index (the GPU one when the
installed faiss has GPU support) over all test samples at once, so any test size works (DINO's `n // 100`
chunking breaks below 100 test images).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

DEFAULT_KS = (10, 20, 100, 200)
TEMPERATURE = 0.07


def l2_normalize(features: np.ndarray | torch.Tensor) -> np.ndarray:
    x = np.asarray(features, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest_neighbours(train: np.ndarray, test: np.ndarray, k: int, use_gpu: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(similarities [n_test, k], indices [n_test, k]), best first, by exact inner product."""
    import faiss

    k = min(k, train.shape[0])
    index = faiss.IndexFlatIP(train.shape[1])
    if use_gpu is None:
        use_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if use_gpu:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(np.ascontiguousarray(train, dtype=np.float32))
    similarities, indices = index.search(np.ascontiguousarray(test, dtype=np.float32), k)
    return similarities, indices


def knn_scores(train_features, train_labels, test_features, k: int, temperature: float = TEMPERATURE,
               num_classes: int | None = None) -> np.ndarray:
    """Class scores [n_test, num_classes]: the sum of exp(sim / T) over each test sample's k nearest train
    samples of that class. Features are L2-normalised here."""
    train, test = l2_normalize(train_features), l2_normalize(test_features)
    labels = np.asarray(train_labels, dtype=np.int64)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    similarities, indices = nearest_neighbours(train, test, k)
    return _votes(similarities, labels[indices], temperature, num_classes)


def _votes(similarities: np.ndarray, neighbour_labels: np.ndarray, temperature: float, num_classes: int) -> np.ndarray:
    weights = np.exp(similarities.astype(np.float64) / temperature)
    scores = np.zeros((similarities.shape[0], num_classes), dtype=np.float64)
    np.add.at(scores, (np.arange(similarities.shape[0])[:, None], neighbour_labels), weights)
    return scores


def knn_accuracy(train_features, train_labels, test_features, test_labels, ks=DEFAULT_KS,
                 temperature: float = TEMPERATURE, num_classes: int | None = None) -> dict[str, Any]:
    """Top-1 and top-5 (fractions) for every k, from one search at the largest k; `predictions` holds each
    k's top-1 class per test sample, so that two models' predictions can be compared (agreement)."""
    train, test = l2_normalize(train_features), l2_normalize(test_features)
    labels = np.asarray(train_labels, dtype=np.int64)
    truth = np.asarray(test_labels, dtype=np.int64)
    num_classes = int(max(labels.max(), truth.max())) + 1 if num_classes is None else num_classes
    similarities, indices = nearest_neighbours(train, test, max(ks))
    out: dict[str, Any] = {"predictions": {}}
    for k in ks:
        scores = _votes(similarities[:, :k], labels[indices[:, :k]], temperature, num_classes)
        ranked = np.argsort(-scores, axis=1, kind="stable")
        out[f"k={k}"] = {"top1": float((ranked[:, 0] == truth).mean()),
                         "top5": float((ranked[:, :min(5, num_classes)] == truth[:, None]).any(1).mean())}
        out["predictions"][f"k={k}"] = ranked[:, 0].tolist()
    return out


def prediction_agreement(a: list[int], b: list[int]) -> float:
    """The share of test samples on which two models' kNN top-1 predictions are the same class."""
    if len(a) != len(b) or not a:
        raise ValueError(f"predictions of {len(a)} and {len(b)} samples cannot be compared")
    return float(np.mean(np.asarray(a) == np.asarray(b)))
