"""`cache info` and `cache verify`: what a store holds, and whether it still matches its images and teachers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from distillery.cache.store import CacheError, CacheStore, invalid_by_cause, storage_tolerance
from distillery.cache.writer import pool_patches
from distillery.data.shards import ShardSet, decode_image, fingerprint_differences
from distillery.data.views import ViewConfig, draw_view, normalize, replay
from distillery.models.teachers import create_teacher

ITEM_SIZE = {"float16": 2, "bfloat16": 2, "int8": 1}


def bytes_per_view(store: CacheStore) -> dict[str, int]:
    """Stored bytes of one view of one image, per teacher (features plus int8 scales)."""
    size = ITEM_SIZE[store.dtype]
    out = {}
    for t in store.teachers:
        tokens = 1 + (0 if store.cls_only else t.num_patches)
        out[t.name] = tokens * t.dim * size + (tokens * 2 if store.dtype == "int8" else 0)
    return out


def describe_store(store: CacheStore) -> dict[str, Any]:
    done = store.completed_shards()
    storage = store.identity["storage"]
    return {
        "store": store.url,
        "samples (N)": store.num_samples,
        "views (V)": store.num_views,
        "dtype": store.dtype,
        "patch pool": "cls only" if store.cls_only else storage["patch_pool"],
        "teachers": [f"{t.name} (dim {t.dim}, grid {t.grid[0]}x{t.grid[1]}"
                     + ("" if store.cls_only else f" stored {t.stored_grid[0]}x{t.stored_grid[1]}") + ")"
                     for t in store.teachers],
        "bytes per view": [f"{name}: {n:,}" for name, n in bytes_per_view(store).items()],
        "size on disk": f"{store.files.size() / 2**20:,.1f} MiB",
        "shards complete": f"{len(done)}/{store.num_shards}",
        "invalid rows": store.manifest["completion"]["num_invalid"] if store.is_complete else "(incomplete)",
        **({"being added": [f"{t.name} ({len(store.completed_shards(t.name))}/{store.num_shards} shards)"
                            for t in store.adding]} if store.adding else {}),
    }


def verify_store(store: CacheStore, data: str, recompute: int = 0, seed: int = 0,
                 progress: Callable[[int], None] | None = None, max_invalid: float = 0.01) -> dict[str, Any]:
    """Check completeness, keys against the data, finiteness, the teachers' invalid rows (at most `max_invalid`
    of the images each) and statistics, and `recompute` random rows against fresh teachers.

    Returns `{"checks": [(name, ok, detail)], "ok": bool}`.
    """
    checks: list[tuple[str, bool, str]] = []
    missing = sorted(set(range(store.num_shards)) - store.completed_shards())
    detail = (f"missing shards {missing[:10]}" if missing else f"{store.num_shards} shards" if store.is_complete
              else "every shard is written, but the store was not marked complete (a refused or unfinished run)")
    checks.append(("all shards complete", not missing and store.is_complete, detail))
    shard_set = ShardSet.open(data)
    changed = fingerprint_differences(store.identity["dataset"], shard_set.fingerprint())
    fingerprint_ok = changed is None
    checks.append(("data matches the manifest", fingerprint_ok, str(data) if fingerprint_ok else changed))
    mismatched, nonfinite = [], []
    for shard_id in sorted(store.completed_shards()):
        block = store.read_block(shard_id, view=None)
        keys = [r.key for r in shard_set.records(shard_id)] if fingerprint_ok else list(block["keys"])
        if list(block["keys"]) != keys:
            mismatched.append(store.shard_names[shard_id])
        valid = torch.from_numpy(block["valid"].astype(bool))
        for name, values in block.items():
            if "/" in name and not torch.isfinite(values[valid]).all():
                nonfinite.append(f"{store.shard_names[shard_id]}:{name}")
        if progress:
            progress(1)
    checks.append(("stored keys match the images", not mismatched, f"mismatch in {mismatched[:5]}" if mismatched else "all rows"))
    checks.append(("no NaN/Inf in valid rows", not nonfinite, ", ".join(nonfinite[:5]) if nonfinite else "all arrays"))
    if not missing:
        entries = store.invalid_rows()
        try:
            store.check_invalid(max_invalid, entries)
            causes = invalid_by_cause(entries)
            checks.append(("teachers' invalid rows within --max-invalid", True,
                           ", ".join(f"{cause}: {n}" for cause, n in causes.items()) or "none"))
        except CacheError as error:
            checks.append(("teachers' invalid rows within --max-invalid", False, str(error).split(": ", 1)[1]))
        unusable = [t.name for t in store.teachers if not _finite_stats(store, t.name)]
        checks.append(("teacher statistics finite", not unusable,
                       f"{', '.join(unusable)}: no valid row, or non-finite mean/std" if unusable else "every teacher"))
    if recompute > 0 and fingerprint_ok:
        checks.append(_recompute(store, shard_set, recompute, seed))
    return {"checks": checks, "ok": all(ok for _, ok, _ in checks)}


def _finite_stats(store: CacheStore, teacher: str) -> bool:
    stats = store.stats(teacher)
    parts = [stats.cls_mean, stats.cls_std] + ([] if stats.patch_mean is None else [stats.patch_mean, stats.patch_std])
    return store.moments(teacher, "cls").count > 0 and all(bool(torch.isfinite(p).all()) for p in parts)


def _recompute(store: CacheStore, shard_set: ShardSet, count: int, seed: int) -> tuple[str, bool, str]:
    """Decode `count` random valid rows, replay their views, run the teachers again, compare with the store."""
    view_config = ViewConfig.from_dict(store.identity["views"]["config"])
    view_seed = store.identity["views"]["seed"]
    pool = store.identity["storage"]["patch_pool"]
    teachers = [create_teacher(t.spec) for t in store.teachers]
    for teacher, layout in zip(teachers, store.teachers, strict=True):
        if teacher.fingerprint() != layout.fingerprint:
            return ("recomputed rows agree", False, f"teacher {layout.spec} is not the one that wrote the store")
    worst, checked = 0.0, 0
    tolerance = storage_tolerance(store.dtype)
    if store.identity["storage"]["forward_precision"] != "float32":
        tolerance += 2**-6  # the store was written under bf16 autocast; this check recomputes in float32
    picks = _spread_rows(store, count, seed)
    for record, view in ((r, v) for shard_id, rows in picks.items()
                         for r, v in zip(_records_at(shard_set, shard_id, [p for p, _ in rows]), [v for _, v in rows])):
        stored = store.read_rows([record.index], [view])
        if not stored["valid"][0]:
            continue
        if stored["keys"][0] != record.key:
            return ("recomputed rows agree", False, f"row {record.index} holds key {stored['keys'][0]}, data has {record.key}")
        image = decode_image(record.image_bytes, record.key)
        params = draw_view(view_config, view_seed, record.index, view, image.height, image.width)
        if not np.array_equal(params, stored["views"][0]):
            return ("recomputed rows agree", False, f"view {view} of {record.key} draws other parameters than stored")
        for teacher, layout in zip(teachers, store.teachers, strict=True):
            p = teacher.preprocessing
            tokens = teacher(normalize(replay(image, params, p.input_size)[None], p.mean, p.std))
            fresh = {"cls": tokens.cls}
            if not store.cls_only:
                fresh["patch"] = pool_patches(tokens.patch, teacher.grid, pool)
            for part, value in fresh.items():
                saved = stored[f"{layout.name}/{part}"]
                scale = value.abs().amax(-1, keepdim=True).clamp_min(1e-12)
                worst = max(worst, float(((saved - value).abs() / scale).max()))
        checked += 1
    ok = worst <= tolerance
    return ("recomputed rows agree", ok, f"{checked} rows over {len(picks)} of {store.num_shards} shards, worst error "
                                         f"{worst:.2e} of the token's max |x| (tolerance {tolerance:.2e} for "
                                         f"{store.dtype}); {detection(store.num_samples, checked)}")


def _spread_rows(store: CacheStore, count: int, seed: int) -> dict[int, list[tuple[int, int]]]:
    """`count` (position, view) rows drawn across every shard in turn (a random order of the shards, then
    positions without replacement within each), so that K >= shards reaches every shard."""
    rng = np.random.default_rng(seed)
    order = [int(j) for j in rng.permutation(sorted(store.completed_shards()))]
    wanted = {j: 0 for j in order}
    for k in range(min(count, store.num_samples)):
        wanted[order[k % len(order)]] += 1
    return {j: [(int(p), int(rng.integers(store.num_views)))
                for p in rng.choice(store.counts[j], size=min(n, store.counts[j]), replace=False)]
            for j, n in wanted.items() if n}


def _records_at(shard_set: ShardSet, shard_id: int, positions: list[int]) -> list:
    records = list(shard_set.records(shard_id))
    return [records[p] for p in positions]


def detection(num_samples: int, checked: int) -> str:
    """How likely `checked` rows drawn without replacement are to include a changed image, when one image or 1%
    of them changed (hypergeometric: 1 - C(N - m, K) / C(N, K))."""
    def found(changed: int) -> float:
        missed = 1.0
        for i in range(checked):
            missed *= max(num_samples - changed - i, 0) / (num_samples - i)
        return 1 - missed

    return (f"a change to one image is found with probability {found(1):.1%}, to 1% of them with "
            f"{found(max(1, num_samples // 100)):.1%}")
