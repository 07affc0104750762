"""ImageFolder (`root/<class>/<image>`, the ImageNet layout) to webdataset shards.

Each file is decoded once to prove it is an image; undecodable and non-image files are skipped, listed in
`conversion.json` and counted. Samples are written in a seeded random order, so every shard holds a mix
of classes (training shuffles within whole shards). JPEG, PNG and WebP bytes are kept as they are; other
formats are re-encoded losslessly as PNG.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from distillery.data.shards import ShardError, ShardWriter
from distillery.errors import DistilleryError
from distillery.files import staged_directory

KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class ConversionReport:
    written: int = 0
    shards: int = 0
    classes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)


def read_listing(listing: Path, layout: str, entries: str) -> list[str]:
    """The non-empty lines of a dataset's split listing (DAVIS `ImageSets/2017/<split>.txt`, VOC
    `ImageSets/Segmentation/<split>.txt`); a missing or empty one is an error naming it."""
    if not listing.is_file():
        raise DistilleryError(f"{listing}: no such file (expected the {layout} layout under {listing.parents[2]})")
    names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    if not names:
        raise DistilleryError(f"{listing}: lists no {entries}")
    return names


def find_classes(root: Path, classes_file: str | os.PathLike | None) -> list[str]:
    present = sorted(p.name for p in root.iterdir() if p.is_dir())
    if classes_file is None:
        if not present:
            raise ShardError(f"{root}: no class sub-directories (expected root/<class>/<image>)")
        return present
    classes = json.loads(Path(classes_file).read_text())
    unknown = sorted(set(present) - set(classes))
    if unknown:
        raise ShardError(f"{root}: class directories not in {classes_file}: {', '.join(unknown[:5])}")
    return classes


def _load(path: str) -> tuple[bytes | None, str, str | None]:
    """(bytes to store, extension, error); decoding the whole image catches truncated files too."""
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format
            image.load()
            if image_format in KEPT_FORMATS:
                return data, KEPT_FORMATS[image_format], None
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, "PNG")
            return buffer.getvalue(), "png", None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return None, "", f"{type(error).__name__}: {error}"


def _key(relative: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", relative)


def convert_image_folder(root: str | os.PathLike, out: str | os.PathLike, shard_size: int = 1000, seed: int = 0,
                         classes_file: str | os.PathLike | None = None, workers: int = 2,
                         progress: Callable[[int], None] | None = None,
                         on_start: Callable[[int], None] | None = None) -> ConversionReport:
    root = Path(root)
    if not root.is_dir():
        raise ShardError(f"{root}: no such directory")
    classes = find_classes(root, classes_file)
    report = ConversionReport(classes=classes)
    files: list[tuple[str, int]] = []
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(root).as_posix()
        class_name = relative.split("/", 1)[0]
        if "/" not in relative or class_name not in classes:
            report.skipped.append((relative, "not inside a class directory"))
            continue
        files.append((relative, classes.index(class_name)))
    order = np.random.default_rng(seed).permutation(len(files))
    files = [files[i] for i in order]
    if on_start:
        on_start(len(files))
    context = multiprocessing.get_context("fork")
    with staged_directory(out) as staging, context.Pool(max(1, workers)) as pool:
        writer = ShardWriter(staging, shard_size)
        loaded = pool.imap(_load, [str(root / relative) for relative, _ in files], chunksize=16)
        for (relative, label), (data, ext, error) in zip(files, loaded, strict=True):
            if progress:
                progress(1)
            if error is not None:
                report.skipped.append((relative, error))
                continue
            with Image.open(io.BytesIO(data)) as image:
                size = image.size
            writer.write(_key(relative), data, ext, label, {"path": relative, "class": classes[label]}, size)
            report.written += 1
        if report.written == 0:
            raise ShardError(f"{root}: no decodable image found ({len(report.skipped)} files skipped)")
        report.shards = len(writer.close(classes))
        (staging / "conversion.json").write_text(json.dumps(
            {"source": str(root), "written": report.written, "seed": seed, "shard_size": shard_size,
             "skipped": [{"path": p, "reason": r} for p, r in report.skipped]}, indent=1))
    return report
