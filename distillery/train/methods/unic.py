"""`unic`: multi-teacher distillation with teacher dropping (Sariyildiz et al., ECCV 2024; naver/unic).

Per teacher a head maps the student's tokens to the teacher's space: an MLP on the final tokens by
default, or UNIC's ladder of projectors (one Linear-GELU-Linear per student block on that block's
tokens, summed; hidden 768, 3072 on the last block). Per teacher and token type the loss is
`0.5 * (1 - cos) + 0.5 * smoothL1(beta=1)` averaged over dimensions; patch losses are averaged over
tokens; CLS and patch are averaged, giving one loss per (teacher, image). Teacher dropping, per image:
the teacher with the highest loss is always kept, every other is dropped with p=0.5; the 0/1
coefficients are detached and divided by their sum over all (teacher, image) pairs (naver/unic
teacher_dropping.py; its comment says "per image", its code divides by the global sum, which we follow).
Targets are the teachers' post-norm tokens standardised per teacher and token type with the cache's exact
dataset statistics (UNIC keeps EMA batch statistics because it has no cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distillery.config import ConfigError
from distillery.train.data import SampleSpec
from distillery.train.methods import Method, MethodContext, register_method
from distillery.train.methods.heads import MLP
from distillery.train.methods.losses import cls_token_loss, patch_token_loss


@dataclass(frozen=True)
class UnicConfig:
    head: str = "mlp"  # "mlp" or "ladder"
    mlp_hidden_dim: int = 2048
    ladder_hidden_dim: int = 768  # naver/unic modeling/unic.py: 768 for intermediate blocks...
    ladder_last_hidden_dim: int = 3072  # ...and 3072 for the last one
    drop_prob: float = 0.5
    cos_weight: float = 0.5
    smooth_l1_weight: float = 0.5

    def __post_init__(self) -> None:
        if self.head not in ("mlp", "ladder"):
            raise ConfigError(f"unic head must be 'mlp' or 'ladder', got {self.head!r}")


def teacher_coefficients(losses: torch.Tensor, drop_prob: float, generator: torch.Generator) -> torch.Tensor:
    """UNIC's teacher dropping. `losses` [n_teachers, B] -> detached coefficients [n_teachers, B] summing to 1:
    the highest-loss teacher of each image is kept, every other is kept with probability 1 - drop_prob."""
    keep = torch.rand(losses.shape, generator=generator, device="cpu").to(losses.device) >= drop_prob
    keep[losses.detach().argmax(0), torch.arange(losses.shape[1], device=losses.device)] = True
    coefficients = keep.float()
    return (coefficients / coefficients.sum()).detach()


class LadderHead(nn.Module):
    """UNIC's ladder of projectors: one MLP per student block, applied to that block's tokens, summed."""

    def __init__(self, in_dim: int, depth: int, hidden_dim: int, last_hidden_dim: int, out_dim: int):
        super().__init__()
        self.projectors = nn.ModuleList(
            MLP(in_dim, last_hidden_dim if i == depth - 1 else hidden_dim, out_dim) for i in range(depth))

    def forward(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([projector(x) for projector, x in zip(self.projectors, blocks, strict=True)]).sum(0)


@register_method
class Unic(Method):
    name = "unic"
    paper_recipe = "vits16_in1k"
    config_class = UnicConfig
    uses_teachers = True
    standardize_targets = True

    def __init__(self, config: UnicConfig, context: MethodContext):
        super().__init__(config, context)
        d, depth = context.student_dim, context.student_depth

        def head(out_dim: int) -> nn.Module:
            if config.head == "ladder":
                return LadderHead(d, depth, config.ladder_hidden_dim, config.ladder_last_hidden_dim, out_dim)
            return MLP(d, config.mlp_hidden_dim, out_dim)

        # In teacher order, not keyed by name: timm names hold dots, which module names cannot.
        self.heads = nn.ModuleList(nn.ModuleDict({"cls": head(t.dim), "patch": head(t.dim)}) for t in context.teachers)

    def sample_spec(self) -> SampleSpec:
        return SampleSpec(teacher_view=True)

    def forward(self, student, batch, step, ema):
        c = self.config
        out = student(batch["student"], return_blocks=c.head == "ladder")
        if c.head == "ladder":
            inputs = {"cls": [b[:, 0] for b in out.blocks], "patch": [b[:, 1:] for b in out.blocks]}
        else:
            inputs = {"cls": out.cls, "patch": out.patch}
        per_teacher = []
        names = [t.name for t in self.context.teachers]
        for name, heads in zip(names, self.heads, strict=True):
            target = batch["targets"][name]
            cls_loss = cls_token_loss(heads["cls"](inputs["cls"]).float(), target.cls, c.cos_weight, c.smooth_l1_weight)
            patch_loss = patch_token_loss(heads["patch"](inputs["patch"]).float(), target.patch, c.cos_weight,
                                          c.smooth_l1_weight)
            per_teacher.append((cls_loss + patch_loss) / 2)
        losses = torch.stack(per_teacher)  # [n_teachers, B]
        generator = torch.Generator().manual_seed(self.context.seed * 1_000_003 + step * 1009 + self.context.rank)
        coefficients = teacher_coefficients(losses, c.drop_prob, generator)
        metrics = {f"loss/{name}": losses[i].detach().mean() for i, name in enumerate(names)}
        metrics |= {f"kept/{name}": (coefficients[i] > 0).float().mean() for i, name in enumerate(names)}
        return {"loss": (coefficients * losses).sum(), **metrics}
