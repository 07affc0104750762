"""The training data stream: image shards (and the matching cache blocks) to batches, exactly resumable.

Each epoch has a seeded shard order; rank r takes every W-th shard of it and each DataLoader worker whole
shards of those, so no shard is read twice in an epoch. A worker reads a shard's images and, with a cache,
the shard's block of the chosen view in one sequential read per array, checks every row's key against the
image's, shuffles in memory, and renders what the method asked for from one decode of each image:

- the teacher view (cached or online): the view the teachers saw, replayed at the student's size;
- a random view (supervised) and multi-crops (DINO), drawn on the fly from counter-based generators;
- the label, and the cached targets or (online mode) the teacher-sized pixels.

Which of the V cached views a shard uses cycles with the epoch from a seeded offset, so within V epochs
every sample sees each of its views once and a block read touches one view only (views are independent
draws, so choosing per shard rather than per sample changes no statistic).

With repeated augmentation (DeiT's RASampler, which Proteus and TinTeM train with), an epoch takes 1/R of
each shard's samples and shows each R times in a row, with R different views, so the copies share a step
as DeiT's do; the epoch keeps its length.

Every worker stream is endless (epochs follow each other), so all ranks can take the same number of steps
whatever their shard sizes. Every batch carries the position its worker will continue from; the loop
stores the positions of the batches it consumed, and a resumed run starts each worker exactly there.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from distillery.cache.store import CacheError, CacheStore
from distillery.config import ConfigError
from distillery.data.pipeline import shard_loader
from distillery.data.shards import ImageDecodeError, ShardSet, decode_image
from distillery.data.views import (STREAM_CROPS, STREAM_RANDOM_VIEW, STREAM_SAMPLE_ORDER, STREAM_SHARD_ORDER,
                                   STREAM_VIEW_CHOICE, ViewConfig, counter_rng, draw_view, replay, sample_view)
from distillery.errors import DistilleryError

MAX_CROPS_PER_EPOCH = 64  # crop counters are epoch * 64 + crop number


@dataclass(frozen=True)
class CropSpec:
    """`count` crops of `size`; crop k is drawn with `views[min(k, len(views) - 1)]` (DINO's two globals differ)."""

    name: str
    count: int
    size: tuple[int, int]
    views: tuple[ViewConfig, ...]


@dataclass(frozen=True)
class SampleSpec:
    teacher_view: bool = False  # batch["student"] = the cached/online teacher view at the student's size
    random_view: ViewConfig | None = None  # batch["student"] = a fresh random view
    crops: tuple[CropSpec, ...] = ()  # batch["crops/<name>"]
    labels: tuple[str, ...] = ()  # batch["labels/<name>"] for each: the class, or a factor of factors.json

    def __post_init__(self) -> None:
        if self.teacher_view and self.random_view is not None:
            raise ConfigError("a sample's student view is either the teacher view or a random view")
        if sum(c.count for c in self.crops) > MAX_CROPS_PER_EPOCH:
            raise ConfigError(f"at most {MAX_CROPS_PER_EPOCH} crops per sample")


@dataclass(frozen=True)
class TeacherViews:
    """Where the teacher view and its targets come from: a cache store, or online teachers of these sizes."""

    num_views: int
    view_seed: int
    view_config: ViewConfig
    stores: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (store URL, the teachers read from it); none online
    online_sizes: tuple[tuple[int, int], ...] = ()


class Position(NamedTuple):
    """Where a worker's stream continues: epoch, index into its shard list for that epoch, record in shard order."""

    epoch: int = 0
    slot: int = 0
    record: int = 0


@dataclass
class TrainStream:
    """The training pipeline's source: call it as (DataLoader worker, workers) for that worker's batches
    (`make_loader`), or iterate it for stream 0 in this process."""

    shard_set: ShardSet
    spec: SampleSpec
    student_size: tuple[int, int]
    batch_size: int  # per rank
    seed: int
    rank: int = 0
    world_size: int = 1
    num_workers: int = 1
    teacher_views: TeacherViews | None = None
    start: list[Position] = field(default_factory=list)  # per stream; empty = from the beginning
    first_batch: int = 0  # batches already taken (resume): the loader's worker w plays stream (w + first_batch) % W
    repeats: int = 1  # repeated augmentation: each chosen sample R times, with R different teacher views

    def __post_init__(self) -> None:
        if self.repeats > 1 and (not self.spec.teacher_view or self.repeats > self.teacher_views.num_views):
            raise DistilleryError(f"repeated augmentation x{self.repeats} shows each sample in that many different "
                                  "teacher views: it needs a method that trains on the teacher view and at least "
                                  f"{self.repeats} views per image"
                                  + (f" (this run has {self.teacher_views.num_views})" if self.teacher_views else ""))
        if len(self.shard_set) < self.world_size * self.num_workers:  # each worker reads whole shards
            shards, streams = len(self.shard_set), self.world_size * self.num_workers
            size = -(-self.shard_set.num_samples // streams)
            raise DistilleryError(f"{self.shard_set.root}: {shards} shard(s) cannot feed {self.world_size} rank(s) x "
                                  f"{self.num_workers} workers (each worker reads whole shards): train with --workers "
                                  f"{max(1, shards // self.world_size)}, or rewrite the set with `distillery data shards "
                                  f"--shard-size {size}` or less")
        self._stores: list[CacheStore] = []  # opened in the worker that reads them

    def shards_of(self, epoch: int, worker: int) -> list[int]:
        order = counter_rng(self.seed, 0, STREAM_SHARD_ORDER, epoch).permutation(len(self.shard_set))
        return [int(s) for s in order[self.rank::self.world_size][worker::self.num_workers]]

    def view_of(self, shard_id: int, epoch: int) -> int:
        offset = int(counter_rng(self.seed, shard_id, STREAM_VIEW_CHOICE, 0).integers(self.teacher_views.num_views))
        return (epoch + offset) % self.teacher_views.num_views

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self(0, 1)

    def __call__(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        if num_workers > 1 and num_workers != self.num_workers:
            raise DistilleryError(f"stream built for {self.num_workers} workers runs in {num_workers}")
        # A DataLoader hands out batches from its workers in turn, starting with worker 0; after a resume at
        # batch k the next batch is due from stream k % W, so the workers take up the streams shifted by k.
        stream = (worker + self.first_batch) % self.num_workers
        buffer: list[dict[str, Any]] = []
        for sample, position in self._samples(stream, self.start[stream] if self.start else Position()):
            buffer.append(sample)
            if len(buffer) == self.batch_size:
                yield collate(buffer, stream, position)
                buffer = []

    def _samples(self, worker: int, start: Position) -> Iterator[tuple[dict[str, Any], Position]]:
        epoch, slot, first = start
        while True:
            shards = self.shards_of(epoch, worker)
            whole_pass, yielded = slot == 0 and first == 0, False  # a resumed run's first pass may be partial
            for slot in range(slot, len(shards)):
                shard_id = shards[slot]
                records = list(self.shard_set.records(shard_id))
                blocks, first_view = self._cache_blocks(shard_id, epoch, records)
                order = self._emissions(shard_id, epoch, len(records))
                for k in range(first, len(order)):
                    position, repeat = order[k]
                    view = None if first_view is None else (first_view + repeat) % self.teacher_views.num_views
                    block = blocks.get(view)
                    if block is not None and not block["valid"][position]:
                        continue
                    record = records[position]
                    try:
                        image = decode_image(record.image_bytes, f"{record.shard}:{record.key}")
                    except ImageDecodeError:
                        continue  # counted by the cache (valid=0) or by `data shards`; training skips it
                    yielded = True
                    yield self._sample(record, image, epoch, view, block, position), Position(epoch, slot, k + 1)
                first = 0
            if whole_pass and not yielded:  # it would wait forever for a batch
                names = [self.shard_set.shards[j].name for j in shards]
                raise DistilleryError(f"{self.shard_set.root or 'pipe:'}: a whole pass over shards {', '.join(names[:4])}"
                                      f"{', ...' if len(names) > 4 else ''} gave no usable sample (every row invalid "
                                      "in the cache, or no image decodes)")
            slot, epoch = 0, epoch + 1

    def _emissions(self, shard_id: int, epoch: int, count: int) -> list[tuple[int, int]]:
        """(record position, repeat) in the order this epoch shows a shard's samples."""
        order = [int(p) for p in counter_rng(self.seed, shard_id, STREAM_SAMPLE_ORDER, epoch).permutation(count)]
        if self.repeats == 1:
            return [(p, 0) for p in order]
        return [(p, repeat) for p in order[:math.ceil(count / self.repeats)] for repeat in range(self.repeats)]

    def _cache_blocks(self, shard_id: int, epoch: int, records: list) -> tuple[dict[int, dict], int | None]:
        """The shard's cache blocks by view (one per repeat; none online), and the epoch's first view."""
        if self.teacher_views is None:
            return {}, None
        first_view = self.view_of(shard_id, epoch)
        if not self.teacher_views.stores:
            return {}, first_view
        views = [(first_view + repeat) % self.teacher_views.num_views for repeat in range(self.repeats)]
        return {view: self._cache_block(shard_id, view, records) for view in views}, first_view

    def _cache_block(self, shard_id: int, view: int, records: list) -> dict:
        """The shard's rows of one view from every store, joined by sample key: each store's keys must be the
        shard's, its view parameters the first store's; a row is valid where it is valid in all of them."""
        if not self._stores:
            self._stores = [CacheStore.open(url) for url, _ in self.teacher_views.stores]
        keys = [r.key for r in records]
        joined: dict[str, Any] = {}
        for (url, teachers), store in zip(self.teacher_views.stores, self._stores, strict=True):
            block = store.read_block(shard_id, view=view, teachers=list(teachers), decoded=False)
            if list(block["keys"]) != keys:
                bad = next(i for i, (a, b) in enumerate(zip(block["keys"], keys)) if a != b)
                raise CacheError(f"{url}: shard {self.shard_set.shards[shard_id].name} row {bad} "
                                 f"holds key {block['keys'][bad]!r} but the image there is {keys[bad]!r}")
            if joined and not np.array_equal(block["views"], joined["views"]):
                raise CacheError(f"{url}: shard {self.shard_set.shards[shard_id].name} holds other view parameters "
                                 f"than {self.teacher_views.stores[0][0]}; its views were drawn differently")
            valid = block.pop("valid")
            joined["valid"] = valid if "valid" not in joined else joined["valid"] & valid
            joined.update(block)
        return joined

    def _sample(self, record, image, epoch: int, view: int | None, block: dict | None, position: int) -> dict[str, Any]:
        sample: dict[str, Any] = {"index": record.index}
        for name in self.spec.labels:
            label = self.shard_set.label_of(record, name)
            if label is None:
                raise DistilleryError(f"{record.shard}:{record.key} has no {name} label, and this method needs it")
            sample[f"labels/{name}"] = label
        if self.spec.teacher_view:
            tv = self.teacher_views
            params = (block["views"][position, view] if block is not None
                      else draw_view(tv.view_config, tv.view_seed, record.index, view, image.height, image.width))
            sample["student"] = replay(image, params, self.student_size)
            for size in tv.online_sizes:
                sample[f"teacher_pixels/{size[0]}x{size[1]}"] = replay(image, params, size)
            if block is not None:
                for key, values in block.items():
                    if "/" in key:
                        # np.array, not ascontiguousarray: that makes a 0-d per-sample scale 1-d, which collates to [B, 1]
                        sample[f"targets/{key}"] = torch.from_numpy(np.array(values[position]))
        elif self.spec.random_view is not None:
            rng = counter_rng(self.seed, record.index, STREAM_RANDOM_VIEW, epoch)
            sample["student"] = replay(image, sample_view(rng, self.spec.random_view, image.height, image.width),
                                       self.student_size)
        crop_number = 0
        for crop in self.spec.crops:
            rendered = []
            for k in range(crop.count):
                rng = counter_rng(self.seed, record.index, STREAM_CROPS, epoch * 64 + crop_number)
                config = crop.views[min(k, len(crop.views) - 1)]
                rendered.append(replay(image, sample_view(rng, config, image.height, image.width), crop.size))
                crop_number += 1
            sample[f"crops/{crop.name}"] = torch.stack(rendered)
        return sample


def collate(samples: list[dict[str, Any]], stream: int, position: Position) -> dict[str, Any]:
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else torch.tensor(values)
    batch["_stream"], batch["_position"] = stream, tuple(position)
    return batch


def make_loader(stream: TrainStream, processes: int, seed: int) -> torch.utils.data.DataLoader:
    """`processes` DataLoader workers (0: in this process); they take turns, so batch k is stream k mod W's."""
    if max(1, processes) != stream.num_workers:
        raise DistilleryError(f"stream split for {stream.num_workers} workers, loader given {processes}")
    return shard_loader(stream, processes, prefetch_factor=4, seed=seed)
