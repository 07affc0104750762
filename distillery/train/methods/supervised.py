"""`supervised`: cross-entropy on the shard labels with a linear head on the CLS token.

DeiT-style light augmentation (random resized crop, flip, mild colour jitter) and label smoothing 0.1
(DeiT, Touvron et al. 2021). Used for the demo's label-trained teachers and as the student-alone baseline.

`label` picks what is learned: the class (`.cls`), or any factor the shards record (the embedded data's
shape, pattern, background or colour; see `factors.json`), so teachers with different expertise can be
trained on the same images. `aux_labels` adds a weighted cross-entropy head per further label, for a model
that knows one label well and others a little.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import nn

from distillery.data.views import ViewConfig
from distillery.errors import DistilleryError
from distillery.train.data import SampleSpec
from distillery.train.methods import Method, MethodContext, register_method


@dataclass(frozen=True)
class SupervisedConfig:
    label: str = "class"
    aux_labels: dict[str, float] = field(default_factory=dict)  # further label -> weight of its loss
    label_smoothing: float = 0.1  # DeiT
    crop_scale: tuple[float, float] = (0.25, 1.0)
    jitter: float = 0.3  # brightness, contrast and saturation, at p=0.8; DeiT's --color-jitter 0.3

    @property
    def weights(self) -> dict[str, float]:
        return {self.label: 1.0, **{name: float(w) for name, w in self.aux_labels.items()}}


@register_method
class Supervised(Method):
    name = "supervised"
    config_class = SupervisedConfig

    def __init__(self, config: SupervisedConfig, context: MethodContext):
        super().__init__(config, context)
        if config.label in config.aux_labels:
            raise DistilleryError(f"supervised: {config.label!r} is both the label and an aux label")
        heads = {}
        for name in config.weights:
            classes = context.label_classes.get(name)
            if not classes:
                known = ", ".join(context.label_classes) or "none"
                raise DistilleryError(f"supervised training on label {name!r} needs shards that name its values "
                                      f"(classes.json, or factors.json for a factor); labels here: {known}")
            heads[name] = nn.Linear(context.student_dim, classes)
            nn.init.trunc_normal_(heads[name].weight, std=0.02)
            nn.init.zeros_(heads[name].bias)
        # the main label's head keeps the name `head`, so checkpoints of single-label runs load as before
        self.head = heads.pop(config.label)
        self.aux_heads = nn.ModuleDict(heads)

    def sample_spec(self) -> SampleSpec:
        c = self.config
        view = ViewConfig(scale=c.crop_scale, jitter_p=0.8 if c.jitter else 0.0, brightness=c.jitter, contrast=c.jitter,
                          saturation=c.jitter, hue=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
        return SampleSpec(random_view=view, labels=tuple(c.weights))

    def forward(self, student, batch, step, ema):
        c = self.config
        features = student(batch["student"]).cls
        logits = self.head(features)
        target = batch[f"labels/{c.label}"]
        loss = F.cross_entropy(logits, target, label_smoothing=c.label_smoothing)
        terms = {"ce": loss.detach(), "train_top1": (logits.argmax(-1) == target).float().mean().detach()}
        for name, head in self.aux_heads.items():
            aux = F.cross_entropy(head(features), batch[f"labels/{name}"], label_smoothing=c.label_smoothing)
            loss = loss + c.aux_labels[name] * aux
            terms[f"ce_{name}"] = aux.detach()
        return {"loss": loss, **terms}
