"""Training methods. Each is one file that owns its config, heads and losses; the loop knows none by name.

A method subclasses `Method`, registers itself with `@register_method`, and tells the loop through class
attributes and a few hooks what it needs:

- `config_class`: the dataclass of its `<name>:` config section;
- `sample_spec()`: the views the data pipeline renders per sample (the teacher view, random views, crops) and
  whether labels are needed;
- `uses_teachers` / `standardize_targets`: whether batches carry teacher targets, and whether those are
  standardised with the dataset statistics first; `view_passes`: how often a step runs the student on its
  view (Proteus: twice, unmasked and masked), for the experiment plans' costs;
- `ema_heads()`: heads the loop should shadow with an EMA next to the student (DINO's teacher), with
  `ema_momentum(step)`;
- `forward(student, batch, step, ema)` -> dict with the total `"loss"` and named terms to log;
- `before_optimizer_step(step)` (gradient surgery) and `after_step(step)` (centres and other state).
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from distillery.config import from_mapping
from distillery.errors import DistilleryError
from distillery.train.data import SampleSpec

_REGISTRY: dict[str, type[Method]] = {}
_MODULES = ("supervised", "dino", "ibot", "unic", "sefa", "tintem", "proteus")


@dataclass(frozen=True)
class TeacherInfo:
    """What a method knows of a teacher: its name, token dim and (stored) patch grid."""

    name: str
    dim: int
    grid: tuple[int, int]


@dataclass(frozen=True)
class MethodContext:
    """Everything a method may size itself by."""

    student_dim: int
    student_grid: tuple[int, int]
    student_size: tuple[int, int]
    student_depth: int
    teachers: tuple[TeacherInfo, ...]
    label_classes: dict[str, int]  # label (class, or a factor of factors.json) -> how many values it takes
    total_steps: int
    steps_per_epoch: int
    seed: int
    rank: int = 0  # this process's rank: per-rank randomness (UNIC's teacher dropping) differs across ranks


class Method(nn.Module, abc.ABC):
    name: ClassVar[str]
    config_class: ClassVar[type]
    uses_teachers: ClassVar[bool] = False
    standardize_targets: ClassVar[bool] = False
    view_passes: ClassVar[int] = 1  # student forwards per teacher/random view and step (what plans cost)
    max_teachers: ClassVar[int | None] = None  # a single-teacher method says 1
    paper_recipe: ClassVar[str | None] = None  # configs/<name>_<paper_recipe>.yaml: its paper's settings, sourced

    def __init__(self, config: Any, context: MethodContext):
        super().__init__()
        self.config, self.context = config, context

    @abc.abstractmethod
    def sample_spec(self) -> SampleSpec:
        """What the data pipeline renders for each sample."""

    @abc.abstractmethod
    def forward(self, student: nn.Module, batch: dict[str, Any], step: int, ema: nn.Module | None) -> dict[str, torch.Tensor]:
        """The total `"loss"` and the named terms to log."""

    def ema_heads(self) -> dict[str, nn.Module] | None:
        """Heads to shadow with an EMA together with the student backbone; None means no EMA."""
        return None

    def ema_momentum(self, step: int) -> float:
        raise DistilleryError(f"method {self.name} has no EMA")

    def before_optimizer_step(self, step: int) -> None:
        """Called after backward, before the optimizer step."""

    def after_step(self, step: int) -> None:
        """Called after the optimizer step (and the EMA update)."""


def register_method(cls: type[Method]) -> type[Method]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    for module in _MODULES:
        importlib.import_module(f"distillery.train.methods.{module}")


def method_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    _load_all()
    if name not in _REGISTRY:
        raise DistilleryError(f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_method(name: str, settings: dict[str, Any], context: MethodContext) -> Method:
    """The one door to a method: its class by name, its config section checked against its dataclass."""
    cls = method_class(name)
    if cls.max_teachers is not None and len(context.teachers) > cls.max_teachers:
        raise DistilleryError(f"{name} distils {cls.max_teachers} teacher(s); got {len(context.teachers)} "
                              f"({', '.join(t.name for t in context.teachers)}): choose with --cache-teacher")
    return cls(from_mapping(cls.config_class, settings, f"`{name}:` section"), context)
