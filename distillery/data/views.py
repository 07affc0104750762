"""Seeded views and their replay: what makes a cached target match the image the student sees.

A view of sample `i` is a pure function of `(seed, i, v)`: a counter-based generator (Philox) keyed on
those numbers draws the RandomResizedCrop box in original-image pixels, the flip and every photometric
parameter. The parameters are a float32 vector, stored in the cache, and `replay` turns an image and
such a vector into pixels. The cache writer and the trainer both call `replay`, so a student sees
bit-for-bit the view its teacher saw; only the output size and the normalisation differ per model.

Layout of a parameter vector (`PARAM_NAMES`): crop box (top, left, height, width), flip, the four
colour-jitter factors, the order they are applied in, grayscale, blur sigma (in pixels at a 224-px
output; 0 = no blur) and solarize.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import correlate1d
from PIL import Image

PARAM_NAMES = ("top", "left", "height", "width", "flip", "brightness", "contrast", "saturation", "hue",
               "order0", "order1", "order2", "order3", "grayscale", "blur_sigma", "solarize")
NUM_PARAMS = len(PARAM_NAMES)
EVAL_VIEW = -1
BLUR_REFERENCE_SIZE = 224  # blur sigma and kernel are given for a 224-px output and scaled with the size

# Streams of the counter-based generator: each use of randomness gets its own, so none can overlap.
STREAM_VIEW = 0
STREAM_VIEW_CHOICE = 1
STREAM_CROPS = 2
STREAM_SHARD_ORDER = 3
STREAM_SAMPLE_ORDER = 4
STREAM_RANDOM_VIEW = 5


def counter_rng(seed: int, index: int, stream: int, counter: int) -> np.random.Generator:
    """An independent generator for `(seed, index, stream, counter)`, cheap to make and order-free.

    Philox is counter-based: the key holds seed and sample index, and the two high words of the counter
    hold the stream and its counter, so draws never run into another tuple's (the low words count blocks).
    """
    if min(seed, index, stream, counter) < 0:
        raise ValueError(f"counter_rng needs non-negative numbers, got {(seed, index, stream, counter)}")
    return np.random.Generator(np.random.Philox(key=(seed << 64) | index, counter=[0, 0, stream, counter]))


@dataclass(frozen=True)
class ViewConfig:
    """How views are drawn. Defaults are UNIC's single-view DINO-style training augmentation
    (naver/unic main_unic.py: RandomResizedCrop(0.08, 1), flip, ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8,
    grayscale p=0.2, GaussianBlur(9, sigma 0.1-5) p=0.2, solarize p=0.2); every op can be switched off by
    setting its probability to 0."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 5.0)
    solarize_p: float = 0.2
    crop_pct: float = 0.875  # evaluation view: centre square of this fraction of the short side

    def __post_init__(self) -> None:
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"view config: {name} must be a probability, got {getattr(self, name)}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"view config: scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"view config: crop_pct must be in (0, 1], got {self.crop_pct}")

    @classmethod
    def from_dict(cls, values: dict) -> ViewConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"view config: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
                            ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, h, w) by torchvision's RandomResizedCrop rule: 10 tries, then a centre crop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_view(config: ViewConfig, seed: int, index: int, view: int, height: int, width: int) -> np.ndarray:
    """The parameters of view `view` of sample `index` (an image of `height` x `width` pixels)."""
    if view == EVAL_VIEW:
        return eval_view(height, width, config.crop_pct)
    return sample_view(counter_rng(seed, index, STREAM_VIEW, view), config, height, width)


def sample_view(rng: np.random.Generator, config: ViewConfig, height: int, width: int) -> np.ndarray:
    """Draw one view's parameters from `rng` (cached views, and the on-the-fly DINO crops)."""
    # Every draw happens whatever the probabilities say, so switching one op off leaves the others' values as they were.
    top, left, h, w = random_resized_crop_box(rng, height, width, config.scale, config.ratio)
    flip = rng.random() < config.flip_p
    jitter = rng.random() < config.jitter_p
    factors = (rng.uniform(max(0.0, 1 - config.brightness), 1 + config.brightness),
               rng.uniform(max(0.0, 1 - config.contrast), 1 + config.contrast),
               rng.uniform(max(0.0, 1 - config.saturation), 1 + config.saturation),
               rng.uniform(-config.hue, config.hue))
    order = rng.permutation(4)
    gray = rng.random() < config.grayscale_p
    blur = rng.random() < config.blur_p
    sigma = rng.uniform(*config.blur_sigma)
    solarize = rng.random() < config.solarize_p
    if not jitter:
        factors = (1.0, 1.0, 1.0, 0.0)
    params = [top, left, h, w, float(flip), *factors, *order, float(gray), sigma if blur else 0.0, float(solarize)]
    return np.asarray(params, dtype=np.float32)


