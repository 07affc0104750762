"""The teacher-feature cache: a Zarr v3 group, its manifest, and the one reader every stage uses.

Layout (R = image shards x slots; the rows of image shard j are [j*slots, j*slots + count), the remaining
slots of its block are padding with valid=0, so shards of any size keep whole-block alignment):

    manifest.json                          identity (data, views, teachers, storage) + completion summary
    shards/<j:06d>.json                    written only after image shard j's arrays are flushed
    keys [R] str, valid [R] uint8, views [R, V, P] float32
    teachers/<name>/cls [R, V, D]          float16 | bfloat16 (stored as uint16) | int8
    teachers/<name>/cls_scale [R, V]       float16, int8 only (symmetric per-token quantisation)
    teachers/<name>/patch [R, V, T, D]     one zarr shard per (image shard, view): a block is one read
    teachers/<name>/patch_scale [R, V, T]
    teachers/<name>/moments/{cls,patch} [n_shards, 3, D] float64   per-shard (count, mean, M2)
    teachers/<name>/valid [R] uint8        teachers added to a finished store only: their own valid rows
    shards/teachers/<name>/<j:06d>.json    an added teacher's record of image shard j

A finished store takes more teachers (`cache-teachers --add`) under its own views and storage: their
arrays are created beside the others, the manifest lists them under `adding` until every shard of theirs
is written, and only then among the store's teachers. The arrays already there are never written again,
and readers of the store see its old teachers throughout.

Features are stored uncompressed: float16 activations compress by about 8% with zstd
(references/environment.md), not worth the CPU that training workers would spend decompressing.
Side files go through fsspec, so a store can live on a local path or any URL zarr accepts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
import numpy as np
import torch
import zarr

from distillery.cache.stats import Moments
from distillery.data.views import NUM_PARAMS
from distillery.errors import DistilleryError
from distillery.files import write_atomic

FORMAT = "distillery-cache/2"  # 2: view parameters gained RandAugment and erasing
MANIFEST = "manifest.json"
RECORDS = "shards"
DTYPES = ("float16", "bfloat16", "int8")
TOKEN_TYPES = ("cls", "patch")


class CacheError(DistilleryError):
    pass


# ---------------------------------------------------------------------------------------- encodings

def encode_tensor(features: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 [..., D] to the stored values, as tensors on the features' device (bfloat16 as its int16 bit
    pattern), and for int8 a float16 scale per token [...]."""
    features = features.detach().float()
    if dtype == "float16":
        return features.half(), None
    if dtype == "bfloat16":
        return features.bfloat16().view(torch.int16), None
    if dtype == "int8":
        # Quantise with the float16-rounded scale that is stored, so decoding is exact to half a step.
        scale = (features.abs().amax(-1) / 127).half().float()
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        values = (features / safe.unsqueeze(-1)).round_().clamp_(-127, 127).to(torch.int8)
        return values, scale.half()
    raise CacheError(f"unknown cache dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def as_stored_array(values: torch.Tensor, dtype: str) -> np.ndarray:
    """An encoded tensor as the array the store holds (bfloat16 bit patterns as uint16)."""
    array = values.cpu().numpy()
    return array.view(np.uint16) if dtype == "bfloat16" else array


def encode(features: torch.Tensor, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 [..., D] to the stored arrays (and, for int8, a float16 scale per token [...])."""
    values, scale = encode_tensor(features.cpu(), dtype)
    return as_stored_array(values, dtype), None if scale is None else scale.numpy()


def decode(values: np.ndarray | torch.Tensor, scale: np.ndarray | torch.Tensor | None, dtype: str) -> torch.Tensor:
    """Stored values to float32 (the inverse of `encode`, up to its rounding): arrays as read from the store,
    or the same values as tensors, e.g. a training batch that crossed to the GPU in its stored dtype."""
    if not isinstance(values, torch.Tensor):
        values = np.asarray(values)
        values = torch.from_numpy(values.view(np.int16) if dtype == "bfloat16" else values)
        scale = None if scale is None else torch.from_numpy(np.asarray(scale))
    if dtype == "bfloat16":
        return values.view(torch.bfloat16).float()
    if dtype == "int8":
        return values.float() * scale.float().unsqueeze(-1)
    return values.float()


def storage_tolerance(dtype: str) -> float:
    """Largest |stored - exact| relative to the token's largest magnitude, from the encoding's rounding
    (float16: 2^-11 relative, bfloat16: 2^-8, int8: half a step of max/127), with headroom for the fp32
    differences between two forwards over differently composed batches."""
    return {"float16": 2**-10, "bfloat16": 2**-7, "int8": 1 / 254 + 2**-10}[dtype]


def inner_chunk_rows(slots: int, most: int = 16) -> int:
    """The largest divisor of `slots` up to `most` (zarr needs inner chunks to tile the shard exactly)."""
    return max(d for d in range(1, min(most, slots) + 1) if slots % d == 0)


def as_json(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists), so stored and fresh identities compare equal."""
    return json.loads(json.dumps(value))


# ---------------------------------------------------------------------------------------- side files

def zarr_location(url: str) -> str:
    """What zarr opens for a store URL: a local path for `file://` (zarr's LocalStore makes the directories
    fsspec's local filesystem would not), the URL itself for any other filesystem."""
    fs, path = fsspec.core.url_to_fs(url)
    return path if isinstance(fs, LocalFileSystem) else url


class SideFiles:
    """JSON files beside the arrays, written atomically, on any fsspec filesystem."""

    def __init__(self, url: str):
        self.fs, self.root = fsspec.core.url_to_fs(url)

    def path(self, relative: str) -> str:
        return f"{self.root.rstrip('/')}/{relative}"

    def read(self, relative: str) -> Any | None:
        path = self.path(relative)
        if not self.fs.exists(path):
            return None
        try:
            return json.loads(self.fs.cat_file(path))
        except json.JSONDecodeError as error:
            raise CacheError(f"{path}: not valid JSON ({error})") from error

    def write(self, relative: str, value: Any) -> None:
        data = json.dumps(value, indent=1, sort_keys=True).encode()
        path = self.path(relative)
        if isinstance(self.fs, LocalFileSystem):
            write_atomic(self.fs._strip_protocol(path), data)  # a rename: readers never see half a file
        else:
            self.fs.pipe_file(path, data)  # object stores put whole objects atomically

    def list(self, relative: str) -> list[str]:
        path = self.path(relative)
        if not self.fs.exists(path):
            return []
        return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False))

    def exists(self) -> bool:
        return self.fs.exists(self.root)

    def remove(self) -> None:
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)

    def size(self) -> int:
        return int(self.fs.du(self.root)) if self.fs.exists(self.root) else 0


