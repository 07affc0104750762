"""The embedded semantic-segmentation set: scenes of the synth world's patterned shapes, in the Pascal VOC layout.

Each image holds 1-3 objects of distinct shapes (the ten in-distribution classes), each with its own pattern
and hue, posed anywhere and at any angle over a ground of a random family; later objects lie in front. The
label marks each pixel with its object's class (1..10; 0 is the ground), and, as VOC marks its object
contours, 255 on the pixels an object's edge only partly covers (between 1/4 and 3/4 of the pixel). Written
as `JPEGImages/<id>.jpg`, `SegmentationClass/<id>.png` (indexed, VOC's palette), `ImageSets/Segmentation/
{train,val}.txt` and `classes.txt`, so `distillery eval segmentation` reads it as it reads VOC 2012. Same seed,
same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from distillery.config import ConfigError
from distillery.data.synth import (BACKGROUNDS, ID_CLASSES, SUPERSAMPLE, _background, _clutter, _draw_object,
                                   _paste_object, _shape_mask)
from distillery.files import staged_directory

SPLIT_IDS = {"train": 7, "val": 8}  # after synth.SPLIT_IDS and synth_video.SPLIT_ID
CLASSES = ("background", *ID_CLASSES)


def voc_palette() -> list[int]:
    """The colour map of VOC's indexed PNGs (bit-interleaved RGB of the index; 255 is (224, 224, 192))."""
    palette = []
    for index in range(256):
        r = g = b = 0
        value = index
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette += [r, g, b]
    return palette


@dataclass(frozen=True)
class SegConfig:
    seed: int = 0
    size: int = 32  # images are 2 x size square
    train: int = 400
    val: int = 100
    objects: tuple[int, int] = (1, 3)

    def __post_init__(self) -> None:
        if self.size < 16 or self.train < 1 or self.val < 1:
            raise ConfigError(f"segmentation set: size must be at least 16 and both splits non-empty, "
                              f"got size {self.size}, train {self.train}, val {self.val}")
        if not 1 <= self.objects[0] <= self.objects[1] <= 3:
            raise ConfigError(f"segmentation set: objects must lie between 1 and 3, got {self.objects}")


def render_scene(config: SegConfig, split: str, index: int) -> tuple[Image.Image, np.ndarray]:
    """Image `index` of `split` and its label (uint8: class, or 255 on partly covered edge pixels)."""
    rng = np.random.default_rng([config.seed, SPLIT_IDS[split], index])
    final = 2 * config.size
    side = final * SUPERSAMPLE
    count = int(rng.integers(config.objects[0], config.objects[1] + 1))
    shapes = [ID_CLASSES[int(i)] for i in rng.choice(len(ID_CLASSES), count, replace=False)]
    objects = [_draw_object(rng, shape, side, scale=(0.3, 0.55), margin=0.6, rotation=math.pi) for shape in shapes]
    canvas = _background(rng, int(rng.integers(len(BACKGROUNDS))), side, avoid_hue=60 * objects[0].family)
    _clutter(canvas, rng, int(rng.integers(0, 3)), size=(0.02, 0.04))
    label = np.zeros((final, final), np.uint8)
    edge = np.zeros((final, final), bool)
    for obj in objects:
        _paste_object(canvas, rng, obj)
        mask = _shape_mask(obj.shape, side, obj.centre, obj.radius, obj.angle, obj.aspect)
        coverage = np.asarray(mask.resize((final, final), Image.BOX), np.float32) / 255
        inside = coverage >= 0.75
        label[inside] = CLASSES.index(obj.shape)
        edge = (edge | (coverage > 0.25)) & ~inside
    label[edge] = 255
    return canvas.resize((final, final), Image.LANCZOS), label


def generate_segmentation(config: SegConfig, out: str | Path) -> int:
    """Write the set under `out` (new or empty); returns the number of images written."""
    palette = voc_palette()
    with staged_directory(out) as partial:
        for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
            (partial / sub).mkdir(parents=True)
        for split, count in (("train", config.train), ("val", config.val)):
            ids = [f"{split}_{index:05d}" for index in range(count)]
            for name, index in zip(ids, range(count), strict=True):
                image, label = render_scene(config, split, index)
                image.save(partial / "JPEGImages" / f"{name}.jpg", quality=95)
                annotation = Image.fromarray(label, "P")
                annotation.putpalette(palette)
                annotation.save(partial / "SegmentationClass" / f"{name}.png")
            (partial / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        (partial / "classes.txt").write_text("".join(f"{name}\n" for name in CLASSES))
    return config.train + config.val

