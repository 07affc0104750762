"""Seeded views and their replay: what makes a cached target match the image the student sees.

A view of sample `i` is a pure function of `(seed, i, v)`: a counter-based generator (Philox) keyed on
those numbers draws the RandomResizedCrop box in original-image pixels, the flip and every photometric
parameter. The parameters are a float32 vector, stored in the cache, and `replay` turns an image and
such a vector into pixels. The cache writer and the trainer both call `replay`, so a student sees
bit-for-bit the view its teacher saw; only the output size and the normalisation differ per model.

Layout of a parameter vector (`PARAM_NAMES`): crop box (top, left, height, width), flip, the four
colour-jitter factors, the order they are applied in, grayscale, blur sigma (in pixels at a 224-px
output; 0 = no blur), solarize; then up to four RandAugment layers (op number in `RANDAUGMENT_OPS` + 1,
0 = none; magnitude; sign) and a random-erasing box (on/off, top, left, height, width as fractions of the
output, and the key of its noise). All zeros after the crop box is the identity.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import correlate1d
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from distillery.config import ConfigError, from_mapping

MAX_RANDAUGMENT_LAYERS = 4
# timm's RandAugment op lists (timm.data.auto_augment _RAND_TRANSFORMS, then the `inc1` variants of
# _RAND_INCREASING_TRANSFORMS); the parameter vector stores an op by its place here, so the order is fixed.
RANDAUGMENT_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
                   "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
                   "PosterizeIncreasing", "SolarizeIncreasing", "ColorIncreasing", "ContrastIncreasing",
                   "BrightnessIncreasing", "SharpnessIncreasing")
_INCREASING = ("PosterizeIncreasing", "SolarizeIncreasing", "ColorIncreasing", "ContrastIncreasing",
               "BrightnessIncreasing", "SharpnessIncreasing")
RANDAUGMENT_CHOICES = {False: RANDAUGMENT_OPS[:15],
                       True: tuple(f"{name}Increasing" if f"{name}Increasing" in _INCREASING else name
                                   for name in RANDAUGMENT_OPS[:15])}
PARAM_NAMES = ("top", "left", "height", "width", "flip", "brightness", "contrast", "saturation", "hue",
               "order0", "order1", "order2", "order3", "grayscale", "blur_sigma", "solarize",
               *(f"ra{layer}_{part}" for layer in range(MAX_RANDAUGMENT_LAYERS) for part in ("op", "magnitude", "sign")),
               "erase", "erase_top", "erase_left", "erase_height", "erase_width", "erase_key")
NUM_PARAMS = len(PARAM_NAMES)
RANDAUGMENT_AT = PARAM_NAMES.index("ra0_op")
ERASE_AT = PARAM_NAMES.index("erase")
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
    randaugment: str = ""  # timm's RandAugment string, e.g. "rand-m9-mstd0.5-inc1" (Proteus and TinTeM); "" = off
    erasing_p: float = 0.0  # timm's RandomErasing in pixel mode (Proteus and TinTeM: 0.25)
    crop_pct: float = 0.875  # evaluation view: centre square of this fraction of the short side

    def __post_init__(self) -> None:
        if self.randaugment:
            parse_randaugment(self.randaugment)
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p", "erasing_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be a probability, got {getattr(self, name)}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ConfigError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.crop_pct <= 1:
            raise ConfigError(f"crop_pct must be in (0, 1], got {self.crop_pct}")

    @classmethod
    def from_dict(cls, values: dict, where: str = "view config") -> ViewConfig:
        return from_mapping(cls, values, where)


@dataclass(frozen=True)
class RandAugmentConfig:
    magnitude: float = 10.0
    layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0
    increasing: bool = False


@functools.lru_cache(maxsize=16)  # drawn for every view; the string is one of a run's few configs
def parse_randaugment(text: str) -> RandAugmentConfig:
    """timm's `rand-...` string (timm.data.auto_augment.rand_augment_transform): m, n, p, mstd, inc."""
    parts = text.split("-")
    if parts[0] != "rand":
        raise ConfigError(f"randaugment {text!r} must start with 'rand-' (timm's RandAugment string)")
    values: dict = {}
    keys = {"m": ("magnitude", float), "n": ("layers", int), "p": ("prob", float), "mstd": ("magnitude_std", float),
            "inc": ("increasing", lambda v: bool(int(v)))}
    for part in parts[1:]:
        key = part.rstrip("0123456789.")
        if key not in keys or key == part:
            raise ConfigError(f"randaugment {text!r}: unknown section {part!r}; known: m, n, p, mstd, inc")
        name, kind = keys[key]
        values[name] = kind(part[len(key):])
    config = RandAugmentConfig(**values)
    if not 0 <= config.layers <= MAX_RANDAUGMENT_LAYERS:
        raise ConfigError(f"randaugment {text!r}: at most {MAX_RANDAUGMENT_LAYERS} layers")
    return config


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
    params = [top, left, h, w, float(flip), *factors, *order, float(gray), sigma if blur else 0.0, float(solarize),
              *_draw_randaugment(rng, config.randaugment), *_draw_erasing(rng, config.erasing_p)]
    return np.asarray(params, dtype=np.float32)


