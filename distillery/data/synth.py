"""The embedded dataset: seeded procedural images in the real on-disk formats.

There is no ImageNet and no pretrained weight here, so tests, the demo and the benchmarks run on this.
Every image is a pure function of `(seed, split, index)`, drawn with its own numpy generator, so the
output is byte-identical for a seed however the work is split across processes.

- ID classes: ten shape families. Colour, texture, scale, rotation, position, background and clutter are
  random and independent of the class, so raw pixels are a poor classifier (README: pixel kNN baseline)
  while the shape stays learnable.
- near-OOD: five held-out shapes that resemble ID ones (pentagon vs hexagon, 4- vs 5-point star, ...).
- far-OOD: textures and noise with no object.
- retrieval: fixed "landmark" scenes re-rendered under viewpoint, lighting and occlusion changes
  (mild = easy, strong = hard, unrecognisable = junk) plus distractor scenes, in the revisited
  Oxford/Paris layout (`gnd_synth.pkl` + `jpg/`).
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
from PIL import Image, ImageDraw, ImageFilter

from distillery.data.shards import ShardWriter, staged_directory

ID_CLASSES = ("disc", "square", "triangle", "plus", "ring", "star", "hexagon", "crescent", "arrow", "ell")
NEAR_OOD_CLASSES = ("pentagon", "star4", "semicircle", "tee", "heart")
SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled, so edges are anti-aliased
SPLIT_IDS = {"train": 1, "val": 2, "ood/near": 3, "ood/far": 4, "retrieval": 5}


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
            raise ValueError(f"--size must be at least 16 px, got {self.size}")
        if self.image_format not in ("jpg", "png"):
            raise ValueError(f"--format must be jpg or png, got {self.image_format!r}")
        if min(self.train, self.val, self.ood_near, self.ood_far, self.landmarks, self.distractors) < 0:
            raise ValueError("image counts cannot be negative")


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


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _texture(rng: np.random.Generator, side: int, with_noise: bool = True) -> Image.Image:
    """A random fill: solid, gradient, stripes, checker or smooth noise, in random colours."""
    kind = rng.integers(0, 5 if with_noise else 4)
    a, b = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
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
        coarse = rng.random((4, 4)).astype(np.float32)
        t = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC),
                       np.float32) / 255
    pixels = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")


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


def _contrasting(rng: np.random.Generator, against: np.ndarray, distance: float = 110.0) -> tuple[int, int, int]:
    """A random colour at least `distance` (RGB L2) from `against`, so the object stands out of its ground."""
    for _ in range(32):
        colour = np.array(_colour(rng), np.float32)
        if np.linalg.norm(colour - against) >= distance:
            break
    return tuple(int(c) for c in colour)


def _smooth_background(rng: np.random.Generator, side: int) -> Image.Image:
    """A low-contrast ground: solid, gradient or soft noise between two nearby colours."""
    base = np.array(_colour(rng), np.float32)
    other = (base + rng.uniform(-50, 50, 3)).clip(0, 255)
    kind = rng.integers(0, 3)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    if kind == 0:
        t = np.zeros_like(xx)
    elif kind == 1:
        angle = rng.uniform(0, 2 * math.pi)
        t = (xx * math.cos(angle) + yy * math.sin(angle) + 1) / 2
    else:
        coarse = rng.random((3, 3)).astype(np.float32)
        t = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC), np.float32) / 255
    pixels = base[None, None] * (1 - t[..., None]) + other[None, None] * t[..., None]
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")


def _fill(rng: np.random.Generator, side: int, against: np.ndarray) -> Image.Image:
    """An object's fill: solid (most often), stripes or checks, in colours that contrast with the ground."""
    a = np.array(_contrasting(rng, against), np.float32)
    kind = rng.choice(3, p=[0.6, 0.2, 0.2])
    if kind == 0:
        return Image.new("RGB", (side, side), tuple(int(c) for c in a))
    b = np.array(_contrasting(rng, against), np.float32)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    if kind == 1:
        angle = rng.uniform(0, math.pi)
        t = (np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi * rng.uniform(2, 4)) > 0)
    else:
        cells = rng.uniform(2, 4)
        t = (np.floor(xx * cells) + np.floor(yy * cells)) % 2 > 0
    pixels = np.where(t[..., None], b[None, None], a[None, None])
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def _paste_shape(canvas: Image.Image, rng: np.random.Generator, name: str, scale: tuple[float, float],
                 margin: float = 0.5, rotation: float = math.pi) -> tuple[float, float, float]:
    side = canvas.size[0]
    radius = rng.uniform(*scale) * side / 2
    centre = tuple(rng.uniform(side / 2 - margin * side / 2, side / 2 + margin * side / 2, 2))
    mask = _shape_mask(name, side, centre, radius, rng.uniform(-rotation, rotation), rng.uniform(0.85, 1.15))
    ground = np.asarray(canvas, np.float32).reshape(-1, 3).mean(0)
    canvas.paste(_fill(rng, side, ground), (0, 0), mask)
    if rng.random() < 0.5:  # a contrasting outline on half the objects
        edge = mask.filter(ImageFilter.MaxFilter(5)).point(lambda v: 255 if v else 0)
        outline = Image.new("L", (side, side), 0)
        outline.paste(edge, (0, 0), Image.eval(mask, lambda v: 255 - v))
        canvas.paste(Image.new("RGB", (side, side), _colour(rng)), (0, 0), outline)
    return centre[0], centre[1], radius


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


