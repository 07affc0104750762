"""Teacher targets for a batch, on the device: decoded from the cache, or computed by online teachers.

Either way a method receives, per teacher, float32 CLS [B, D] and patch [B, T_student, D] tokens: patch
grids are resized to the student's grid (bilinear), and for methods that ask (UNIC, SeFA) both token types
are standardised with the dataset statistics (per teacher, CLS and patch separately).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F

from distillery.cache.stats import Moments
from distillery.cache.store import CacheStore, TeacherStats, decode
from distillery.console import progress_bar
from distillery.data.shards import ShardSet, decode_image
from distillery.data.views import ViewConfig, draw_view, normalize, replay
from distillery.models.teachers import Teacher, Tokens

STD_FLOOR = 1e-6


def resize_patch_grid(patch: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """[B, h*w, D] on grid (h, w) to [B, H*W, D] on `target`, bilinear; unchanged when the grids agree."""
    if tuple(grid) == tuple(target):
        return patch
    b, _, d = patch.shape
    image = patch.transpose(1, 2).reshape(b, d, *grid)
    resized = F.interpolate(image.float(), size=target, mode="bilinear", align_corners=False)
    return resized.flatten(2).transpose(1, 2)


def standardize(tokens: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (tokens - mean) / std.clamp_min(STD_FLOOR)


class TargetSource:
    """Produces `{teacher: Tokens}` for a batch (already on the device)."""

    def __init__(self, names: list[str], grids: list[tuple[int, int]], student_grid: tuple[int, int],
                 stats: dict[str, TeacherStats] | None, device: torch.device, dtype: dict[str, str] | None = None,
                 teachers: list[Teacher] | None = None):
        self.names, self.student_grid = names, student_grid
        self.grids = dict(zip(names, grids, strict=True))  # by teacher name, so no order can misalign them
        self.dtype, self.teachers = dtype, teachers
        self.stats = None if stats is None else {
            name: TeacherStats(*(None if v is None else v.to(device) for v in (s.cls_mean, s.cls_std, s.patch_mean, s.patch_std)))
            for name, s in stats.items()}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Tokens]:
        raw = self._online(batch) if self.teachers is not None else self._cached(batch)
        out = {}
        for name, tokens in raw.items():
            cls, patch = tokens.cls.float(), resize_patch_grid(tokens.patch.float(), self.grids[name], self.student_grid)
            if self.stats is not None:
                s = self.stats[name]
                cls, patch = standardize(cls, s.cls_mean, s.cls_std), standardize(patch, s.patch_mean, s.patch_std)
            out[name] = Tokens(cls, patch)
        return out

    def _cached(self, batch: dict[str, Any]) -> dict[str, Tokens]:
        def part(name: str, which: str) -> torch.Tensor:
            return decode(batch[f"targets/{name}/{which}"], batch.get(f"targets/{name}/{which}_scale"), self.dtype[name])

        return {name: Tokens(part(name, "cls"), part(name, "patch")) for name in self.names}

    def _online(self, batch: dict[str, Any]) -> dict[str, Tokens]:
        out = {}
        for name, teacher in zip(self.names, self.teachers, strict=True):
            p = teacher.preprocessing
            pixels = batch[f"teacher_pixels/{p.input_size[0]}x{p.input_size[1]}"]
            out[name] = teacher(normalize(pixels, p.mean, p.std))
        return out


def cached_stats(store: CacheStore, names: list[str]) -> dict[str, TeacherStats]:
    return {name: store.stats(name) for name in names}


def online_stats(teachers: list[Teacher], shard_set: ShardSet, samples: int, view_config: ViewConfig, view_seed: int,
                 device: torch.device, batch_size: int = 64) -> dict[str, TeacherStats]:
    """Standardisation statistics from a pre-pass over the first `samples` images (view 0 of each), for online
    teachers without a cache to read exact statistics from."""
    moments: dict[tuple[str, str], Moments] = {(t.name, p): Moments.empty(t.embed_dim) for t in teachers for p in ("cls", "patch")}
    images = []

    def flush() -> None:
        for teacher in teachers:
            p = teacher.preprocessing
            pixels = torch.stack([replay(image, params, p.input_size) for image, params in images]).to(device)
            tokens = teacher(normalize(pixels, p.mean, p.std))
            moments[(teacher.name, "cls")] = moments[(teacher.name, "cls")].merge(Moments.of(tokens.cls))
            moments[(teacher.name, "patch")] = moments[(teacher.name, "patch")].merge(Moments.of(tokens.patch))
        images.clear()

    with progress_bar() as progress:
        task = progress.add_task("teacher statistics pre-pass", total=min(samples, shard_set.num_samples))
        records = (record for shard_id in range(len(shard_set)) for record in shard_set.records(shard_id))
        for record in itertools.islice(records, samples):
            image = decode_image(record.image_bytes, record.key)
            images.append((image, draw_view(view_config, view_seed, record.index, 0, image.height, image.width)))
            if len(images) == batch_size:
                flush()
            progress.advance(task)
        if images:
            flush()
    as_tensor = lambda a: torch.from_numpy(a).float()  # noqa: E731
    return {t.name: TeacherStats(as_tensor(moments[(t.name, "cls")].mean), as_tensor(moments[(t.name, "cls")].std),
                                 as_tensor(moments[(t.name, "patch")].mean), as_tensor(moments[(t.name, "patch")].std))
            for t in teachers}
