"""Webdataset image shards: the one reader and the one writer every stage uses.

A shard directory holds `*.tar` files in webdataset layout (`{key}.jpg|png`, `{key}.cls`, `{key}.json`),
plus `shards.json` (per shard: sample count, a hash of its keys, image size range) and, for labelled data,
`classes.json`. Every sample gets a stable global index: shards in sorted name order, then position in the
shard. Work is split by whole shards, so ranks and DataLoader workers never read the same file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import webdataset as wds
from PIL import Image, UnidentifiedImageError
from webdataset.tariterators import group_by_keys, tar_file_expander

from distillery.errors import DistilleryError
from distillery.files import partial_path, publish, write_atomic

INDEX_FILE = "shards.json"
CLASSES_FILE = "classes.json"
FACTORS_FILE = "factors.json"
CLASS_LABEL = "class"  # the label in each sample's .cls; any other label is a factor of factors.json
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
INDEX_FORMAT = "distillery-shards/1"


class ShardError(DistilleryError):
    """A shard directory or shard file that cannot be used as it is."""


class ImageDecodeError(DistilleryError):
    """An image in a shard that PIL cannot decode."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    keys_sha256: str
    min_size: tuple[int, int] | None = None  # (width, height) of the smallest image, when known
    max_size: tuple[int, int] | None = None


class Record(NamedTuple):
    """One undecoded sample: what a shard holds for a key."""

    index: int
    key: str
    image_bytes: bytes | None
    label: int | None
    meta: dict[str, Any]
    shard: str


