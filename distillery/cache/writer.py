"""`cache-teachers`: decode each image once, draw its V views, run every teacher on every view, store it all.

Work is split by image shard: rank r writes shards r, r+W, ... (W = world size), DataLoader workers
decode and replay whole shards, and the main process runs the teachers in batches that never cross a
shard boundary. Each shard's arrays are written in one block and only then is its completion record
written, so a crash loses at most the shards in flight; re-running the command skips finished shards and,
because batches are shard-local and everything is seeded, the finished store is bit-identical however
often it was interrupted and however many ranks wrote it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, NamedTuple

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from fsspec.implementations.local import LocalFileSystem

from distillery.cache.stats import Moments, mean_and_m2
from distillery.cache.store import (DTYPES, MANIFEST, CacheError, CacheStore, SideFiles, as_json, as_stored_array,
                                    decode, encode_tensor, identity_differences)
from distillery.console import console, progress_bar
from distillery.data.pipeline import shard_loader, shard_records, shards_for
from distillery.data.shards import ImageDecodeError, ShardSet, decode_image, fingerprint_differences
from distillery.data.views import NUM_PARAMS, ViewConfig, draw_view, normalize, replay
from distillery.models.teachers import Teacher, create_teacher

MANIFEST_WAIT_SECONDS = 600


@dataclass(frozen=True)
class CacheConfig:
    teachers: tuple[str, ...]
    views: int = 4
    seed: int = 0
    view_config: ViewConfig = field(default_factory=ViewConfig)
    dtype: str = "float16"
    patch_pool: int = 1
    cls_only: bool = False
    batch_size: int = 32  # images per teacher forward, each with its V views
    workers: int = 2
    max_invalid: float = 0.01  # a teacher with non-finite outputs for more of the images leaves the store incomplete

    def __post_init__(self) -> None:
        if not self.teachers:
            raise CacheError("give at least one --teacher")
        if len(set(self.teachers)) != len(self.teachers):
            raise CacheError(f"a teacher is given twice: {list(self.teachers)}")
        if self.views < 1:
            raise CacheError(f"--views must be at least 1, got {self.views}")
        if self.dtype not in DTYPES:
            raise CacheError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.patch_pool not in (1, 2, 4):
            raise CacheError(f"--patch-pool must be 1, 2 or 4, got {self.patch_pool}")
        if self.batch_size < 1:
            raise CacheError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not 0 <= self.max_invalid <= 1:
            raise CacheError(f"--max-invalid is a fraction of the images, from 0 to 1, got {self.max_invalid:g}")


def pooled_grid(grid: tuple[int, int], pool: int) -> tuple[int, int]:
    return -(-grid[0] // pool), -(-grid[1] // pool)


def pool_patches(patch: torch.Tensor, grid: tuple[int, int], pool: int) -> torch.Tensor:
    """Average `pool` x `pool` neighbourhoods of the patch grid: [B, T, D] -> [B, T', D] (edge windows partial)."""
    if pool == 1:
        return patch
    b, _, d = patch.shape
    image = patch.transpose(1, 2).reshape(b, d, *grid)
    pooled = F.avg_pool2d(image, pool, stride=pool, ceil_mode=True, count_include_pad=False)
    return pooled.flatten(2).transpose(1, 2)


def build_identity(shard_set: ShardSet, teachers: list[Teacher], config: CacheConfig, precision: str) -> dict:
    """Everything that decides the stored bytes; a store is only extended by a run with the same identity."""
    return as_json({
        "dataset": shard_set.fingerprint(),
        "views": {"count": config.views, "seed": config.seed, "config": asdict(config.view_config)},
        "storage": {"dtype": config.dtype, "patch_pool": config.patch_pool, "cls_only": config.cls_only,
                    "slots": max(s.count for s in shard_set.shards), "forward_precision": precision},
        "teachers": [{"name": t.name, "spec": t.spec, "dim": t.embed_dim, "grid": list(t.grid),
                      "stored_grid": list(pooled_grid(t.grid, config.patch_pool)), "fingerprint": t.fingerprint()}
                     for t in teachers],
    })


# ------------------------------------------------------------------------------ decoding and views (workers)

class ViewedImage(NamedTuple):
    shard_id: int
    position: int
    index: int
    key: str
    error: str | None
    params: np.ndarray  # [V, P]
    pixels: dict[tuple[int, int], torch.Tensor] | None  # input size -> uint8 [V, 3, H, W]
    seconds: float


def viewed_images(shard_set: ShardSet, shard_ids: list[int], config: CacheConfig, sizes: list[tuple[int, int]],
                  worker: int, num_workers: int) -> Iterator[ViewedImage]:
    """The cache writer's pipeline source: whole shards, each image decoded once and rendered at every
    teacher input size for each of its views."""
    for item in shard_records(shard_set, shards_for(shard_ids, worker, num_workers)):
        yield view_image(item.record, item.shard_id, item.position, config, sizes)


def view_image(record, shard_id: int, position: int, config: CacheConfig, sizes: list[tuple[int, int]]) -> ViewedImage:
    start = time.perf_counter()
    try:
        image = decode_image(record.image_bytes, f"{record.shard}:{record.key}")
    except ImageDecodeError as error:
        return ViewedImage(shard_id, position, record.index, record.key, str(error),
                           np.zeros((config.views, NUM_PARAMS), np.float32), None, time.perf_counter() - start)
    params = np.stack([draw_view(config.view_config, config.seed, record.index, v, image.height, image.width)
                       for v in range(config.views)])
    pixels = {size: torch.stack([replay(image, p, size) for p in params]) for size in sizes}
    return ViewedImage(shard_id, position, record.index, record.key, None, params, pixels, time.perf_counter() - start)


# ------------------------------------------------------------------------------ one shard's buffers (main process)

class ShardBuffer:
    """Everything one image shard will write, filled batch by batch, written in one go: every array of a
    new store, or only the added teachers' (`adding`) of a finished one."""

    def __init__(self, store: CacheStore, shard_id: int, config: CacheConfig, adding: bool = False):
        self.store, self.shard_id, self.config, self.adding = store, shard_id, config, adding
        self.layouts = store.adding if adding else store.teachers
        self.count = store.counts[shard_id]
        slots, views = store.slots, config.views
        self.keys = np.full(slots, "", dtype=object)
        self.valid = np.zeros(slots, np.uint8)
        self.views = np.zeros((slots, views, NUM_PARAMS), np.float32)
        self.features: dict[str, np.ndarray] = {}
        value_dtype = {"float16": np.float16, "bfloat16": np.uint16, "int8": np.int8}[config.dtype]
        for t in self.layouts:
            parts = {"cls": (t.dim,)} if config.cls_only else {"cls": (t.dim,), "patch": (t.num_patches, t.dim)}
            for part, tail in parts.items():
                self.features[f"teachers/{t.name}/{part}"] = np.zeros((slots, views, *tail), value_dtype)
                if config.dtype == "int8":
                    self.features[f"teachers/{t.name}/{part}_scale"] = np.zeros((slots, views, *tail[:-1]), np.float16)
        self.moments = {(t.name, part): Moments.empty(t.dim) for t in self.layouts
                        for part in (("cls",) if config.cls_only else ("cls", "patch"))}
        self.pending: list[ViewedImage] = []
        self.received = 0
        self.invalid: list[dict] = []

    def add(self, item: ViewedImage) -> None:
        if item.position != self.received:
            raise CacheError(f"shard {self.shard_id}: sample {item.position} arrived out of order")
        self.received += 1
        self.keys[item.position] = item.key
        self.views[item.position] = item.params
        if item.error is None:
            self.pending.append(item)
        else:
            self.invalid.append({"key": item.key, "index": item.index, "reason": item.error})

    @property
    def batch_ready(self) -> bool:
        return len(self.pending) >= self.config.batch_size or (self.received == self.count and bool(self.pending))

    @property
    def complete(self) -> bool:
        return self.received == self.count and not self.pending

    def run_batch(self, teachers: list[Teacher], device: torch.device) -> tuple[float, float]:
        """Run the teachers on the next batch of pending images, then check, encode and summarise what they
        output on the device, copying to the host only what is stored. Returns the seconds of the forward
        and of the rest."""
        items, self.pending = self.pending[: self.config.batch_size], self.pending[self.config.batch_size:]
        start = time.perf_counter()
        outputs = self._forward(items, teachers, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the forward's time is its own, not the checks' after it
        forwarded = time.perf_counter()
        self._store(items, outputs)
        return forwarded - start, time.perf_counter() - forwarded

    def _forward(self, items: list[ViewedImage], teachers: list[Teacher],
                 device: torch.device) -> dict[tuple[str, str], torch.Tensor]:
        """(teacher, part) -> its tokens for every view of every image, [B, V, D] or [B, V, T, D], on the device."""
        views, outputs = self.config.views, {}
        for teacher in teachers:
            p = teacher.preprocessing
            pixels = torch.cat([item.pixels[p.input_size] for item in items]).to(device, non_blocking=True)
            tokens = teacher(normalize(pixels, p.mean, p.std))
            outputs[(teacher.name, "cls")] = tokens.cls.reshape(len(items), views, -1)
            if not self.config.cls_only:
                patch = pool_patches(tokens.patch, teacher.grid, self.config.patch_pool)
                outputs[(teacher.name, "patch")] = patch.reshape(len(items), views, *patch.shape[1:])
        return outputs

    def _store(self, items: list[ViewedImage], outputs: dict[tuple[str, str], torch.Tensor]) -> None:
        """Encode every output, then take per-image float64 moments of the stored values as training will decode
        them, merged image by image in shard order so that they do not depend on the batch size. The moments
        are also the finite check: an image is valid where every teacher output's moments are finite, i.e.
        where every stored value is (this also catches a float16 overflow, which a check of the float32
        outputs would pass). Invalid images are stored as zeros."""
        dtype = self.config.dtype
        encoded, finite_parts = {}, []
        for key, values in outputs.items():
            stored, scale = encode_tensor(values, dtype)
            moments = torch.stack([mean_and_m2(decode(stored[k], None if scale is None else scale[k], dtype))
                                   for k in range(len(items))])  # [B, 2, D]
            finite_parts.append(torch.isfinite(moments).flatten(1).all(1))
            encoded[key] = (stored, scale, moments, values[0].numel() // values.shape[-1])
        finite_parts = torch.stack(finite_parts)
        finite = finite_parts.all(0)
        for stored, scale, _, _ in encoded.values():
            stored[~finite] = 0
            if scale is not None:
                scale[~finite] = 0
        finite_parts, finite = finite_parts.cpu().numpy(), finite.cpu().numpy()
        for k in np.flatnonzero(~finite):
            name, part = list(outputs)[int(np.argmin(finite_parts[:, k]))]  # the first teacher output that failed
            self.invalid.append({"key": items[k].key, "index": items[k].index,
                                 "reason": f"non-finite {part} output of teacher {name}"})
        positions = np.array([item.position for item in items])
        for (name, part), (stored, scale, moments, count) in encoded.items():
            self.features[f"teachers/{name}/{part}"][positions] = as_stored_array(stored, dtype)
            if scale is not None:
                self.features[f"teachers/{name}/{part}_scale"][positions] = scale.cpu().numpy()
            moments = moments.cpu().numpy()
            for k in np.flatnonzero(finite):
                self.moments[(name, part)] = self.moments[(name, part)].merge(Moments(float(count), *moments[k]))
        self.valid[positions[finite]] = 1

    def flush(self) -> None:
        arrays: dict[str, np.ndarray] = dict(self.features)
        if self.adding:
            self._check_against_store()
            arrays.update({f"teachers/{t.name}/valid": self.valid for t in self.layouts})
        else:
            arrays.update({"keys": self.keys.astype(str), "valid": self.valid, "views": self.views})
        for (name, part), moments in self.moments.items():
            arrays[f"teachers/{name}/moments/{part}"] = moments.to_array()
        record = {"shard": self.store.shard_names[self.shard_id], "count": self.count,
                  "num_valid": int(self.valid.sum()), "invalid": sorted(self.invalid, key=lambda e: e["index"])}
        self.store.write_shard(self.shard_id, arrays, record,
                               teachers=[t.name for t in self.layouts] if self.adding else None)

    def _check_against_store(self) -> None:
        """An added teacher's rows must be the store's: the same keys, and views drawn with the same parameters."""
        rows = self.store.rows(self.shard_id)
        stored_keys = self.store.group["keys"][rows]
        if list(stored_keys) != list(self.keys[: self.count]):
            raise CacheError(f"{self.store.url}: image shard {self.store.shard_names[self.shard_id]} holds other keys "
                             "than the store's; its data changed since the store was built")
        if not np.array_equal(self.store.group["views"][rows], self.views[: self.count]):
            raise CacheError(f"{self.store.url}: the views of image shard {self.store.shard_names[self.shard_id]} "
                             "differ from the store's; the images changed since the store was built")


class ShardFlusher:
    """Writes finished shards on a thread of its own, so the teachers run on the next shard's batches while a
    shard's arrays go to the store (Zarr's writes release the GIL). At most `depth` shards wait, which bounds
    the memory it costs; a write's error is raised in the main loop, and leaving the block waits for every
    write, so no shard is left half-written behind a finished run."""

    def __init__(self, depth: int = 2):
        self.depth = depth
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="cache-write")
        self.pending: deque[tuple[int, Future]] = deque()
        self.finished: list[tuple[int, float]] = []

    def __enter__(self) -> ShardFlusher:
        return self

    def __exit__(self, *error) -> None:
        self.pool.shutdown(wait=True)  # an interrupted run still finishes the writes it started
        if error[0] is None:
            self.written(wait=True)  # raises a write's error

    def submit(self, buffer: ShardBuffer) -> None:
        while len(self.pending) >= self.depth:
            count, future = self.pending.popleft()
            self.finished.append((count, future.result()))
        self.pending.append((buffer.count, self.pool.submit(_timed_flush, buffer)))

    def written(self, wait: bool = False) -> list[tuple[int, float]]:
        """(images, seconds) of each write finished since the last call, in order (with `wait`, all of them)."""
        while self.pending and (wait or self.pending[0][1].done()):
            count, future = self.pending.popleft()
            self.finished.append((count, future.result()))
        finished, self.finished = self.finished, []
        return finished


def _timed_flush(buffer: ShardBuffer) -> float:
    start = time.perf_counter()
    buffer.flush()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------ the command

def _open_or_create(url: str, identity: dict, overwrite: bool, rank: int, world_size: int, barrier) -> CacheStore:
    files = SideFiles(url)
    if rank == 0:
        if overwrite:
            files.remove()
        manifest = files.read(MANIFEST)
        if manifest is None:
            store = CacheStore.create(url, identity)
        else:
            store = CacheStore.open(url, writable=True)
            _check_identity(url, store.identity, identity)
        if barrier:
            barrier()
        return store
    if barrier:
        barrier()
    elif overwrite:
        raise CacheError("--overwrite with several writers needs torchrun (a rendezvous); run it once alone first")
    _wait_for_manifest(url)
    store = CacheStore.open(url, writable=True)
    _check_identity(url, store.identity, identity)
    return store


def _check_identity(url: str, stored: dict, wanted: dict,
                    refusal: str = "was built with other settings; refusing to extend it (use --overwrite to rebuild, "
                                   "or another --out)") -> None:
    changed = fingerprint_differences(stored["dataset"], wanted["dataset"])
    differences = ([f"dataset: {changed}"] if changed else []) + identity_differences(
        {k: v for k, v in stored.items() if k != "dataset"}, {k: v for k, v in wanted.items() if k != "dataset"})
    if differences:
        raise CacheError(f"{url} {refusal}. Differences: " + "; ".join(differences[:6])
                         + (f"; and {len(differences) - 6} more" if len(differences) > 6 else ""))


def _open_for_addition(url: str, identity: dict, rank: int, barrier) -> CacheStore:
    """The finished store at `url`, taking `identity`'s teachers beside its own: the same data, views and
    storage, checked before anything is created (rank 0 creates the arrays; the others wait for it)."""
    names = {t["name"] for t in identity["teachers"]}

    def opened() -> CacheStore:
        store = CacheStore.open(url, writable=True)
        _check_identity(url, {**store.identity, "teachers": identity["teachers"]}, identity,
                        "cannot take these teachers: they would see other data, views or storage")
        return store

    if rank == 0:
        store = opened()
        store.begin_addition(identity["teachers"])
        if barrier:
            barrier()
        return store
    if barrier:
        barrier()
    else:
        _wait_for_manifest(url, lambda m: names <= {t["name"] for t in m["identity"]["teachers"] + m.get("adding", [])})
    return opened()


def _wait_for_manifest(url: str, ready=lambda manifest: True) -> None:
    """Plain processes (no rendezvous): poll until rank 0 has written a manifest that is `ready`."""
    files, deadline = SideFiles(url), time.monotonic() + MANIFEST_WAIT_SECONDS
    while (manifest := files.read(MANIFEST)) is None or not ready(manifest):
        if time.monotonic() > deadline:
            raise CacheError(f"{url}: rank 0 did not prepare the store within {MANIFEST_WAIT_SECONDS} s")
        time.sleep(0.5)


def addition_config(url: str, teachers: tuple[str, ...], batch_size: int = 32, workers: int = 2,
                    max_invalid: float = 0.01) -> CacheConfig:
    """The config that adds `teachers` to the store at `url`: its own views and storage."""
    identity = CacheStore.open(url).identity
    views, storage = identity["views"], identity["storage"]
    return CacheConfig(teachers, views=views["count"], seed=views["seed"],
                       view_config=ViewConfig.from_dict(views["config"]), dtype=storage["dtype"],
                       patch_pool=storage["patch_pool"], cls_only=storage["cls_only"], batch_size=batch_size,
                       workers=workers, max_invalid=max_invalid)


def _distributed_barrier(world_size: int):
    """With torchrun (MASTER_ADDR set) ranks meet at a gloo barrier; plain processes poll the manifest instead."""
    if world_size == 1 or "MASTER_ADDR" not in os.environ:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.barrier


def stage_rates(counts: dict[str, int], seconds: dict[str, float]) -> str:
    """`decode 540 img/s · forward 640 img/s · write ...`: each stage's images over its own time, and "..." until
    it has run long enough to measure (a first shard's write would otherwise read as billions of img/s)."""
    return " · ".join(f"{stage} {counts[stage] / seconds[stage]:,.0f} img/s" if seconds[stage] >= 0.05 and counts[stage]
                      else f"{stage} ..." for stage in seconds)


class WriterLock:
    """One cache-teachers run per store: its rank 0 holds an advisory lock (flock) on `<store>.lock` beside the
    store for the whole run, which the kernel releases when the process ends, however it ends (kill -9
    included); the file says who holds it. Only local (and NFS-style) file systems have such locks; a store on
    an object store (s3://, gs://) is not guarded, and the ranks of one run share their rank 0's lock."""

    def __init__(self, url: str):
        fs, path = fsspec.core.url_to_fs(url)
        self.path = f"{path.rstrip('/')}.lock" if isinstance(fs, LocalFileSystem) else None
        self.url, self.file = url, None

    def __enter__(self) -> WriterLock:
        if self.path is None:
            return self
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            owner = self.file.read().strip() or "another process"
            self.file.close()
            raise CacheError(f"{self.url} is being written by another cache-teachers run ({owner}); wait for it to "
                             "end, or stop it (its lock goes with its process)") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.file.flush()
        return self

    def __exit__(self, *error) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


def cache_teachers(data: str, out: str, config: CacheConfig, overwrite: bool = False, add: bool = False,
                   rank: int | None = None, world_size: int | None = None, device: str | None = None,
                   show_progress: bool = True) -> dict[str, Any]:
    """Build (or resume) the cache of `config.teachers` over the shards in `data`, or with `add` add them to
    the finished store `out` (see `addition_config`); returns a summary. Rank 0 holds the store's WriterLock."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    with WriterLock(out) if rank == 0 else contextlib.nullcontext():
        return _cache_teachers(data, out, config, overwrite, add, rank, world_size, device, show_progress)


def _cache_teachers(data: str, out: str, config: CacheConfig, overwrite: bool, add: bool, rank: int, world_size: int,
                    device: str | None, show_progress: bool) -> dict[str, Any]:
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    shard_set = ShardSet.open(data)
    teachers = [create_teacher(spec, device) for spec in config.teachers]
    if len({t.name for t in teachers}) != len(teachers):
        raise CacheError(f"two teachers share a name: {[t.name for t in teachers]}; give local-dir paths distinct names")
    precision = "bfloat16-autocast" if device.type == "cuda" else "float32"
    identity = build_identity(shard_set, teachers, config, precision)
    if add and overwrite:
        raise CacheError("--add extends a finished store; it cannot be combined with --overwrite")
    if add:
        store = _open_for_addition(out, identity, rank, _distributed_barrier(world_size))
        done = set.intersection(*(store.completed_shards(t.name) for t in teachers))
    else:
        store = _open_or_create(out, identity, overwrite, rank, world_size, _distributed_barrier(world_size))
        done = store.completed_shards()
    todo = [j for j in shard_set.assigned_shards(rank, world_size) if j not in done]
    sizes = sorted({t.preprocessing.input_size for t in teachers})
    loader = shard_loader(partial(viewed_images, shard_set, todo, config, sizes), config.workers, prefetch_factor=8)
    timings = {"decode": 0.0, "forward": 0.0, "encode": 0.0, "write": 0.0}
    counts = {"decode": 0, "forward": 0, "encode": 0, "write": 0}  # images through each stage so far
    images = 0
    buffers: dict[int, ShardBuffer] = {}
    for empty in (j for j in todo if shard_set.shards[j].count == 0):
        ShardBuffer(store, empty, config, adding=add).flush()
    start = time.perf_counter()
    with progress_bar("rates") as progress, ShardFlusher() as flusher:
        task = progress.add_task(f"caching (rank {rank}/{world_size})", total=sum(shard_set.shards[j].count for j in todo),
                                 rates="", visible=show_progress)
        for item in loader:
            if item.shard_id not in buffers:
                buffers[item.shard_id] = ShardBuffer(store, item.shard_id, config, adding=add)
            buffer = buffers[item.shard_id]
            buffer.add(item)
            timings["decode"] += item.seconds
            counts["decode"] += 1
            if buffer.batch_ready:
                batch = min(len(buffer.pending), config.batch_size)
                forward, encoding = buffer.run_batch(teachers, device)
                timings["forward"] += forward
                timings["encode"] += encoding
                counts["forward"] += batch
                counts["encode"] += batch
            if buffer.complete:
                flusher.submit(buffer)
                del buffers[item.shard_id]
            for written, seconds in flusher.written():
                counts["write"] += written
                timings["write"] += seconds
            images += 1
            progress.update(task, advance=1, rates=stage_rates(counts, timings))
        for written, seconds in flusher.written(wait=True):
            counts["write"] += written
            timings["write"] += seconds
        progress.update(task, rates=stage_rates(counts, timings))
    if buffers:  # the data ended inside a shard: the index promised more samples than the tar holds
        raise CacheError(f"shards {sorted(buffers)} ended early; their records were not written")
    complete = store.finalize(config.max_invalid)
    elapsed = time.perf_counter() - start
    summary = {"store": out, "rank": rank, "world_size": world_size, "shards_written": len(todo),
               "shards_skipped": len(shard_set.assigned_shards(rank, world_size)) - len(todo),
               "images": images, "seconds": round(elapsed, 2), "images_per_second": round(images / max(elapsed, 1e-9), 1),
               **{f"{stage}_images_per_second": round(counts[stage] / s, 1) if s > 0 else None
                  for stage, s in timings.items()},
               "complete": complete}
    if complete:
        summary["invalid"] = store.manifest["completion"]["num_invalid"]
        summary.update({f"invalid ({cause})": count for cause, count in store.manifest["completion"]["invalid_by_cause"].items()})
    elif show_progress:
        console.print(f"rank {rank}: done; {store.num_shards - len(store.completed_shards())} shards remain for other ranks")
    return summary
