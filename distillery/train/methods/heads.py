"""The projection MLP that UNIC, SeFA and DINO put on the student: one module, so its init is written once."""

from __future__ import annotations

from torch import nn


class MLP(nn.Sequential):
    """`layers` Linear layers with GELU between, weights trunc-normal(std 0.02) and biases zero, the init of
    DINO's DINOHead (facebookresearch/dino vision_transformer.py) and naver/unic's projectors.

    layers=2 is UNIC's head (Linear-GELU-Linear); layers=3 is the MLP of DINO's head and SeFA's distillation
    heads (Linear-GELU-Linear-GELU-Linear)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2):
        widths = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
        modules: list[nn.Module] = []
        for i in range(layers):
            modules.append(nn.Linear(widths[i], widths[i + 1]))
            if i < layers - 1:
                modules.append(nn.GELU())
        super().__init__(*modules)
        for module in self:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
