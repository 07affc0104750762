"""`distillery demo`: the whole pipeline on the embedded data, from nothing to a report, on a CPU.

synth data -> two teachers trained here (`supervised` and `dino`, exported as local-dir models) -> one cache
of both -> students (UNIC, SeFA, TinTeM from one teacher and from both) -> evaluation suite -> report. A
random-init baseline (the dino teacher's architecture, untrained) is evaluated beside them, so the report shows
what training bought.

Every step writes files and is skipped when its files are complete, so a second run only re-reads them:
the synth directory appears only when whole (staged), a model counts as done once its export holds
`model.safetensors` (an interrupted training run is resumed from its newest checkpoint), `cache-teachers`
resumes or checks a finished store itself, and the evaluation reuses every feature file whose fingerprint
still matches. What runs is described by a YAML file (configs/demo.yaml); the steps call the same
functions as the commands a user would type, so the demo is also a worked example of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distillery.console import console
from distillery.errors import DistilleryError


@dataclass(frozen=True)
class ModelRun:
    """One model the demo trains: its method config, overrides of it, and whether DINO's EMA teacher is exported."""

    name: str
    config: str
    overrides: dict[str, Any] = field(default_factory=dict)
    ema: bool = False


@dataclass(frozen=True)
class DemoConfig:
    work: Path
    report: Path
    synth: dict[str, Any]
    cache: dict[str, Any]
    teachers: tuple[ModelRun, ...]
    students: tuple[ModelRun, ...]
    baselines: dict[str, str]  # name -> train config whose student is evaluated untrained
    evaluation: dict[str, Any]
    pca_images: int = 4

    @classmethod
    def load(cls, path: str | Path, work: str | Path | None = None, report: str | Path | None = None) -> DemoConfig:
        path = Path(path)
        if not path.exists():
            raise DistilleryError(f"{path}: no such demo config")
        values = yaml.safe_load(path.read_text()) or {}
        known = {"work", "report", "synth", "cache", "teachers", "students", "baselines", "eval", "pca_images"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DistilleryError(f"{path}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
        runs = {part: tuple(_model_run(path, name, entry) for name, entry in (values.get(part) or {}).items())
                for part in ("teachers", "students")}
        if not runs["teachers"] or not runs["students"]:
            raise DistilleryError(f"{path}: needs at least one entry under teachers: and under students:")
        return cls(work=Path(work or values.get("work", "work/demo")), report=Path(report or values.get("report", "results/demo")),
                   synth=dict(values.get("synth") or {}), cache=dict(values.get("cache") or {}),
                   teachers=runs["teachers"], students=runs["students"],
                   baselines={str(k): str(v) for k, v in (values.get("baselines") or {}).items()}, evaluation=dict(values.get("eval") or {}),
                   pca_images=int(values.get("pca_images", 4)))


def _model_run(path: Path, name: str, entry: Any) -> ModelRun:
    if not isinstance(entry, dict) or "config" not in entry:
        raise DistilleryError(f"{path}: {name} needs a mapping with a config: key (a train config file)")
    extra = sorted(set(entry) - {"config", "overrides", "ema"})
    if extra:
        raise DistilleryError(f"{path}: {name}: unknown key {extra[0]!r} (config, overrides, ema)")
    return ModelRun(name, str(entry["config"]), dict(entry.get("overrides") or {}), bool(entry.get("ema", False)))


class Steps:
    """Prints what each step does or reuses, and how long it took."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def run(self, title: str, done: bool, action) -> Any:
        if done:
            console.print(f"[green]reusing[/] {title}")
            return None
        console.rule(title)
        tick = time.perf_counter()
        result = action()
        console.print(f"[green]done[/] {title} in {time.perf_counter() - tick:.0f} s")
        return result


def run_demo(config: DemoConfig) -> Path:
    """Run (or finish) every step of the demo; returns the report's path."""
    from distillery.cache.store import CacheStore
    from distillery.cache.writer import CacheConfig, cache_teachers
    from distillery.data.synth import SynthConfig, generate
    from distillery.evaluate.report import write_report
    from distillery.evaluate.suite import run_suite

    steps = Steps()
    work = config.work
    synth = work / "synth"
    steps.run(f"synth data -> {synth}", synth.exists(), lambda: generate(SynthConfig(**config.synth), synth))

    teachers = {run.name: _trained(steps, run, work, str(synth / "train"), {}) for run in config.teachers}

    store = work / "cache.zarr"
    cache_config = CacheConfig(teachers=tuple(teachers.values()), **config.cache)
    complete = store.exists() and CacheStore.open(str(store)).is_complete
    steps.run(f"cache-teachers {', '.join(teachers)} -> {store}", complete,
              lambda: cache_teachers(str(synth / "train"), str(store), cache_config))

    students = {run.name: _trained(steps, run, work, str(synth / "train"), {"cache": str(store)})
                for run in config.students}

    baselines = {name: _untrained(steps, name, train_config, work) for name, train_config in config.baselines.items()}
    suite = _suite_config(config, synth, {**baselines, **teachers, **students})
    suite_path = work / "suite.yaml"
    suite_path.write_text(yaml.safe_dump(suite, sort_keys=False))
    steps.run(f"evaluation suite -> {suite['out']}", False, lambda: run_suite(suite_path))

    runs = {run.name: work / "runs" / run.name for run in (*config.teachers, *config.students)}
    report = steps.run(f"report -> {config.report}", False, lambda: write_report(
        suite_path, teachers=list(teachers), students=list(students), baselines=list(baselines), runs=runs, out=config.report,
        pca_data=str(synth / "val"), pca_images=config.pca_images))
    console.print(f"demo finished in {time.perf_counter() - steps.start:.0f} s")
    return report


def _trained(steps: Steps, run: ModelRun, work: Path, data: str, extra: dict[str, Any]) -> str:
    """Train `run` (or resume it) and export it; returns its local-dir spec. Skipped when the export exists."""
    from distillery.train import checkpoint as ckpt
    from distillery.train.export import export_run
    from distillery.train.loop import train

    run_dir, export_dir = work / "runs" / run.name, work / "models" / run.name

    def train_and_export() -> None:
        resume = bool(ckpt.list_checkpoints(run_dir)) if run_dir.exists() else False
        values = {} if resume else {"data": data, "out": str(run_dir), **extra}
        train(values, None if resume else _with_overrides(run, work), resume=resume)
        export_run(run_dir, export_dir, ema=run.ema)

    steps.run(f"train {run.name} ({run.config}) -> {export_dir}", (export_dir / "model.safetensors").exists(),
              train_and_export)
    return f"local-dir:{export_dir}"


def _untrained(steps: Steps, name: str, train_config: str, work: Path) -> str:
    from distillery.train.export import export_initial

    export_dir = work / "models" / name
    steps.run(f"untrained {name} ({train_config}) -> {export_dir}", (export_dir / "model.safetensors").exists(),
              lambda: export_initial(train_config, export_dir))
    return f"local-dir:{export_dir}"


def _with_overrides(run: ModelRun, work: Path) -> Path:
    """The run's config file with the demo's overrides merged in (nested sections merged key by key)."""
    from distillery.train.config import read_yaml

    values = read_yaml(run.config)
    for key, value in run.overrides.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) and isinstance(values.get(key), dict) else value
    path = work / "configs" / f"{run.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def _suite_config(config: DemoConfig, synth: Path, models: dict[str, str]) -> dict[str, Any]:
    return {"models": models,
            "data": {"train": str(synth / "train"), "val": str(synth / "val"),
                     "ood": {"near": str(synth / "ood" / "near"), "far": str(synth / "ood" / "far")},
                     "retrieval": {"dataset": "synth", "root": str(synth / "retrieval")}},
            "tasks": config.evaluation.get("tasks", ["knn", "linear", "retrieval", "ood", "cka"]),
            "settings": config.evaluation.get("settings", {}),
            "out": str(config.work / "eval")}
