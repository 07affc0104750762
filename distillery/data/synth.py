"""The embedded dataset: seeded procedural images in the real on-disk formats.

There is no ImageNet and no pretrained weight here, so tests, the demo and the benchmarks run on this.
Every image is a pure function of `(seed, split, index)`, drawn with its own numpy generator, so the
output is byte-identical for a seed however the work is split across processes.

- ID classes: ten shape families. Each image also records the factors it was drawn from (`FACTORS`: shape,
  the object's fill pattern, the background family, the object's hue family) in its .json, so any factor can
  be an evaluation label. Factors, pose (rotation, scale, position) and clutter are independent, so raw
  pixels are a poor classifier (`distillery eval baselines`) while shape and pattern stay learnable.
- near-OOD: five held-out shapes that resemble ID ones (pentagon vs hexagon, 4- vs 5-point star, ...).
- far-OOD: textures and noise with no object.
- transfer (`generate_transfer`, written by `synth_sets`): the near-OOD shapes as classes of their own.
- retrieval: fixed "landmark" scenes, each a large object of a shape and pattern no other scene has as its
  main object, on its own ground among smaller objects, re-rendered under viewpoint, light, colour-balance
  (hue) and occlusion changes (mild = easy, strong = hard, unrecognisable = junk), plus distractor scenes, in
  the revisited Oxford/Paris layout (`gnd_synth.pkl` + `jpg/`). The hue changes defeat colour histograms.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from distillery.config import ConfigError
from distillery.data.shards import ShardWriter
from distillery.files import staged_directory

ID_CLASSES = ("disc", "square", "triangle", "plus", "ring", "star", "hexagon", "crescent", "arrow", "ell")
NEAR_OOD_CLASSES = ("pentagon", "star4", "semicircle", "tee", "heart")
SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled, so edges are anti-aliased
SPLIT_IDS = {"train": 1, "val": 2, "ood/near": 3, "ood/far": 4, "retrieval": 5, "transfer/train": 6, "transfer/val": 7}


@dataclass(frozen=True)
class SynthConfig:
    seed: int = 0
    size: int = 32
    train: int = 5000
    val: int = 1000
    ood_near: int = 500
    ood_far: int = 500
    landmarks: int = 12
    distractors: int = 120
    shard_size: int = 500
    image_format: str = "jpg"
    workers: int = 2

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ConfigError(f"--size must be at least 16 px, got {self.size}")
        if self.image_format not in ("jpg", "png"):
            raise ConfigError(f"--format must be jpg or png, got {self.image_format!r}")
        if min(self.train, self.val, self.ood_near, self.ood_far, self.landmarks, self.distractors) < 0:
            raise ConfigError("image counts cannot be negative")
        if self.landmarks >= len(ID_CLASSES) * len(PATTERNS):
            raise ConfigError(f"--landmarks must be below {len(ID_CLASSES) * len(PATTERNS)}: each landmark's object "
                             "is a shape and pattern of its own")


# ---------------------------------------------------------------- shapes: unit-radius outlines, centred at 0

def _regular(n: int, phase: float = 0.0) -> list[tuple[float, float]]:
    return [(math.cos(phase + 2 * math.pi * k / n), math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _star(points: int, inner: float) -> list[tuple[float, float]]:
    return [
        (r * math.cos(math.pi * k / points - math.pi / 2), r * math.sin(math.pi * k / points - math.pi / 2))
        for k, r in ((k, 1.0 if k % 2 == 0 else inner) for k in range(2 * points))
    ]


def _arc(start: float, end: float, n: int = 24, radius: float = 1.0, centre=(0.0, 0.0)) -> list[tuple[float, float]]:
    return [(centre[0] + radius * math.cos(start + (end - start) * k / (n - 1)),
             centre[1] + radius * math.sin(start + (end - start) * k / (n - 1))) for k in range(n)]


# Each shape is a list of (polygon, fill) parts in unit coordinates; fill 0 cuts a hole.
SHAPES: dict[str, list[tuple[list[tuple[float, float]], int]]] = {
    "disc": [(_arc(0, 2 * math.pi, 48), 1)],
    "square": [(_regular(4, math.pi / 4), 1)],
    "triangle": [(_regular(3, -math.pi / 2), 1)],
    "plus": [([(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
               (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)], 1)],
    "ring": [(_arc(0, 2 * math.pi, 48), 1), (_arc(0, 2 * math.pi, 48, 0.55), 0)],
    "star": [(_star(5, 0.42), 1)],
    "hexagon": [(_regular(6), 1)],
    "crescent": [(_arc(0, 2 * math.pi, 48), 1), (_arc(0, 2 * math.pi, 48, 0.85, (0.45, 0.0)), 0)],
    "arrow": [([(-1, -0.25), (0.2, -0.25), (0.2, -0.7), (1, 0), (0.2, 0.7), (0.2, 0.25), (-1, 0.25)], 1)],
    "ell": [([(-0.7, -1), (-0.15, -1), (-0.15, 0.45), (0.7, 0.45), (0.7, 1), (-0.7, 1)], 1)],
    "pentagon": [(_regular(5, -math.pi / 2), 1)],
    "star4": [(_star(4, 0.4), 1)],
    "semicircle": [(_arc(0, math.pi, 32) + [(1.0, 0.0)], 1)],
    "tee": [([(-1, -1), (1, -1), (1, -0.45), (0.28, -0.45), (0.28, 1), (-0.28, 1), (-0.28, -0.45), (-1, -0.45)], 1)],
    "heart": [(_arc(math.pi, 2 * math.pi, 16, 0.5, (-0.45, -0.2)) + _arc(math.pi, 2 * math.pi, 16, 0.5, (0.45, -0.2))
               + [(0.0, 1.0)], 1)],
}


# ---------------------------------------------------------------- factors: what each ID image is drawn from

# Every ID image records its factor values (indices into these tuples) in its .json, so any factor can be
# the label of an evaluation. They are drawn independently, so one factor tells nothing about another.
PATTERNS = ("solid", "stripes", "checks", "dots")
BACKGROUNDS = ("plain", "noise", "lines", "clutter")
COLOURS = ("red", "yellow", "green", "cyan", "blue", "magenta")  # hue families, 60 degrees each
FACTORS = {"shape": ID_CLASSES, "pattern": PATTERNS, "background": BACKGROUNDS, "colour": COLOURS}


def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    """RGB in 0..255 for a hue in degrees."""
    h = (hue % 360) / 60
    c = value * saturation
    x = c * (1 - abs(h % 2 - 1))
    r, g, b = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h) % 6]
    return np.array([r, g, b], np.float32) * 255 + (value - c) * 255


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _family_colour(rng: np.random.Generator, family: int) -> np.ndarray:
    """A saturated colour whose hue lies in the family's 60-degree band."""
    return _hsv(60 * family + rng.uniform(-25, 25), rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))