def render_object(rng: np.random.Generator, name: str, size: int) -> Image.Image:
    """One object of shape `name` on a random smooth ground with a little clutter, some of it in front."""
    side = size * SUPERSAMPLE
    canvas = _smooth_background(rng, side)
    _clutter(canvas, rng, int(rng.integers(0, 3)), size=(0.03, 0.08))
    _paste_shape(canvas, rng, name, scale=(0.6, 0.9), margin=0.35, rotation=math.radians(10))
    _clutter(canvas, rng, int(rng.integers(0, 2)), size=(0.03, 0.06))
    return _finish(canvas, size)


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
    occlusion: tuple[float, float]  # fraction of the side covered by an occluder


EASY = Difficulty(rotation=8, zoom=(0.92, 1.08), shift=0.05, light=0.1, occlusion=(0.0, 0.15))
HARD = Difficulty(rotation=35, zoom=(0.7, 1.45), shift=0.15, light=0.35, occlusion=(0.3, 0.5))
JUNK = Difficulty(rotation=90, zoom=(2.8, 4.0), shift=0.35, light=0.6, occlusion=(0.65, 0.8))


def _landmark_scene(seed: int, landmark: int, side: int) -> Image.Image:
    """A fixed scene: the same pixels every time it is asked for, drawn larger than the view."""
    rng = np.random.default_rng([seed, SPLIT_IDS["retrieval"], 10_000 + landmark])
    canvas = _texture(rng, side)
    names = list(ID_CLASSES + NEAR_OOD_CLASSES)
    for _ in range(int(rng.integers(3, 6))):
        _paste_shape(canvas, rng, names[int(rng.integers(len(names)))], scale=(0.15, 0.35), margin=0.55)
    return canvas


def _render_view(scene: Image.Image, rng: np.random.Generator, d: Difficulty, size: int) -> Image.Image:
    """Look at the middle of a scene from a changed viewpoint, under changed light, partly occluded."""
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
    pixels = np.asarray(image, np.float32)
    gain, offset = 1 + rng.uniform(-d.light, d.light), rng.uniform(-d.light, d.light) * 128
    tint = 1 + rng.uniform(-d.light, d.light, 3) / 2
    image = Image.fromarray((pixels * gain * tint + offset).clip(0, 255).astype(np.uint8), "RGB")
    cover = rng.uniform(*d.occlusion)
    if cover > 0:
        w = h = int(out * math.sqrt(cover))
        x0, y0 = (int(v) for v in rng.integers(0, out - w + 1, 2))
        image.paste(_texture(rng, out).crop((0, 0, w, h)), (x0, y0))
    return _finish(image, size)


