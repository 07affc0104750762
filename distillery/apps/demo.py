"""`distillery demo`: the whole pipeline on the embedded data, from nothing to a report, on a CPU.

synth data -> two shipped teachers (checked against their provenance records; `make teachers` retrains them)
-> one cache of both -> students (UNIC and SeFA from both; UNIC, TinTeM and Proteus from one) and the same
student trained alone on labels -> evaluation suite -> report. A random-init baseline (the students'
architecture, untrained) is evaluated beside them, so the report shows what training bought.

Every step writes files and is skipped when its files are complete, so a second run only re-reads them:
the synth directory appears only when whole (staged), a model counts as done once its export holds
`model.safetensors` (an interrupted training run is resumed from its newest checkpoint), `cache-teachers`
resumes or checks a finished store itself, and the evaluation reuses every feature file whose fingerprint
still matches and every result whose model, data and settings are unchanged. What runs is described by a
YAML file (configs/demo.yaml); the steps call the same functions as the commands a user would type, so the
demo is also a worked example of them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distillery.config import check_keys, project_path, read_yaml
from distillery.console import console
from distillery.errors import DistilleryError
from distillery.files import write_atomic


PROVENANCE = "provenance.json"  # beside a shipped teacher's weights: how it was made


@dataclass(frozen=True)
class ModelRun:
    """One model the demo trains: its method config, overrides of it, and whether DINO's EMA teacher is exported.
    A `shipped` model is trained once by `make teachers` into that directory (committed) and read from there."""

    name: str
    config: str
    overrides: dict[str, Any] = field(default_factory=dict)
    ema: bool = False
    shipped: str | None = None
    expertise: str | None = None  # a teacher's: the label it knows (its students are scored on it)


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
    alone: ModelRun | None = None  # the students' architecture trained alone on labels, without teachers

    @classmethod
    def load(cls, path: str | Path, work: str | Path | None = None, report: str | Path | None = None) -> DemoConfig:
        path = Path(path)
        values = check_keys(read_yaml(path), str(path), ("work", "report", "synth", "cache", "teachers", "students",
                                                          "alone", "baselines", "eval", "pca_images"))
        runs = {part: tuple(_model_run(path, name, entry) for name, entry in (values.get(part) or {}).items())
                for part in ("teachers", "students")}
        if not runs["teachers"] or not runs["students"]:
            raise DistilleryError(f"{path}: needs at least one entry under teachers: and under students:")
        unknown_teachers = [f"{run.name}: {t}" for run in runs["students"]
                            for t in run.overrides.get("cache_teachers") or () if t not in {r.name for r in runs["teachers"]}]
        if unknown_teachers:
            raise DistilleryError(f"{path}: student {unknown_teachers[0]} is not one of the teachers")
        alone = values.get("alone")
        return cls(work=Path(work or values.get("work", "work/demo")), report=Path(report or values.get("report", "results/demo")),
                   synth=dict(values.get("synth") or {}), cache=dict(values.get("cache") or {}),
                   teachers=runs["teachers"], students=runs["students"],
                   baselines={str(k): str(v) for k, v in (values.get("baselines") or {}).items()}, evaluation=dict(values.get("eval") or {}),
                   pca_images=int(values.get("pca_images", 4)),
                   alone=_model_run(path, "alone", alone) if alone is not None else None)


def _model_run(path: Path, name: str, entry: Any) -> ModelRun:
    check_keys(entry, f"{path}: {name}", ("overrides", "ema", "shipped", "expertise"), required=("config",))
    return ModelRun(name, str(entry["config"]), dict(entry.get("overrides") or {}), bool(entry.get("ema", False)),
                    str(entry["shipped"]) if entry.get("shipped") else None,
                    str(entry["expertise"]) if entry.get("expertise") else None)


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
    from distillery.data.views import ViewConfig
    from distillery.apps.report import suite_columns, write_report
    from distillery.evaluate.suite import read_suite_config, run_suite, write_suite_config

    steps = Steps()
    work = config.work
    synth = _synth(steps, config)
    identity = _synth_identity(synth) if any(run.shipped for run in config.teachers) else None
    teachers = {run.name: _shipped(run, identity) if run.shipped else _trained(steps, run, work, str(synth / "train"), {})
                for run in config.teachers}

    store = work / "cache.zarr"
    views = ViewConfig.from_dict(config.cache.get("view_config") or {})
    cache_config = CacheConfig(teachers=tuple(teachers.values()), **{**config.cache, "view_config": views})
    complete = store.exists() and CacheStore.open(str(store)).is_complete
    steps.run(f"cache-teachers {', '.join(teachers)} -> {store}", complete,
              lambda: cache_teachers(str(synth / "train"), str(store), cache_config))

    students = {run.name: _trained(steps, run, work, str(synth / "train"), {"cache": str(store)})
                for run in config.students}
    alone = {config.alone.name: _trained(steps, config.alone, work, str(synth / "train"), {})} if config.alone else {}

    baselines = {name: _untrained(steps, name, train_config, work) for name, train_config in config.baselines.items()}
    suite = _suite_config(config, synth, {**baselines, **teachers, **students, **alone})
    suite_path = work / "suite.yaml"
    write_suite_config(suite_path, suite)
    steps.run(f"evaluation suite -> {suite['out']}", False, lambda: run_suite(suite_path))
    columns = suite_columns(read_suite_config(suite_path))
    roles = _roles(config, columns)
    steps.run("model-free baselines and the heads' kNN (TinTeM Table 3)", False, lambda: _analyses(config, synth, suite, roles))

    trained = (*[r for r in config.teachers if not r.shipped], *config.students, *([config.alone] if config.alone else []))
    runs = {run.name: work / "runs" / run.name for run in trained}
    report = steps.run(f"report -> {config.report}", False, lambda: write_report(
        suite_path, teachers=list(teachers), students=list(students), baselines=list(baselines), runs=runs, out=config.report,
        pca_data=str(synth / "val"), pca_images=config.pca_images, columns=columns, roles=roles))
    console.print(f"demo finished in {time.perf_counter() - steps.start:.0f} s")
    return report


def _synth(steps: Steps, config: DemoConfig) -> Path:
    from distillery.data.synth import SynthConfig, generate

    from distillery.data.synth_sets import EVALUATION_PARTS, generate_evaluation_sets

    synth = config.work / "synth"
    steps.run(f"synth data -> {synth}", synth.exists(), lambda: generate(SynthConfig(**config.synth), synth))
    still = SynthConfig(**config.synth)
    steps.run(f"evaluation sets -> {synth}/{{{','.join(EVALUATION_PARTS)}}}",
              all((synth / s).exists() for s in EVALUATION_PARTS),
              lambda: generate_evaluation_sets(synth, still.seed, still.size))
    return synth


def _synth_identity(synth: Path) -> dict[str, Any]:
    """What a shipped teacher was trained on: the generator config recorded in synth.json and a hash of the
    train shards' bytes (the same config gives other images when the generator changes)."""
    digest = hashlib.sha256()
    for tar in sorted((synth / "train").glob("*.tar")):
        digest.update(tar.name.encode() + tar.read_bytes())
    return {"config": json.loads((synth / "synth.json").read_text())["config"], "train_sha256": digest.hexdigest()}


