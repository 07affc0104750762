"""The embedded DAVIS-2017 set: short videos of the synth world's patterned shapes, with every frame annotated.

Each sequence has 10-30 frames of 1-3 objects (distinct shapes, each with its own pattern and hue) that move,
turn and change scale, bounce off the frame's edges and pass in front of one another in a fixed depth order,
over a ground that pans. The objects' masks are drawn with the frames, so every frame's annotation is exact:
an indexed PNG with 0 for the ground and k for the k-th object. Written in the DAVIS-2017 layout
(`JPEGImages/480p/<seq>/%05d.jpg`, `Annotations/480p/<seq>/%05d.png`, `ImageSets/2017/val.txt`) so that
`distillery eval davis` reads it as it reads the real set. Same seed, same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from distillery.config import ConfigError
from distillery.data.synth import (BACKGROUNDS, COLOURS, ID_CLASSES, PATTERNS, _background, _family_colour,
                                   _pattern_fill, _shape_mask)
from distillery.files import staged_directory

SPLIT_ID = 6  # after the still splits' ids in synth.SPLIT_IDS
# DAVIS's palette for the first indices (black ground, then the objects), so the PNGs look like DAVIS's.
PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0, 0, 0] * 252


@dataclass(frozen=True)
class VideoConfig:
    seed: int = 0
    size: int = 32  # frames are 3 x size wide and 2 x size high
    sequences: int = 6
    frames: tuple[int, int] = (10, 30)
    objects: tuple[int, int] = (1, 3)

    def __post_init__(self) -> None:
        if self.size < 16 or self.sequences < 1:
            raise ConfigError(f"davis set: size must be at least 16 and sequences at least 1, got {self.size}, {self.sequences}")
        if not 3 <= self.frames[0] <= self.frames[1] or not 1 <= self.objects[0] <= self.objects[1] <= 3:
            raise ConfigError("davis set: frames must be at least 3 (scoring leaves out the first and the last), "
                              "objects between 1 and 3")


@dataclass
class _Mover:
    shape: str
    fill: Image.Image  # the object's patterned fill on a canvas twice the frame's side, centred
    centre: np.ndarray
    velocity: np.ndarray
    radius: float
    growth: float  # radius change per frame, as a fraction
    angle: float
    spin: float
    aspect: float


def _movers(rng: np.random.Generator, count: int, side: int, width: int, height: int) -> list[_Mover]:
    shapes = rng.choice(len(ID_CLASSES), count, replace=False)
    movers = []
    for shape in shapes:
        radius = rng.uniform(0.16, 0.26) * height
        fill = _pattern_fill(rng, int(rng.integers(len(PATTERNS))), 2 * side,
                             _family_colour(rng, int(rng.integers(len(COLOURS)))), radius)
        centre = np.array([rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)])
        speed, heading = rng.uniform(0.02, 0.05) * width, rng.uniform(0, 2 * math.pi)
        movers.append(_Mover(ID_CLASSES[int(shape)], fill, centre, speed * np.array([math.cos(heading), math.sin(heading)]),
                             radius, rng.uniform(-0.02, 0.02), rng.uniform(0, 2 * math.pi), rng.uniform(-0.15, 0.15),
                             rng.uniform(0.85, 1.15)))
    return movers


def _step(mover: _Mover, width: int, height: int) -> None:
    mover.centre = mover.centre + mover.velocity
    for axis, limit in ((0, width), (1, height)):  # bounce off the frame's edges
        if not mover.radius * 0.5 <= mover.centre[axis] <= limit - mover.radius * 0.5:
            mover.velocity[axis] = -mover.velocity[axis]
            mover.centre[axis] = min(max(mover.centre[axis], mover.radius * 0.5), limit - mover.radius * 0.5)
    mover.angle += mover.spin
    mover.radius = float(np.clip(mover.radius * (1 + mover.growth), 0.12 * height, 0.32 * height))


def render_sequence(config: VideoConfig, index: int) -> tuple[list[Image.Image], list[np.ndarray]]:
    """Frames and annotations of sequence `index`."""
    rng = np.random.default_rng([config.seed, SPLIT_ID, index])
    width, height = 3 * config.size, 2 * config.size
    side = width
    count = int(rng.integers(config.objects[0], config.objects[1] + 1))
    frames = int(rng.integers(config.frames[0], config.frames[1] + 1))
    ground = _background(rng, int(rng.integers(len(BACKGROUNDS))), 2 * side, rng.uniform(0, 360))
    pan, pan_velocity = rng.uniform(0, side / 2, 2), rng.uniform(-1.5, 1.5, 2) * config.size / 32
    movers = _movers(rng, count, side, width, height)
    images, masks = [], []
    for _ in range(frames):
        left, top = (int(round(v)) for v in np.clip(pan, 0, side))
        canvas = ground.crop((left, top, left + side, top + side))
        label = np.zeros((side, side), np.uint8)
        for k, mover in enumerate(movers, start=1):  # later objects pass in front
            centre = (float(mover.centre[0]), float(mover.centre[1]))
            mask = _shape_mask(mover.shape, side, centre, mover.radius, mover.angle, mover.aspect)
            offset = (int(round(side - centre[0])), int(round(side - centre[1])))
            canvas.paste(mover.fill.crop((offset[0], offset[1], offset[0] + side, offset[1] + side)), (0, 0), mask)
            label[np.asarray(mask) >= 128] = k
            _step(mover, width, height)
        pan = np.clip(pan + pan_velocity, 0, side)
        images.append(canvas.crop((0, 0, width, height)))
        masks.append(label[:height, :width].copy())
    return images, masks


def generate_davis(config: VideoConfig, out: str | Path) -> int:
    """Write the set under `out` (new or empty); returns the number of frames written."""
    written = 0
    with staged_directory(out) as partial:
        names = [f"synth{index:03d}" for index in range(config.sequences)]
        for name, index in zip(names, range(config.sequences), strict=True):
            frames_dir, masks_dir = partial / "JPEGImages" / "480p" / name, partial / "Annotations" / "480p" / name
            frames_dir.mkdir(parents=True)
            masks_dir.mkdir(parents=True)
            images, masks = render_sequence(config, index)
            for t, (image, mask) in enumerate(zip(images, masks, strict=True)):
                image.save(frames_dir / f"{t:05d}.jpg", quality=95)
                annotation = Image.fromarray(mask, "P")
                annotation.putpalette(PALETTE)
                annotation.save(masks_dir / f"{t:05d}.png")
            written += len(images)
        (partial / "ImageSets" / "2017").mkdir(parents=True)
        (partial / "ImageSets" / "2017" / "val.txt").write_text("".join(f"{n}\n" for n in names))
    return written