# ---------------------------------------------------------------- writing

@dataclass(frozen=True)
class _Job:
    split: str
    index: int
    kind: str  # "object", "texture"
    name: str


def _render_job(args: tuple[SynthConfig, _Job]) -> bytes:
    config, job = args
    rng = np.random.default_rng([config.seed, SPLIT_IDS[job.split], job.index])
    if job.kind == "object":
        image = render_object(rng, job.name, config.size)
    else:
        image = render_texture(rng, config.size)
    return _encode(image, config.image_format)


def _encode(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "jpg":
        image.save(buffer, "JPEG", quality=95)
    else:
        image.save(buffer, "PNG", optimize=False)
    return buffer.getvalue()


def _jobs(config: SynthConfig) -> Iterator[tuple[str, list[_Job], list[str] | None]]:
    """(split, jobs, class names) for every shard split; labels are indices into the class names."""
    def objects(split: str, count: int, classes: tuple[str, ...]) -> list[_Job]:
        # Balanced classes in a seeded random order, so every shard holds a mix of all classes.
        order = np.random.default_rng([config.seed, SPLIT_IDS[split]]).permutation(count)
        return [_Job(split, i, "object", classes[int(order[i]) % len(classes)]) for i in range(count)]

    yield "train", objects("train", config.train, ID_CLASSES), list(ID_CLASSES)
    yield "val", objects("val", config.val, ID_CLASSES), list(ID_CLASSES)
    yield "ood/near", objects("ood/near", config.ood_near, NEAR_OOD_CLASSES), list(NEAR_OOD_CLASSES)
    yield "ood/far", [_Job("ood/far", i, "texture", "texture") for i in range(config.ood_far)], None


def generate(config: SynthConfig, out: str | os.PathLike, progress: Callable[[str, int], None] | None = None) -> dict:
    """Write the whole embedded dataset under `out`; returns a summary of what was written.

    `progress(task, n)` is told about every image written, for a progress bar.
    """
    summary: dict[str, int] = {}
    context = multiprocessing.get_context("fork")
    with staged_directory(out) as partial, \
            (context.Pool(config.workers) if config.workers > 1 else _InlinePool()) as pool:
        for split, jobs, classes in _jobs(config):
            writer = ShardWriter(partial / split, config.shard_size, prefix=split.replace("/", "-"))
            for job, data in zip(jobs, pool.imap(_render_job, [(config, j) for j in jobs], chunksize=64)):
                label = classes.index(job.name) if classes else None
                meta = {"split": split, "kind": job.kind, "name": job.name, "seed": config.seed}
                writer.write(f"{split.replace('/', '_')}_{job.index:07d}", data, config.image_format, label, meta,
                             size=(config.size, config.size))
                if progress:
                    progress(split, 1)
            writer.close(classes)
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


def _write_retrieval(config: SynthConfig, root: Path, progress: Callable[[str, int], None] | None) -> int:
    """Landmark views and distractors in the revisitop layout; returns the number of images."""
    size = 2 * config.size  # queries get cropped to their box, so retrieval images are drawn larger
    scene_side = 2 * size * SUPERSAMPLE
    (root / "jpg").mkdir(parents=True)
    rng = np.random.default_rng([config.seed, SPLIT_IDS["retrieval"]])
    imlist, qimlist, gnd = [], [], []
    database: list[tuple[str, Image.Image]] = []
    per_landmark: list[dict[str, list[int]]] = []
    for landmark in range(config.landmarks):
        scene = _landmark_scene(config.seed, landmark, scene_side)
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
        scene = _landmark_scene(config.seed, config.landmarks + 1 + d, scene_side)
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
