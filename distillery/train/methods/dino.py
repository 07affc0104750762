"""`dino`: self-distillation with no labels (Caron et al. 2021), readable top to bottom.

The student sees 2 global and L local crops; an EMA copy of student + head (the teacher) sees the 2 global
crops. The loss is the cross-entropy between the teacher's centred, sharpened softmax and the student's
softmax, over every (teacher global crop, student crop) pair except same-view pairs. Defaults follow
facebookresearch/dino main_dino.py: head 2048 hidden / 256 bottleneck / weight-normed last layer, student
temperature 0.1, teacher temperature 0.04 (optionally warmed up from a lower value), centre momentum 0.9,
EMA momentum 0.996 -> 1 on a cosine, last layer frozen for the first epoch, global crops at scale (0.4, 1),
local crops at (0.05, 0.4) and 96/224 of the global size, and DINO's photometric recipe per crop.

`DinoObjective` is the whole SSL part as one module, so SeFA adds it to its distillation loss unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from distillery.config import check_keys
from distillery.data.views import ViewConfig
from distillery.models.students import StudentOutput
from distillery.train.data import CropSpec, SampleSpec
from distillery.train.distributed import all_reduce_mean
from distillery.train.methods import Method, MethodContext, register_method
from distillery.train.methods.heads import MLP
from distillery.train.schedules import warmup_constant, warmup_cosine


COLOUR_KEYS = ("jitter_p", "brightness", "contrast", "saturation", "hue", "grayscale_p")


@dataclass(frozen=True)
class DinoConfig:
    out_dim: int = 65536  # main_dino.py default; small data wants far fewer prototypes (configs/dino_synth.yaml)
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True  # README: False with a larger teacher temperature helps ViT-S, at some stability risk
    local_crops: int = 8
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    local_size: int | None = None  # None: 96/224 of the student's input size, in whole patches
    # Colour augmentation of every crop, as ViewConfig settings (its defaults are main_dino.py's: ColorJitter(0.4,
    # 0.4, 0.2, 0.1) at p=0.8, grayscale p=0.2). Data where an image's colours identify it (the embedded synth
    # set) needs more, or DINO learns colour instead of shape.
    colour: dict = field(default_factory=dict)
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 0
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996  # raise towards 0.9995 with small batches (dino issue #104)
    freeze_last_layer_epochs: float = 1

    def __post_init__(self) -> None:
        check_keys(self.colour, "dino colour", COLOUR_KEYS)


class DinoHead(nn.Module):
    """3-layer MLP, L2 normalisation, then a weight-normalised linear layer (DINO's head)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 norm_last_layer: bool = True):
        super().__init__()
        self.mlp = MLP(in_dim, hidden_dim, bottleneck_dim, layers=3)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def dino_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, center: torch.Tensor, student_temp: float,
              teacher_temp: float) -> torch.Tensor:
    """DINO's cross-entropy. `student_out` [n_crops, B, K] (globals first), `teacher_out` [n_global, B, K],
    `center` [K]. Mean over the (teacher crop i, student crop v) pairs with v != i of
    H(softmax((t_i - c) / teacher_temp), softmax(s_v / student_temp)), each averaged over the batch."""
    teacher_probs = F.softmax((teacher_out - center) / teacher_temp, dim=-1).detach()
    student_logp = F.log_softmax(student_out / student_temp, dim=-1)
    total, pairs = student_out.new_zeros(()), 0
    for i in range(teacher_out.shape[0]):
        for v in range(student_out.shape[0]):
            if v == i:
                continue
            total = total + (-teacher_probs[i] * student_logp[v]).sum(-1).mean()
            pairs += 1
    return total / pairs


def updated_center(center: torch.Tensor, batch_center: torch.Tensor, momentum: float) -> torch.Tensor:
    """center <- m * center + (1 - m) * mean of the teacher outputs (over the global batch)."""
    return center * momentum + batch_center * (1 - momentum)