def _draw_randaugment(rng: np.random.Generator, text: str) -> list[float]:
    """timm's RandAugment draws: n ops with replacement, each applied with probability p, its magnitude
    from N(m, mstd) clipped to [0, 10] (uniform on [0, m] when mstd > 100), and a random sign."""
    config = parse_randaugment(text) if text else RandAugmentConfig(layers=0)
    choices = RANDAUGMENT_CHOICES[config.increasing]
    out = []
    for layer in range(MAX_RANDAUGMENT_LAYERS):
        op, applied = int(rng.integers(len(choices))), rng.random() < config.prob
        if config.magnitude_std > 100:
            magnitude = rng.uniform(0, config.magnitude)
        else:
            magnitude = config.magnitude + config.magnitude_std * rng.standard_normal()
        negative = rng.random() > 0.5
        on = layer < config.layers and applied
        out += [RANDAUGMENT_OPS.index(choices[op]) + 1 if on else 0, min(max(magnitude, 0.0), 10.0) if on else 0.0,
                (-1.0 if negative else 1.0) if on else 0.0]
    return out


ERASE_REFERENCE_SIZE = 224  # the erased box is drawn on a square of this side and stored as fractions of it


def _draw_erasing(rng: np.random.Generator, probability: float) -> list[float]:
    """timm's RandomErasing box (area 0.02-1/3 of the image, aspect 0.3-3.3, 10 tries, one box) and noise key."""
    erase, side = rng.random() < probability, ERASE_REFERENCE_SIZE
    key = float(rng.integers(1 << 24))  # float32 holds integers below 2^24 exactly
    for _ in range(10):
        area = rng.uniform(0.02, 1 / 3) * side * side
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if w < side and h < side:
            top, left = int(rng.integers(0, side - h + 1)), int(rng.integers(0, side - w + 1))
            if erase:
                return [1.0, top / side, left / side, h / side, w / side, key]
            break
    return [0.0] * 6


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
    if params[RANDAUGMENT_AT:ERASE_AT:3].any():
        pixels = randaugment(pixels, params[RANDAUGMENT_AT:ERASE_AT])
    if not _photometric_identity(params):
        pixels = photometric(pixels.astype(np.float32) / 255, params, out_w)
    if params[ERASE_AT]:
        pixels = erase(pixels, params[ERASE_AT + 1:ERASE_AT + 6])
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


# timm's create_transform passes the ImageNet mean as the fill of geometric ops and the training
# interpolation (Proteus and TinTeM: bicubic) as their resampling.
RANDAUGMENT_FILL = tuple(min(255, round(255 * x)) for x in IMAGENET_DEFAULT_MEAN)


def randaugment_args(name: str, magnitude: float, sign: float) -> tuple:
    """The op arguments of timm's LEVEL_TO_ARG for this magnitude, with the sign drawn beforehand instead of
    by `random` inside timm (tests/test_views.py checks them against timm's for both signs)."""
    from timm.data.auto_augment import LEVEL_TO_ARG

    level = magnitude / 10
    if name == "Rotate":
        return (sign * level * 30,)
    if name in ("ShearX", "ShearY"):
        return (sign * level * 0.3,)
    if name in ("TranslateXRel", "TranslateYRel"):
        return (sign * level * 0.45,)
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        return (max(0.1, 1.0 + sign * level * 0.9),)
    level_fn = LEVEL_TO_ARG[name]
    return () if level_fn is None else tuple(level_fn(magnitude, {}))


def randaugment(pixels: np.ndarray, layers: np.ndarray) -> np.ndarray:
    """Apply stored RandAugment layers (op + 1, magnitude, sign) to uint8 [H, W, 3] with timm's op functions."""
    from timm.data.auto_augment import NAME_TO_OP

    image = Image.fromarray(pixels)
    for op, magnitude, sign in layers.reshape(-1, 3):
        if op:
            name = RANDAUGMENT_OPS[int(op) - 1]
            image = NAME_TO_OP[name](image, *randaugment_args(name, float(magnitude), float(sign)),
                                     fillcolor=RANDAUGMENT_FILL, resample=Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


ERASE_MEAN, ERASE_STD = np.float32(IMAGENET_DEFAULT_MEAN), np.float32(IMAGENET_DEFAULT_STD)


def erase(pixels: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Fill the stored box with per-pixel noise: timm's pixel-mode erasing writes N(0, 1) in normalised
    space; here that is mapped back through the ImageNet mean and std to uint8 so that every model's replay
    holds the same bytes (exactly timm's values for an ImageNet-normalised model, up to clipping)."""
    out_h, out_w = pixels.shape[:2]
    top, left = int(round(float(box[0]) * out_h)), int(round(float(box[1]) * out_w))
    h, w = max(1, int(round(float(box[2]) * out_h))), max(1, int(round(float(box[3]) * out_w)))
    h, w = min(h, out_h - top), min(w, out_w - left)
    noise = np.random.default_rng(int(box[4])).standard_normal((h, w, 3), dtype=np.float32)
    pixels = pixels.copy()
    pixels[top:top + h, left:left + w] = np.clip(np.round((noise * ERASE_STD + ERASE_MEAN) * 255), 0, 255)
    return pixels


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