def invalid_by_cause(entries: list[dict]) -> dict[str, int]:
    """How many invalid rows each cause accounts for: `teacher NAME` (non-finite outputs) or `undecodable image`."""
    causes: dict[str, int] = {}
    for entry in entries:
        reason = entry["reason"]
        cause = f"teacher {reason.rsplit('of teacher ', 1)[1]}" if "of teacher " in reason else "undecodable image"
        causes[cause] = causes.get(cause, 0) + 1
    return causes


# Where a teacher was loaded from says nothing about what it computes (its fingerprint does): a moved
# local-dir must not make a finished store unusable.
INFORMATIONAL_KEYS = {"spec"}


def identity_differences(stored: Any, wanted: Any, where: str = "") -> list[str]:
    """Human-readable differences between two manifest identities."""
    if isinstance(stored, dict) and isinstance(wanted, dict):
        out = []
        for key in sorted((set(stored) | set(wanted)) - INFORMATIONAL_KEYS):
            out += identity_differences(stored.get(key), wanted.get(key), f"{where}.{key}" if where else key)
        return out
    if isinstance(stored, list) and isinstance(wanted, list) and len(stored) == len(wanted):
        return [d for i, (a, b) in enumerate(zip(stored, wanted)) for d in identity_differences(a, b, f"{where}[{i}]")]
    if stored != wanted:
        return [f"{where}: store has {_short(stored)}, this run has {_short(wanted)}"]
    return []


def _short(value: Any) -> str:
    if isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
        return f"{len(value)} ({', '.join(v['name'] for v in value)})"
    text = json.dumps(value)
    return text if len(text) < 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------------- the store

