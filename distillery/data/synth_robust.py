"""The embedded robustness sets, in the layouts of their ImageNet counterparts (`eval robustness` reads both):

- `val-v2/`: a fresh draw from the val distribution (its own seed stream), class folders named by index
  (`0` ... `9`) as ImageNet-V2 names them;
- `val-r/`: renditions of six of the ten shapes (outlines, flat icons and sketches on plain grounds), class
  folders by name, with the subset in `classes.json` as ImageNet-R's 200 classes are listed;
- `val-c/<corruption>/<severity>/<class>/`: clean draws corrupted at severities 1-5 by one corruption per
  ImageNet-C family (noise, blur, weather, digital), with severities scaled from ImageNet-C's to 32-px images;
  `normaliser.json` holds the stated baseline's mean error per corruption (raw-pixel kNN, k = 20, against the
  train split), which mCE divides by as ImageNet-C divides by AlexNet's;
- `val-9/<variant>/val/<class>/`: the ImageNet-9 variants, exact because the generator knows each object's
  mask: original, mixed_same / mixed_rand / mixed_next (the object on the ground of another image of the same
  class / any image / the next class), only_fg (on black), no_fg (its mask blacked out), only_bg_b (its
  bounding box blacked out), only_bg_t (its bounding box tiled with the ground from outside it). The ten
  shapes are the superclasses (`in_to_in9.json`: the identity).

Images are PNG (a JPEG step would add a corruption of its own). Same seed, same bytes.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from distillery.config import ConfigError
from distillery.data.synth import (ID_CLASSES, SUPERSAMPLE, _family_colour, _finish, _hsv, _shape_mask,
                                   object_layers, render_object)
from distillery.files import staged_directory

SPLIT_IDS = {"val-v2": 9, "val-r": 10, "val-c": 11, "val-9": 12}
RENDITION_CLASSES = ID_CLASSES[:6]
RENDITIONS = ("outline", "flat", "sketch")
# ImageNet-C's parameters (hendrycks/robustness make_imagenet_c.py) with the spatial ones scaled 224 -> 32 px
CORRUPTIONS = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),  # noise sigma on [0, 1]
    "defocus_blur": (0.45, 0.6, 0.85, 1.15, 1.45),  # blur radius in px (IN-C's disk radii 3..10 / 7)
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),  # added to HSV value
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),  # (x - mean) x c + mean
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),  # box-downscale factor, then back up
    "jpeg_compression": (25, 18, 15, 10, 7),  # JPEG quality
}
VARIANTS = ("original", "mixed_same", "mixed_rand", "mixed_next", "only_fg", "no_fg", "only_bg_b", "only_bg_t")


@dataclass(frozen=True)
class RobustConfig:
    seed: int = 0
    size: int = 32
    images: int = 200  # per set (per corruption and severity for val-c), balanced over its classes

    def __post_init__(self) -> None:
        if self.size < 16 or self.images < len(ID_CLASSES):
            raise ConfigError(f"robustness sets: size must be at least 16 and images at least {len(ID_CLASSES)}, "
                              f"got {self.size}, {self.images}")


def _png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "PNG", optimize=False)


def _rng(config: RobustConfig, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, SPLIT_IDS[split], index])


# ---------------------------------------------------------------------------------------------- renditions

def render_rendition(rng: np.random.Generator, name: str, size: int) -> Image.Image:
    """Shape `name` as an outline, a flat icon or a sketch on a plain light or dark ground."""
    side = size * SUPERSAMPLE
    style = RENDITIONS[int(rng.integers(len(RENDITIONS)))]
    dark = rng.random() < 0.5
    ground = tuple(int(v) for v in _hsv(rng.uniform(0, 360), rng.uniform(0, 0.2), 0.15 if dark else 0.92))
    ink = tuple(int(v) for v in (_family_colour(rng, int(rng.integers(6))) if style == "flat" else
                                 _hsv(0, 0, 0.9 if dark else 0.1)))
    canvas = Image.new("RGB", (side, side), ground)
    centre = tuple(float(c) for c in rng.uniform(side * 0.4, side * 0.6, 2))
    radius, angle, aspect = rng.uniform(0.28, 0.4) * side, rng.uniform(-math.pi / 4, math.pi / 4), rng.uniform(0.85, 1.15)
    strokes = 3 if style == "sketch" else 1
    for _ in range(strokes):
        jitter = rng.normal(0, side * 0.015, 2) if style == "sketch" else np.zeros(2)
        mask = _shape_mask(name, side, (centre[0] + jitter[0], centre[1] + jitter[1]), radius, angle, aspect)
        if style != "flat":
            width = int(side * 0.03) * 2 + 1
            mask = Image.fromarray(np.asarray(mask.filter(ImageFilter.MaxFilter(width))) -
                                   np.asarray(mask.filter(ImageFilter.MinFilter(width))))
        canvas.paste(Image.new("RGB", (side, side), ink), (0, 0), mask)
    return _finish(canvas, size)


# ---------------------------------------------------------------------------------------------- corruptions

def corrupt(image: Image.Image, corruption: str, severity: int, rng: np.random.Generator) -> Image.Image:
    """`image` under one corruption at severity 1-5."""
    c = CORRUPTIONS[corruption][severity - 1]
    x = np.asarray(image, np.float32) / 255
    if corruption == "gaussian_noise":
        x = x + rng.normal(0, c, x.shape)
    elif corruption == "defocus_blur":
        return image.filter(ImageFilter.GaussianBlur(c))
    elif corruption == "brightness":
        hsv = np.asarray(image.convert("HSV"), np.float32) / 255
        hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
        return Image.fromarray((hsv * 255).round().astype(np.uint8), "HSV").convert("RGB")
    elif corruption == "contrast":
        mean = x.mean(axis=(0, 1), keepdims=True)
        x = (x - mean) * c + mean
    elif corruption == "pixelate":
        small = image.resize((max(1, int(image.width * c)), max(1, int(image.height * c))), Image.BOX)
        return small.resize(image.size, Image.BOX)
    else:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=int(c))
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return Image.fromarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8), "RGB")


def pixel_knn_errors(train_dir: Path, images: dict[str, list[tuple[Image.Image, int]]], size: int) -> dict[str, float]:
    """The stated baseline of `normaliser.json`: raw-pixel kNN (k = 20, T = 0.07, DINO's weighted vote) error
    per corruption, averaged over its severities, with the train split as the bank."""
    from distillery.evaluate.baselines import pixel_features
    from distillery.evaluate.knn import knn_accuracy, l2_normalize

    _, bank = pixel_features(train_dir, size)
    bank_features = l2_normalize(bank.features)
    errors = {}
    for corruption, labelled in images.items():
        queries = l2_normalize(np.stack([np.asarray(im, np.float32).ravel() for im, _ in labelled]))
        labels = np.array([label for _, label in labelled], np.int64)
        top1 = knn_accuracy(bank_features, bank.labels, queries, labels, (20,), 0.07, len(ID_CLASSES))["k=20"]["top1"]
        errors[corruption] = round(1 - top1, 6)
    return errors


# ---------------------------------------------------------------------------------------------- ImageNet-9

def _bbox(mask: Image.Image) -> tuple[int, int, int, int]:
    box = mask.point(lambda v: 255 if v >= 128 else 0).getbbox()
    return box or (0, 0, 1, 1)


def _tiled_box(ground: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """`ground` with `box` filled by tiles of the ground from its largest strip outside the box."""
    out = ground.copy()
    left, top, right, bottom = box
    strips = [(0, 0, ground.width, top), (0, bottom, ground.width, ground.height),
              (0, 0, left, ground.height), (right, 0, ground.width, ground.height)]
    strip = max(strips, key=lambda s: (s[2] - s[0]) * (s[3] - s[1]))
    tile = ground.crop(strip) if (strip[2] - strip[0]) * (strip[3] - strip[1]) > 0 else Image.new("RGB", (1, 1))
    for y in range(top, bottom, tile.height):
        for x in range(left, right, tile.width):
            out.paste(tile.crop((0, 0, min(tile.width, right - x), min(tile.height, bottom - y))), (x, y))
    return out


def in9_variants(layers: list, classes: list[int], index: int, rng: np.random.Generator) -> dict[str, Image.Image]:
    """Every variant of image `index` (supersampled) from the layers of all images of the set."""
    own = layers[index]
    same = [i for i, c in enumerate(classes) if c == classes[index] and i != index] or [index]  # a class of one
    following = [i for i, c in enumerate(classes) if c == (classes[index] + 1) % len(ID_CLASSES)]
    others = [i for i in range(len(layers)) if i != index]
    black = Image.new("RGB", own.ground.size)
    box = _bbox(own.mask)
    blanked = own.ground.copy()
    blanked.paste(black.crop(box), box[:2])
    no_fg = own.ground.copy()
    no_fg.paste(black, (0, 0), own.mask)
    return {"original": own.composite(),
            "mixed_same": own.composite(layers[int(rng.choice(same))].ground),
            "mixed_rand": own.composite(layers[int(rng.choice(others))].ground),
            "mixed_next": own.composite(layers[int(rng.choice(following))].ground),
            "only_fg": own.composite(black), "no_fg": no_fg, "only_bg_b": blanked,
            "only_bg_t": _tiled_box(own.ground, box)}


# ---------------------------------------------------------------------------------------------- the sets

def generate_robustness_sets(config: RobustConfig, out: str | Path, train_dir: str | Path) -> dict[str, int]:
    """Write val-v2/, val-r/, val-c/ and val-9/ under `out`; `train_dir` (the train shards) is the bank of
    val-c's stated baseline. Returns the images written per set."""
    out = Path(out)
    counts = {}
    with staged_directory(out / "val-v2") as partial:
        for i in range(config.images):
            label = i % len(ID_CLASSES)
            image, _ = render_object(_rng(config, "val-v2", i), ID_CLASSES[label], config.size)
            _png(image, partial / str(label) / f"v2_{i:05d}.png")
        counts["val-v2"] = config.images
    with staged_directory(out / "val-r") as partial:
        for i in range(config.images):
            name = RENDITION_CLASSES[i % len(RENDITION_CLASSES)]
            _png(render_rendition(_rng(config, "val-r", i), name, config.size), partial / name / f"r_{i:05d}.png")
        (partial / "classes.json").write_text(json.dumps(
            {"source": "distillery data synth: the shapes val-r renders", "classes": list(RENDITION_CLASSES)}, indent=1))
        counts["val-r"] = config.images
    with staged_directory(out / "val-c") as partial:
        clean = [(render_object(_rng(config, "val-c", i), ID_CLASSES[i % len(ID_CLASSES)], config.size)[0],
                  i % len(ID_CLASSES)) for i in range(config.images)]
        corrupted: dict[str, list[tuple[Image.Image, int]]] = {}
        for corruption in CORRUPTIONS:
            corrupted[corruption] = []
            for severity in range(1, 6):
                rng = np.random.default_rng([config.seed, SPLIT_IDS["val-c"], 1_000_000, severity,
                                             list(CORRUPTIONS).index(corruption)])
                for i, (image, label) in enumerate(clean):
                    damaged = corrupt(image, corruption, severity, rng)
                    _png(damaged, partial / corruption / str(severity) / ID_CLASSES[label] / f"c_{i:05d}.png")
                    corrupted[corruption].append((damaged, label))
        (partial / "normaliser.json").write_text(json.dumps(
            {"source": "distillery data synth: raw-pixel kNN (k=20, T=0.07) top-1 error per corruption, mean over "
                       "severities 1-5, with the train split as the bank", "baseline": "raw-pixel kNN",
             "errors": pixel_knn_errors(Path(train_dir), corrupted, config.size)}, indent=1))
        counts["val-c"] = config.images * 5 * len(CORRUPTIONS)
    with staged_directory(out / "val-9") as partial:
        classes = [i % len(ID_CLASSES) for i in range(config.images)]
        layers = [object_layers(_rng(config, "val-9", i), ID_CLASSES[c], config.size) for i, c in enumerate(classes)]
        for i, label in enumerate(classes):
            variants = in9_variants(layers, classes, i, np.random.default_rng([config.seed, SPLIT_IDS["val-9"], 1, i]))
            for variant, image in variants.items():
                _png(_finish(image, config.size), partial / variant / "val" / f"{label:02d}_{ID_CLASSES[label]}" / f"in9_{i:05d}.png")
        (partial / "in_to_in9.json").write_text(json.dumps(
            {"source": "distillery data synth: the ten shapes are the superclasses", "classes": list(ID_CLASSES),
             "in_to_in9": {str(i): i for i in range(len(ID_CLASSES))}}, indent=1))
        counts["val-9"] = config.images * len(VARIANTS)
    return counts
