"""Frozen features for evaluation: any model spec, on shards, an ImageFolder tree or a list of image files.

Every task scores features from here. A model is anything `create_teacher` opens (timm names, `hf-hub:`,
`local-dir:`, `spec@SIZE`); it runs in eval mode under `inference_mode`, with bf16 autocast on CUDA.

- Pooling: `cls` (post-final-norm CLS, the default), `patch_mean` (mean of the post-norm patch tokens), or
  `last_blocks` (the CLS of each of the last k blocks, each through the final norm, concatenated: DINO's
  linear-evaluation input, `eval_linear.py`, n = 4 for ViT-S).
- Classification images get the model's own eval view, the one training's evaluation uses: the centred
  square of `crop_pct` of the short side resized to the input size (`views.eval_view` + `views.replay`, i.e.
  timm's resize-to-size/crop_pct + centre crop), then its mean/std.
- Retrieval images keep their aspect: the longer side becomes `max_side` (default: the model's input size),
  both sides rounded to a multiple of the patch size, and the model runs at that size (timm's
  `dynamic_img_size`). Multi-scale runs scales 1, 1/sqrt(2), 1/2 and averages the descriptors (DINO's
  `multi_scale`); the average is L2-normalised like any other descriptor.

Raw pooled features are stored as `.npz` (no pickle) with a fingerprint of the model weights, the data, the
transform and the pooling; a later call with the same fingerprint reads the file instead of running the
model, and a call with another recomputes and says what changed. L2 normalisation is applied on reading,
so one file serves tasks that want raw features (CKA, linear probe) and those that want unit vectors.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from distillery.console import console, progress_bar
from distillery.data.imagefolder import find_classes
from distillery.data.pipeline import ShardLoader, ShardStream, WorkerFailure, decode, shard_records
from distillery.data.shards import (INDEX_FILE, ImageDecodeError, ShardSet, decode_image, is_url, join_url,
                                    names_shards)
from distillery.data.views import eval_view, normalize, replay
from distillery.errors import DistilleryError
from distillery.evaluate.knn import l2_normalize
from distillery.evaluate.retrieval import crop_box
from distillery.files import atomic_path
from distillery.models.teachers import Preprocessing, Teacher, create_teacher

FORMAT = "distillery-features/1"
POOLINGS = ("cls", "patch_mean", "last_blocks")
MULTI_SCALES = (1.0, 1 / math.sqrt(2), 0.5)  # DINO eval_image_retrieval.py --multiscale
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


class Features(NamedTuple):
    features: np.ndarray  # float32 [N, D]
    labels: np.ndarray | None  # int64 [N], when the data is labelled
    keys: list[str]  # sample keys, aligned with the rows
    fingerprint: dict[str, Any]


@dataclass(frozen=True)
class Pooling:
    """Which vector of the model's output is an image's feature."""

    kind: str = "cls"
    last_blocks: int = 4  # only for kind "last_blocks"

    def __post_init__(self) -> None:
        if self.kind not in POOLINGS:
            raise DistilleryError(f"unknown pooling {self.kind!r}; choose one of {', '.join(POOLINGS)}")
        if self.last_blocks < 1:
            raise DistilleryError(f"last_blocks must be at least 1, got {self.last_blocks}")

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "last_blocks": self.last_blocks} if self.kind == "last_blocks" else {"kind": self.kind}


# ---------------------------------------------------------------------------------------------- models

def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(spec: str, device: str | None = None, any_size: bool = False) -> Teacher:
    """A frozen model from a spec. `any_size` builds a ViT with timm's `dynamic_img_size`, so it takes
    retrieval images of any shape (the position embedding is resampled to each patch grid; at the model's
    own input size nothing changes). Models without that option (convolutional nets) take any size anyway."""
    device = device or default_device()
    if any_size:
        try:
            return create_teacher(spec, device, dynamic_img_size=True)
        except TypeError as error:
            if "dynamic_img_size" not in str(error):
                raise
    return create_teacher(spec, device)


def patch_size(teacher: Teacher) -> int:
    size = getattr(getattr(teacher.model, "patch_embed", None), "patch_size", 1)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def model_device(teacher: Teacher) -> torch.device:
    return next(teacher.parameters()).device


def patch_grid(teacher: Teacher, height: int, width: int) -> tuple[int, int]:
    """The patch grid a model makes of an input of this size (timm's ViT rule, or the CNN's feature map)."""
    patch_embed = getattr(teacher.model, "patch_embed", None)
    if patch_embed is not None and hasattr(patch_embed, "dynamic_feat_size"):
        return tuple(patch_embed.dynamic_feat_size((height, width)))
    with torch.inference_mode():
        features = teacher.model.forward_features(torch.zeros(1, 3, height, width, device=model_device(teacher)))
    return tuple(features.shape[-2:])


@torch.inference_mode()
def pool_features(teacher: Teacher, images: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """[B, D] features of normalised images [B, 3, H, W]."""
    if pooling.kind == "cls":
        return teacher(images).cls
    if pooling.kind == "patch_mean":
        return teacher(images).patch.mean(1)
    if not (teacher.has_class_token and hasattr(teacher.model, "forward_intermediates")):
        raise DistilleryError(f"{teacher.spec}: last_blocks pooling needs a ViT with a class token")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.is_cuda):
        blocks = teacher.model.forward_intermediates(images, indices=pooling.last_blocks, norm=True, output_fmt="NLC",
                                                     intermediates_only=True, return_prefix_tokens=True)
    return torch.cat([prefix[:, 0] for _, prefix in blocks], dim=1).float()


# ---------------------------------------------------------------------------------------------- transforms

class Transform(Protocol):
    def render(self, image: Image.Image) -> list[torch.Tensor]:
        """uint8 [3, H, W] views of one image; their features are averaged."""

    def describe(self) -> dict[str, Any]:
        """What decides the pixels, for the fingerprint."""


@dataclass(frozen=True)
class CentreCrop:
    """The model's eval view: resize + centre crop per its pretrained_cfg, as in training's evaluation."""

    input_size: tuple[int, int]
    crop_pct: float

    @classmethod
    def of(cls, preprocessing: Preprocessing) -> CentreCrop:
        return cls(preprocessing.input_size, preprocessing.crop_pct)

    def render(self, image: Image.Image) -> list[torch.Tensor]:
        return [replay(image, eval_view(image.height, image.width, self.crop_pct), self.input_size)]

    def describe(self) -> dict[str, Any]:
        # replay resizes with antialiased bicubic whatever the pretrained_cfg's interpolation says
        return {"kind": "centre_crop", "input_size": list(self.input_size), "crop_pct": self.crop_pct,
                "interpolation": "bicubic"}


@dataclass(frozen=True)
class KeepAspect:
    """Retrieval: the whole image, longer side `max_side` (times each scale), sides a multiple of `patch`."""

    max_side: int
    patch: int
    scales: tuple[float, ...] = (1.0,)

    def size_at(self, height: int, width: int, scale: float) -> tuple[int, int]:
        longer = self.max_side * scale / max(height, width)
        return tuple(max(self.patch, int(round(side * longer / self.patch)) * self.patch) for side in (height, width))

    def render(self, image: Image.Image) -> list[torch.Tensor]:
        whole = eval_view(image.height, image.width, 1.0)
        whole[:4] = (0, 0, image.height, image.width)
        return [replay(image, whole, self.size_at(image.height, image.width, s)) for s in self.scales]

    def describe(self) -> dict[str, Any]:
        return {"kind": "keep_aspect", "max_side": self.max_side, "patch": self.patch, "scales": list(self.scales),
                "interpolation": "bicubic"}


# ---------------------------------------------------------------------------------------------- image sources

class _Item(NamedTuple):
    position: int
    key: str
    label: int | None
    views: list[torch.Tensor]
    skipped: str | None = None  # why the image gave no views (it does not decode): counted and left out


class ShardSource:
    """A webdataset shard directory; rows follow the global sample index."""

    def __init__(self, shard_set: ShardSet, name: str):
        self.shard_set, self.name = shard_set, name
        self.classes = shard_set.classes

    def __len__(self) -> int:
        return self.shard_set.num_samples

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "shards", **self.shard_set.fingerprint()}

    def dataset(self, transform: Transform) -> torch.utils.data.Dataset:
        return ShardStream(partial(_shard_items, self.shard_set, transform))


def _shard_items(shard_set: ShardSet, transform: Transform, worker: int, num_workers: int) -> Iterator[_Item]:
    """Feature extraction's pipeline source: every image of the worker's shards, rendered by `transform`."""
    shards = shard_set.assigned_shards(worker=worker, num_workers=num_workers)
    for decoded in decode(shard_records(shard_set, shards), name=partial(_sample_name, shard_set.root)):
        record = decoded.item.record
        if decoded.error is not None:
            yield _Item(record.index, record.key, record.label, [], str(decoded.error))
            continue
        yield _Item(record.index, record.key, record.label, transform.render(decoded.image))


def _sample_name(root: str, record) -> str:
    return f"{join_url(root, record.shard) if root else record.shard}:{record.key}"


@dataclass(frozen=True)
class ImageFile:
    path: Path
    key: str
    label: int | None = None
    box: tuple[float, float, float, float] | None = None  # crop to this (x1, y1, x2, y2) first


class FileSource:
    """Image files in a fixed order: an ImageFolder tree, or a retrieval database or query list."""

    def __init__(self, files: list[ImageFile], name: str, classes: tuple[str, ...] | None = None):
        self.files, self.name, self.classes = tuple(files), name, classes

    def __len__(self) -> int:
        return len(self.files)

    def fingerprint(self) -> dict[str, Any]:
        """Keys, sizes and modification times (not the bytes: checking a cached file must stay cheap)."""
        digest = hashlib.sha256()
        for f in self.files:
            try:
                stat = f.path.stat()
            except OSError as error:
                raise DistilleryError(f"{f.path}: cannot read ({error.strerror})") from error
            digest.update(json.dumps([f.key, f.label, f.box, stat.st_size, stat.st_mtime_ns]).encode())
        return {"kind": "files", "num_samples": len(self.files), "files_sha256": digest.hexdigest()}

    def dataset(self, transform: Transform) -> torch.utils.data.Dataset:
        return _FileImages(self.files, transform)


class _FileImages(torch.utils.data.Dataset):
    def __init__(self, files: tuple[ImageFile, ...], transform: Transform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, position: int) -> _Item | WorkerFailure:
        file = self.files[position]
        try:
            data = file.path.read_bytes()
        except OSError as error:  # carried, not raised: a DataLoader worker would fold a traceback into it
            return WorkerFailure(DistilleryError(f"{file.path}: cannot read ({error.strerror})"))
        try:
            image = decode_image(data, str(file.path))
        except ImageDecodeError as error:  # as `data shards` does: skipped and counted
            return _Item(position, file.key, file.label, [], str(error))
        if file.box is not None:
            image = crop_box(image, file.box)
        return _Item(position, file.key, file.label, self.transform.render(image))


ImageSource = ShardSource | FileSource


def source_name(path: str | os.PathLike) -> str:
    """A file-safe name from the last two parts of a path or URL (`synth/val` -> `synth_val`, `ood/near` ->
    `ood_near`)."""
    parts = PurePosixPath(urlparse(str(path)).path).parts[-2:] if is_url(path) else Path(path).resolve().parts[-2:]
    return "_".join(p for p in parts if p not in ("/", "")) or "data"


def open_images(path: str | os.PathLike) -> ImageSource:
    """A shard directory (`*.tar` + `shards.json`; a path or an fsspec URL), some of its shards (one `.tar`, a
    brace pattern or `pipe:` commands, as webdataset names them) or an ImageFolder tree (`root/<class>/<image>`)."""
    if names_shards(path):
        shard_set = ShardSet.open(path)
        prefix = source_name(shard_set.root) if shard_set.root else "pipe"
        return ShardSource(shard_set, f"{prefix}_{len(shard_set)}_{shard_set.shards[0].name[:-4]}")
    if is_url(path):
        return ShardSource(ShardSet.open(path), source_name(path))
    path = Path(path)
    if not path.is_dir():
        raise DistilleryError(f"{path}: no such directory (expected webdataset shards or an ImageFolder tree)")
    if (path / INDEX_FILE).exists() or any(path.glob("*.tar")):
        return ShardSource(ShardSet.open(path), source_name(path))
    classes = find_classes(path, None)
    files = [ImageFile(file, file.relative_to(path).as_posix(), label)
             for label, name in enumerate(classes)
             for file in sorted((path / name).rglob("*")) if file.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DistilleryError(f"{path}: no images in its class directories ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return FileSource(files, source_name(path), tuple(classes))


# ---------------------------------------------------------------------------------------------- extraction

@dataclass(frozen=True)
class Extraction:
    """How features are computed and where they are kept; shared by every task."""

    batch_size: int = 128
    workers: int = 2
    cache_dir: Path | None = None  # None: compute every time, keep nothing
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.workers < 0:
            raise DistilleryError(f"batch size must be >= 1 and workers >= 0, got {self.batch_size} and {self.workers}")


def features_fingerprint(teacher: Teacher, source: ImageSource, transform: Transform, pooling: Pooling) -> dict[str, Any]:
    return {"format": FORMAT, "model": teacher.fingerprint(), "data": source.fingerprint(),
            "transform": transform.describe(), "pooling": pooling.describe(),
            "mean": list(teacher.preprocessing.mean), "std": list(teacher.preprocessing.std)}


def extract_features(teacher: Teacher, source: ImageSource, extraction: Extraction, transform: Transform | None = None,
                     pooling: Pooling = Pooling(), normalized: bool = True) -> Features:
    """Features of every image of `source`, from the cache when its fingerprint matches, else computed (and cached).

    `transform` defaults to the model's eval view; `normalized` L2-normalises each row."""
    transform = transform or CentreCrop.of(teacher.preprocessing)
    fingerprint = features_fingerprint(teacher, source, transform, pooling)
    path = None
    if extraction.cache_dir is not None:
        variant = hashlib.sha256(json.dumps([fingerprint["transform"], fingerprint["pooling"]], sort_keys=True).encode())
        path = Path(extraction.cache_dir) / f"{source.name}-{pooling.kind}-{variant.hexdigest()[:8]}.npz"
    features = _read_cached(path, fingerprint) if path is not None else None
    if features is None:
        features = _compute(teacher, source, extraction, transform, pooling, fingerprint)
        if path is not None:
            _write_cached(path, features, teacher.spec)
    if normalized:
        features = features._replace(features=l2_normalize(features.features))
    return features