def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    return yy, xx


def _blend(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    return a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]


def _smooth_noise(rng: np.random.Generator, side: int, cells: int) -> np.ndarray:
    coarse = rng.random((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC),
                      np.float32) / 255


def _background(rng: np.random.Generator, family: int, side: int, avoid_hue: float) -> Image.Image:
    """A ground of the given family, in a hue at least 90 degrees away from the object's."""
    hue = avoid_hue + rng.uniform(90, 270)
    base = _hsv(hue, rng.uniform(0.0, 0.6), rng.uniform(0.25, 0.9))
    other = (base + rng.uniform(-60, 60, 3)).clip(0, 255)
    yy, xx = _grid(side)
    name = BACKGROUNDS[family]
    if name in ("plain", "clutter"):
        angle = rng.uniform(0, 2 * math.pi)
        t = (xx * math.cos(angle) + yy * math.sin(angle) + 1) / 2
    elif name == "noise":
        t = _smooth_noise(rng, side, int(rng.integers(5, 9)))
    else:  # thin parallel lines
        angle = rng.uniform(0, math.pi)
        t = (np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi * rng.uniform(5, 8)) > 0.6)
        t = t.astype(np.float32)
    canvas = Image.fromarray(_blend(base, other, t).clip(0, 255).astype(np.uint8), "RGB")
    if name == "clutter":
        _clutter(canvas, rng, int(rng.integers(5, 9)), size=(0.03, 0.07))
    return canvas


