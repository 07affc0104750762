"""`tintem`: label-free distillation through a teacher head ("Faithful Label-free Knowledge Distillation",
Nanni et al.; emannix/tintem-teacher-in-the-middle, the "reversed Proteus").

A head `LayerNorm(D_t) -> Linear(D_t -> D_s)` maps the teacher's tokens to the student's width. It is
trained only by an SNE loss that makes its output keep the teacher's similarity structure: cosine-
similarity kernels at temperatures τ in {0.01, ..., 0.10}, self-similarity masked, row-wise softmax,
symmetrised into one joint distribution, KL(teacher || head), averaged over τ. One term is taken within
each image over all its tokens (CLS + patches), one across the batch over CLS tokens (all-gathered over
ranks with gradient). The student matches the *detached* head output with a cosine loss on the CLS token
and on all tokens; like the reference code (CosineLoss, proteus_vmfsne7_reversed.py L40-53) the all-token
cosine is taken between the flattened [T * D] token matrices of an image. Head and student step together;
the head never receives gradient from the student's term, nor the student from the SNE terms.

Targets are the teachers' post-norm tokens as they are (no standardisation), as in the paper. With several
teachers the head maps the concatenation of their tokens, each scaled to unit norm per token so that no
teacher dominates the similarity structure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distillery.errors import DistilleryError
from distillery.train.data import SampleSpec
from distillery.train.distributed import all_gather_with_grad
from distillery.train.methods import Method, MethodContext, register_method

PAPER_TEMPERATURES = tuple(round(0.01 * k, 2) for k in range(1, 11))  # run/TinTeM_imagenet_dinov2_vits.yaml


@dataclass(frozen=True)
class TintemConfig:
    temperatures: tuple[float, ...] = PAPER_TEMPERATURES
    local_weight: float = 1.0  # the λs of the reference config, all 1
    global_weight: float = 1.0
    token_weight: float = 1.0  # student CLS cosine
    features_weight: float = 1.0  # student all-token cosine


# Self-similarity is masked with a large finite offset, as the reference does (1e8): with -inf the backward of
# logaddexp(-inf, -inf) is nan even where the forward's value is masked out.
SELF_SIMILARITY_OFFSET = 1e8


def _joint_log_probs(features: torch.Tensor, temperature: float) -> torch.Tensor:
    """log of the symmetrised joint SNE distribution of `features` [..., N, D] -> [..., N, N].
    The diagonal holds a huge negative number (probability 0); callers leave it out."""
    normed = F.normalize(features, dim=-1)
    logits = normed @ normed.transpose(-1, -2) / temperature
    n = logits.shape[-1]
    diagonal = torch.eye(n, device=logits.device)
    conditional = torch.log_softmax(logits - SELF_SIMILARITY_OFFSET * diagonal, dim=-1)  # p(j | i), p(i | i) = 0
    # p_ij = (p(j|i) + p(i|j)) / 2N, computed in log space
    return torch.logaddexp(conditional, conditional.transpose(-1, -2)) - torch.log(torch.tensor(2.0 * n))


def sne_kl(teacher: torch.Tensor, head: torch.Tensor, temperatures: tuple[float, ...]) -> torch.Tensor:
    """KL(P_teacher || Q_head) of the joint SNE distributions over the N items of the second-to-last axis,
    averaged over `temperatures` and over any leading (batch) axes. `teacher` [..., N, D_t], `head` [..., N, D_s].

    Zero when `head` preserves the teacher's cosine similarities (e.g. any orthogonal map). Computed in fp32
    outside autocast: at temperature 0.01 a bf16 similarity matmul biases the loss by about 1%."""
    with torch.autocast(teacher.device.type, enabled=False):
        return _sne_kl(teacher.float(), head.float(), temperatures)


def _sne_kl(teacher: torch.Tensor, head: torch.Tensor, temperatures: tuple[float, ...]) -> torch.Tensor:
    total = teacher.new_zeros((), dtype=torch.float32)
    off_diagonal = ~torch.eye(teacher.shape[-2], dtype=torch.bool, device=teacher.device)
    for temperature in temperatures:
        log_p = _joint_log_probs(teacher.detach(), temperature)
        log_q = _joint_log_probs(head, temperature)
        kl = torch.where(off_diagonal, log_p.exp() * (log_p - log_q), torch.zeros((), device=teacher.device))
        total = total + kl.sum((-1, -2)).mean()
    return total / len(temperatures)


def flattened_cosine_loss(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - cos between the flattened per-image tensors ([B, D] or [B, T, D]), averaged over the batch."""
    return (1 - F.cosine_similarity(student.flatten(1), target.flatten(1), dim=-1)).mean()


class TeacherHead(nn.Module):
    """LayerNorm(D_t) -> Linear(D_t -> D_s): the 'teacher in the middle'."""

    def __init__(self, teacher_dim: int, student_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(teacher_dim)
        self.linear = nn.Linear(teacher_dim, student_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


def teacher_head_from_state(state: dict, where: str) -> TeacherHead:
    """The teacher head of a TinTeM checkpoint (`state`, as `checkpoint.load_checkpoint` returns it)."""
    if state.get("config", {}).get("method") != "tintem":
        raise DistilleryError(f"{where}: not a tintem run (method {state.get('config', {}).get('method')!r}); only "
                              "TinTeM has a teacher head")
    prefix = "method.head."
    weights = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    head = TeacherHead(weights["norm.weight"].shape[0], weights["linear.weight"].shape[0])
    head.load_state_dict(weights)
    return head.eval().requires_grad_(False)


def combine_teachers(tokens: list[torch.Tensor]) -> torch.Tensor:
    """One teacher's tokens as they are; several teachers' concatenated, each L2-normalised per token."""
    if len(tokens) == 1:
        return tokens[0]
    return torch.cat([F.normalize(t, dim=-1) for t in tokens], dim=-1)


@register_method
class Tintem(Method):
    name = "tintem"
    paper_recipe = "vitt14_in1k"
    config_class = TintemConfig
    uses_teachers = True
    standardize_targets = False

    def __init__(self, config: TintemConfig, context: MethodContext):
        super().__init__(config, context)
        self.teacher_names = [t.name for t in context.teachers]
        self.head = TeacherHead(sum(t.dim for t in context.teachers), context.student_dim)

    def sample_spec(self) -> SampleSpec:
        return SampleSpec(teacher_view=True)

    def forward(self, student, batch, step, ema):
        c = self.config
        targets = [batch["targets"][name] for name in self.teacher_names]
        teacher_tokens = combine_teachers([torch.cat([t.cls[:, None], t.patch], dim=1) for t in targets])  # [B, 1+T, D_t]
        mapped = self.head(teacher_tokens)  # [B, 1+T, D_s], with gradient for the head
        local = sne_kl(teacher_tokens, mapped, c.temperatures)
        global_ = sne_kl(all_gather_with_grad(teacher_tokens[:, 0]), all_gather_with_grad(mapped[:, 0]), c.temperatures)
        out = student(batch["student"])
        student_tokens = torch.cat([out.cls[:, None], out.patch], dim=1)
        target = mapped.detach()
        token = flattened_cosine_loss(out.cls, target[:, 0])
        features = flattened_cosine_loss(student_tokens, target)
        loss = c.local_weight * local + c.global_weight * global_ + c.token_weight * token + c.features_weight * features
        return {"loss": loss, "sne_local": local.detach(), "sne_global": global_.detach(), "cos_cls": token.detach(),
                "cos_tokens": features.detach()}
