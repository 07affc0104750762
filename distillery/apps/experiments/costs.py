"""What an experiment costs: the cache's bytes on disk, and GPU-hours from measured throughput.

Bytes come from the same function `distillery cache info` reports for a written store. GPU-hours divide image
counts by images/s from `benchmarks/gpu_throughput.json`:

```json
{"device": "...", "teacher_images_per_s": {"vit_small_patch16_224@224": 8214.7, ...},
 "train_images_per_s": {"unic:vit_small_patch16_224": 900.0, "student:vit_small_patch16_224": 1052.9, ...}}
```

A figure measured for the model (architecture, input size and FLOPs all equal) is used as it is; any other is
scaled by FLOPs from the nearest measured one, and the plan says so. `student:arch` is the bare student's
training rate, for methods with no figure of their own.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from distillery.apps.experiments.architectures import ModelGeometry, PlannedTeacher, architecture
from distillery.apps.experiments.definition import ExperimentError


class PlannedStore(NamedTuple):
    """The parts of a CacheStore that `cache.verify.bytes_per_view` reads, for a store not yet written."""

    dtype: str
    cls_only: bool
    teachers: list


def bytes_per_view(teachers: list[PlannedTeacher], dtype: str, patch_pool: int, cls_only: bool) -> dict[str, int]:
    """Stored bytes of one view of one image per teacher: the arithmetic `distillery cache info` reports."""
    from distillery.cache.store import TeacherLayout
    from distillery.cache.verify import bytes_per_view as stored_bytes_per_view
    from distillery.cache.writer import pooled_grid

    layouts = [TeacherLayout(t.name, t.spec, t.geometry.dim, t.geometry.grid, pooled_grid(t.geometry.grid, patch_pool), {})
               for t in teachers]
    return stored_bytes_per_view(PlannedStore(dtype, cls_only, layouts))


def store_name(teachers: list[PlannedTeacher], cache: dict[str, Any]) -> str:
    """One store per (teachers, views, seed, storage): experiments that agree on them share it."""
    return ("+".join(t.name for t in teachers) + f"_v{cache['views']}_seed{cache['seed']}_{cache['dtype']}"
            + ("_cls" if cache["cls_only"] else f"_pool{cache['patch_pool']}")
            + (f"_{Path(cache['view_config']).stem}" if cache.get("view_config") else "") + ".zarr")


@dataclass(frozen=True)
class Throughput:
    """Measured images/s on one GPU kind: forward passes by `arch[@size]`, training by `method:arch`."""

    path: Path
    device: str
    forward: dict[str, float]
    train: dict[str, float]

    @classmethod
    def load(cls, path: Path) -> Throughput | None:
        """None when the file is not there (the plan then says "not measured")."""
        if not path.exists():
            return None
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ExperimentError(f"{path}: not valid JSON ({error})") from error
        for key in ("device", "teacher_images_per_s", "train_images_per_s"):
            if key not in values:
                raise ExperimentError(f"{path}: missing key {key!r}")
        for key in ("teacher_images_per_s", "train_images_per_s"):
            bad = [k for k, v in values[key].items() if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0]
            if bad:
                raise ExperimentError(f"{path}: {key}[{bad[0]!r}] must be a positive number of images per second")
        return cls(path, str(values["device"]), dict(values["teacher_images_per_s"]), dict(values["train_images_per_s"]))


class Rate(NamedTuple):
    images_per_s: float | None
    how: str  # "measured as KEY", "scaled from KEY by FLOPs ...", or why there is none


def forward_rate(throughput: Throughput | None, geometry: ModelGeometry) -> Rate:
    """Forward images/s of a model: measured for its architecture and size, else scaled from the nearest in FLOPs."""
    if throughput is None or not throughput.forward:
        return Rate(None, "not measured")
    key, measured, exact = _closest(throughput, throughput.forward, geometry)
    if exact:
        return Rate(throughput.forward[key], f"measured as {key}")
    return Rate(throughput.forward[key] * measured.gflops / geometry.gflops,
                f"scaled from {key} by FLOPs ({measured.gflops:.3g} / {geometry.gflops:.3g} GFLOPs)")


def train_rate(throughput: Throughput | None, method: str, student: ModelGeometry, pass_gflops: float) -> Rate:
    """Training images/s of `method` with this student.

    Measured as `method:arch`, or scaled by student FLOPs from the nearest figure of the same method; else the
    bare student's rate (`student:arch`) scaled by the FLOPs of every student pass a sample takes (`pass_gflops`:
    the teacher view, random views, crops): a lower bound, as heads, losses and the EMA copy are not counted."""
    if throughput is None:
        return Rate(None, "not measured")
    for prefix, gflops in ((f"{method}:", student.gflops), ("student:", pass_gflops)):
        candidates = {k: v for k, v in throughput.train.items() if k.startswith(prefix)}
        if not candidates:
            continue
        key, measured, exact = _closest(throughput, candidates, student)
        if exact and prefix != "student:":
            return Rate(candidates[key], f"measured as {key}")
        bound = "; a lower bound: heads, losses and EMA not counted" if prefix == "student:" else ""
        return Rate(candidates[key] * measured.gflops / gflops,
                    f"scaled from {key} by FLOPs ({measured.gflops:.3g} / {gflops:.3g} GFLOPs per image{bound})")
    return Rate(None, f"not measured (no {method}:... or student:... entry)")


def _closest(throughput: Throughput, candidates: dict[str, float], geometry: ModelGeometry) -> tuple[str, ModelGeometry, bool]:
    """The entry measured for this model (same architecture, input size and FLOPs: exact), else the nearest in FLOPs."""
    from distillery.models.teachers import split_size

    for key in candidates:
        arch, size = split_size(key.rpartition(":")[2])
        if arch == geometry.arch and size in (None, geometry.input_size[0]):
            measured = _measured_geometry(throughput, key)
            if measured.input_size == geometry.input_size and measured.gflops == geometry.gflops:
                return key, measured, True
    geometries = {key: _measured_geometry(throughput, key) for key in candidates}
    key = min(geometries, key=lambda k: abs(math.log(geometries[k].gflops / geometry.gflops)))
    return key, geometries[key], False


def _measured_geometry(throughput: Throughput, key: str) -> ModelGeometry:
    """The architecture a throughput key names: `arch` or `arch@size`, after a `method:` prefix for training."""
    from distillery.models.teachers import split_size

    arch, size = split_size(key.rpartition(":")[2])
    try:
        return architecture(arch, size)
    except ExperimentError as error:
        raise ExperimentError(f"{throughput.path}: key {key!r}: {error}") from error


class Hours(NamedTuple):
    gpu_hours: float | None  # None when a needed rate is not measured
    detail: str


def gpu_hours(parts: list[tuple[float, Rate, str]]) -> Hours:
    """Sum of images / rate over parts, each (images, rate, label saying what the images are)."""
    details, total = [], 0.0
    for images, rate, label in parts:
        if rate.images_per_s is None:
            details.append(f"{label}: {rate.how}")
            total = math.nan
            continue
        hours = images / rate.images_per_s / 3600
        total += hours
        details.append(f"{label} = {images:,.0f} at {rate.images_per_s:,.0f}/s = {hours:.2f} h ({rate.how})")
    return Hours(None if math.isnan(total) else total, "; ".join(details))