def _pattern_fill(rng: np.random.Generator, pattern: int, side: int, colour: np.ndarray, radius: float) -> Image.Image:
    """The object's fill: its colour, patterned with a second tone of the same hue at a scale tied to its size."""
    yy, xx = _grid(side)
    second = (colour * rng.uniform(0.25, 0.5)).clip(0, 255) if rng.random() < 0.5 else \
        (colour + (255 - colour) * rng.uniform(0.55, 0.8)).clip(0, 255)
    period = radius / side * rng.uniform(0.55, 0.75)  # about three stripes, cells or dots across the object
    angle = rng.uniform(0, math.pi)
    u = (xx * math.cos(angle) + yy * math.sin(angle)) / period
    v = (-xx * math.sin(angle) + yy * math.cos(angle)) / period
    name = PATTERNS[pattern]
    if name == "solid":
        t = np.zeros_like(xx)
    elif name == "stripes":
        t = (np.floor(u * 2) % 2).astype(np.float32)
    elif name == "checks":
        t = ((np.floor(u * 1.5) + np.floor(v * 1.5)) % 2).astype(np.float32)
    else:  # dots on a square lattice
        t = (((u % 1 - 0.5) ** 2 + (v % 1 - 0.5) ** 2) < 0.27 ** 2).astype(np.float32)
    return Image.fromarray(_blend(colour, second, t).clip(0, 255).astype(np.uint8), "RGB")


def _shape_mask(name: str, side: int, centre: tuple[float, float], radius: float, angle: float,
                aspect: float) -> Image.Image:
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    cos, sin = math.cos(angle), math.sin(angle)
    for polygon, fill in SHAPES[name]:
        points = [(centre[0] + radius * (x * aspect * cos - y * sin), centre[1] + radius * (x * aspect * sin + y * cos))
                  for x, y in polygon]
        draw.polygon(points, fill=255 * fill)
    return mask


@dataclass(frozen=True)
class ObjectDraw:
    """Everything that decides one object: its factors and its pose (in canvas pixels)."""

    shape: str
    pattern: int
    family: int
    colour: tuple[float, float, float]
    centre: tuple[float, float]
    radius: float
    angle: float
    aspect: float


def _draw_object(rng: np.random.Generator, shape: str, side: int, scale: tuple[float, float], margin: float,
                 rotation: float, pattern: int | None = None, family: int | None = None) -> ObjectDraw:
    pattern = int(rng.integers(len(PATTERNS))) if pattern is None else pattern
    family = int(rng.integers(len(COLOURS))) if family is None else family
    colour = tuple(float(c) for c in _family_colour(rng, family))
    radius = rng.uniform(*scale) * side / 2
    centre = tuple(float(c) for c in rng.uniform(side / 2 - margin * side / 2, side / 2 + margin * side / 2, 2))
    return ObjectDraw(shape, pattern, family, colour, centre, radius, rng.uniform(-rotation, rotation),
                      rng.uniform(0.85, 1.15))


def _paste_object(canvas: Image.Image, rng: np.random.Generator, obj: ObjectDraw) -> None:
    side = canvas.size[0]
    mask = _shape_mask(obj.shape, side, obj.centre, obj.radius, obj.angle, obj.aspect)
    canvas.paste(_pattern_fill(rng, obj.pattern, side, np.array(obj.colour, np.float32), obj.radius), (0, 0), mask)


def _clutter(canvas: Image.Image, rng: np.random.Generator, count: int, size: tuple[float, float] = (0.04, 0.12)) -> None:
    side = canvas.size[0]
    draw = ImageDraw.Draw(canvas)
    for _ in range(count):
        x, y = rng.uniform(0, side, 2)
        r = rng.uniform(*size) * side
        if rng.random() < 0.5:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=_colour(rng))
        else:
            dx, dy = rng.uniform(-2 * r, 2 * r, 2)
            draw.line([(x, y), (x + dx, y + dy)], fill=_colour(rng), width=max(1, int(r / 3)))


