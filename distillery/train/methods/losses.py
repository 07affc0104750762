"""UNIC's and SeFA's per-token distillation loss, with the token axis named by the function called."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cls_token_loss(prediction: torch.Tensor, target: torch.Tensor, cos_weight: float = 0.5,
                   smooth_l1_weight: float = 0.5) -> torch.Tensor:
    """`cos_weight * (1 - cos) + smooth_l1_weight * smoothL1(beta=1)` averaged over dimensions, per image:
    [B, D] -> [B] (naver/unic main_unic.py's loss; SeFA's L_sim with alpha = cos_weight)."""
    if prediction.ndim != 2 or prediction.shape != target.shape:
        raise ValueError(f"CLS tokens are [B, D]; got {tuple(prediction.shape)} against {tuple(target.shape)}")
    return _per_token(prediction, target, cos_weight, smooth_l1_weight)


def patch_token_loss(prediction: torch.Tensor, target: torch.Tensor, cos_weight: float = 0.5,
                     smooth_l1_weight: float = 0.5) -> torch.Tensor:
    """The same loss on patch tokens, averaged over the token axis: [B, T, D] -> [B]."""
    if prediction.ndim != 3 or prediction.shape != target.shape:
        raise ValueError(f"patch tokens are [B, T, D]; got {tuple(prediction.shape)} against {tuple(target.shape)}")
    return _per_token(prediction, target, cos_weight, smooth_l1_weight).mean(dim=1)


TOKEN_LOSSES = {"cls": cls_token_loss, "patch": patch_token_loss}


def _per_token(prediction: torch.Tensor, target: torch.Tensor, cos_weight: float, smooth_l1_weight: float) -> torch.Tensor:
    cos = 1 - F.cosine_similarity(prediction, target, dim=-1)
    smooth_l1 = F.smooth_l1_loss(prediction, target, beta=1.0, reduction="none").mean(-1)
    return cos_weight * cos + smooth_l1_weight * smooth_l1
