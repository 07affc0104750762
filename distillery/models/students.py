"""Students: any timm ViT, created without pretrained weights, exposing the tokens distillation needs.

`create_student("vit_tiny_patch16_224", img_size=32, patch_size=4)` forwards the overrides to
`timm.create_model`, so the architectures of the papers (ViT-Ti/S/B) and tiny CPU-sized variants come
through one door. Export writes timm's `local-dir` layout, so a student is a teacher spec afterwards.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, NamedTuple

import timm
import torch
from timm.models import save_for_hf
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from distillery.errors import DistilleryError
from distillery.models.teachers import Preprocessing

VIT_MODULES = ("timm.models.vision_transformer", "timm.models.deit", "distillery.models.convstem")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class StudentOutput(NamedTuple):
    cls: torch.Tensor  # [B, D] after the final norm
    patch: torch.Tensor  # [B, T, D] after the final norm
    blocks: list[torch.Tensor] | None  # per block [B, 1 + T, D] before the final norm (CLS first), when asked


class Student(nn.Module):
    """A trainable timm model with its creation arguments, so it can be rebuilt from a checkpoint or exported.

    The distillation students are ViTs (CLS token, patch tokens, per-block tokens for ladder heads). A
    convolutional model is accepted too, for label-trained teachers: its pooled features stand for the CLS
    token and its feature-map positions for the patch tokens, as `Teacher` reads them. Its input size comes
    from its pretrained_cfg (set it with `pretrained_cfg_overlay: {input_size: [3, H, W]}`).
    """

    def __init__(self, arch: str, model_args: dict[str, Any] | None = None,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        super().__init__()
        self.arch, self.model_args = arch, dict(model_args or {})
        try:
            self.model = timm.create_model(arch, pretrained=False, num_classes=0, **self.model_args)
        except (RuntimeError, TypeError) as error:
            raise DistilleryError(f"student {arch!r} with {self.model_args}: {error}") from error
        self.is_vit = isinstance(self.model, VisionTransformer)
        self.embed_dim = int(self.model.num_features)
        if self.is_vit:
            if self.model.cls_token is None:
                raise DistilleryError(f"student {arch!r} has no class token (set class_token=True)")
            self.num_prefix_tokens = self.model.num_prefix_tokens
            self.grid = tuple(self.model.patch_embed.grid_size)
            height, width = self.model.patch_embed.img_size
        else:
            _, height, width = self.model.pretrained_cfg.get("input_size", (3, 224, 224))
            self.num_prefix_tokens = 0
            with torch.no_grad():
                features = self.model.eval().forward_features(torch.zeros(1, 3, height, width))
            self.model.train()
            if features.ndim != 4:
                raise DistilleryError(f"student {arch!r} is a {type(self.model).__name__}, neither a timm ViT nor "
                                      "a model with a convolutional feature map")
            self.grid = tuple(features.shape[-2:])
        self.preprocessing = Preprocessing((int(height), int(width)), tuple(mean), tuple(std), "bicubic", 0.875)

    @property
    def depth(self) -> int:
        """The number of transformer blocks (0 for a convolutional model, which has no per-block tokens)."""
        return len(self.model.blocks) if self.is_vit else 0

    def forward(self, images: torch.Tensor, return_blocks: bool = False, mask: torch.Tensor | None = None,
                mask_token: torch.Tensor | None = None) -> StudentOutput:
        """Post-norm tokens; with `mask` (bool [B, T]) the masked patch embeddings are replaced by `mask_token`
        [D] before the position embedding, as DINOv2's `prepare_tokens_with_masks` (and iBOT) do."""
        if mask is not None:
            if return_blocks or not self.is_vit:
                raise DistilleryError(f"a masked forward needs a ViT student and no per-block tokens ({self.arch})")
            tokens = self._masked_features(images, mask, mask_token)
            return StudentOutput(tokens[:, 0], tokens[:, self.num_prefix_tokens:], None)
        if not self.is_vit:
            if return_blocks:
                raise DistilleryError(f"per-block tokens (ladder heads) need a ViT student, not {self.arch}")
            features = self.model.forward_features(images)
            return StudentOutput(self.model.forward_head(features, pre_logits=True), features.flatten(2).transpose(1, 2),
                                 None)
        if not return_blocks:
            tokens = self.model.forward_features(images)
            return StudentOutput(tokens[:, 0], tokens[:, self.num_prefix_tokens:], None)
        tokens, intermediates = self.model.forward_intermediates(
            images, indices=self.depth, norm=False, output_fmt="NLC", return_prefix_tokens=True)
        blocks = [torch.cat([prefix[:, :1], patch], dim=1) for patch, prefix in intermediates]
        return StudentOutput(tokens[:, 0], tokens[:, self.num_prefix_tokens:], blocks)

    def _masked_features(self, images: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
        """timm's VisionTransformer.forward_features with the masked patch embeddings replaced."""
        model = self.model
        x = model.patch_embed(images)  # [B, T, D], or [B, H, W, D] with dynamic_img_size
        x = torch.where(mask.reshape(x.shape[:-1])[..., None], mask_token.to(x.dtype), x)
        x = model.norm_pre(model.patch_drop(model._pos_embed(x)))
        return model.norm(model.blocks(x))

    def no_weight_decay(self) -> set[str]:
        names = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else set()
        return {f"model.{name}" for name in names}

    def config(self) -> dict[str, Any]:
        return {"arch": self.arch, "model_args": self.model_args, "mean": list(self.preprocessing.mean),
                "std": list(self.preprocessing.std)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Student:
        return cls(config["arch"], config["model_args"], tuple(config["mean"]), tuple(config["std"]))


def create_student(arch: str, **overrides: Any) -> Student:
    """The one door to a student. `overrides` go to `timm.create_model` (img_size, patch_size, drop_path_rate, depth, ...)."""
    return Student(arch, overrides)


def initial_student(arch: str, model_args: dict[str, Any], seed: int) -> Student:
    """The student a run with this seed starts from (seeds the global RNG, as the trainer's init relies on)."""
    torch.manual_seed(seed)
    # ViTs take any input size (local crops, retrieval images); other families have no such argument.
    vit = timm.is_model(arch) and timm.models.model_entrypoint(arch).__module__ in VIT_MODULES
    return Student(arch, {"dynamic_img_size": True, **model_args} if vit else dict(model_args))


def load_init(student: Student, spec: str) -> None:
    """Start `student` from the weights of the model `spec` names (local-dir:, name.tag, hf-hub:), loaded as
    teachers are (safetensors, or a tensors-only torch file). A ViT's position embedding is resampled to the
    student's grid by timm's own checkpoint filter; any other difference is one line naming both."""
    from distillery.models.teachers import load_pretrained

    state = load_pretrained(spec, num_classes=0).state_dict()
    if student.is_vit:
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = checkpoint_filter_fn(state, student.model)
    try:
        student.model.load_state_dict(state)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        raise DistilleryError(f"--init {spec}: its weights do not fit the student {student.arch} "
                              f"{student.model_args} ({detail[:300]})") from error


def export_local_dir(student: Student, out: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                     tag: str = "distillery") -> Path:
    """Write the backbone as a timm `local-dir` model with timm's `save_for_hf` (config.json + model.safetensors).

    `timm.create_model("local-dir:OUT", pretrained=True)` rebuilds exactly this backbone; the
    `pretrained_cfg` carries the input size and the mean/std the student was trained with, so evaluation
    and `cache-teachers` preprocess as training did. `state_dict` (e.g. the EMA weights) replaces the
    student's own weights when given.
    """
    model = student.model
    if state_dict is not None:
        model = copy.deepcopy(model)
        model.load_state_dict(state_dict)
    height, width = student.preprocessing.input_size
    pretrained_cfg = {"tag": tag, "input_size": (3, height, width), "interpolation": "bicubic",
                      "crop_pct": student.preprocessing.crop_pct, "mean": student.preprocessing.mean,
                      "std": student.preprocessing.std, "license": None, "url": None, "hf_hub_id": None}
    save_for_hf(model, str(out), model_config={"pretrained_cfg": pretrained_cfg}, safe_serialization=True)
    return Path(out)