def _finish(canvas: Image.Image, size: int) -> Image.Image:
    return canvas.resize((size, size), Image.LANCZOS)


@dataclass(frozen=True)
class ObjectLayers:
    """An object image before compositing, at the supersampled side: what the ImageNet-9-style variants
    recombine (a foreground on another image's ground, a ground without its foreground)."""

    ground: Image.Image
    fill: Image.Image  # the object's patterned fill over the whole canvas
    mask: Image.Image  # L: where the object is
    factors: dict[str, int]

    def composite(self, ground: Image.Image | None = None) -> Image.Image:
        canvas = (ground or self.ground).copy()
        canvas.paste(self.fill, (0, 0), self.mask)
        return canvas


def object_layers(rng: np.random.Generator, name: str, size: int) -> ObjectLayers:
    """The layers of `render_object`'s image, drawn from `rng` in the same order (so the same bytes follow)."""
    side = size * SUPERSAMPLE
    background = int(rng.integers(len(BACKGROUNDS)))
    obj = _draw_object(rng, name, side, scale=(0.5, 0.85), margin=0.35, rotation=math.radians(45))
    ground = _background(rng, background, side, avoid_hue=60 * obj.family)
    mask = _shape_mask(obj.shape, side, obj.centre, obj.radius, obj.angle, obj.aspect)
    fill = _pattern_fill(rng, obj.pattern, side, np.array(obj.colour, np.float32), obj.radius)
    factors = {"pattern": obj.pattern, "background": background, "colour": obj.family}
    if name in ID_CLASSES:
        factors["shape"] = ID_CLASSES.index(name)
    return ObjectLayers(ground, fill, mask, factors)


def render_object(rng: np.random.Generator, name: str, size: int) -> tuple[Image.Image, dict[str, int]]:
    """One patterned object of shape `name` on a ground of a random family; returns the image and its factors.

    Pose varies widely (rotation, scale, position), so pixels line up poorly between images of one shape.
    """
    layers = object_layers(rng, name, size)
    canvas = layers.composite()
    _clutter(canvas, rng, int(rng.integers(0, 2)), size=(0.03, 0.05))
    return _finish(canvas, size), layers.factors


def _texture(rng: np.random.Generator, side: int) -> Image.Image:
    """A random fill: solid, gradient, stripes, checker or smooth noise, in random colours."""
    kind = rng.integers(0, 5)
    a, b = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
    yy, xx = _grid(side)
    angle = rng.uniform(0, math.pi)
    along = xx * math.cos(angle) + yy * math.sin(angle)
    if kind == 0:
        t = np.zeros_like(xx)
    elif kind == 1:
        t = along
    elif kind == 2:
        t = (np.sin(along * 2 * math.pi * rng.uniform(2, 6)) > 0).astype(np.float32)
    elif kind == 3:
        cells = rng.uniform(2, 6)
        t = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2).astype(np.float32)
    else:
        t = _smooth_noise(rng, side, 4)
    return Image.fromarray(_blend(a, b, t).clip(0, 255).astype(np.uint8), "RGB")


def render_texture(rng: np.random.Generator, size: int) -> Image.Image:
    """Far-OOD: a texture or pixel noise with no object in it."""
    side = size * SUPERSAMPLE
    if rng.random() < 0.3:
        noise = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        return Image.fromarray(noise, "RGB")
    canvas = _texture(rng, side)
    overlay = _texture(rng, side)
    canvas = Image.blend(canvas, overlay, float(rng.uniform(0.2, 0.6)))
    return _finish(canvas, size)


# ---------------------------------------------------------------- retrieval scenes

@dataclass(frozen=True)
class Difficulty:
    rotation: float  # degrees, symmetric
    zoom: tuple[float, float]
    shift: float  # fraction of the side
    light: float  # brightness/contrast change, symmetric
    hue: float  # colour-balance change: hue rotation in degrees, symmetric
    occlusion: tuple[float, float]  # fraction of the side covered by an occluder


