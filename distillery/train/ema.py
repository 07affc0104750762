"""An exponential moving average of a module (DINO's teacher, `export --ema`), in the style of timm's ModelEmaV3.

It is an nn.Module, so its weights go into checkpoints; the decay is a function of the step supplied by
the caller (DINO: cosine 0.996 -> 1), kept apart from `update`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma(nn.Module):
    def __init__(self, source: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(source).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, source: nn.Module, decay: float) -> None:
        ema_params = list(self.module.parameters())
        source_params = list(source.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in source_params], 1.0 - decay)
        for ema_buffer, buffer in zip(self.module.buffers(), source.buffers(), strict=True):
            ema_buffer.copy_(buffer)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
