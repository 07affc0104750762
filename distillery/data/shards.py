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
import re
import shlex
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import fsspec
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image, UnidentifiedImageError
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

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
    strays: int = 0  # member groups that are not samples (README.txt, __MACOSX/...), skipped; counted by a scan
    bytes: int | None = None  # the tar's size (unknown for a pipe)
    members_sha256: str | None = None  # a hash of every sample member's name and size, in tar order


class Record(NamedTuple):
    """One undecoded sample: what a shard holds for a key."""

    index: int
    key: str
    image_bytes: bytes | None
    label: int | None
    meta: dict[str, Any]
    shard: str


SAMPLE_EXTENSIONS = (*IMAGE_EXTENSIONS, "cls", "json")


def is_stray(key: str, extensions: Iterable[str]) -> bool:
    """Whether a tar's member group is not a sample: no image, label or metadata file (README.txt,
    notes.txt), or macOS's metadata (`__MACOSX/`, `._name`, whose webdataset key ends at the slash). Strays
    are skipped wherever shards are read, and counted where a pass over the tars counts samples."""
    return key.endswith("/") or "__MACOSX" in key.split("/") or not set(extensions) & set(SAMPLE_EXTENSIONS)


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
    """Whether a shard-set argument names shards rather than their directory: one `.tar`, a brace pattern,
    or `pipe:` commands."""
    return str(spec).endswith(".tar") or "{" in str(spec) or str(spec).startswith("pipe:")


def is_url(spec: str | os.PathLike) -> bool:
    """Whether a location is a URL (fsspec's `s3://`, `gs://`, `https://`, ... or a `pipe:` command) rather
    than a local path."""
    return "://" in str(spec) or str(spec).startswith("pipe:")


def join_url(location: str, name: str) -> str:
    """A file of a shard directory given as a path or a URL."""
    return f"{location.rstrip('/')}/{name}" if is_url(location) else os.path.join(location, name)


def _read_text(url: str) -> str | None:
    """A small file's text through fsspec (a local path or any URL it knows), or None when there is none."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs.cat_file(path).decode() if fs.isfile(path) else None


def open_shard(url: str) -> BinaryIO:
    """A shard's bytes the way webdataset opens them: `pipe:` runs the command and reads its stdout (its
    exit status is checked at the end), anything else goes through fsspec (a path, `file://`, `s3://`, ...)."""
    try:
        return gopen(url) if url.startswith("pipe:") else fsspec.open(url, "rb").open()
    except (OSError, ValueError) as error:
        raise ShardError(f"{url}: cannot open ({error})") from error


def _reason(error: BaseException) -> str:
    """Why reading a shard failed, in words: webdataset folds a pipe's exit status, or the stream and URL of
    a tar error, into the exception's arguments."""
    text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    exit_status = re.search(r": exit (\d+) \(read\)", text)
    return f"its command exited with status {exit_status[1]}" if exit_status else text.split(" @ ")[0].splitlines()[0]


def _pipe_name(command: str) -> str:
    """A `pipe:` shard's name, which the dataset fingerprint records: that of the `.tar` its command reads."""
    tars = [os.path.basename(word) for word in shlex.split(command[len("pipe:"):]) if word.endswith(".tar")]
    if not tars:
        raise ShardError(f"{command}: a pipe: command must name the .tar it reads (its name identifies the shard)")
    return tars[0]


def _label_files(location: str) -> tuple[tuple[str, ...] | None, dict[str, tuple[str, ...]]]:
    """The class names (classes.json) and factor values (factors.json) a shard directory records."""
    classes = _read_text(join_url(location, CLASSES_FILE))
    factors = _read_text(join_url(location, FACTORS_FILE))
    return (tuple(json.loads(classes)) if classes is not None else None,
            {str(k): tuple(v) for k, v in json.loads(factors).items()} if factors is not None else {})


def _scan_shard(url: str, name: str) -> ShardInfo:
    """Count a shard's samples from its tar headers (no image is decoded; a pipe is read through once), with
    the sizes that let a fingerprint see changed content; stray members (`is_stray`) are not samples, and are
    counted apart."""
    groups: list[tuple[str, set[str], list[str]]] = []  # key, its extensions, "name<TAB>size" of its members
    stream = open_shard(url)
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|" if url.startswith("pipe:") else "r:") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, extension = base_plus_ext(member.name)
                entry = f"{member.name}\t{member.size}\n"
                if key is None:
                    groups.append((member.name, set(), [entry]))
                elif groups and groups[-1][0] == key:
                    groups[-1][1].add(extension)
                    groups[-1][2].append(entry)
                else:
                    groups.append((key, {extension}, [entry]))
    except (tarfile.TarError, OSError) as error:
        raise ShardError(f"{url}: not a readable tar file ({_reason(error)})") from error
    samples = [(key, entries) for key, extensions, entries in groups if not is_stray(key, extensions)]
    keys = [key for key, _ in samples]
    members = hashlib.sha256("".join(entry for _, entries in samples for entry in entries).encode())
    size = None
    if not url.startswith("pipe:"):
        fs, path = fsspec.core.url_to_fs(url)
        size = int(fs.size(path))
    return ShardInfo(name=name, count=len(keys), keys_sha256=keys_sha256(keys), strays=len(groups) - len(keys),
                     bytes=size, members_sha256=members.hexdigest())