def train_shipped_teachers(config: DemoConfig, only: tuple[str, ...] = ()) -> list[Path]:
    """`make teachers`: train each shipped teacher from its recipe, from scratch, on the demo's data, and write it
    into its shipped directory with a provenance record (recipe, data, weights hash) that the demo checks."""
    from distillery.evaluate.results import write_json
    from distillery.models.teachers import create_teacher
    from distillery.train.export import export_run
    from distillery.train.loop import train

    shipped = [r for r in config.teachers if r.shipped and (not only or r.name in only)]
    unknown = sorted(set(only) - {r.name for r in shipped})
    if unknown:
        raise DistilleryError(f"{unknown[0]}: not a shipped teacher of this demo config")
    steps = Steps()
    synth = _synth(steps, config)
    identity = _synth_identity(synth)
    written = []
    for run in shipped:
        run_dir, out = config.work / "runs" / run.name, project_path(run.shipped)
        recipe = with_overrides(run, config.work)

        def train_and_export() -> None:
            shutil.rmtree(run_dir, ignore_errors=True)  # always the whole recipe from step 0: the result is its seed's
            train({"data": str(synth / "train"), "out": str(run_dir)}, recipe)
            shutil.rmtree(out, ignore_errors=True)
            export_run(run_dir, out, ema=run.ema, overwrite=True)

        steps.run(f"train {run.name} ({run.config}) -> {out}", False, train_and_export)
        write_json(out / PROVENANCE, {
            "name": run.name, "recipe": run.config, "overrides": run.overrides,
            "recipe_sha256": hashlib.sha256(recipe.read_bytes()).hexdigest(), "synth": identity,
            "weights_sha256": create_teacher(f"local-dir:{out}").fingerprint()["weights_sha256"],
            "made_by": "make teachers (distillery demo --train-teachers)"})
        written.append(out)
    return written