# Views change colour balance as well as viewpoint and light, so a landmark is found by what it is (its
# objects' shapes and patterns), not by its colours: a colour histogram scores below a learned model.
EASY = Difficulty(rotation=10, zoom=(0.9, 1.1), shift=0.05, light=0.15, hue=60, occlusion=(0.0, 0.05))
HARD = Difficulty(rotation=35, zoom=(0.75, 1.35), shift=0.12, light=0.35, hue=180, occlusion=(0.05, 0.15))
JUNK = Difficulty(rotation=90, zoom=(2.8, 4.0), shift=0.35, light=0.6, hue=180, occlusion=(0.65, 0.8))


def main_objects(seed: int, landmarks: int, distractors: int) -> list[tuple[str, int]]:
    """(shape, pattern) of each scene's main object: landmarks first, then distractors. Every landmark has a
    combination of its own that no distractor shares, so what identifies a landmark is its object."""
    combos = [(shape, pattern) for shape in ID_CLASSES for pattern in range(len(PATTERNS))]
    order = [combos[int(i)] for i in np.random.default_rng([seed, SPLIT_IDS["retrieval"], 1]).permutation(len(combos))]
    landmark_combos, others = order[:landmarks], order[landmarks:]
    return landmark_combos + [others[d % len(others)] for d in range(distractors)]


def _landmark_scene(seed: int, landmark: int, side: int, main_object: tuple[str, int]) -> Image.Image:
    """A fixed scene: one large object of the given shape and pattern on its own ground, with a few smaller
    objects around it; the same pixels every time it is asked for, drawn larger than the view."""
    rng = np.random.default_rng([seed, SPLIT_IDS["retrieval"], 10_000 + landmark])
    names = list(ID_CLASSES)
    main = _draw_object(rng, main_object[0], side, scale=(0.6, 0.75), margin=0.05, rotation=math.pi,
                        pattern=main_object[1])
    canvas = _background(rng, int(rng.integers(len(BACKGROUNDS))), side, avoid_hue=60 * main.family)
    for _ in range(int(rng.integers(3, 6))):
        other = _draw_object(rng, names[int(rng.integers(len(names)))], side, scale=(0.1, 0.16), margin=0.8,
                             rotation=math.pi)
        _paste_object(canvas, rng, other)
    _paste_object(canvas, rng, main)
    return canvas


def _rotate_hue(image: Image.Image, degrees: float) -> Image.Image:
    hsv = np.asarray(image.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(round(degrees / 360 * 256))) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def _render_view(scene: Image.Image, rng: np.random.Generator, d: Difficulty, size: int) -> Image.Image:
    """Look at the middle of a scene from a changed viewpoint, under changed light and colour balance,
    partly occluded."""
    side = scene.size[0]
    angle = math.radians(rng.uniform(-d.rotation, d.rotation))
    zoom = rng.uniform(*d.zoom)
    view = side / 2 / zoom  # half-width of the visible window in scene pixels (the view shows half the scene)
    cx, cy = side / 2 + rng.uniform(-d.shift, d.shift, 2) * side
    cos, sin = math.cos(angle), math.sin(angle)
    out = size * SUPERSAMPLE
    step = 2 * view / out
    # PIL's affine maps output pixels to input pixels: (x, y) -> (a x + b y + c, d x + e y + f)
    a, b, e_ = step * cos, -step * sin, step * cos
    d_ = step * sin
    c = cx - (a * out / 2 + b * out / 2)
    f = cy - (d_ * out / 2 + e_ * out / 2)
    ground = tuple(int(v) for v in np.asarray(scene).reshape(-1, 3).mean(0))  # what lies beyond the scene
    image = scene.transform((out, out), Image.AFFINE, (a, b, c, d_, e_, f), resample=Image.BILINEAR, fillcolor=ground)
    image = _rotate_hue(image, rng.uniform(-d.hue, d.hue))
    pixels = np.asarray(image, np.float32)
    gain, offset = 1 + rng.uniform(-d.light, d.light), rng.uniform(-d.light, d.light) * 128
    tint = 1 + rng.uniform(-d.light, d.light, 3) / 2
    image = Image.fromarray((pixels * gain * tint + offset).clip(0, 255).astype(np.uint8), "RGB")
    cover = rng.uniform(*d.occlusion)
    if cover > 0:  # a blotchy ellipse, so that the occluder itself reads as no shape of the data
        w = int(out * math.sqrt(cover * 4 / math.pi))
        x0, y0 = (int(v) for v in rng.integers(0, out - w + 1, 2))
        mask = Image.new("L", (out, out), 0)
        ImageDraw.Draw(mask).ellipse([x0, y0, x0 + w, y0 + w], fill=255)
        blotch = _blend(np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32), _smooth_noise(rng, out, 6))
        image.paste(Image.fromarray(blotch.clip(0, 255).astype(np.uint8), "RGB"), (0, 0), mask)
    return _finish(image, size)


