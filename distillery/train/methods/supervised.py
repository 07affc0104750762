"""`supervised`: cross-entropy on the shard labels with a linear head on the CLS token.

DeiT-style light augmentation (random resized crop, flip, mild colour jitter) and label smoothing 0.1
(DeiT, Touvron et al. 2021). Used for the demo's label-trained teacher and as the student-alone baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distillery.data.views import ViewConfig
from distillery.errors import DistilleryError
from distillery.train.data import SampleSpec
from distillery.train.methods import Method, MethodContext, register_method


@dataclass(frozen=True)
class SupervisedConfig:
    label_smoothing: float = 0.1  # DeiT
    crop_scale: tuple[float, float] = (0.25, 1.0)
    jitter: float = 0.3  # brightness, contrast and saturation, at p=0.8; DeiT's --color-jitter 0.3


@register_method
class Supervised(Method):
    name = "supervised"
    config_class = SupervisedConfig
    needs_labels = True

    def __init__(self, config: SupervisedConfig, context: MethodContext):
        super().__init__(config, context)
        if not context.num_classes:
            raise DistilleryError("supervised training needs labelled shards with a classes.json")
        self.head = nn.Linear(context.student_dim, context.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def sample_spec(self) -> SampleSpec:
        c = self.config
        view = ViewConfig(scale=c.crop_scale, jitter_p=0.8 if c.jitter else 0.0, brightness=c.jitter, contrast=c.jitter,
                          saturation=c.jitter, hue=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
        return SampleSpec(random_view=view, labels=True)

    def forward(self, student, batch, step, ema):
        logits = self.head(student(batch["student"]).cls)
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.config.label_smoothing)
        accuracy = (logits.argmax(-1) == batch["label"]).float().mean()
        return {"loss": loss, "ce": loss.detach(), "train_top1": accuracy.detach()}
