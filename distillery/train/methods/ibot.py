"""`ibot`: DINO's self-distillation plus masked image modelling with an online tokenizer (Zhou et al., ICLR
2022; bytedance/ibot at da316d8), as a method of its own and as SeFA's `ssl: ibot`.

What it adds to `dino` (main_ibot.py, `iBOTLoss` L478-572; models/head.py `iBOTHead`; loader.py
`ImageFolderMask` L15-103):
- the student sees its 2 global crops with blockwise-masked patches replaced by a learnt mask token (local
  crops unmasked); the EMA teacher sees the global crops unmasked;
- one head for every token: the DINO head's MLP, L2 normalisation and weight-normed last layer on the CLS
  token, and on the patch tokens the same last layer (`shared_head`, the README's ViT recipe) or a second one;
- loss = λ1 · DINO's CLS cross-entropy over the (teacher crop q, student crop v ≠ q) pairs + λ2 · the patch
  cross-entropy of v = q pairs: per token H(softmax((t - c2) / τ_t2), softmax(s / τ_s)), summed over a crop's
  masked tokens and divided by their count (at least 1), averaged over the batch and the 2 global crops;
- a second centre c2 (momentum 0.9) of the teacher's patch outputs, mean over tokens then over the batch; the
  patch teacher temperature warms up from 0.04 to 0.07 over the same epochs as the CLS one;
- masks (BEiT's blockwise generator): per global crop a ratio drawn from `pred_ratio` ± `pred_ratio_var`
  (a list: one of its entries at random; the README's `0 0.3` / `0 0.2` masks half the crops at U(0.1, 0.5)
  and leaves the others whole), then blocks of area U((min(H, W) // 3)², left), aspect in [0.3, 1/0.3],
  added while they add unmasked patches and the count stays under the ratio; none before `pred_start_epoch`.
  Drawn here from a generator seeded by (seed, step, rank), so runs repeat.

The mask token belongs to the objective (zeros at init, as iBOT's VisionTransformer), not the exported backbone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distillery.config import ConfigError
from distillery.models.students import StudentOutput
from distillery.train.distributed import all_reduce_mean
from distillery.train.methods import MethodContext, register_method
from distillery.train.methods.dino import (Dino, DinoConfig, DinoHead, DinoObjective, _crop_major, dino_loss,
                                           updated_center)
from distillery.train.schedules import warmup_constant


@dataclass(frozen=True)
class IbotConfig(DinoConfig):
    out_dim: int = 8192  # main_ibot.py: 8192 prototypes for CLS and for patches
    patch_out_dim: int = 8192  # used only with shared_head False
    shared_head: bool = True
    teacher_patch_temp: float = 0.07
    warmup_teacher_patch_temp: float = 0.04
    center_momentum2: float = 0.9
    lambda1: float = 1.0  # the CLS (DINO) term
    lambda2: float = 1.0  # the masked-patch term
    pred_ratio: tuple[float, ...] = (0.0, 0.3)
    pred_ratio_var: tuple[float, ...] = (0.0, 0.2)
    pred_aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3)
    pred_start_epoch: float = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.pred_ratio) != len(self.pred_ratio_var):
            raise ConfigError(f"ibot: pred_ratio {self.pred_ratio} and pred_ratio_var {self.pred_ratio_var} differ in length")
        if any(v > r or r + v > 1 for r, v in zip(self.pred_ratio, self.pred_ratio_var)):
            raise ConfigError("ibot: every pred_ratio needs pred_ratio_var <= ratio and ratio + var <= 1")


def block_mask(grid: tuple[int, int], ratio: float, log_aspect: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """BEiT's blockwise mask (iBOT loader.py L71-99): bool [H, W] with about ratio x H x W patches masked."""
    height, width = grid
    mask = np.zeros(grid, dtype=bool)
    high = ratio * height * width
    count = 0
    while count < high:
        budget = high - count
        delta = 0
        for _ in range(10):
            low = (min(height, width) // 3) ** 2
            area = low + (budget - low) * rng.random()  # Python's random.uniform: the budget may be below `low`
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < width and h < height:
                top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
                new = h * w - int(mask[top:top + h, left:left + w].sum())
                if 0 < new <= budget:
                    mask[top:top + h, left:left + w] = True
                    delta += new
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask


def crop_ratio(config: IbotConfig, rng: np.random.Generator) -> float:
    """One crop's prediction ratio: each (ratio, var) entry drawn as U(ratio - var, ratio + var), one chosen."""
    drawn = [rng.uniform(r - v, r + v) if v > 0 else r for r, v in zip(config.pred_ratio, config.pred_ratio_var)]
    return float(drawn[int(rng.integers(len(drawn)))])


def ibot_masks(batch: int, crops: int, grid: tuple[int, int], config: IbotConfig, rng: np.random.Generator,
               active: bool = True) -> torch.Tensor:
    """bool [crops, batch, H*W]: a mask per global crop of every image (all False when not `active`)."""
    log_aspect = (math.log(config.pred_aspect_ratio[0]), math.log(config.pred_aspect_ratio[1]))
    masks = np.zeros((crops, batch, grid[0] * grid[1]), dtype=bool)
    if active:
        for image in range(batch):
            for crop in range(crops):
                masks[crop, image] = block_mask(grid, crop_ratio(config, rng), log_aspect, rng).ravel()
    return torch.from_numpy(masks)


def ibot_patch_loss(student_patch: torch.Tensor, teacher_patch: torch.Tensor, masks: torch.Tensor, center: torch.Tensor,
                    student_temp: float, teacher_temp: float) -> torch.Tensor:
    """The masked-patch term: `student_patch`, `teacher_patch` [crops, B, T, K], `masks` [crops, B, T]; per crop
    and image the cross-entropy summed over masked tokens / their count (>= 1), mean over images and crops."""
    teacher_probs = F.softmax((teacher_patch - center) / teacher_temp, dim=-1).detach()
    per_token = torch.sum(-teacher_probs * F.log_softmax(student_patch / student_temp, dim=-1), dim=-1)
    masks = masks.float()
    per_image = (per_token * masks).sum(-1) / masks.sum(-1).clamp(min=1.0)
    return per_image.mean(-1).mean()


class IbotHead(nn.Module):
    """iBOTHead: DINO's head on every token; the patch tokens through the CLS layer or a second last layer."""

    def __init__(self, in_dim: int, config: IbotConfig):
        super().__init__()
        self.cls = DinoHead(in_dim, config.out_dim, config.hidden_dim, config.bottleneck_dim, config.norm_last_layer)
        self.last_layer2 = None
        if not config.shared_head:
            second = DinoHead(in_dim, config.patch_out_dim, config.hidden_dim, config.bottleneck_dim, config.norm_last_layer)
            self.last_layer2 = second.last_layer

    @property
    def last_layers(self) -> list[nn.Module]:
        return [self.cls.last_layer] + ([self.last_layer2] if self.last_layer2 is not None else [])

    def forward(self, cls: torch.Tensor, patch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        cls_out = self.cls(cls)
        if patch is None:
            return cls_out, None
        bottleneck = F.normalize(self.cls.mlp(patch), dim=-1)
        return cls_out, (self.last_layer2 or self.cls.last_layer)(bottleneck)


class IbotObjective(DinoObjective):
    """DINO's objective with iBOT's masked-patch term, head, second centre and masks."""

    def __init__(self, config: IbotConfig, context: MethodContext):
        nn.Module.__init__(self)  # not DinoObjective's: its head and centre are DINO's, these are iBOT's
        self.config, self.context = config, context
        self.head = IbotHead(context.student_dim, config)
        self.mask_token = nn.Parameter(torch.zeros(context.student_dim))
        self.register_buffer("center", torch.zeros(config.out_dim))
        self.register_buffer("center2", torch.zeros(config.out_dim if config.shared_head else config.patch_out_dim))
        self._pending_center: torch.Tensor | None = None
        self._pending_center2: torch.Tensor | None = None

    def teacher_patch_temp(self, step: int) -> float:
        c = self.config
        warmup = int(c.warmup_teacher_temp_epochs * self.context.steps_per_epoch)
        return warmup_constant(step, c.teacher_patch_temp, warmup, c.warmup_teacher_patch_temp)

    def forward(self, student: nn.Module, batch: dict, step: int, ema: nn.Module) -> tuple[torch.Tensor, dict, StudentOutput]:
        """As DINO's (its global crops are masked, so none is given from outside)."""
        c = self.config
        globals_ = _crop_major(batch["crops/global"])
        batch_size = batch["crops/global"].shape[0]
        grid = self.context.student_grid  # global crops are at the student's input size
        rng = np.random.default_rng([self.context.seed, step, self.context.rank])
        active = step >= c.pred_start_epoch * self.context.steps_per_epoch
        masks = ibot_masks(batch_size, 2, grid, c, rng, active)  # [2, B, T], chosen on the host
        student_global = student(globals_, mask=masks.flatten(0, 1).to(globals_.device, non_blocking=True),
                                 mask_token=self.mask_token)
        cls_out, patch_out = self.head(student_global.cls, student_global.patch)
        cls_parts = [cls_out]
        if "crops/local" in batch:
            cls_parts.append(self.head(student(_crop_major(batch["crops/local"])).cls)[0])
        student_cls = torch.cat(cls_parts).float().reshape(-1, batch_size, c.out_dim)
        student_patch = patch_out.float().reshape(2, batch_size, *patch_out.shape[1:])
        with torch.no_grad():
            teacher = ema["backbone"](globals_)
            teacher_cls, teacher_patch = ema["head"](teacher.cls, teacher.patch)
            teacher_cls = teacher_cls.float().reshape(2, batch_size, c.out_dim)
            teacher_patch = teacher_patch.float().reshape(2, batch_size, *teacher_patch.shape[1:])
        self._pending_center = teacher_cls.mean(dim=(0, 1))
        self._pending_center2 = teacher_patch.mean(dim=2).mean(dim=(0, 1))
        cls_loss = dino_loss(student_cls, teacher_cls, self.center, c.student_temp, self.teacher_temp(step))
        patch_loss = ibot_patch_loss(student_patch, teacher_patch, masks.to(student_patch.device, non_blocking=True),
                                     self.center2, c.student_temp, self.teacher_patch_temp(step))
        loss = c.lambda1 * cls_loss + c.lambda2 * patch_loss
        return loss, {"ibot_cls": cls_loss.detach(), "ibot_patch": patch_loss.detach()}, student_global

    def before_optimizer_step(self, step: int) -> None:
        if step < self.config.freeze_last_layer_epochs * self.context.steps_per_epoch:
            for layer in self.head.last_layers:
                for parameter in layer.parameters():
                    parameter.grad = None

    def after_step(self, step: int) -> None:
        if self._pending_center is not None:
            c = self.config
            self.center.copy_(updated_center(self.center, all_reduce_mean(self._pending_center), c.center_momentum))
            self.center2.copy_(updated_center(self.center2, all_reduce_mean(self._pending_center2), c.center_momentum2))
            self._pending_center = self._pending_center2 = None


@register_method
class Ibot(Dino):
    name = "ibot"
    config_class = IbotConfig
    objective_class = IbotObjective