@dataclass(frozen=True)
class TeacherLayout:
    name: str
    spec: str
    dim: int
    grid: tuple[int, int]  # the teacher's patch grid
    stored_grid: tuple[int, int]  # after --patch-pool
    fingerprint: dict

    @property
    def num_patches(self) -> int:
        return self.stored_grid[0] * self.stored_grid[1]

    @classmethod
    def from_dict(cls, d: dict) -> TeacherLayout:
        return cls(d["name"], d["spec"], d["dim"], tuple(d["grid"]), tuple(d["stored_grid"]), d["fingerprint"])

    def to_dict(self) -> dict:
        return {"name": self.name, "spec": self.spec, "dim": self.dim, "grid": list(self.grid),
                "stored_grid": list(self.stored_grid), "fingerprint": self.fingerprint}


@dataclass(frozen=True)
class TeacherStats:
    """Dataset mean and std per dimension, float32 [D], for standardising targets."""

    cls_mean: torch.Tensor
    cls_std: torch.Tensor
    patch_mean: torch.Tensor | None
    patch_std: torch.Tensor | None


def _create_teacher_arrays(group: zarr.Group, identity: dict, teacher: dict, own_valid: bool) -> None:
    storage, slots = identity["storage"], identity["storage"]["slots"]
    num_shards, views = len(identity["dataset"]["counts"]), identity["views"]["count"]
    rows = slots * num_shards
    value_dtype = {"float16": "float16", "bfloat16": "uint16", "int8": "int8"}[storage["dtype"]]
    node = group.create_group(f"teachers/{teacher['name']}")
    dim = teacher["dim"]
    tokens = teacher["stored_grid"][0] * teacher["stored_grid"][1]
    # CLS blocks are small: one chunk per image shard. Patch blocks get one zarr shard per (image shard,
    # view), cut into inner chunks of a few rows: per-chunk overhead makes 1-row chunks write at half the
    # speed (BENCHMARKS.md), while a few rows still keep single-row reads cheap.
    inner = inner_chunk_rows(slots)
    shapes = {"cls": ((rows, views, dim), None, (slots, views, dim))}
    if not storage["cls_only"]:
        shapes["patch"] = ((rows, views, tokens, dim), (slots, 1, tokens, dim), (inner, 1, tokens, dim))
    for part, (shape, shard, chunk) in shapes.items():
        node.create_array(part, shape=shape, dtype=value_dtype, shards=shard, chunks=chunk, compressors=None,
                          fill_value=0, attributes={"encoding": storage["dtype"]})
        if storage["dtype"] == "int8":
            node.create_array(f"{part}_scale", shape=shape[:-1], dtype="float16",
                              shards=None if shard is None else shard[:-1], chunks=chunk[:-1],
                              compressors=None, fill_value=0)
        node.create_array(f"moments/{part}", shape=(num_shards, 3, dim), dtype="float64", chunks=(1, 3, dim),
                          fill_value=0)
    if own_valid:
        node.create_array("valid", shape=(rows,), dtype="uint8", chunks=(slots,), fill_value=0)


