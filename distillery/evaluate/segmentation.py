"""Linear semantic segmentation on frozen patch tokens: DINOv2's `linear` setting, the protocol of TinTeM's
Pascal VOC numbers (the Proteus codebase evaluates with DINOv2's segmentation code).

Every default is a value of DINOv2's published mmseg 0.x config for VOC 2012,
https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_voc2012_linear_config.py (a copy:
Jiawei-Yang/Denoising-ViT, evaluation/configs/vitb_voc2012_linear_config.py; DINOv2's ADE20K linear config
has the same head, schedule and augmentation):
- head (`BNHead`, in_index [3] of out_indices [8, 9, 10, 11], i.e. the last block): BatchNorm over the
  channels of the last block's patch tokens (after the final norm), then a 1x1 convolution to the classes,
  initialised N(0, 0.01) with zero bias (mmseg's `conv_seg` init). Its logits are upsampled bilinearly
  (align_corners False) to the label's size; cross-entropy with the ignore index 255, averaged over the
  labelled pixels. The backbone input is centre-padded to a multiple of the patch size (DINOv2's
  `CenterPadding` pre-hook) and the logits are resized to the unpadded input, as DINOv2 does.
- training: 40k iterations of 16 crops (8 GPUs x 2); AdamW, lr 1e-3, weight decay 1e-4 on every parameter,
  betas (0.9, 0.999); mmcv's poly policy (power 1, to 0) after a 1500-iteration linear warmup from 1e-6 x.
- augmentation: rescale to img_scale (2048, 512) x r, r ~ U(0.5, 2.0), keeping the ratio (factor
  min(2048 r / long side, 512 r / short side)); a random 512 crop, redrawn up to 10 times while one class
  covers at least 75% of its labelled pixels (cat_max_ratio); horizontal flip (p 0.5); mmseg's
  PhotoMetricDistortion; normalise (ImageNet mean and std); pad to 512 (image 0 after normalising, label 255).
- test: rescale to (2048, 512) keeping the ratio; slide windows of 512 at stride 341, the logits of
  overlapping windows averaged; resized bilinearly to the image's own size; argmax.
- scoring (mmseg `mean_iou`): one confusion matrix over every val pixel whose label is not 255; per class
  IoU = TP / (TP + FP + FN); mIoU the mean over classes whose union is not empty; aAcc the pixel accuracy;
  mAcc the mean over classes of the per-class pixel accuracy.

Layout (Pascal VOC 2012): `JPEGImages/<id>.jpg`, `SegmentationClass/<id>.png` (indexed PNGs: 0 background,
1..20 the classes, 255 boundaries and void), `ImageSets/Segmentation/<split>.txt`. VOC's 21 classes are
assumed unless `classes.txt` (one name per line, index order) lies beside them, as in the synth set.

Deterministic on CPU: each crop's augmentation comes from a generator seeded by (seed, crop index), and the
image order from one seeded permutation per pass, so DataLoader workers do not change a result.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from distillery.config import ConfigError, apply_overrides, from_mapping, read_yaml
from distillery.data.imagefolder import read_listing
from distillery.errors import DistilleryError
from distillery.evaluate.features import model_device, patch_grid, patch_size
from distillery.models.teachers import Teacher
from distillery.train.schedules import warmup_poly

IGNORE_INDEX = 255
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
CROP_TRIES = 10  # mmseg RandomCrop: redraws while cat_max_ratio is exceeded


@dataclass(frozen=True)
class SegmentationSettings:
    crop_size: int = 512
    scale: tuple[int, int] = (2048, 512)  # mmseg img_scale: (long side, short side) bounds
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    photometric: bool = True  # mmseg PhotoMetricDistortion
    stride: int = 341  # slide inference
    iterations: int = 40000
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    power: float = 1.0
    train_split: str = "train"
    val_split: str = "val"
    workers: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.crop_size, self.stride, self.iterations, self.batch_size, *self.scale) < 1:
            raise ConfigError("segmentation: crop_size, stride, iterations, batch_size and scale must be positive")
        if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ConfigError(f"segmentation: ratio_range must be increasing and positive, got {self.ratio_range}")
        if not 0 <= self.warmup_iters < self.iterations:
            raise ConfigError(f"segmentation: warmup_iters ({self.warmup_iters}) must be below iterations "
                              f"({self.iterations})")


def read_settings(path: str | Path | None = None, overrides: tuple[str, ...] = ()) -> SegmentationSettings:
    """Settings from a YAML mapping (default: DINOv2's VOC values) with `--set KEY=VALUE` on top."""
    values = read_yaml(path) if path is not None else {}
    return from_mapping(SegmentationSettings, apply_overrides(values, overrides), str(path or "--set"))


# ------------------------------------------------------------------------------------------------ the data

@dataclass(frozen=True)
class LabelledImage:
    image: Path
    label: Path


def read_split(root: str | Path, split: str) -> list[LabelledImage]:
    """The images of `ImageSets/Segmentation/<split>.txt`, each with its label PNG."""
    root = Path(root)
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    ids = read_listing(listing, "Pascal VOC", "image")
    items = [LabelledImage(root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png") for i in ids]
    for item in items:
        for path in (item.image, item.label):
            if not path.is_file():
                raise DistilleryError(f"{path}: listed in {listing} but missing")
    return items


def class_names(root: str | Path) -> tuple[str, ...]:
    """`classes.txt` beside the data, else VOC's 21 classes."""
    path = Path(root) / "classes.txt"
    if not path.is_file():
        return VOC_CLASSES
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not 2 <= len(names) < IGNORE_INDEX:
        raise DistilleryError(f"{path}: needs between 2 and {IGNORE_INDEX - 1} class names, has {len(names)}")
    return names


def read_pair(item: LabelledImage, classes: int) -> tuple[Image.Image, Image.Image]:
    """An RGB image and its label (mode L), checked: the same size, every value a class or 255."""
    try:
        with Image.open(item.image) as image:
            rgb = image.convert("RGB")
        with Image.open(item.label) as label_image:
            if label_image.mode not in ("P", "L"):
                raise DistilleryError(f"{item.label}: label mode {label_image.mode}, expected an indexed (P) or L PNG")
            label = np.array(label_image)
    except OSError as error:
        raise DistilleryError(f"{item.image.parent.parent}: unreadable image or label for {item.image.stem} "
                              f"({error})") from error
    if label.shape != (rgb.size[1], rgb.size[0]):
        raise DistilleryError(f"{item.label}: label is {label.shape[1]}x{label.shape[0]}, its image "
                              f"{rgb.size[0]}x{rgb.size[1]}")
    unknown = sorted(set(np.unique(label).tolist()) - set(range(classes)) - {IGNORE_INDEX})
    if unknown:
        raise DistilleryError(f"{item.label}: label value {unknown[0]} is neither a class (0..{classes - 1}) "
                              f"nor {IGNORE_INDEX}")
    return rgb, Image.fromarray(label, "L")


# ------------------------------------------------------------------------------------------------ augmentation

def rescaled_size(size: tuple[int, int], scale: tuple[int, int], ratio: float = 1.0) -> tuple[int, int]:
    """(W, H) after mmcv's keep-ratio rescale to img_scale x ratio."""
    width, height = size
    factor = min(scale[0] * ratio / max(width, height), scale[1] * ratio / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def crop_box(label: np.ndarray, crop: int, cat_max_ratio: float, rng: np.random.Generator) -> tuple[int, int]:
    """(top, left) of a random crop, redrawn while one class covers at least cat_max_ratio of its labelled pixels."""
    margin_h, margin_w = max(label.shape[0] - crop, 0), max(label.shape[1] - crop, 0)
    top, left = int(rng.integers(margin_h + 1)), int(rng.integers(margin_w + 1))
    if cat_max_ratio >= 1:
        return top, left
    for _ in range(CROP_TRIES):
        window = label[top:top + crop, left:left + crop]
        _, counts = np.unique(window[window != IGNORE_INDEX], return_counts=True)
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
        top, left = int(rng.integers(margin_h + 1)), int(rng.integers(margin_w + 1))
    return top, left


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on uint8 RGB [H, W, 3]: each step with probability 1/2, brightness
    +-32, contrast x U(0.5, 1.5) before or after, saturation x U(0.5, 1.5) and hue +-18 (OpenCV's 0-180
    hue units) in HSV, rounding to uint8 after each step as mmseg does. PIL's HSV (hue 0-255) stands in for
    OpenCV's, so hue steps are quantised to 1/256 of a turn rather than 1/180."""
    def convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    if rng.integers(2):
        image = convert(image, beta=rng.uniform(-32, 32))
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        image = convert(image, alpha=rng.uniform(0.5, 1.5))
    saturate, shift = rng.integers(2), rng.integers(2)
    saturation = rng.uniform(0.5, 1.5) if saturate else 1.0
    hue = int(rng.integers(-18, 18)) if shift else 0
    if saturate or shift:
        hsv = np.array(Image.fromarray(image, "RGB").convert("HSV"))
        if saturate:
            hsv[..., 1] = convert(hsv[..., 1], alpha=saturation)
        if shift:
            hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + round(hue * 256 / 180)) % 256).astype(np.uint8)
        image = np.array(Image.fromarray(hsv, "HSV").convert("RGB"))
    if not contrast_first and rng.integers(2):
        image = convert(image, alpha=rng.uniform(0.5, 1.5))
    return image


def normalise(image: np.ndarray) -> torch.Tensor:
    """uint8 RGB [H, W, 3] to a normalised float tensor [3, H, W]."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    return (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - mean) / std  # a copy: PIL's arrays are read-only


class TrainCrops(torch.utils.data.Dataset):
    """Crop i of the run: pass i // n, the image at place i % n of that pass's seeded permutation, augmented
    by a generator seeded by (seed, i)."""

    def __init__(self, items: list[LabelledImage], classes: int, settings: SegmentationSettings):
        self.items, self.classes, self.settings = items, classes, settings
        self._order: tuple[int, np.ndarray] | None = None  # (pass, its permutation), drawn once per pass

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.settings.seed, 0, epoch]).permutation(len(self.items)))
        return self._order[1]

    def __len__(self) -> int:
        return self.settings.iterations * self.settings.batch_size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.settings
        epoch, place = divmod(index, len(self.items))
        image, label = read_pair(self.items[int(self.order(epoch)[place])], self.classes)
        rng = np.random.default_rng([s.seed, 1, index])
        size = rescaled_size(image.size, s.scale, rng.uniform(*s.ratio_range))
        pixels = np.asarray(image.resize(size, Image.BILINEAR))
        labels = np.asarray(label.resize(size, Image.NEAREST))
        top, left = crop_box(labels, s.crop_size, s.cat_max_ratio, rng)
        pixels = pixels[top:top + s.crop_size, left:left + s.crop_size]
        labels = labels[top:top + s.crop_size, left:left + s.crop_size]
        if rng.random() < 0.5:
            pixels, labels = pixels[:, ::-1], labels[:, ::-1]
        if s.photometric:
            pixels = photometric_distortion(np.ascontiguousarray(pixels), rng)
        out = torch.zeros(3, s.crop_size, s.crop_size)
        target = torch.full((s.crop_size, s.crop_size), IGNORE_INDEX, dtype=torch.int64)
        out[:, :pixels.shape[0], :pixels.shape[1]] = normalise(pixels)
        target[:labels.shape[0], :labels.shape[1]] = torch.from_numpy(labels.astype(np.int64))
        return out, target


# ------------------------------------------------------------------------------------------------ the head

def patch_map(teacher: Teacher, images: torch.Tensor) -> torch.Tensor:
    """The last block's patch tokens as a map [B, D, h, w], the input centre-padded to a multiple of the
    patch size (DINOv2's CenterPadding)."""
    multiple = patch_size(teacher)
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    grid = patch_grid(teacher, *images.shape[-2:])
    with torch.inference_mode():
        tokens = teacher(images).patch
    return tokens.transpose(1, 2).reshape(len(images), -1, *grid).clone()


class LinearSegmentationHead(nn.Module):
    """mmseg's BNHead as DINOv2 configures it: BatchNorm, then a 1x1 convolution to the classes."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.conv_seg = nn.Conv2d(channels, classes, 1)
        nn.init.normal_(self.conv_seg.weight, 0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.conv_seg(self.bn(features)), size=size, mode="bilinear", align_corners=False)


def pixel_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the labelled pixels (0 when none is; no host sync to find out)."""
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def train_head(teacher: Teacher, items: list[LabelledImage], classes: int, settings: SegmentationSettings,
               progress=None) -> tuple[LinearSegmentationHead, float]:
    """The head trained for `settings.iterations` steps; returns it and the mean loss of the last 50 steps."""
    device = model_device(teacher)
    torch.manual_seed(settings.seed)
    crops = TrainCrops(items, classes, settings)
    channels = patch_map(teacher, crops[0][0][None].to(device)).shape[1]
    head = LinearSegmentationHead(channels, classes).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr, betas=(0.9, 0.999),
                                  weight_decay=settings.weight_decay)
    loader = torch.utils.data.DataLoader(crops, batch_size=settings.batch_size, num_workers=settings.workers,
                                         shuffle=False, drop_last=True, persistent_workers=False)
    recent: list[torch.Tensor] = []
    head.train()
    for step, (images, labels) in enumerate(loader):
        lr = warmup_poly(step, settings.iterations, settings.lr, settings.power, 0.0, settings.warmup_iters,
                         settings.warmup_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss = pixel_loss(head(patch_map(teacher, images), labels.shape[-2:]), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        recent = [*recent[-49:], loss.detach()]
        if progress:
            progress(step + 1, recent)
    return head.eval(), float(torch.stack(recent).mean())


# ------------------------------------------------------------------------------------------------ inference and scores

@torch.no_grad()
def predict(teacher: Teacher, head: LinearSegmentationHead, image: Image.Image,
            settings: SegmentationSettings) -> np.ndarray:
    """Class indices [H, W] of one image: keep-ratio rescale, slide windows, averaged logits, resized back."""
    device = model_device(teacher)
    pixels = normalise(np.asarray(image.resize(rescaled_size(image.size, settings.scale), Image.BILINEAR)))[None]
    pixels = pixels.to(device)
    height, width = pixels.shape[-2:]
    crop, stride = settings.crop_size, settings.stride
    logits = torch.zeros(1, head.conv_seg.out_channels, height, width, device=device)
    counts = torch.zeros(1, 1, height, width, device=device)
    for row in range(max(height - crop + stride - 1, 0) // stride + 1):
        for col in range(max(width - crop + stride - 1, 0) // stride + 1):
            bottom, right = min(row * stride + crop, height), min(col * stride + crop, width)
            top, left = max(bottom - crop, 0), max(right - crop, 0)
            window = pixels[..., top:bottom, left:right]
            logits[..., top:bottom, left:right] += head(patch_map(teacher, window), window.shape[-2:])
            counts[..., top:bottom, left:right] += 1
    logits = F.interpolate(logits / counts, size=(image.size[1], image.size[0]), mode="bilinear", align_corners=False)
    return logits[0].argmax(0).cpu().numpy()


def confusion_matrix(prediction: np.ndarray, label: np.ndarray, classes: int) -> np.ndarray:
    """[classes, classes] pixel counts, rows the label and columns the prediction; label 255 is left out."""
    kept = label != IGNORE_INDEX
    pairs = label[kept].astype(np.int64) * classes + prediction[kept].astype(np.int64)
    return np.bincount(pairs, minlength=classes * classes).reshape(classes, classes)


def segmentation_scores(confusion: np.ndarray, names: tuple[str, ...]) -> dict[str, Any]:
    """mIoU, mAcc and aAcc of a confusion matrix as mmseg's `mean_iou` computes them (classes with an empty
    union, or no labelled pixel, count as NaN and are left out of the means)."""
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    labelled = confusion.sum(1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        class_iou, class_acc = tp / union, tp / labelled
    if not labelled.sum():
        raise DistilleryError("segmentation: the val labels have no labelled pixel (all 255)")
    return {"mIoU": float(np.nanmean(class_iou)), "mAcc": float(np.nanmean(class_acc)),
            "aAcc": float(tp.sum() / labelled.sum()),
            "per_class": {name: {"IoU": float(class_iou[i]), "Acc": float(class_acc[i])} for i, name in enumerate(names)}}


# ------------------------------------------------------------------------------------------------ the task

HEADLINE = ("mIoU", "mAcc", "aAcc")


def segmentation_result(teacher: Teacher, name: str, spec: str, root: str | Path,
                        settings: SegmentationSettings = SegmentationSettings()):
    """The segmentation TaskResult of one model (what `eval segmentation` and the suite's task write)."""
    from distillery.console import progress_bar
    from distillery.evaluate.results import TaskResult, percent

    names = class_names(root)
    train, val = read_split(root, settings.train_split), read_split(root, settings.val_split)
    confusion = np.zeros((len(names), len(names)), np.int64)
    with progress_bar("loss") as progress:
        fit = progress.add_task(f"segmentation head {name}", total=settings.iterations, loss="")

        def advance(step: int, recent: list[torch.Tensor]) -> None:
            fields = {"loss": f"loss {float(recent[-1]):.3f}"} if step % 50 == 0 else {}
            progress.update(fit, completed=step, **fields)

        head, final_loss = train_head(teacher, train, len(names), settings, advance)
        score = progress.add_task(f"segmentation val {name}", total=len(val), loss="")
        for item in val:
            image, label = read_pair(item, len(names))
            confusion += confusion_matrix(predict(teacher, head, image, settings), np.asarray(label), len(names))
            progress.advance(score)
    metrics = {**segmentation_scores(confusion, names), "final_loss": final_loss}
    data = {"segmentation": {"root": str(root), "classes": list(names),
                             "images": {settings.train_split: len(train), settings.val_split: len(val)}}}
    return TaskResult("segmentation", {name: {"spec": spec, "fingerprint": teacher.fingerprint()}}, data,
                      dataclasses.asdict(settings), metrics, ("model", "mIoU %", "mAcc %", "aAcc %"),
                      [(name, *(percent(metrics[k]) for k in HEADLINE))])


def segmentation_task(spec: str, root: str | Path, settings: SegmentationSettings = SegmentationSettings(),
                      out: Path | None = None, device: str | None = None):
    """`distillery eval segmentation`: mIoU of one model, written to OUT (default results/<model>/segmentation.json)."""
    from distillery.evaluate.features import load_model
    from distillery.evaluate.results import default_path, save_result

    teacher = load_model(spec, device, any_size=True)
    result = segmentation_result(teacher, teacher.name, spec, root, settings)
    return result, save_result(result, out or default_path(teacher.name, "segmentation"))
