"""The analyses the papers explain their results with.

- **Head orthogonality** (TinTeM Table 4, Fig. 4): for every linear map W of a run's method heads (TinTeM's
  teacher head; a Proteus-style student's projection heads), A = W W^T when W has fewer rows than columns,
  else W^T W (the smaller Gram matrix, the identity for orthonormal rows or columns), alpha = mean(diag A),
  and the score ||A / alpha - I||_F: 0 for an orthogonal map up to scale. Fig. 4's density of the diagonal
  against the off-diagonal entries of A / alpha is written as a PNG.
- **Clustering** (SeFA Table 25): k-means (k = the number of classes, 10 restarts, seeded) on L2-normalised
  CLS features, NMI of its clusters against the labels, and the silhouette score of the labels themselves
  on the same features (scikit-learn's `normalized_mutual_info_score`, `silhouette_score`).
- **Attention maps** (SeFA appendix F): the last block's attention of the CLS token to every patch, per head,
  for a few images, one PNG per model (timm ViTs: recomputed from the block's own qkv projection on its input).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distillery.errors import DistilleryError
from distillery.evaluate.features import Extraction, model_device, patch_grid
from distillery.evaluate.results import TaskResult, percent

# ---------------------------------------------------------------------------------------------- orthogonality


def orthogonality_score(weight: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(||A / alpha - I||_F, A / alpha) for the smaller Gram matrix A of `weight` [out, in]."""
    w = weight.double()
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    scaled = gram / torch.diagonal(gram).mean()
    return float(torch.linalg.matrix_norm(scaled - torch.eye(len(scaled), dtype=scaled.dtype))), scaled


LINEAR_HEAD = re.compile(r"^method\.(.+)\.weight$")


def head_maps(state: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """Every 2-D weight of a checkpoint's method heads (the Linear maps), by module name."""
    maps = {match.group(1): value for name, value in state["model"].items()
            if (match := LINEAR_HEAD.match(name)) and value.ndim == 2}
    if not maps:
        raise DistilleryError(f"{where}: no linear head maps in the method's weights "
                              f"(method {state.get('config', {}).get('method')!r} has no heads)")
    return maps


def plot_gram_density(scaled: dict[str, torch.Tensor], path: Path, title: str) -> Path:
    """Fig. 4: histograms of the diagonal and off-diagonal entries of each A / alpha."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5 * len(scaled), 3.5))
    FigureCanvasAgg(figure)
    for i, (name, matrix) in enumerate(scaled.items()):
        axes = figure.add_subplot(1, len(scaled), i + 1)
        values = matrix.numpy()
        off = values[~np.eye(len(values), dtype=bool)]
        axes.hist(off, bins=60, density=True, alpha=0.7, label="off-diagonal")
        axes.hist(np.diag(values), bins=30, density=True, alpha=0.7, label="diagonal")
        axes.set_title(name)
        axes.set_xlabel("entry of A / mean(diag A)")
        axes.legend()
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


def head_orthogonality(run_dir: Path, out: Path) -> tuple[TaskResult, Path]:
    """TinTeM Table 4 for a run's newest checkpoint: the score of every head map; writes the density PNG."""
    from distillery.train import checkpoint as ckpt

    path = ckpt.latest_checkpoint(run_dir)
    state = ckpt.load_checkpoint(path)
    maps = head_maps(state, str(path))
    scores, scaled = {}, {}
    for name, weight in maps.items():
        scores[name], scaled[name] = orthogonality_score(weight)
    figure = plot_gram_density(scaled, out.with_suffix(".png"), f"{Path(run_dir).name}: Gram entries of the head maps")
    rows = [(name, list(maps[name].shape), f"{score:.4f}") for name, score in scores.items()]
    result = TaskResult("orthogonality", {Path(run_dir).name: {"checkpoint": str(path),
                                                               "method": state.get("config", {}).get("method")}},
                        {}, {"score": "||A / mean(diag A) - I||_F of the smaller Gram matrix A"},
                        {"heads": scores, "figure": str(figure)}, ("head map", "shape", "||A/α - I||_F"), rows)
    return result, figure


# ---------------------------------------------------------------------------------------------- clustering

@dataclass(frozen=True)
class ClusteringSettings:
    restarts: int = 10
    seed: int = 0


def clustering_scores(features: np.ndarray, labels: np.ndarray, settings: ClusteringSettings = ClusteringSettings()) -> dict[str, float]:
    """NMI of k-means clusters (k = classes present) against `labels`, and the labels' silhouette score, on
    L2-normalised `features`."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score, silhouette_score

    normed = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    k = len(np.unique(labels))
    if k < 2:
        raise DistilleryError("clustering: the images hold one class; NMI and silhouette need at least two")
    clusters = KMeans(n_clusters=k, n_init=settings.restarts, random_state=settings.seed).fit_predict(normed)
    return {"nmi": float(normalized_mutual_info_score(labels, clusters)),
            "silhouette": float(silhouette_score(normed, labels)), "k": k}


def clustering_task(model, data, settings: ClusteringSettings, extraction: Extraction) -> TaskResult:
    """SeFA Table 25 on the val set's CLS features."""
    from distillery.evaluate.tasks import labelled_features

    data.require("clustering")
    _, features = labelled_features(model, data.val, extraction, normalized=False)
    metrics = clustering_scores(features.features, features.labels, settings)
    return TaskResult("clustering", model.describe(), {"val": features.fingerprint["data"]},
                      {**dataclasses.asdict(settings), "features": "L2-normalised CLS after the final norm"}, metrics,
                      ("metric", "value"), [("NMI (k-means vs labels) %", percent(metrics["nmi"])),
                                            ("silhouette of the labels", f"{metrics['silhouette']:.4f}")])


# ---------------------------------------------------------------------------------------------- attention

@torch.inference_mode()
def cls_attention(teacher, images: torch.Tensor) -> torch.Tensor:
    """[B, heads, h, w]: the last block's attention of the CLS token to each patch (timm ViTs)."""
    model = teacher.model
    blocks = getattr(model, "blocks", None)
    if blocks is None or not teacher.has_class_token or not hasattr(blocks[-1], "attn"):
        raise DistilleryError(f"{teacher.spec}: attention maps need a ViT with a class token")
    captured = {}
    handle = blocks[-1].attn.register_forward_hook(lambda module, args, output: captured.setdefault("x", args[0]))
    try:
        model.forward_features(images)
    finally:
        handle.remove()
    attn, x = blocks[-1].attn, captured["x"]
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)  # [B, heads, N, N]
    prefix = getattr(model, "num_prefix_tokens", 1)
    grid = patch_grid(teacher, *images.shape[-2:])
    return weights[:, :, 0, prefix:].reshape(b, attn.num_heads, *grid).float()