def _shipped(run: ModelRun, identity: dict[str, Any]) -> str:
    """The local-dir spec of a shipped teacher, after checking it is the one `make teachers` wrote for the data
    of this `identity` (`_synth_identity`)."""
    from distillery.models.teachers import create_teacher

    out = project_path(run.shipped)
    record_path = out / PROVENANCE
    if not (out / "model.safetensors").exists() or not record_path.exists():
        raise DistilleryError(f"{out}: shipped teacher {run.name} is missing; `make teachers` trains it")
    record = json.loads(record_path.read_text())
    # The train shards' bytes are what a teacher learnt from; the generator config is kept for the reader, and
    # splits added beside train (a new evaluation set) leave the teacher valid.
    if (record.get("synth") or {}).get("train_sha256") != identity["train_sha256"]:
        raise DistilleryError(f"{record_path}: {run.name} was trained on other synth train images than this demo's; "
                              "run `make teachers` for this data")
    spec = f"local-dir:{out}"
    if create_teacher(spec).fingerprint()["weights_sha256"] != record.get("weights_sha256"):
        raise DistilleryError(f"{out}: weights differ from those recorded in {PROVENANCE}; run `make teachers`")
    console.print(f"[green]shipped[/] teacher {run.name} ({spec}, trained by {record['recipe']})")
    return spec


def _roles(config: DemoConfig, columns: tuple) -> Any:
    """Who is who for the claims: each teacher's expertise, each student's method and teachers, and the report's
    higher-is-better columns as the tasks of the mean over tasks."""
    from distillery.evaluate.claims import Roles

    teachers = {run.name: run.expertise for run in config.teachers}
    missing = [name for name, label in teachers.items() if not label]
    if missing:
        raise DistilleryError(f"teacher {missing[0]} has no expertise: (the label its students are scored on)")
    students = {run.name: (str(read_yaml(run.config).get("method")),
                           tuple(run.overrides.get("cache_teachers") or teachers)) for run in config.students}
    tasks = tuple(c.where for c in columns if c.higher_is_better)
    return Roles(teachers, students, tasks, config.alone.name if config.alone else None)


