"""Training configuration: a YAML file whose keys mirror `distillery train`'s options; the CLI overrides it.

Method settings live under a key named after the method (`dino:`, `unic:`, ...) and are checked against
that method's own config dataclass when the config is resolved, before anything is built. `--set key=value`
changes any key, nested ones included (`--set unic.drop_prob=0.3`, `--set student_args.depth=6`). The
resolved config is saved in the run directory as `config.yaml`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from distillery.config import ConfigError, apply_overrides, from_mapping, read_yaml
from distillery.train.methods import method_class, method_names


@dataclass(frozen=True)
class TrainConfig:
    method: str
    data: str
    out: str
    student: str = "vit_tiny_patch16_224"
    student_args: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model
    init: str | None = None  # a model spec (local-dir:, name.tag, hf-hub:) whose weights the student starts from
    epochs: int = 100
    max_steps: int | None = None  # stop after this many steps; the schedules still span `epochs`
    batch_size: int = 256  # global: split evenly across ranks
    grad_accum_steps: int = 1  # each step sums the gradients of this many micro-batches of batch_size / K
    lr: float = 5e-4  # at batch 256; scaled linearly with the batch size when lr_scaling is "linear"
    lr_scaling: str = "linear"
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float | None = None  # cosine schedule to this value (DINO: 0.04 -> 0.4); None = constant
    clip_grad: float = 3.0  # max gradient norm; 0 turns clipping off
    clip_mode: str = "global"  # global: the norm of all gradients (torch clip_grad_norm_); per_parameter: each
    # parameter's gradient on its own, as DINO's utils.clip_gradients does
    betas: tuple[float, float] = (0.9, 0.999)
    seed: int = 0
    workers: int = 2
    checkpoint_every: int = 0  # steps; 0 = only at the end
    keep_checkpoints: int = 3
    log_every: int = 10
    tensorboard: bool = False  # also write every metrics.jsonl record as TensorBoard scalars under <out>/tensorboard
    cache: str | list[str] | None = None  # teacher targets from this store (or stores, one per teacher, joined)...
    cache_teachers: list[str] = field(default_factory=list)  # ...only these of its teachers (default: all)
    teachers: list[str] = field(default_factory=list)  # ...or these teachers run online
    stats_from: str | None = None  # online mode: standardisation statistics from this store
    stats_samples: int = 512  # online mode without stats_from: images in the statistics pre-pass
    views: int = 4  # online mode: views per image, drawn as a cache with this count would be
    view_seed: int = 0  # online mode: seed of the views
    view_config: dict[str, Any] = field(default_factory=dict)  # online mode: ViewConfig overrides
    repeated_augmentation: int = 1  # DeiT's RASampler: each sample R times per step, in R views (Proteus, TinTeM: 3)
    method_config: dict[str, Any] = field(default_factory=dict)  # the `<method>:` section

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.epochs < 1:
            raise ConfigError("batch_size and epochs must be positive")
        if self.grad_accum_steps < 1 or self.batch_size % self.grad_accum_steps:
            raise ConfigError(f"grad_accum_steps must be at least 1 and divide batch_size {self.batch_size}, "
                              f"got {self.grad_accum_steps}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"warmup_epochs must be at least 0, got {self.warmup_epochs:g}")
        if self.repeated_augmentation < 1:
            raise ConfigError(f"repeated_augmentation must be 1 (off) or more, got {self.repeated_augmentation}")
        if self.clip_mode not in ("global", "per_parameter"):
            raise ConfigError(f"clip_mode must be 'global' or 'per_parameter', got {self.clip_mode!r}")
        if self.lr_scaling not in ("linear", "none"):
            raise ConfigError(f"lr_scaling must be 'linear' or 'none', got {self.lr_scaling!r}")
        if isinstance(self.cache, list) and not (self.cache and all(isinstance(c, str) and c for c in self.cache)):
            raise ConfigError(f"cache must be a store, or a non-empty list of stores, got {self.cache!r}")
        if self.cache and self.teachers:
            raise ConfigError("give either --cache or --teacher, not both")
        if self.cache_teachers and not self.cache:
            raise ConfigError("--cache-teacher picks teachers of a store: give --cache too")

    @property
    def peak_lr(self) -> float:
        return self.lr * self.batch_size / 256 if self.lr_scaling == "linear" else self.lr

    @property
    def cache_urls(self) -> list[str]:
        """The stores the targets come from: one, or several joined by sample key (`--cache` repeated)."""
        return [] if not self.cache else [self.cache] if isinstance(self.cache, str) else list(self.cache)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["betas"] = list(self.betas)
        section = values.pop("method_config")
        return {**values, self.method: section} if section else values


OPTION_NAMES = {f.name for f in fields(TrainConfig)} - {"method_config"}
# What a resumed run may change: none of these alter the data stream, the model or the schedules.
RESUMABLE_CHANGES = {"max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "tensorboard"}


def resolve(file_values: dict[str, Any], cli_values: dict[str, Any], source: str = "config",
            overrides: tuple[str, ...] = ()) -> TrainConfig:
    """Merge a config file's values with the command line's (CLI wins; None on the CLI means 'not given'),
    then the `--set` overrides, and check everything, the method's section included."""
    merged = dict(file_values)
    merged.update({k: v for k, v in cli_values.items() if v is not None})
    merged = apply_overrides(merged, overrides)
    method = merged.get("method")
    if not method:
        raise ConfigError(f"{source}: no method given (--method or `method:` in the config)")
    method_cls = method_class(method)
    section = merged.pop(method, None) or {}
    unknown = sorted(set(merged) - OPTION_NAMES)
    stray = [k for k in unknown if k in method_names()]
    if stray:
        raise ConfigError(f"{source}: section {stray[0]!r} is for another method; this run's method is {method!r}")
    if unknown:
        raise ConfigError(f"{source}: unknown config key {unknown[0]!r}; known keys: {', '.join(sorted(OPTION_NAMES))}")
    for key in ("data", "out"):
        if not merged.get(key):
            raise ConfigError(f"{source}: no {key} given (--{key} or `{key}:` in the config)")
    from_mapping(method_cls.config_class, section, f"{source}: `{method}:` section")
    config = from_mapping(TrainConfig, {**merged, "method_config": section}, source)
    teachers = config.teachers or config.cache_teachers  # a whole store's teachers are known once it is opened
    if method_cls.max_teachers is not None and teachers and len(teachers) > method_cls.max_teachers:
        raise ConfigError(f"{source}: {method} distils {method_cls.max_teachers} teacher(s); got {len(teachers)}")
    return config


RECIPES_DIR = Path("configs")


def recipe_path(method: str, recipe: str | None) -> Path | None:
    """The packaged config a `--method` run starts from: `paper` (the default: the method's paper recipe, where
    it has one), `synth` (the embedded data's), `none` (TrainConfig's generic defaults) or NAME for
    configs/<method>_NAME.yaml. Each file says where its values come from."""
    method_cls = method_class(method)
    name = recipe or ("paper" if method_cls.paper_recipe else "none")
    if name == "none":
        return None
    suffix = method_cls.paper_recipe if name == "paper" else name
    from distillery.config import project_path

    path = RECIPES_DIR / f"{method}_{suffix}.yaml"
    if suffix is None or not project_path(path).exists():
        known = sorted(p.stem.removeprefix(f"{method}_") for p in project_path(RECIPES_DIR).glob(f"{method}_*.yaml"))
        raise ConfigError(f"--recipe {name}: {method} has no {'paper recipe' if suffix is None else path}; "
                          f"its recipes: {', '.join(['none', *known])}")
    return path


def save(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def load_saved(path: str | Path) -> TrainConfig:
    values = read_yaml(path)
    return resolve(values, {}, str(path))