def _current(indexed: ShardInfo, url: str, size: int) -> ShardInfo:
    """An index entry, or a fresh scan of its shard when the tar's size is no longer the one the index
    recorded (a shard rewritten after its index: its samples, keys and sizes are then read from it)."""
    return indexed if indexed.bytes in (None, size) else _scan_shard(url, indexed.name)


def fingerprint_differences(stored: dict[str, Any], current: dict[str, Any]) -> str | None:
    """What differs between the data a fingerprint describes (`stored`, e.g. a cache's) and `current`, naming the
    first shard that differs; None when they agree on everything both record (a fingerprint taken before
    sizes were recorded, or of pipes, whose byte sizes are unknown, has fewer things to compare)."""
    if stored["shards"] != current["shards"]:
        gone = [s for s in stored["shards"] if s not in current["shards"]]
        new = [s for s in current["shards"] if s not in stored["shards"]]
        return f"other shards (missing {gone[:3]}, not in the fingerprint {new[:3]})" if gone or new else "shards in another order"
    # Byte sizes are recorded but not compared: a stray member (a README added to a tar) changes them and no
    # sample, and any change to a sample's files shows in the member hash.
    for key, what in (("counts", "sample count"), ("members_sha256", "sample files (names or sizes)")):
        if key in stored and key in current:
            changed = [i for i, (a, b) in enumerate(zip(stored[key], current[key], strict=True)) if a != b]
            if changed:
                first = changed[0]
                return (f"shard {stored['shards'][first]} has other {what}"
                        + (f" ({stored[key][first]} -> {current[key][first]})" if key == "counts" else "")
                        + (f", and {len(changed) - 1} more shards" if len(changed) > 1 else ""))
    if stored["keys_sha256"] != current["keys_sha256"]:
        return "the sample keys differ"
    return None


def _indexed_shards(location: str) -> tuple[ShardInfo, ...] | None:
    """The shards a directory's shards.json lists, or None when it has none."""
    text = _read_text(join_url(location, INDEX_FILE))
    if text is None:
        return None
    index = json.loads(text)
    if index.get("format") != INDEX_FORMAT:
        raise ShardError(f"{join_url(location, INDEX_FILE)}: unknown index format {index.get('format')!r}, "
                         f"expected {INDEX_FORMAT}")
    return tuple(ShardInfo(s["name"], s["count"], s["keys_sha256"], _size(s.get("min_size")), _size(s.get("max_size")),
                           bytes=s.get("bytes"), members_sha256=s.get("members_sha256"))
                 for s in index["shards"])