def _analyses(config: DemoConfig, synth: Path, suite: dict[str, Any], roles: Any) -> None:
    """The numbers the claims read beyond the suite's: raw-pixel kNN and colour-histogram retrieval, and the
    kNN of each TinTeM run's teacher head and each Proteus run's student head (TinTeM Table 3)."""
    from distillery.evaluate.baselines import run_baselines
    from distillery.evaluate.features import Extraction, default_device
    from distillery.evaluate.results import default_path, save_result
    from distillery.evaluate.suite import features_dir
    from distillery.evaluate.tasks import EvalData, EvalModel, KnnSettings, RetrievalData
    from distillery.evaluate.heads import head_knn
    from distillery.evaluate.results import HEAD_KNN_TASKS

    eval_dir = Path(suite["out"])
    labels = tuple(dict.fromkeys(roles.teachers.values()))
    data = EvalData(train=synth / "train", val=synth / "val", retrieval=RetrievalData("synth", synth / "retrieval"))
    run_baselines(data, labels, eval_dir)

    def extraction(model: EvalModel) -> Extraction:
        return Extraction(cache_dir=features_dir(eval_dir, model.name), show_progress=False)

    for student, (method, teachers) in roles.students.items():
        if method not in HEAD_KNN_TASKS:
            continue
        model = EvalModel.load(student, suite["models"][student], default_device())
        models = [EvalModel.load(t, suite["models"][t], default_device()) for t in teachers]
        for label in dict.fromkeys(roles.teachers[t] for t in teachers):
            result = head_knn(config.work / "runs" / student, model, models, data, KnnSettings(label=label), extraction)
            save_result(result, default_path(student, result.task, eval_dir))


def _trained(steps: Steps, run: ModelRun, work: Path, data: str, extra: dict[str, Any]) -> str:
    """Train `run` (or resume it) and export it; returns its local-dir spec. Skipped when the export exists."""
    from distillery.train import checkpoint as ckpt
    from distillery.train.export import export_run
    from distillery.train.loop import train

    run_dir, export_dir = work / "runs" / run.name, work / "models" / run.name

    def train_and_export() -> None:
        resume = bool(ckpt.list_checkpoints(run_dir)) if run_dir.exists() else False
        values = {} if resume else {"data": data, "out": str(run_dir), **extra}
        train(values, None if resume else with_overrides(run, work), resume=resume)
        export_run(run_dir, export_dir, ema=run.ema, overwrite=True)  # a step left unfinished is redone

    steps.run(f"train {run.name} ({run.config}) -> {export_dir}", (export_dir / "model.safetensors").exists(),
              train_and_export)
    return f"local-dir:{export_dir}"


def _untrained(steps: Steps, name: str, train_config: str, work: Path) -> str:
    from distillery.train.export import export_initial

    export_dir = work / "models" / name
    steps.run(f"untrained {name} ({train_config}) -> {export_dir}", (export_dir / "model.safetensors").exists(),
              lambda: export_initial(train_config, export_dir, overwrite=True))
    return f"local-dir:{export_dir}"


def with_overrides(run: ModelRun, work: Path) -> Path:
    """The run's config file with the demo's overrides merged in (nested sections merged key by key)."""

    values = read_yaml(run.config)
    for key, value in run.overrides.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) and isinstance(values.get(key), dict) else value
    path = work / "configs" / f"{run.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, yaml.safe_dump(values, sort_keys=False))
    return path


ROBUSTNESS_SETS = {"v2": "v2", "r": "r", "c": "c", "in9": "9"}  # robustness set -> synth/val-<directory>


def _suite_config(config: DemoConfig, synth: Path, models: dict[str, str]) -> dict[str, Any]:
    from distillery.data.synth_sets import TRANSFER_SET
    from distillery.evaluate.suite import suite_config_values

    return suite_config_values(models, str(synth / "train"), str(synth / "val"),
                               config.evaluation.get("tasks", ["knn", "linear", "retrieval", "ood", "cka"]),
                               config.evaluation.get("settings", {}), str(config.work / "eval"),
                               {"near": str(synth / "ood" / "near"), "far": str(synth / "ood" / "far")},
                               ("synth", str(synth / "retrieval")), str(synth / "davis"), str(synth / "seg"),
                               {name: str(synth / f"val-{directory}") for name, directory in ROBUSTNESS_SETS.items()},
                               {"novel-shapes": str(synth / TRANSFER_SET)})