def _compute(teacher: Teacher, source: ImageSource, extraction: Extraction, transform: Transform, pooling: Pooling,
             fingerprint: dict[str, Any]) -> Features:
    device = next(teacher.parameters()).device
    loader = ShardLoader(source.dataset(transform), batch_size=extraction.batch_size, num_workers=extraction.workers,
                         collate_fn=list, pin_memory=device.type == "cuda")
    n = len(source)
    features: np.ndarray | None = None
    labels = np.full(n, -1, np.int64)
    keys: list[str | None] = [None] * n
    skipped: list[str] = []
    mean, std = teacher.preprocessing.mean, teacher.preprocessing.std
    with progress_bar() as progress:
        task = progress.add_task(f"features {teacher.name} / {source.name}", total=n, visible=extraction.show_progress)
        for batch in loader:
            skipped += [item.skipped for item in batch if item.skipped]
            items = [item for item in batch if not item.skipped]
            if items:
                pooled = _forward(teacher, items, pooling, mean, std, device)
                if features is None:
                    features = np.zeros((n, pooled.shape[1]), np.float32)
                features[[item.position for item in items]] = pooled
            for item in items:
                keys[item.position] = item.key
                labels[item.position] = -1 if item.label is None else item.label
            progress.advance(task, len(batch))
    kept = [i for i, key in enumerate(keys) if key is not None]
    if features is None or len(kept) + len(skipped) < n:
        raise DistilleryError(f"{source.name}: {n - len(kept) - len(skipped)} of {n} images produced no feature")
    if skipped:
        console.print(f"[yellow]{source.name}: skipped {len(skipped)} of {n} images that do not decode "
                      f"(first: {skipped[0]})[/]")
    labelled = bool((labels[kept] >= 0).all())
    return Features(features[kept], labels[kept] if labelled else None, [keys[i] for i in kept], fingerprint)