def keys_sha256(keys: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def decode_image(data: bytes | None, where: str) -> Image.Image:
    """Decode to RGB with PIL (torchvision's decoders do not load with a CPU torch; see _torchvision_ops)."""
    if data is None:
        raise ImageDecodeError(f"{where}: sample has no image file ({'/'.join(IMAGE_EXTENSIONS)})")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageDecodeError(f"{where}: cannot decode image ({error})") from error


def names_shards(spec: str | os.PathLike) -> bool:
    """Whether a shard-set argument names shards rather than their directory: one `.tar`, or a brace pattern."""
    return str(spec).endswith(".tar") or "{" in str(spec)


def _label_files(root: Path) -> tuple[tuple[str, ...] | None, dict[str, tuple[str, ...]]]:
    """The class names (classes.json) and factor values (factors.json) a shard directory records."""
    classes = tuple(json.loads((root / CLASSES_FILE).read_text())) if (root / CLASSES_FILE).exists() else None
    factors = {}
    if (root / FACTORS_FILE).exists():
        factors = {str(k): tuple(v) for k, v in json.loads((root / FACTORS_FILE).read_text()).items()}
    return classes, factors


def _scan_shard(path: Path) -> ShardInfo:
    """Count a shard's samples from its tar headers alone (no image is read)."""
    keys: list[str] = []
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key = member.name.split(".", 1)[0]
                if not keys or keys[-1] != key:
                    keys.append(key)
    except tarfile.TarError as error:
        raise ShardError(f"{path}: not a readable tar file ({error})") from error
    return ShardInfo(name=path.name, count=len(keys), keys_sha256=keys_sha256(keys))


@dataclass(frozen=True)
class ShardSet:
    """The shards of one split, in global-index order."""

    root: Path
    shards: tuple[ShardInfo, ...]
    classes: tuple[str, ...] | None = None
    factors: dict[str, tuple[str, ...]] = field(default_factory=dict)  # factor -> value names (factors.json)
    offsets: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        offsets, total = [], 0
        for shard in self.shards:
            offsets.append(total)
            total += shard.count
        object.__setattr__(self, "offsets", tuple(offsets))

    @classmethod
    def open(cls, root: str | os.PathLike) -> ShardSet:
        """A shard directory, or some of its shards the way webdataset names them: one `.tar`, or a brace
        pattern (`shards/train-{000000..000099}.tar`), in the order given. The directory's shards.json (or
        one pass over the named tars, when it has none) says what each holds."""
        if names_shards(root):
            return cls._open_named(str(root))
        root = Path(root)
        if not root.is_dir():
            raise ShardError(f"{root}: no such shard directory")
        tars = sorted(p.name for p in root.glob("*.tar"))
        if not tars:
            raise ShardError(f"{root}: no .tar shards here")
        classes, factors = _label_files(root)
        index_path = root / INDEX_FILE
        if not index_path.exists():
            return cls(root, tuple(_scan_shard(root / name) for name in tars), classes, factors)
        index = json.loads(index_path.read_text())
        if index.get("format") != INDEX_FORMAT:
            raise ShardError(f"{index_path}: unknown index format {index.get('format')!r}, expected {INDEX_FORMAT}")
        shards = tuple(
            ShardInfo(s["name"], s["count"], s["keys_sha256"], _size(s.get("min_size")), _size(s.get("max_size")))
            for s in index["shards"]
        )
        listed = [s.name for s in shards]
        if listed != tars:
            missing = sorted(set(listed) - set(tars))
            extra = sorted(set(tars) - set(listed))
            raise ShardError(f"{index_path}: index does not match the .tar files (missing: {missing}, not indexed: {extra})")
        return cls(root, shards, classes, factors)

    @classmethod
    def _open_named(cls, spec: str) -> ShardSet:
        from braceexpand import braceexpand

        paths = [Path(p) for p in braceexpand(spec)]
        directories = sorted({str(p.parent) for p in paths})
        if len(directories) > 1:
            raise ShardError(f"{spec}: the shards of one set lie in one directory; these are in {', '.join(directories)}")
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise ShardError(f"{missing[0]}: no such shard ({len(missing)} of the {len(paths)} that {spec} names are missing)")
        root = paths[0].parent
        indexed = {s.name: s for s in cls.open(root).shards} if (root / INDEX_FILE).exists() else {}
        shards = tuple(indexed.get(p.name) or _scan_shard(p) for p in paths)  # no index: one pass over these
        return cls(root, shards, *_label_files(root))

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    def __len__(self) -> int:
        return len(self.shards)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this data for a cache manifest: names, counts and keys, not paths."""
        return {
            "shards": [s.name for s in self.shards],
            "counts": [s.count for s in self.shards],
            "num_samples": self.num_samples,
            "keys_sha256": keys_sha256(s.keys_sha256 for s in self.shards),
        }

    def label_names(self, label: str = CLASS_LABEL) -> tuple[str, ...] | None:
        """The names of a label's values: the classes for `class`, else a factor's values (factors.json)."""
        if label == CLASS_LABEL:
            return self.classes
        if label not in self.factors:
            known = ", ".join([CLASS_LABEL, *self.factors])
            raise ShardError(f"{self.root}: no label {label!r} here (labels: {known})")
        return self.factors[label]

    def label_sizes(self) -> dict[str, int]:
        """How many values each label of these shards takes (the class, when classes.json names it, and factors)."""
        sizes = {CLASS_LABEL: len(self.classes)} if self.classes else {}
        return {**sizes, **{name: len(values) for name, values in self.factors.items()}}

    def label_of(self, record: Record, label: str = CLASS_LABEL) -> int | None:
        """A record's value of `label` (an index into `label_names(label)`), or None when it has none."""
        if label == CLASS_LABEL:
            return record.label
        value = record.meta.get("factors", {}).get(label)
        return None if value is None else int(value)

    def records(self, shard_id: int) -> Iterator[Record]:
        """Yield the samples of one shard in file order, undecoded, with their global indices."""
        shard = self.shards[shard_id]
        path = self.root / shard.name
        position = -1
        with open(path, "rb") as stream:
            try:
                for position, sample in enumerate(group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}]))):
                    yield _record(sample, self.offsets[shard_id] + position, shard.name)
            except (tarfile.TarError, ValueError) as error:
                # webdataset wraps tarfile's error as (message, stream, url): the message is what says why
                reason = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
                reason = reason.split(" @ ")[0]
                raise ShardError(f"{path}: truncated or corrupt after {position + 1} of its {shard.count} "
                                 f"samples ({reason})") from error
        if position + 1 != shard.count:
            raise ShardError(f"{path}: holds {position + 1} samples but the index says {shard.count}")

    def assigned_shards(self, rank: int = 0, world_size: int = 1, worker: int = 0, num_workers: int = 1) -> list[int]:
        """The shards one (rank, worker) reads: round-robin over all rank x worker slots, so none overlap."""
        slot, slots = rank * num_workers + worker, world_size * num_workers
        return list(range(slot, len(self.shards), slots))


def _size(value: list[int] | None) -> tuple[int, int] | None:
    return None if value is None else (int(value[0]), int(value[1]))


def _record(sample: dict[str, Any], index: int, shard: str) -> Record:
    image_bytes = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
    label = int(sample["cls"].decode()) if "cls" in sample else None
    meta = json.loads(sample["json"]) if "json" in sample else {}
    return Record(index, sample["__key__"], image_bytes, label, meta, shard)


