"""`sefa`: multi-teacher distillation regularised by DINO (or, with `ssl: ibot`, iBOT) self-supervision
("Self-Supervision Improves Multi-Teacher Distillation", ICLR 2026 submission; no public code, built from its
equations).

    L = λ · L_DINO + (1 − λ) · L_distill,   L_distill = Σ_teachers L_sim,   L_sim = α (1 − cos) + (1 − α) smoothL1

λ = 0.5 (the paper's Table 20), α = 0.5. L_sim is averaged over dimensions and tokens per image, CLS and
patch averaged (CLS only as an option), no teacher dropping. Distillation heads are DINO-head-like MLPs
(Linear-GELU-Linear-GELU-Linear, 2048 hidden) per teacher and token type, on standardised targets. The
DINO part is the `dino` method's objective unchanged (EMA copy of student + DINO head, 2 global + L local
crops). The distillation input is the cached view, replayed at the student's size as one more student
forward; the DINO crops are drawn on the fly from the same decoded image (README: how they relate).

`shared_view: true` (not the paper's method, so not the default) makes the cached view DINO's first global
crop instead: one forward of the global crops serves both losses, one student forward of B images fewer per
step. That crop then has the cache's augmentation instead of DINO's first-global recipe (blur always, DINO's
colour jitter), for the EMA teacher too. BENCHMARKS.md, "SeFA's shared view", measures what it costs and saves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from distillery.config import ConfigError, from_mapping
from distillery.models.students import StudentOutput
from distillery.train.data import SampleSpec
from distillery.train.methods import Method, MethodContext, register_method
from distillery.train.methods.dino import DinoConfig, DinoHooks, DinoObjective
from distillery.train.methods.ibot import IbotConfig, IbotObjective
from distillery.train.methods.heads import MLP
from distillery.train.methods.losses import TOKEN_LOSSES


@dataclass(frozen=True)
class SefaConfig:
    ssl_weight: float = 0.5  # λ, SeFA Table 20
    alpha: float = 0.5  # weight of (1 - cos) in L_sim
    cls_only: bool = False
    head_hidden_dim: int = 2048
    ssl: str = "dino"  # the SSL objective: dino, or ibot (SeFA Table 1 compares both)
    dino: dict = field(default_factory=dict)  # DinoConfig settings of the SSL part (ssl: dino)
    ibot: dict = field(default_factory=dict)  # IbotConfig settings of the SSL part (ssl: ibot)
    shared_view: bool = False  # the cached view is DINO's first global crop (one student forward fewer)

    def __post_init__(self) -> None:
        if not 0 <= self.ssl_weight <= 1:
            raise ConfigError(f"sefa ssl_weight (λ) must be in [0, 1], got {self.ssl_weight}")
        if self.ssl not in SSL_OBJECTIVES:
            raise ConfigError(f"sefa ssl must be one of {', '.join(SSL_OBJECTIVES)}, got {self.ssl!r}")
        unused = "ibot" if self.ssl == "dino" else "dino"
        if getattr(self, unused):
            raise ConfigError(f"sefa: a {unused}: section with ssl: {self.ssl} would be ignored")
        if self.shared_view and self.ssl != "dino":
            raise ConfigError("sefa shared_view needs ssl: dino (iBOT masks the student's global crops, which the "
                              "distillation loss must see whole)")
        # checked with the rest of the section, before anything is built
        from_mapping(SSL_OBJECTIVES[self.ssl][0], getattr(self, self.ssl), self.ssl)


SSL_OBJECTIVES = {"dino": (DinoConfig, DinoObjective), "ibot": (IbotConfig, IbotObjective)}


def sefa_loss(ssl_loss: torch.Tensor, distill_loss: torch.Tensor, ssl_weight: float) -> torch.Tensor:
    return ssl_weight * ssl_loss + (1 - ssl_weight) * distill_loss


@register_method
class Sefa(DinoHooks, Method):
    name = "sefa"
    paper_recipe = "vits16_in1k"
    config_class = SefaConfig
    uses_teachers = True
    standardize_targets = True

    def __init__(self, config: SefaConfig, context: MethodContext):
        super().__init__(config, context)
        config_class, objective = SSL_OBJECTIVES[config.ssl]
        self.objective = objective(from_mapping(config_class, getattr(config, config.ssl), f"`sefa:` section: {config.ssl}"),
                                   context)
        parts = ("cls",) if config.cls_only else ("cls", "patch")
        # In teacher order, not keyed by name: timm names hold dots, which module names cannot.
        self.heads = nn.ModuleList(
            nn.ModuleDict({p: MLP(context.student_dim, config.head_hidden_dim, t.dim, layers=3) for p in parts})
            for t in context.teachers)

    def sample_spec(self) -> SampleSpec:
        return SampleSpec(teacher_view=True, crops=self.objective.crop_specs(first_global_given=self.config.shared_view))

    def distill_loss(self, tokens: StudentOutput, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_distill of the student's tokens of the cached view."""
        tokens = {"cls": tokens.cls, "patch": tokens.patch}
        total, metrics = 0.0, {}
        for teacher, heads in zip(self.context.teachers, self.heads, strict=True):
            name = teacher.name
            target = batch["targets"][name]
            per_part = [TOKEN_LOSSES[part](head(tokens[part]).float(), getattr(target, part), self.config.alpha,
                                           1 - self.config.alpha) for part, head in heads.items()]
            similarity = torch.stack(per_part).mean(0).mean()
            metrics[f"loss/{name}"] = similarity.detach()
            total = total + similarity
        return total, metrics

    def forward(self, student, batch, step, ema):
        if self.config.shared_view:
            ssl, ssl_metrics, globals_ = self.objective(student, batch, step, ema, first_global=batch["student"])
            size = batch["student"].shape[0]  # crop-major: the first B rows are the cached view's
            distill, metrics = self.distill_loss(StudentOutput(globals_.cls[:size], globals_.patch[:size], None), batch)
        else:
            distill, metrics = self.distill_loss(student(batch["student"]), batch)
            ssl, ssl_metrics, _ = self.objective(student, batch, step, ema)
        loss = sefa_loss(ssl, distill, self.config.ssl_weight)
        return {"loss": loss, self.config.ssl: ssl.detach(), "distill": distill.detach(), **metrics, **ssl_metrics}