@dataclass(frozen=True)
class ShardSet:
    """The shards of one split, in global-index order. `root` is their directory as given (a path or an
    fsspec URL; "" for `pipe:` commands, which have none) and `urls` how each shard is opened."""

    root: str
    shards: tuple[ShardInfo, ...]
    urls: tuple[str, ...]
    classes: tuple[str, ...] | None = None
    factors: dict[str, tuple[str, ...]] = field(default_factory=dict)  # factor -> value names (factors.json)
    indexed: bool = False  # the counts came from shards.json, not from a pass over the tars
    offsets: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        offsets, total = [], 0
        for shard in self.shards:
            offsets.append(total)
            total += shard.count
        object.__setattr__(self, "offsets", tuple(offsets))

    @classmethod
    def open(cls, spec: str | os.PathLike) -> ShardSet:
        """A shard directory (a path or an fsspec URL: `s3://bucket/train`), or some shards the way webdataset
        names them: one `.tar`, a brace pattern (`shards/train-{000000..000099}.tar`) or `pipe:` commands
        (`pipe:aws s3 cp s3://bucket/train-{000000..000099}.tar -`), in the order given. The directory's
        shards.json (or one pass over the named tars, when there is none) says what each holds."""
        spec = str(spec)
        if names_shards(spec):
            return cls._open_named(spec)
        fs, path = fsspec.core.url_to_fs(spec)
        if not fs.isdir(path):
            raise ShardError(f"{spec}: no such shard directory")
        sizes = {os.path.basename(entry["name"]): int(entry["size"]) for entry in fs.ls(path, detail=True)
                 if entry["name"].endswith(".tar") and entry["type"] == "file"}  # one listing, no read
        tars = sorted(sizes)
        if not tars:
            raise ShardError(f"{spec}: no .tar shards here")
        urls = tuple(join_url(spec, name) for name in tars)
        shards = _indexed_shards(spec)
        if shards is None:
            return cls(spec, tuple(_scan_shard(url, name) for url, name in zip(urls, tars)), urls, *_label_files(spec))
        listed = [s.name for s in shards]
        if listed != tars:
            missing = sorted(set(listed) - set(tars))
            extra = sorted(set(tars) - set(listed))
            raise ShardError(f"{join_url(spec, INDEX_FILE)}: index does not match the .tar files (missing: {missing}, "
                             f"not indexed: {extra})")
        shards = tuple(_current(shard, url, sizes[shard.name]) for shard, url in zip(shards, urls))
        return cls(spec, shards, urls, *_label_files(spec), indexed=True)

    @classmethod
    def _open_named(cls, spec: str) -> ShardSet:
        urls = list(braceexpand(spec))
        if spec.startswith("pipe:"):  # no directory to hold an index or label files: one pass counts them
            names = [_pipe_name(url) for url in urls]
            return cls("", tuple(_scan_shard(url, name) for url, name in zip(urls, names)), tuple(urls))
        directories = sorted({url.rsplit("/", 1)[0] if "/" in url else "." for url in urls})
        if len(directories) > 1:
            raise ShardError(f"{spec}: the shards of one set lie in one directory; these are in {', '.join(directories)}")
        fs, _ = fsspec.core.url_to_fs(urls[0])
        paths = [fsspec.core.url_to_fs(url)[1] for url in urls]
        missing = [url for url, path in zip(urls, paths) if not fs.isfile(path)]
        if missing:
            raise ShardError(f"{missing[0]}: no such shard ({len(missing)} of the {len(urls)} that {spec} names are missing)")
        root = directories[0]
        names = [url.rsplit("/", 1)[-1] for url in urls]
        indexed = {s.name: s for s in _indexed_shards(root) or ()}
        shards = tuple(_current(indexed[name], url, int(fs.size(path))) if name in indexed else _scan_shard(url, name)
                       for url, path, name in zip(urls, paths, names))
        return cls(root, shards, tuple(urls), *_label_files(root), indexed=all(name in indexed for name in names))

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    def __len__(self) -> int:
        return len(self.shards)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this data for a cache manifest, not where it lies: names, counts and keys, and where
        every shard has them, each tar's byte size and a hash of its members' names and sizes (so that an
        image re-encoded under the same key is seen without reading any image)."""
        fingerprint: dict[str, Any] = {
            "shards": [s.name for s in self.shards],
            "counts": [s.count for s in self.shards],
            "num_samples": self.num_samples,
            "keys_sha256": keys_sha256(s.keys_sha256 for s in self.shards),
        }
        if all(s.bytes is not None for s in self.shards):
            fingerprint["bytes"] = [s.bytes for s in self.shards]
        if all(s.members_sha256 is not None for s in self.shards):
            fingerprint["members_sha256"] = [s.members_sha256 for s in self.shards]
        return fingerprint

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
        shard, url = self.shards[shard_id], self.urls[shard_id]
        position = -1
        try:
            with open_shard(url) as stream:
                samples = group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
                kept = (sample for sample in samples
                        if not is_stray(sample["__key__"], (k for k in sample if not k.startswith("__"))))
                for position, sample in enumerate(kept):
                    yield _record(sample, self.offsets[shard_id] + position, shard.name)
        except (tarfile.TarError, ValueError, OSError) as error:
            raise ShardError(f"{url}: truncated or corrupt after {position + 1} of its {shard.count} "
                             f"samples ({_reason(error)})") from error
        if position + 1 != shard.count:
            raise ShardError(f"{url}: holds {position + 1} samples but the index says {shard.count}")

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
        index = {"format": INDEX_FORMAT, "shards": [{k: v for k, v in asdict(s).items() if k != "strays"} for s in self.shards]}
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
        scanned = _scan_shard(str(self.root / self._name()), self._name())  # its headers: the sizes a fingerprint holds
        self.shards.append(ShardInfo(
            name=self._name(), count=len(self._keys), keys_sha256=keys_sha256(self._keys),
            min_size=min(sizes, key=lambda s: s[0] * s[1]) if sizes else None,
            max_size=max(sizes, key=lambda s: s[0] * s[1]) if sizes else None,
            bytes=scanned.bytes, members_sha256=scanned.members_sha256,
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
        "directory": shard_set.root or "(pipe: commands)",
        "shards": len(shard_set),
        "samples": shard_set.num_samples,
        "classes": len(shard_set.classes) if shard_set.classes else 0,
        "class_names": list(shard_set.classes or ()),
        "factors": {name: list(values) for name, values in shard_set.factors.items()},
        "min_size": min(sizes, key=area) if sizes else None,
        "max_size": max(sizes, key=area) if sizes else None,
        "indexed": shard_set.indexed,
        **({"stray members skipped": sum(s.strays for s in shard_set.shards)} if not shard_set.indexed else {}),
    }