class ShardWriter:
    """Writes numbered shards of at most `shard_size` samples; a shard only gets its `.tar` name once complete.

    `close()` writes `shards.json` (and `classes.json`) last, so a directory with an index is a finished one.
    Tar metadata is fixed (mtime 0, fixed owner), so the same samples give byte-identical files.
    """

    def __init__(self, root: str | os.PathLike, shard_size: int, prefix: str = "shard"):
        if shard_size < 1:
            raise ShardError(f"shard size must be at least 1, got {shard_size}")
        self.root, self.shard_size, self.prefix = Path(root), shard_size, prefix
        self.root.mkdir(parents=True, exist_ok=True)
        stale = [p.name for p in self.root.iterdir() if p.suffix == ".tar" or p.name == INDEX_FILE]
        if stale:
            raise ShardError(f"{self.root}: already holds shards ({', '.join(sorted(stale)[:3])}, ...); choose an empty directory")
        self.shards: list[ShardInfo] = []
        self._writer: wds.TarWriter | None = None
        self._keys: list[str] = []
        self._sizes: list[tuple[int, int]] = []

    def write(self, key: str, image_bytes: bytes, ext: str, label: int | None = None,
              meta: dict[str, Any] | None = None, size: tuple[int, int] | None = None) -> None:
        if "." in key or "/" in key:
            raise ShardError(f"sample key {key!r} may not contain '.' or '/' (webdataset splits names at the first dot)")
        if self._writer is None:
            self._open()
        sample: dict[str, Any] = {"__key__": key, ext: image_bytes}
        if label is not None:
            sample["cls"] = str(int(label)).encode()
        if meta:
            sample["json"] = json.dumps(meta, sort_keys=True).encode()
        self._writer.write(sample)
        self._keys.append(key)
        if size is not None:
            self._sizes.append(size)
        if len(self._keys) == self.shard_size:
            self._finish_shard()

    def close(self, classes: list[str] | None = None, factors: dict[str, list[str]] | None = None) -> list[ShardInfo]:
        """Finish the last shard, then write the class and factor names and the index (last)."""
        if self._writer is not None:
            self._finish_shard()
        if classes is not None:
            write_atomic(self.root / CLASSES_FILE, json.dumps(list(classes), indent=1))
        if factors:
            write_atomic(self.root / FACTORS_FILE, json.dumps(factors, indent=1))
        index = {"format": INDEX_FORMAT, "shards": [asdict(s) for s in self.shards]}
        write_atomic(self.root / INDEX_FILE, json.dumps(index, indent=1))
        return self.shards

    def abort(self) -> None:
        """Drop the shard in progress (its partial file never got a .tar name)."""
        if self._writer is not None:
            self._writer.close()
            self._partial_path().unlink(missing_ok=True)
            self._writer = None

    def _name(self) -> str:
        return f"{self.prefix}-{len(self.shards):06d}.tar"

    def _partial_path(self) -> Path:
        return partial_path(self.root / self._name())

    def _open(self) -> None:
        self._writer = wds.TarWriter(str(self._partial_path()), user="distillery", group="distillery", mtime=0)
        self._keys, self._sizes = [], []

    def _finish_shard(self) -> None:
        self._writer.close()
        self._writer = None
        publish(self._partial_path(), self.root / self._name())
        sizes = self._sizes or None
        self.shards.append(ShardInfo(
            name=self._name(), count=len(self._keys), keys_sha256=keys_sha256(self._keys),
            min_size=min(sizes, key=lambda s: s[0] * s[1]) if sizes else None,
            max_size=max(sizes, key=lambda s: s[0] * s[1]) if sizes else None,
        ))


def describe(shard_set: ShardSet, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Shard and sample counts, classes and the image size range (from the index, else from image headers)."""
    sizes = [s for shard in shard_set.shards for s in (shard.min_size, shard.max_size)]
    if any(s is None for s in sizes):
        sizes = []
        for shard_id in range(len(shard_set)):
            for record in shard_set.records(shard_id):
                if record.image_bytes is not None:
                    try:
                        with Image.open(io.BytesIO(record.image_bytes)) as image:
                            sizes.append(image.size)
                    except (UnidentifiedImageError, OSError):
                        pass
                if progress:
                    progress(1)
    area = lambda s: s[0] * s[1]  # noqa: E731
    return {
        "directory": str(shard_set.root),
        "shards": len(shard_set),
        "samples": shard_set.num_samples,
        "classes": len(shard_set.classes) if shard_set.classes else 0,
        "class_names": list(shard_set.classes or ()),
        "factors": {name: list(values) for name, values in shard_set.factors.items()},
        "min_size": min(sizes, key=area) if sizes else None,
        "max_size": max(sizes, key=area) if sizes else None,
        "indexed": (shard_set.root / INDEX_FILE).exists(),
    }