def _forward(teacher: Teacher, items: list[_Item], pooling: Pooling, mean, std, device: torch.device) -> np.ndarray:
    """Mean feature over each item's views; views of the same shape run as one batch (retrieval sizes vary)."""
    by_shape: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for row, item in enumerate(items):
        for view in item.views:
            by_shape[tuple(view.shape)].append((row, view))
    sums: torch.Tensor | None = None
    for members in by_shape.values():
        pixels = torch.stack([view for _, view in members]).to(device, non_blocking=True)
        out = pool_features(teacher, normalize(pixels, mean, std), pooling).float().cpu()
        if sums is None:
            sums = torch.zeros(len(items), out.shape[1])
        sums.index_add_(0, torch.tensor([row for row, _ in members]), out)
    counts = torch.tensor([len(item.views) for item in items], dtype=torch.float32)
    return (sums / counts[:, None]).numpy()


def _read_cached(path: Path, fingerprint: dict[str, Any]) -> Features | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            stored_fingerprint = json.loads(str(stored["fingerprint"]))
            if stored_fingerprint != fingerprint:
                changed = [k for k in fingerprint if stored_fingerprint.get(k) != fingerprint[k]]
                console.print(f"features: {path} was computed with another {', '.join(changed)}; recomputing")
                return None
            labels = stored["labels"] if "labels" in stored.files else None
            features = Features(stored["features"], labels, stored["keys"].tolist(), fingerprint)
    except (OSError, ValueError, KeyError) as error:
        console.print(f"features: {path} is unreadable ({error}); recomputing")
        return None
    console.print(f"features: reusing {path}")
    return features