class DinoObjective(nn.Module):
    """DINO's head, centre, crops and schedules: the SSL loss of `dino` and of SeFA."""

    def __init__(self, config: DinoConfig, context: MethodContext):
        super().__init__()
        self.config, self.context = config, context
        self.head = DinoHead(context.student_dim, config.out_dim, config.hidden_dim, config.bottleneck_dim,
                             config.norm_last_layer)
        self.register_buffer("center", torch.zeros(config.out_dim))
        self._pending_center: torch.Tensor | None = None

    def crop_specs(self, first_global_given: bool = False) -> tuple[CropSpec, ...]:
        """The crops the data stream draws; with `first_global_given` only the second global crop (the caller
        hands `forward` the first)."""
        c, size = self.config, self.context.student_size
        patch = size[0] // self.context.student_grid[0]
        local = c.local_size or max(patch, round(size[0] * 96 / 224 / patch) * patch)
        base = dict(flip_p=0.5, blur_sigma=(0.1, 2.0), **c.colour)
        global_1 = ViewConfig(scale=c.global_scale, blur_p=1.0, solarize_p=0.0, **base)
        global_2 = ViewConfig(scale=c.global_scale, blur_p=0.1, solarize_p=0.2, **base)
        local_view = ViewConfig(scale=c.local_scale, blur_p=0.5, solarize_p=0.0, **base)
        globals_ = (global_2,) if first_global_given else (global_1, global_2)
        crops = [CropSpec("global", len(globals_), size, globals_)]
        if c.local_crops:
            crops.append(CropSpec("local", c.local_crops, (local, local), (local_view,)))
        return tuple(crops)

    def teacher_temp(self, step: int) -> float:
        c = self.config
        warmup = int(c.warmup_teacher_temp_epochs * self.context.steps_per_epoch)
        return warmup_constant(step, c.teacher_temp, warmup, c.warmup_teacher_temp)

    def ema_momentum(self, step: int) -> float:
        return warmup_cosine(step, self.context.total_steps, self.config.momentum_teacher, 1.0)

    def forward(self, student: nn.Module, batch: dict, step: int, ema: nn.Module,
                first_global: torch.Tensor | None = None) -> tuple[torch.Tensor, dict, StudentOutput]:
        """The DINO loss, its collapse diagnostics, and the student's tokens of the global crops (crop-major).
        `first_global` [B, 3, H, W], when given, is the first global crop (the batch then holds only the second)."""
        globals_ = _crop_major(batch["crops/global"])
        if first_global is not None:
            globals_ = torch.cat([first_global, globals_])
        student_globals = student(globals_)
        student_cls = [student_globals.cls]
        if "crops/local" in batch:
            student_cls.append(student(_crop_major(batch["crops/local"])).cls)
        batch_size = batch["crops/global"].shape[0]
        student_out = self.head(torch.cat(student_cls)).float().reshape(-1, batch_size, self.config.out_dim)
        with torch.no_grad():
            teacher_out = ema["head"](ema["backbone"](globals_).cls).float().reshape(2, batch_size, self.config.out_dim)
        self._pending_center = teacher_out.detach().mean(dim=(0, 1))
        loss = dino_loss(student_out, teacher_out, self.center, self.config.student_temp, self.teacher_temp(step))
        # The collapse diagnostics of the DINO paper (Fig. 7): uniform collapse drives the teacher's entropy to
        # log(out_dim), dimension collapse drives it to 0; the KL is what the student still has to learn.
        probs = F.softmax((teacher_out.detach() - self.center) / self.teacher_temp(step), dim=-1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
        return loss, {"teacher_entropy": entropy, "kl": loss.detach() - entropy}, student_globals

    def before_optimizer_step(self, step: int) -> None:
        if step < self.config.freeze_last_layer_epochs * self.context.steps_per_epoch:
            for parameter in self.head.last_layer.parameters():
                parameter.grad = None

    def after_step(self, step: int) -> None:
        if self._pending_center is not None:
            batch_center = all_reduce_mean(self._pending_center)
            self.center.copy_(updated_center(self.center, batch_center, self.config.center_momentum))
            self._pending_center = None


def _crop_major(crops: torch.Tensor) -> torch.Tensor:
    """[B, n, 3, H, W] to [n * B, 3, H, W], crop by crop (so outputs split into per-crop chunks of B)."""
    return crops.transpose(0, 1).reshape(-1, *crops.shape[2:])


class DinoHooks:
    """The training hooks of a method whose self-supervised part is a DinoObjective in `self.objective`
    (dino, and SeFA's SSL half): the EMA teacher of the backbone and head, the frozen last layer, the centre."""

    objective: DinoObjective

    def ema_heads(self) -> dict[str, nn.Module]:
        return {"head": self.objective.head}

    def ema_momentum(self, step: int) -> float:
        return self.objective.ema_momentum(step)

    def before_optimizer_step(self, step: int) -> None:
        self.objective.before_optimizer_step(step)

    def after_step(self, step: int) -> None:
        self.objective.after_step(step)


@register_method
class Dino(DinoHooks, Method):
    """A self-supervised method that is its objective alone (`ibot` is this with iBOT's objective)."""

    name = "dino"
    config_class = DinoConfig
    objective_class = DinoObjective

    def __init__(self, config: DinoConfig, context: MethodContext):
        super().__init__(config, context)
        self.objective = self.objective_class(config, context)

    def sample_spec(self) -> SampleSpec:
        return SampleSpec(crops=self.objective.crop_specs())

    def forward(self, student, batch, step, ema):
        loss, metrics, _ = self.objective(student, batch, step, ema)
        return {"loss": loss, self.name: loss.detach(), **metrics}
