"""Frozen models we read features from: the teachers of `cache-teachers`, and every model `eval` scores.

A spec is anything `timm.create_model` accepts with `pretrained=True`:
- a registry name with a pretrained tag, `vit_small_patch16_224.dino` (weights from the local Hugging Face
  cache; offline mode is on, so a missing file fails at once with a message saying where to put it),
- `hf-hub:org/repo`,
- `local-dir:/path`, a directory with `config.json` + `model.safetensors` (or `pytorch_model.bin`) as timm's
  `save_for_hf` writes it
  (exported students and the demo's teachers).

timm's loaders read safetensors, or fall back to `torch.load(weights_only=True)`; nothing is unpickled.
A teacher returns post-final-norm CLS and patch tokens (register and other prefix tokens dropped). Its
preprocessing comes from the model's own `pretrained_cfg`, as timm's data config does.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import timm
import torch
from torch import nn

from distillery.errors import DistilleryError


class Tokens(NamedTuple):
    cls: torch.Tensor  # [B, D]
    patch: torch.Tensor  # [B, T, D], row-major over the patch grid


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects of its input, from its timm `pretrained_cfg`."""

    input_size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float

    @classmethod
    def from_pretrained_cfg(cls, cfg: dict) -> Preprocessing:
        _, height, width = cfg.get("input_size", (3, 224, 224))
        return cls(
            input_size=(int(height), int(width)),
            mean=tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
            std=tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
            interpolation=str(cfg.get("interpolation", "bicubic")),
            crop_pct=float(cfg.get("crop_pct", 0.875)),
        )


def weights_sha256(model: nn.Module) -> str:
    """A hash of every tensor of the state dict, by name, in name order (independent of file format)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# What a local-dir may hold, in timm's order of preference: safetensors, or a torch file timm opens with
# torch.load(weights_only=True), which rebuilds tensors and refuses any other object (no code runs).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def load_pretrained(spec: str, **kwargs) -> nn.Module:
    """`timm.create_model(spec, pretrained=True)` with errors that say what to do."""
    if spec.startswith("local-dir:"):
        path = Path(spec[len("local-dir:"):])
        if not (path / "config.json").exists():
            raise DistilleryError(f"{spec}: no config.json in {path} (expected the layout of timm's save_for_hf)")
        if not any((path / name).exists() for name in WEIGHT_FILES):
            raise DistilleryError(f"{spec}: no {' or '.join(WEIGHT_FILES)} in {path}")
    elif "/" in spec and not spec.startswith("hf-hub:"):
        raise DistilleryError(f"{spec!r} looks like a path: write local-dir:{spec}")
    try:
        return timm.create_model(spec, pretrained=True, **kwargs)
    except (FileNotFoundError, OSError) as error:  # huggingface_hub's LocalEntryNotFoundError is an OSError
        cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
        raise DistilleryError(
            f"{spec}: pretrained weights not found locally (offline mode; looked in the Hugging Face cache {cache}). "
            f"On a machine with network run `HF_HUB_OFFLINE=0 python -c \"import timm; timm.create_model('{spec}', "
            f"pretrained=True)\"` and copy that cache here (or point HF_HOME at it), or pass local-dir:/path "
            f"to a directory written by timm's save_for_hf") from error
    except (RuntimeError, pickle.UnpicklingError) as error:
        if "weights_only" in str(error):  # torch.load(weights_only=True), in timm, met something other than tensors
            raise DistilleryError(f"{spec}: its weight file holds more than tensors (loading it would run code); "
                                  "only safetensors or a tensors-only torch file is loaded") from error
        if "Unknown model" not in str(error):
            raise
        arch = spec.split(".")[0]
        similar = timm.list_models(f"*{arch.split('_')[0]}*", pretrained=True)[:8]
        raise DistilleryError(f"{spec}: not a timm model name; similar pretrained names: {', '.join(similar)}") from error


class Teacher(nn.Module):
    """A frozen model that returns post-norm CLS and patch tokens, with its preprocessing and fingerprint."""

    def __init__(self, spec: str, model: nn.Module):
        super().__init__()
        self.spec = spec
        self.model = model.eval().requires_grad_(False)
        self.preprocessing = Preprocessing.from_pretrained_cfg(dict(model.pretrained_cfg))
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.has_class_token = getattr(model, "cls_token", None) is not None
        self.embed_dim = int(model.num_features)
        with torch.inference_mode():
            probe = self.forward(torch.zeros(1, 3, *self.preprocessing.input_size))
        self.num_patches = probe.patch.shape[1]
        self.grid = _grid(model, self.num_patches)
        self._fingerprint: dict | None = None

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # frozen: always eval mode (dropout, drop-path off)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> Tokens:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.is_cuda)
        with autocast:
            features = self.model.forward_features(images)
        features = features.float()
        if features.ndim == 4:  # a convolutional map [B, C, H, W]: its positions are the patch tokens
            patch = features.flatten(2).transpose(1, 2)
            return Tokens(self.model.forward_head(features, pre_logits=True).float(), patch)
        patch = features[:, self.num_prefix_tokens:]
        cls = features[:, 0] if self.has_class_token else patch.mean(1)
        return Tokens(cls, patch)

    def fingerprint(self) -> dict:
        """Identifies what the teacher computes: its weights and its preprocessing (not where it was loaded from)."""
        if self._fingerprint is None:
            self._fingerprint = {"weights_sha256": weights_sha256(self.model),
                                 "preprocessing": {k: list(v) if isinstance(v, tuple) else v
                                                   for k, v in asdict(self.preprocessing).items()}}
        return self._fingerprint

    @property
    def name(self) -> str:
        return teacher_name(self.spec)


def teacher_name(spec: str) -> str:
    """A short, file-safe name for a spec: `vit_small_patch16_224.dino`, or the directory name of a local-dir."""
    if spec.startswith("local-dir:"):
        return Path(spec[len("local-dir:"):].rstrip("/")).name
    return spec.removeprefix("hf-hub:").replace("/", "--")


def _grid(model: nn.Module, num_patches: int) -> tuple[int, int]:
    patch_embed = getattr(model, "patch_embed", None)
    grid = getattr(patch_embed, "grid_size", None)
    if grid is not None and grid[0] * grid[1] == num_patches:
        return int(grid[0]), int(grid[1])
    side = int(round(num_patches ** 0.5))
    if side * side != num_patches:
        raise DistilleryError(f"cannot tell the patch grid of a model with {num_patches} patch tokens")
    return side, side


def split_size(spec: str) -> tuple[str, int | None]:
    """`name@224` -> (`name`, 224): run a model at another input size than its pretrained_cfg's (timm resamples
    the position embedding), e.g. DINOv2 ViT-S/14 at 224 px as TinTeM does instead of its default 518."""
    base, at, size = spec.rpartition("@")
    if not at:
        return spec, None
    if not size.isdigit() or int(size) < 16:
        raise DistilleryError(f"{spec}: the part after '@' must be an input size in pixels, e.g. {base}@224")
    return base, int(size)


def create_teacher(spec: str, device: str | torch.device = "cpu", **model_kwargs) -> Teacher:
    """The one door to a frozen feature model. Heads are dropped (`num_classes=0`); `model_kwargs` go to
    `timm.create_model` (e.g. `dynamic_img_size=True` for retrieval images of any shape)."""
    base, size = split_size(spec)
    model = load_pretrained(base, num_classes=0, **({"img_size": size} if size else {}), **model_kwargs)
    if size:
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, size, size)}
    return Teacher(spec, model).to(device)