class CacheStore:
    """A cache of teacher features. Open with `CacheStore.open(url)`; the writer creates it with `create`."""

    def __init__(self, url: str, manifest: dict, writable: bool = False):
        self.url = url
        self.manifest = manifest
        self.identity = manifest["identity"]
        self.files = SideFiles(url)
        self.group = zarr.open_group(zarr_location(url), mode="r+" if writable else "r")  # readers never write
        storage = self.identity["storage"]
        self.dtype: str = storage["dtype"]
        self.cls_only: bool = storage["cls_only"]
        self.slots: int = storage["slots"]
        self.num_views: int = self.identity["views"]["count"]
        self.counts: list[int] = self.identity["dataset"]["counts"]
        self.shard_names: list[str] = self.identity["dataset"]["shards"]
        self.teachers = [TeacherLayout.from_dict(t) for t in self.identity["teachers"]]
        self.adding = [TeacherLayout.from_dict(t) for t in manifest.get("adding", [])]  # not yet readable
        self.own_valid: set[str] = set(manifest.get("own_valid", []))  # added teachers, with their own valid rows
        self._offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    # -- creation and opening

    @classmethod
    def open(cls, url: str, writable: bool = False) -> CacheStore:
        manifest = SideFiles(url).read(MANIFEST)
        if manifest is None:
            raise CacheError(f"{url}: not a distillery cache (no {MANIFEST}); build one with `distillery cache-teachers`")
        if manifest.get("format") != FORMAT:
            raise CacheError(f"{url}/{MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT}")
        return cls(url, manifest, writable)

    @classmethod
    def create(cls, url: str, identity: dict) -> CacheStore:
        """Create every array, then write the manifest last: a store with a manifest is a usable one."""
        slots = identity["storage"]["slots"]
        rows, views = slots * len(identity["dataset"]["counts"]), identity["views"]["count"]
        group = zarr.open_group(zarr_location(url), mode="w")
        group.create_array("keys", shape=(rows,), dtype=str, chunks=(slots,))
        group.create_array("valid", shape=(rows,), dtype="uint8", chunks=(slots,), fill_value=0)
        group.create_array("views", shape=(rows, views, NUM_PARAMS), dtype="float32", chunks=(slots, views, NUM_PARAMS))
        for teacher in identity["teachers"]:
            _create_teacher_arrays(group, identity, teacher, own_valid=False)
        manifest = {"format": FORMAT, "identity": identity, "completion": None}
        SideFiles(url).write(MANIFEST, manifest)
        return cls(url, manifest, writable=True)

    def begin_addition(self, teachers: list[dict]) -> None:
        """Make room for `teachers` (identity entries) beside the store's own: their arrays, then the manifest
        listing them as `adding`. Resuming the same addition, or one already finished, changes nothing."""
        names = [t["name"] for t in teachers]
        held = {t.name: t for t in self.teachers}
        if all(name in held for name in names):
            stale = [name for name, t in zip(names, teachers) if held[name].fingerprint != t["fingerprint"]]
            if stale:
                raise CacheError(f"{self.url} already holds a teacher {stale[0]} with other weights or preprocessing; "
                                 "give the new one another name (its local-dir's name)")
            return
        clashes = [name for name in names if name in held]
        if clashes:
            raise CacheError(f"{self.url} already holds teacher {clashes[0]}; add only teachers it does not hold")
        if not self.is_complete:
            raise CacheError(f"{self.url} is incomplete ({len(self.completed_shards())}/{self.num_shards} shards); "
                             "finish it (re-run its cache-teachers) before adding a teacher")
        if self.adding:
            differences = identity_differences(self.manifest["adding"], teachers, "adding")
            if differences:
                raise CacheError(f"{self.url} is taking other teachers already "
                                 f"({', '.join(t.name for t in self.adding)}); finish that addition first "
                                 f"(re-run it with --add), then add these")
            return
        for teacher in teachers:
            _create_teacher_arrays(self.group, self.identity, teacher, own_valid=True)
        self.manifest = {**self.manifest, "adding": teachers}
        self.files.write(MANIFEST, self.manifest)
        self.adding = [TeacherLayout.from_dict(t) for t in teachers]

    # -- geometry

    @property
    def num_shards(self) -> int:
        return len(self.counts)

    @property
    def num_samples(self) -> int:
        return int(self._offsets[-1])

    def rows(self, shard_id: int) -> slice:
        start = shard_id * self.slots
        return slice(start, start + self.counts[shard_id])

    def row_of(self, global_index: np.ndarray | int) -> np.ndarray:
        """Store rows of dataset global indices (sorted shards, then position)."""
        index = np.asarray(global_index, dtype=np.int64)
        shard = np.searchsorted(self._offsets, index, side="right") - 1
        return shard * self.slots + (index - self._offsets[shard])

    def teacher(self, name: str) -> TeacherLayout:
        for t in self.teachers + self.adding:
            if t.name == name:
                return t
        raise CacheError(f"{self.url}: no teacher {name!r}; it has {', '.join(t.name for t in self.teachers)}")

    # -- completion

    def completed_shards(self, teacher: str | None = None) -> set[int]:
        """The image shards written: of the store's own teachers, or of one added teacher."""
        return {int(name.split(".")[0]) for name in self.files.list(self._records(teacher)) if name.endswith(".json")}

    def _records(self, teacher: str | None) -> str:
        return f"{RECORDS}/teachers/{teacher}" if teacher in self.own_valid | {t.name for t in self.adding} else RECORDS

    def shard_record(self, shard_id: int, teacher: str | None = None) -> dict | None:
        return self.files.read(f"{self._records(teacher)}/{shard_id:06d}.json")

    @property
    def is_complete(self) -> bool:
        return self.manifest.get("completion") is not None

    def finalize(self, max_invalid: float | None = None) -> bool:
        """Record completion in the manifest once every shard is done (of an addition too: its teachers then
        join the store's); True if the store is complete. A teacher whose outputs were not finite for more
        than `max_invalid` of the images leaves the store incomplete, with one line naming it.

        Deterministic content, so two writers finishing together write the same bytes.
        """
        if len(self.completed_shards()) < self.num_shards:
            return False
        if self.adding:
            if any(len(self.completed_shards(t.name)) < self.num_shards for t in self.adding):
                return False
        entries = self.invalid_rows(teachers=self.teachers + self.adding)  # what the store holds once finalized
        if max_invalid is not None:
            self.check_invalid(max_invalid, entries)
        if self.adding:
            added = self.manifest["adding"]
            identity = {**self.identity, "teachers": self.identity["teachers"] + added}
            manifest = {key: value for key, value in self.manifest.items() if key != "adding"}
            self.manifest = {**manifest, "identity": identity,
                             "own_valid": sorted(self.own_valid | {t["name"] for t in added})}
            self.identity, self.own_valid = identity, set(self.manifest["own_valid"])
            self.teachers, self.adding = self.teachers + self.adding, []
        completion = {"num_valid": self.num_samples - len(entries), "num_invalid": len(entries), "invalid": entries,
                      "invalid_by_cause": invalid_by_cause(entries),
                      "stats": {t.name: self._stats_summary(t) for t in self.teachers}}
        self.manifest = {**self.manifest, "completion": completion}
        self.files.write(MANIFEST, self.manifest)
        return True

    def invalid_rows(self, teachers: list[TeacherLayout] | None = None) -> list[dict]:
        """Every invalid row the shard records list (of the store's teachers and of those being added), one
        entry per image, in index order."""
        names = {t.name for t in (self.teachers if teachers is None else teachers)}
        invalid: dict[int, dict] = {}
        for teacher in [None, *sorted(name for name in self.own_valid | {t.name for t in self.adding} if name in names)]:
            for shard_id in range(self.num_shards):
                for entry in self.shard_record(shard_id, teacher)["invalid"]:
                    invalid.setdefault(entry["index"], entry)
        return [invalid[index] for index in sorted(invalid)]

    def check_invalid(self, max_invalid: float, entries: list[dict]) -> None:
        """Refuse a store in which a teacher's outputs were not finite for more than `max_invalid` of the images."""
        for cause, count in invalid_by_cause(entries).items():
            if cause.startswith("teacher ") and count > max_invalid * self.num_samples:
                raise CacheError(f"{self.url}: {cause} gave non-finite outputs for {count:,} of {self.num_samples:,} "
                                 f"images ({count / self.num_samples:.1%}), more than --max-invalid "
                                 f"{max_invalid:g}; the store is left incomplete (check the teacher, or raise "
                                 "--max-invalid)")

    def _stats_summary(self, teacher: TeacherLayout) -> dict:
        stats = self.stats(teacher.name)
        summary = {"cls_mean_norm": float(stats.cls_mean.norm()), "cls_std_mean": float(stats.cls_std.mean())}
        if stats.patch_mean is not None:
            summary.update(patch_mean_norm=float(stats.patch_mean.norm()), patch_std_mean=float(stats.patch_std.mean()))
        return summary

    # -- writing (one writer per image shard)

    def write_shard(self, shard_id: int, arrays: dict[str, np.ndarray], record: dict,
                    teachers: list[str] | None = None) -> None:
        """Write a shard's whole slot block of every array, then its completion record (one per added teacher
        when `teachers` names an addition)."""
        block = slice(shard_id * self.slots, (shard_id + 1) * self.slots)
        try:
            for name, values in arrays.items():
                if "/moments/" in name:
                    self.group[name][shard_id] = values
                else:
                    self.group[name][block] = values
            for teacher in teachers or [None]:
                self.files.write(f"{self._records(teacher)}/{shard_id:06d}.json", record)
        except OSError as error:  # a full disk, a lost mount: the shard has no record, so a re-run redoes it
            raise CacheError(f"{self.url}: writing image shard {self.shard_names[shard_id]} failed "
                             f"({error.strerror or error}); it is not marked complete, and re-running the same "
                             "command resumes from it") from error

    # -- reading

    def read_keys(self, shard_id: int) -> np.ndarray:
        return self.group["keys"][self.rows(shard_id)]

    def read_block(self, shard_id: int, view: int | None = None, parts: tuple[str, ...] = TOKEN_TYPES,
                   teachers: list[str] | None = None, decoded: bool = True) -> dict[str, Any]:
        """One image shard's rows: keys, valid, views and, per teacher and part, the features of one view
        (or all views when `view` is None). Each array is one sequential read of its zarr shard.

        Returns `{"keys", "valid", "views", "<teacher>/<part>": float32 tensor}`; with `decoded=False` the
        stored arrays are returned as they are (plus `"<teacher>/<part>_scale"` for int8), for decoding
        later in a batch."""
        rows = self.rows(shard_id)
        views = slice(None) if view is None else slice(view, view + 1)
        teachers = teachers or [t.name for t in self.teachers]
        out: dict[str, Any] = {"keys": self.group["keys"][rows], "valid": self._valid(rows, teachers),
                               "views": self.group["views"][rows]}
        for name in teachers:
            for part in parts:
                if part == "patch" and self.cls_only:
                    raise CacheError(f"{self.url}: a --cls-only cache has no patch tokens")
                values = self.group[f"teachers/{name}/{part}"][rows, views]
                scale = self.group[f"teachers/{name}/{part}_scale"][rows, views] if self.dtype == "int8" else None
                if view is not None:
                    values, scale = values[:, 0], None if scale is None else scale[:, 0]
                if decoded:
                    out[f"{name}/{part}"] = decode(values, scale, self.dtype)
                else:
                    out[f"{name}/{part}"] = values
                    if scale is not None:
                        out[f"{name}/{part}_scale"] = scale
        return out

    def read_rows(self, global_indices: list[int], views: list[int], parts: tuple[str, ...] = TOKEN_TYPES) -> dict[str, Any]:
        """Features of arbitrary (sample, view) pairs, decoded to float32; for tools and spot checks.
        Training reads whole blocks with `read_block`."""
        rows = self.row_of(np.asarray(global_indices))
        names = [t.name for t in self.teachers]
        out: dict[str, Any] = {"keys": [self.group["keys"][int(r)] for r in rows],
                               "valid": np.array([self._valid(slice(int(r), int(r) + 1), names)[0] for r in rows]),
                               "views": np.stack([self.group["views"][int(r), v] for r, v in zip(rows, views, strict=True)])}
        for teacher in self.teachers:
            for part in parts:
                if part == "patch" and self.cls_only:
                    continue
                array = self.group[f"teachers/{teacher.name}/{part}"]
                values = np.stack([array[int(r), v] for r, v in zip(rows, views, strict=True)])
                scale = None
                if self.dtype == "int8":
                    scales = self.group[f"teachers/{teacher.name}/{part}_scale"]
                    scale = np.stack([scales[int(r), v] for r, v in zip(rows, views, strict=True)])
                out[f"{teacher.name}/{part}"] = decode(values, scale, self.dtype)
        return out

    def _valid(self, rows: slice, teachers: list[str]) -> np.ndarray:
        """Rows valid for these teachers: decoded and finite when the store was built, and finite for each
        added teacher among them."""
        valid = self.group["valid"][rows]
        for name in teachers:
            if name in self.own_valid:
                valid = valid & self.group[f"teachers/{name}/valid"][rows]
        return valid

    def moments(self, name: str, part: str) -> Moments:
        """Merged over every shard written so far, in shard order (deterministic)."""
        layout = self.teacher(name)
        partial = self.group[f"teachers/{name}/moments/{part}"][:]
        total = Moments.empty(layout.dim)
        for shard_id in sorted(self.completed_shards(name)):
            total = total.merge(Moments.from_array(partial[shard_id]))
        return total

    def stats(self, name: str) -> TeacherStats:
        cls_moments = self.moments(name, "cls")
        patch = None if self.cls_only else self.moments(name, "patch")
        as_tensor = lambda a: torch.from_numpy(a).float()  # noqa: E731
        return TeacherStats(as_tensor(cls_moments.mean), as_tensor(cls_moments.std),
                            None if patch is None else as_tensor(patch.mean), None if patch is None else as_tensor(patch.std))