def eval_view(height: int, width: int, crop_pct: float) -> np.ndarray:
    """The evaluation view: the centred square of `crop_pct` of the short side (resize + centre crop)."""
    side = max(1, int(round(min(height, width) * crop_pct)))
    params = np.zeros(NUM_PARAMS, dtype=np.float32)
    params[:4] = ((height - side) // 2, (width - side) // 2, side, side)
    params[5:13] = (1.0, 1.0, 1.0, 0.0, 0, 1, 2, 3)
    return params


def replay(image: Image.Image, params: np.ndarray, out_size: int | tuple[int, int]) -> torch.Tensor:
    """Render view `params` of `image` at `out_size`: uint8 tensor [3, H, W]. The one replay function.

    Crop and resize in one bicubic, antialiased PIL resize, then flip, then the photometric chain in float32
    (colour jitter in the stored order, grayscale, blur, solarize) with a single rounding to uint8 at the end.
    Deterministic on CPU: the same inputs give the same bytes.
    """
    out_h, out_w = (out_size, out_size) if isinstance(out_size, int) else out_size
    top, left, h, w = (float(v) for v in params[:4])
    pixels = np.asarray(image.resize((out_w, out_h), Image.BICUBIC, box=(left, top, left + w, top + h)), dtype=np.uint8)
    if params[4]:
        pixels = pixels[:, ::-1]
    if not _photometric_identity(params):
        pixels = photometric(pixels.astype(np.float32) / 255, params, out_w)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def _photometric_identity(params: np.ndarray) -> bool:
    return bool(params[5] == 1 and params[6] == 1 and params[7] == 1 and params[8] == 0 and not params[13]
                and params[14] == 0 and not params[15])


# ITU-R 601 luma weights (torchvision's rgb_to_grayscale) and the RGB <-> YIQ pair used for hue rotation.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype(np.float32)


def photometric(x: np.ndarray, params: np.ndarray, out_w: int) -> np.ndarray:
    """The photometric part of a view, on float32 [H, W, 3] in [0, 1]; returns uint8 [H, W, 3].

    The operations of torchvision's ColorJitter, RandomGrayscale, GaussianBlur and RandomSolarize, written by
    hand as one numpy pass: torchvision's functional ops round to uint8 after every op and cost 40-700 us
    each on a 32-px view (its HSV hue shift alone 0.7 ms, 4 ms at 224 px), which made data loading the
    bottleneck of DINO training. Hue is a rotation of the chroma plane in YIQ space (the linear form of a hue
    shift); the other ops follow torchvision's definitions, clamping to [0, 1] after each blend.
    """
    brightness, contrast, saturation, hue = (float(v) for v in params[5:9])
    for op in params[9:13]:
        op = int(op)
        if op == 0 and brightness != 1:
            x = np.clip(x * brightness, 0, 1)
        elif op == 1 and contrast != 1:
            x = np.clip(contrast * x + (1 - contrast) * float((x @ _LUMA).mean()), 0, 1)
        elif op == 2 and saturation != 1:
            x = np.clip(saturation * x + (1 - saturation) * (x @ _LUMA)[..., None], 0, 1)
        elif op == 3 and hue != 0:
            angle = 2 * math.pi * hue
            rotation = np.array([[1, 0, 0], [0, math.cos(angle), -math.sin(angle)], [0, math.sin(angle), math.cos(angle)]],
                                np.float32)
            x = np.clip(x @ (_YIQ_TO_RGB @ rotation @ _RGB_TO_YIQ).T, 0, 1)
    if params[13]:
        x = np.repeat((x @ _LUMA)[..., None], 3, axis=-1)
    sigma = float(params[14]) * out_w / BLUR_REFERENCE_SIZE
    if sigma > 0:
        kernel_size = max(3, 2 * round((9 * out_w / BLUR_REFERENCE_SIZE - 1) / 2) + 1)  # UNIC's 9-px kernel, scaled
        half = (kernel_size - 1) / 2
        kernel = np.exp(-0.5 * (np.linspace(-half, half, kernel_size) / sigma) ** 2).astype(np.float32)
        kernel /= kernel.sum()
        # mode="mirror" reflects without repeating the edge pixel, as torch's "reflect" padding does
        x = correlate1d(correlate1d(x, kernel, axis=0, mode="mirror"), kernel, axis=1, mode="mirror")
    x = np.round(x * 255)
    if params[15]:
        x = np.where(x >= 128, 255 - x, x)
    return np.clip(x, 0, 255).astype(np.uint8)


def normalize(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [..., 3, H, W] to float32, scaled to [0, 1] and standardised per channel."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return (pixels.float() / 255 - mean_t) / std_t