def _write_cached(path: Path, features: Features, spec: str) -> None:
    """Written under a temporary name and renamed, so a file with this name is always complete. The spec is
    kept beside the fingerprint (not in it: the same weights loaded from elsewhere are the same features)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"features": features.features, "keys": np.asarray(features.keys, dtype=np.str_),
              "fingerprint": np.asarray(json.dumps(features.fingerprint, sort_keys=True)), "spec": np.asarray(spec)}
    if features.labels is not None:
        arrays["labels"] = features.labels
    with atomic_path(path) as partial, open(partial, "wb") as f:
        np.savez(f, **arrays)


def store_features(urls: list[str], view: int = 0) -> dict[str, tuple[str, Features]]:
    """Every teacher's stored CLS of one view, from stores built on the same shards (one per teacher, or
    several teachers each), keeping the rows valid in every store: teacher name -> (its spec, Features).
    No image is decoded and no teacher runs: CKA between cached teachers costs one read of their CLS."""
    from distillery.cache.store import CacheStore

    loaded, keys, valid = {}, None, None
    for url in urls:
        store = CacheStore.open(url)
        if not store.is_complete:
            raise DistilleryError(f"{url}: incomplete store; finish it with cache-teachers before comparing teachers")
        if not 0 <= view < store.num_views:
            raise DistilleryError(f"{url}: no view {view}; it holds views 0-{store.num_views - 1}")
        blocks = [store.read_block(shard, view=view, parts=("cls",)) for shard in range(store.num_shards)]
        store_keys = [str(k) for block in blocks for k in block["keys"]]
        if keys is not None and store_keys != keys:
            raise DistilleryError(f"{url} and {urls[0]} were built on other images (their sample keys differ)")
        keys = store_keys
        store_valid = np.concatenate([np.asarray(block["valid"], bool) for block in blocks])
        valid = store_valid if valid is None else valid & store_valid
        for teacher in store.teachers:
            if teacher.name in loaded:
                raise DistilleryError(f"teacher {teacher.name} is in more than one of {', '.join(urls)}")
            cls = np.concatenate([np.asarray(block[f"{teacher.name}/cls"], np.float32) for block in blocks])
            fingerprint = {"model": teacher.fingerprint,
                           "data": {"store_dataset": store.identity["dataset"], "view": view}}
            loaded[teacher.name] = (teacher.spec, cls, fingerprint)
    kept = [key for key, ok in zip(keys, valid) if ok]
    return {name: (spec, Features(cls[valid], None, kept, fingerprint))
            for name, (spec, cls, fingerprint) in loaded.items()}


def read_features_file(path: str | os.PathLike) -> tuple[str, Features]:
    """(model spec, features) from a file written by `extract_features` (raw, not normalised)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as stored:
            labels = stored["labels"] if "labels" in stored.files else None
            return str(stored["spec"]), Features(stored["features"], labels, stored["keys"].tolist(),
                                                 json.loads(str(stored["fingerprint"])))
    except (OSError, ValueError, KeyError) as error:
        raise DistilleryError(f"{path}: not a distillery features file ({error})") from error