# ---------------------------------------------------------------- writing

@dataclass(frozen=True)
class _Job:
    split: str
    index: int
    kind: str  # "object", "texture"
    name: str


def _render_job(args: tuple[SynthConfig, _Job]) -> tuple[bytes, dict[str, int] | None]:
    config, job = args
    rng = np.random.default_rng([config.seed, SPLIT_IDS[job.split], job.index])
    if job.kind == "object":
        image, factors = render_object(rng, job.name, config.size)
    else:
        image, factors = render_texture(rng, config.size), None
    return _encode(image, config.image_format), factors


def _encode(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "jpg":
        image.save(buffer, "JPEG", quality=95)
    else:
        image.save(buffer, "PNG", optimize=False)
    return buffer.getvalue()


def _objects(config: SynthConfig, split: str, count: int, classes: tuple[str, ...]) -> list[_Job]:
    # Balanced classes in a seeded random order, so every shard holds a mix of all classes.
    order = np.random.default_rng([config.seed, SPLIT_IDS[split]]).permutation(count)
    return [_Job(split, i, "object", classes[int(order[i]) % len(classes)]) for i in range(count)]


def _jobs(config: SynthConfig) -> Iterator[tuple[str, list[_Job], list[str] | None]]:
    """(split, jobs, class names) for every shard split; labels are indices into the class names."""
    yield "train", _objects(config, "train", config.train, ID_CLASSES), list(ID_CLASSES)
    yield "val", _objects(config, "val", config.val, ID_CLASSES), list(ID_CLASSES)
    yield "ood/near", _objects(config, "ood/near", config.ood_near, NEAR_OOD_CLASSES), list(NEAR_OOD_CLASSES)
    yield "ood/far", [_Job("ood/far", i, "texture", "texture") for i in range(config.ood_far)], None


def _write_split(config: SynthConfig, split: str, jobs: list[_Job], classes: list[str] | None, out: Path, pool,
                 progress: Callable[[str, int], None] | None) -> None:
    """One split's images as shards under `out`, rendered by `pool`, labelled by their index in `classes`."""
    writer = ShardWriter(out, config.shard_size, prefix=split.replace("/", "-"))
    for job, (data, factors) in zip(jobs, pool.imap(_render_job, [(config, j) for j in jobs], chunksize=64)):
        label = classes.index(job.name) if classes else None
        meta = {"split": split, "kind": job.kind, "name": job.name, "seed": config.seed}
        if factors is not None:
            meta["factors"] = factors
        writer.write(f"{split.replace('/', '_')}_{job.index:07d}", data, config.image_format, label, meta,
                     size=(config.size, config.size))
        if progress:
            progress(split, 1)
    writer.close(classes, {name: list(values) for name, values in FACTORS.items()
                           if name != "shape" or split in ("train", "val")} if classes else None)


def _pool(config: SynthConfig):
    return multiprocessing.get_context("fork").Pool(config.workers) if config.workers > 1 else _InlinePool()


def generate(config: SynthConfig, out: str | os.PathLike, progress: Callable[[str, int], None] | None = None) -> dict:
    """Write the whole embedded dataset under `out`; returns a summary of what was written.

    `progress(task, n)` is told about every image written, for a progress bar.
    """
    summary: dict[str, int] = {}
    with staged_directory(out) as partial, _pool(config) as pool:
        for split, jobs, classes in _jobs(config):
            _write_split(config, split, jobs, classes, partial / split, pool, progress)
            summary[split] = len(jobs)
        summary["retrieval"] = _write_retrieval(config, partial / "retrieval", progress)
        recorded = {k: v for k, v in asdict(config).items() if k != "workers"}  # workers change nothing written
        (partial / "synth.json").write_text(json.dumps({"config": recorded, "counts": summary}, indent=1))
    return summary


class _InlinePool:
    """`multiprocessing.Pool`'s imap, in this process (for --workers 1)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap(fn, items, chunksize=1):
        return map(fn, items)


def generate_transfer(config: SynthConfig, out: str | os.PathLike, train: int, val: int) -> int:
    """OUT/train and OUT/val: the five held-out shapes as a labelled set of their own, the embedded counterpart
    of the papers' transfer suites (classes no model was trained or distilled on; the same shapes as near-OOD,
    other images). Returns the number of images."""
    with staged_directory(out) as partial, _pool(config) as pool:
        for part, count in (("train", train), ("val", val)):
            split = f"transfer/{part}"
            _write_split(config, split, _objects(config, split, count, NEAR_OOD_CLASSES), list(NEAR_OOD_CLASSES),
                         partial / part, pool, None)
    return train + val


def _write_retrieval(config: SynthConfig, root: Path, progress: Callable[[str, int], None] | None) -> int:
    """Landmark views and distractors in the revisitop layout; returns the number of images."""
    size = 2 * config.size  # queries get cropped to their box, so retrieval images are drawn larger
    scene_side = 2 * size * SUPERSAMPLE
    (root / "jpg").mkdir(parents=True)
    rng = np.random.default_rng([config.seed, SPLIT_IDS["retrieval"]])
    mains = main_objects(config.seed, config.landmarks, config.distractors)
    imlist, qimlist, gnd = [], [], []
    database: list[tuple[str, Image.Image]] = []
    per_landmark: list[dict[str, list[int]]] = []
    for landmark in range(config.landmarks):
        scene = _landmark_scene(config.seed, landmark, scene_side, mains[landmark])
        groups: dict[str, list[int]] = {"easy": [], "hard": [], "junk": []}
        for group, difficulty, count in (("easy", EASY, 4), ("hard", HARD, 4), ("junk", JUNK, 2)):
            for _ in range(count):
                groups[group].append(len(database))
                database.append((f"landmark{landmark:03d}_{group}{len(groups[group]):02d}",
                                 _render_view(scene, rng, difficulty, size)))
        per_landmark.append(groups)
        for q in range(2):
            name = f"query_landmark{landmark:03d}_{q}"
            image = _render_view(scene, rng, EASY, size)
            # The landmark fills the middle of every view; the box marks it, leaving the border out.
            margin = int(rng.integers(size // 8, size // 5 + 1))
            qimlist.append(name)
            gnd.append({**{k: list(v) for k, v in groups.items()},
                        "bbx": [margin, margin, size - margin, size - margin]})
            _save(image, root / "jpg" / f"{name}.jpg", progress)
    for d in range(config.distractors):
        scene = _landmark_scene(config.seed, config.landmarks + 1 + d, scene_side, mains[config.landmarks + d])
        database.append((f"distractor{d:04d}", _render_view(scene, rng, EASY, size)))
    # Database order is shuffled so that index order carries no hint of the answer.
    order = rng.permutation(len(database))
    position = {int(old): new for new, old in enumerate(order)}
    for old in order:
        name, image = database[int(old)]
        imlist.append(name)
        _save(image, root / "jpg" / f"{name}.jpg", progress)
    for entry in gnd:
        for group in ("easy", "hard", "junk"):
            entry[group] = sorted(position[i] for i in entry[group])
    with open(root / "gnd_synth.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f, protocol=4)
    return len(imlist) + len(qimlist)


def _save(image: Image.Image, path: Path, progress: Callable[[str, int], None] | None) -> None:
    path.write_bytes(_encode(image, "jpg"))
    if progress:
        progress("retrieval", 1)


def image_counts(config: SynthConfig) -> dict[str, int]:
    """How many images each part will get (for progress bars)."""
    return {"train": config.train, "val": config.val, "ood/near": config.ood_near, "ood/far": config.ood_far,
            "retrieval": config.landmarks * 12 + config.distractors}
