"""The papers' analyses: head orthogonality by hand, clustering scores on fixed inputs, attention maps equal
to timm's own attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distillery.errors import DistilleryError
from distillery.evaluate.analysis import clustering_scores, head_maps, orthogonality_score


def test_orthogonality_is_zero_for_an_orthogonal_map_at_any_scale_and_known_otherwise():
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    assert orthogonality_score(3 * q[:4])[0] == pytest.approx(0, abs=1e-12)  # orthonormal rows, scaled
    assert orthogonality_score(q[:, :4])[0] == pytest.approx(0, abs=1e-12)  # orthonormal columns: W^T W
    # W = [[1, 1, 1], [1, 1, 1]]: A = W W^T = 3 * ones(2, 2), alpha = 3, A / alpha - I = [[0, 1], [1, 0]]
    score, scaled = orthogonality_score(torch.ones(2, 3))
    assert score == pytest.approx(np.sqrt(2)) and torch.equal(scaled, torch.ones(2, 2, dtype=torch.float64))
    # W = diag(1, 2): A = diag(1, 4), alpha = 2.5, A / alpha - I = diag(-0.6, 0.6)
    assert orthogonality_score(torch.diag(torch.tensor([1.0, 2.0])))[0] == pytest.approx(np.hypot(0.6, 0.6))


def test_head_maps_are_the_methods_linear_weights():
    state = {"model": {"student.blocks.0.attn.qkv.weight": torch.zeros(3, 3), "method.head.linear.weight": torch.ones(2, 4),
                       "method.head.norm.weight": torch.ones(4)}, "config": {"method": "tintem"}}
    assert list(head_maps(state, "ckpt")) == ["head.linear"]
    with pytest.raises(DistilleryError, match="ckpt: no linear head maps"):
        head_maps({"model": {}, "config": {"method": "unic"}}, "ckpt")


def test_clustering_scores_on_fixed_inputs():
    # two tight, far-apart pairs: k-means finds them, NMI 1; silhouette by hand on the unit vectors
    features = np.array([[1.0, 0.0], [0.99, 0.141], [0.0, 1.0], [0.141, 0.99]])
    labels = np.array([0, 0, 1, 1])
    scores = clustering_scores(features, labels)
    assert scores["nmi"] == pytest.approx(1.0) and scores["k"] == 2
    normed = features / np.linalg.norm(features, axis=1, keepdims=True)
    distance = np.linalg.norm(normed[:, None] - normed[None], axis=-1)
    a = np.array([distance[0, 1], distance[1, 0], distance[2, 3], distance[3, 2]])
    b = np.array([distance[0, 2:].mean(), distance[1, 2:].mean(), distance[2, :2].mean(), distance[3, :2].mean()])
    assert scores["silhouette"] == pytest.approx(np.mean((b - a) / np.maximum(a, b)))
    swapped = clustering_scores(features, np.array([0, 1, 0, 1]))
    assert swapped["nmi"] == pytest.approx(0.0, abs=1e-12) and swapped["silhouette"] < 0
    with pytest.raises(DistilleryError, match="one class"):
        clustering_scores(features, np.zeros(4, np.int64))


def test_cls_attention_is_timms_own_attention(teacher_specs):
    from distillery.evaluate.analysis import cls_attention
    from distillery.evaluate.features import load_model

    teacher = load_model(teacher_specs[0], "cpu")
    attn = teacher.model.blocks[-1].attn
    attn.fused_attn = False  # so timm computes the softmax where a hook can see it
    seen = {}
    handle = attn.attn_drop.register_forward_hook(lambda module, args, output: seen.setdefault("attn", output))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    maps = cls_attention(teacher, images)
    handle.remove()
    grid = 32 // 4
    assert maps.shape == (2, attn.num_heads, grid, grid)
    expected = seen["attn"][:, :, 0, teacher.model.num_prefix_tokens:].reshape(2, attn.num_heads, grid, grid)
    assert torch.allclose(maps, expected, atol=1e-6)
