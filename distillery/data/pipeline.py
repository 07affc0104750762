"""The one shard pipeline: small generator stages, composed per use, run in DataLoader workers by one dataset.

As in webdataset's DataPipeline, every stage takes an iterable and yields: the split of whole shards over
ranks and DataLoader workers (`shards_for`), the records of those shards (`shard_records`), their decoded
images (`decode`), and what a use renders from them. The cache writer, the training stream and feature
extraction each compose these into a source `(worker, num_workers) -> iterable`; `ShardStream` runs the
source in each DataLoader worker, and `shard_loader` is the one DataLoader over it (items pass through
as the source yields them; sources batch themselves where they need to). Each stage runs on a plain list too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from PIL import Image

from distillery.data.shards import ImageDecodeError, Record, ShardSet, decode_image
from distillery.errors import DistilleryError

Source = Callable[[int, int], Iterable[Any]]  # (DataLoader worker, number of workers) -> items


class WorkerFailure(NamedTuple):
    """A user-facing error raised in a DataLoader worker, carried to the main process as an item. PyTorch
    re-raises a worker's exception with its whole traceback folded into the message; `ShardLoader` raises
    this one as it was, one line naming the shard and the sample."""

    error: DistilleryError


def carry_failures(items: Iterable[Any]) -> Iterator[Any]:
    """`items`, ending with a WorkerFailure instead of raising a DistilleryError (in a DataLoader worker)."""
    try:
        yield from items
    except DistilleryError as error:
        yield WorkerFailure(error)


class ShardStream(torch.utils.data.IterableDataset):
    """Runs `source(worker, num_workers)` in each DataLoader worker (worker 0 of 1 in the main process)."""

    def __init__(self, source: Source):
        self.source = source

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        items = iter(self.source(worker, num_workers))
        return items if info is None else carry_failures(items)


class ShardLoader(torch.utils.data.DataLoader):
    """The project's DataLoader: raises a worker's WorkerFailure (an item, or one inside a list batch) as the
    error it carries."""

    def __iter__(self) -> Iterator[Any]:
        for item in super().__iter__():
            for part in item if isinstance(item, list) else (item,):
                if isinstance(part, WorkerFailure):
                    raise part.error
            yield item


def shard_loader(source: Source, workers: int, prefetch_factor: int = 4, seed: int | None = None,
                 pin_memory: bool = False) -> ShardLoader:
    """A ShardLoader over `ShardStream(source)` with `workers` processes (0: in this process)."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return ShardLoader(ShardStream(source), batch_size=None, num_workers=workers, collate_fn=_as_is,
                       prefetch_factor=prefetch_factor if workers else None, generator=generator,
                       pin_memory=pin_memory, worker_init_fn=_quiet_inherited_sessions if workers else None)


class _InheritedSessionFilter(logging.Filter):
    """A forked worker inherits the parent's fsspec filesystems (s3fs, gcsfs). fsspec builds fresh ones for the
    new process, and each inherited aiohttp session, which belongs to the parent's event loop and cannot be
    closed from the child, is reported as 'Unclosed client session' when it is dropped. Only those reports
    are filtered; every other asyncio error still reaches the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Unclosed client session", "Unclosed connector"))


def _quiet_inherited_sessions(worker_id: int) -> None:
    logging.getLogger("asyncio").addFilter(_InheritedSessionFilter())


def _as_is(item: Any) -> Any:
    return item


def shards_for(shard_ids: Sequence[int], worker: int, num_workers: int) -> list[int]:
    """The whole shards one DataLoader worker reads of a rank's `shard_ids`: every num_workers-th."""
    return list(shard_ids[worker::num_workers])


class ShardRecord(NamedTuple):
    shard_id: int
    position: int  # in the shard's file order
    record: Record


def shard_records(shard_set: ShardSet, shard_ids: Iterable[int]) -> Iterator[ShardRecord]:
    """Every record of each shard, undecoded, in file order."""
    for shard_id in shard_ids:
        for position, record in enumerate(shard_set.records(shard_id)):
            yield ShardRecord(shard_id, position, record)


class Decoded(NamedTuple):
    item: ShardRecord
    image: Image.Image | None  # None when the bytes do not decode
    error: ImageDecodeError | None


def decode(items: Iterable[ShardRecord], name: Callable[[Record], str] | None = None) -> Iterator[Decoded]:
    """Each record's image, decoded once; an undecodable one comes with its error, for the next stage to
    count, skip or raise. `name` says how errors name a record (default: shard:key)."""
    for item in items:
        record = item.record
        try:
            yield Decoded(item, decode_image(record.image_bytes, name(record) if name else f"{record.shard}:{record.key}"),
                          None)
        except ImageDecodeError as error:
            yield Decoded(item, None, error)
