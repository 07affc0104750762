"""`proteus`: label-free distillation by projection heads on the student (Zhang et al., "Accessing Vision
Foundation Models via ImageNet-1K", ICLR 2025; BeSpontaneous/Proteus-pytorch at 8b1b274), TinTeM's baseline.

Three student-side heads, each `LayerNorm(D_s) -> Linear(D_s -> D_t)` (pretrain/models_proteus_dinov2.py
L68-78): `token_head`, `fea_head` and `patch_head`. Every loss is `nn.MSELoss()`, the mean over all elements
(L80, L151-160):
- token: MSE(token_head(student CLS), teacher CLS), both of the unmasked pass;
- fea: MSE(concat(token_head(student CLS), fea_head(student patches)), concat(teacher CLS, teacher patches)),
  unmasked pass: the CLS half reuses the token head's output, as L144-157 do;
- patch: the student runs a second time with iBOT-style mask tokens, and MSE(patch_head(its tokens at the
  masked positions), the teacher's unmasked tokens at those positions) (L123-160).
total = λ_token token + λ_fea fea + λ_patch patch, all 1 (pretrain/run_pretrain.sh).

Masks follow its collate (pretrain/augmentations.py L24-80 with run_pretrain.sh's `--mask_probability 0.5
--mask_ratio 0.5 --mask_first_n`): the first int(B x 0.5) images of a batch each get int(T x 0.5) masked
patches chosen uniformly at random, the others none. Here the draw comes from a generator seeded by (seed,
step, rank), so a run repeats. The mask token is a learnt [D_s] vector, zeros at init (DINOv2's
`mask_token`); it belongs to the method, not the exported backbone. Targets are the teacher's post-norm
tokens as they are (no standardisation), one teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distillery.config import ConfigError
from distillery.errors import DistilleryError
from distillery.train.data import SampleSpec
from distillery.train.methods import Method, MethodContext, register_method


@dataclass(frozen=True)
class ProteusConfig:
    mask_probability: float = 0.5  # share of each batch's images that get masked
    mask_ratio: float = 0.5  # share of a masked image's patches
    token_weight: float = 1.0  # λ_token
    fea_weight: float = 1.0  # λ_fea
    patch_weight: float = 1.0  # λ_patch

    def __post_init__(self) -> None:
        if not (0 <= self.mask_probability <= 1 and 0 <= self.mask_ratio <= 1):
            raise ConfigError(f"proteus: mask_probability and mask_ratio must lie in [0, 1], got "
                              f"{self.mask_probability} and {self.mask_ratio}")


def projection_head(in_dim: int, out_dim: int) -> nn.Sequential:
    """LayerNorm -> Linear, PyTorch's default initialisation, as the reference builds its three heads."""
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim))


def token_head_from_state(state: dict, where: str) -> nn.Sequential:
    """The token head (student CLS -> teacher space) of a Proteus checkpoint (`checkpoint.load_checkpoint`)."""
    if state.get("config", {}).get("method") != "proteus":
        raise DistilleryError(f"{where}: not a proteus run (method {state.get('config', {}).get('method')!r}); only "
                              "Proteus has a student head")
    prefix = "method.token_head."
    weights = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    head = projection_head(*weights["1.weight"].shape[::-1])
    head.load_state_dict(weights)
    return head.eval().requires_grad_(False)


def proteus_masks(batch: int, tokens: int, config: ProteusConfig, generator: torch.Generator) -> torch.Tensor:
    """bool [batch, tokens]: the first int(batch x p) rows with int(tokens x ratio) random positions each."""
    masked_images, masked_tokens = int(batch * config.mask_probability), int(tokens * config.mask_ratio)
    mask = torch.zeros(batch, tokens, dtype=torch.bool)
    if masked_images and masked_tokens:
        order = torch.rand(masked_images, tokens, generator=generator).argsort(dim=1)
        mask[:masked_images].scatter_(1, order[:, :masked_tokens], True)
    return mask


def proteus_losses(token_out: torch.Tensor, fea_out: torch.Tensor, patch_out: torch.Tensor, teacher_cls: torch.Tensor,
                   teacher_patch: torch.Tensor, masked: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three MSE terms from the heads' outputs: `token_out` [B, D_t] (token head on the unmasked CLS),
    `fea_out` [B, T, D_t] (fea head on the unmasked patches), `patch_out` [B, T, D_t] (patch head on the masked
    pass's patches); `masked` holds the flat indices (into B x T) the patch term scores, as the reference's
    `mask_indices_list`: computed with the mask on the host, so selecting them needs no device sync."""
    student_whole = torch.cat([token_out[:, None], fea_out], dim=1)
    teacher_whole = torch.cat([teacher_cls[:, None], teacher_patch], dim=1)
    if len(masked):
        patch = F.mse_loss(patch_out.flatten(0, 1).index_select(0, masked),
                           teacher_patch.flatten(0, 1).index_select(0, masked))
    else:  # a batch too small to mask any image: the term is 0 (an empty mean would be NaN)
        patch = patch_out.sum() * 0
    return {"token": F.mse_loss(token_out, teacher_cls), "fea": F.mse_loss(student_whole, teacher_whole), "patch": patch}


@register_method
class Proteus(Method):
    name = "proteus"
    paper_recipe = "vitt14_in1k"
    config_class = ProteusConfig
    uses_teachers = True
    view_passes = 2  # the unmasked and the masked pass
    max_teachers = 1

    def __init__(self, config: ProteusConfig, context: MethodContext):
        super().__init__(config, context)
        d, d_t = context.student_dim, context.teachers[0].dim
        self.token_head, self.fea_head, self.patch_head = (projection_head(d, d_t) for _ in range(3))
        self.mask_token = nn.Parameter(torch.zeros(d))

    def sample_spec(self) -> SampleSpec:
        return SampleSpec(teacher_view=True)

    def forward(self, student, batch, step, ema):
        c = self.config
        images = batch["student"]
        target = batch["targets"][self.context.teachers[0].name]
        tokens = target.patch.shape[1]
        generator = torch.Generator().manual_seed(self.context.seed * 1_000_003 + step * 1009 + self.context.rank)
        mask = proteus_masks(len(images), tokens, c, generator)
        indices = mask.flatten().nonzero().flatten().to(images.device, non_blocking=True)
        unmasked = student(images)
        masked = student(images, mask=mask.to(images.device, non_blocking=True), mask_token=self.mask_token)
        losses = proteus_losses(self.token_head(unmasked.cls).float(), self.fea_head(unmasked.patch).float(),
                                self.patch_head(masked.patch).float(), target.cls.float(), target.patch.float(), indices)
        total = c.token_weight * losses["token"] + c.fea_weight * losses["fea"] + c.patch_weight * losses["patch"]
        return {"loss": total, **{f"loss/{name}": value.detach() for name, value in losses.items()}}