def plot_attention(images: np.ndarray, maps: torch.Tensor, path: Path, title: str) -> Path:
    """One row per image: the image, then each head's CLS attention upsampled over it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    count, heads = maps.shape[:2]
    figure = Figure(figsize=(1.6 * (heads + 1), 1.6 * count))
    FigureCanvasAgg(figure)
    for row in range(count):
        axes = figure.add_subplot(count, heads + 1, row * (heads + 1) + 1)
        axes.imshow(images[row])
        axes.axis("off")
        for head in range(heads):
            axes = figure.add_subplot(count, heads + 1, row * (heads + 1) + head + 2)
            axes.imshow(maps[row, head].cpu().numpy(), cmap="inferno")
            axes.axis("off")
            if row == 0:
                axes.set_title(f"head {head}", fontsize=8)
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


def attention_figure(teacher, name: str, data: Path, path: Path, count: int = 6) -> Path:
    """The CLS attention maps of the first `count` images of `data` in the model's eval view."""
    from distillery.data.views import normalize
    from distillery.evaluate.features import CentreCrop, open_images

    source = open_images(data)
    dataset = source.dataset(CentreCrop.of(teacher.preprocessing))
    count = min(count, len(source))
    items = (list(itertools.islice(iter(dataset), count)) if isinstance(dataset, torch.utils.data.IterableDataset)
             else [dataset[i] for i in range(count)])
    pixels = torch.stack([item.views[0] for item in items])  # uint8 [B, 3, H, W]
    images = normalize(pixels, teacher.preprocessing.mean, teacher.preprocessing.std)
    maps = cls_attention(teacher, images.to(model_device(teacher)))
    return plot_attention(pixels.permute(0, 2, 3, 1).numpy(), maps, path, f"{name}: last-block CLS attention")
