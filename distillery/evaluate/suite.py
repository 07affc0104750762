"""`distillery eval` runners: one task for one model (each `eval <task>` command), CKA across models, and the
suite: several tasks for several models from one YAML file, ending in one comparison table.

Suite config (paths relative to the working directory; `configs/eval_synth.yaml` is an example):

    models: {dino: "local-dir:students/dino", random: "local-dir:students/random"}   # name: spec
    data:
      train: synth/train
      val: synth/val
      ood: {near: synth/ood/near, far: synth/ood/far}   # group: directory, or group: [directories]
      retrieval: {dataset: synth, root: synth/retrieval}
      transfer: {novel-shapes: synth/transfer/novel-shapes}   # name: DIR holding train/ and val/, or name: {train, val}
    tasks: [knn, linear, retrieval, ood, cka, "knn:pattern"]   # TASK:LABEL scores knn/linear on a factor
    settings: {knn: {ks: [10, 20, 100, 200]}, linear: {grid: dinov2}, ood: {k: 10}, retrieval: {crop_queries: true}}
    out: results/eval_synth

`knn:pattern` (or `linear:<label>`) scores the task on a factor the shards record instead of the class,
with the task's settings otherwise, into OUT/<model>/knn-pattern.json. It writes OUT/<model>/<task>.json,
OUT/cka.json + cka.png, and OUT/summary.json + summary.md (rows: models;
columns: kNN top-1 at k=20, linear top-1, retrieval Medium/Hard mAP, OOD AUROC and FPR@95 per group).
Features are cached under OUT/<model>/features, and each result file keeps a hash of what decided it (the
model's fingerprint, the name, size and time of every data file the suite names, the task's settings, the
version, and for robustness the probe it scores), so a re-run reuses every result whose inputs are unchanged
and recomputes the rest (`recompute=True`, `eval suite --recompute`, recomputes all).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import distillery

from distillery.config import check_keys, read_yaml
from distillery.console import console, print_table
from distillery.data.shards import CLASS_LABEL
from distillery.errors import DistilleryError
from distillery.evaluate.cka import plot_cka_heatmap
from distillery.evaluate.features import (Extraction, Features, default_device, read_features_file, source_name,
                                          store_features)
from distillery.files import write_atomic
from distillery.evaluate.robustness import COLUMNS as ROBUSTNESS_COLUMNS
from distillery.evaluate.robustness import SETS as ROBUSTNESS_SETS
from distillery.evaluate.robustness import probe_path
from distillery.evaluate.results import (RESULTS_DIR, MetricPath, TaskResult, davis_score, default_path, knn_top1,
                                        labelled_task, linear_top1, ood_metric, percent, retrieval_map, save_result,
                                        segmentation_score, write_json)
from distillery.evaluate.tasks import (ANY_SIZE_TASKS, SETTINGS, SINGLE_MODEL_TASKS, TASKS, CkaSettings, EvalData,
                                       EvalModel, RetrievalData, TransferSet, cka_features, cka_task, settings_from_dict)
from distillery.models.teachers import teacher_name


def features_dir(root: Path, model_name: str) -> Path:
    return Path(root) / model_name / "features"


def _cached_under(extraction: Extraction, root: Path, model_name: str) -> Extraction:
    """`extraction` as given when it names a cache directory, else caching under ROOT/<model>/features."""
    if extraction.cache_dir is not None:
        return extraction
    return dataclasses.replace(extraction, cache_dir=features_dir(root, model_name))


def run_task(task: str, spec: str, data: EvalData, settings: Any, extraction: Extraction, device: str | None = None,
             out: Path | None = None, results_root: Path = RESULTS_DIR) -> tuple[TaskResult, Path]:
    """One task for one model; the result goes to `out` (default results/<model name>/<task>.json) and the
    features are cached under `extraction.cache_dir` (default results/<model name>/features)."""
    name = teacher_name(spec)
    data.require(task)
    model = EvalModel.load(name, spec, device or default_device(), any_size=task in ANY_SIZE_TASKS)
    result = SINGLE_MODEL_TASKS[task](model, data, settings, _cached_under(extraction, results_root, name))
    return result, save_result(result, out or default_path(name, result.task, results_root))


def run_cka(specs: list[str], feature_files: list[str], data: Path | None, settings: CkaSettings, extraction: Extraction,
            device: str | None = None, out: Path | None = None, task: str = "cka",
            results_root: Path = RESULTS_DIR, stores: list[str] = ()) -> tuple[TaskResult, Path, Path]:
    """CKA between models run on `data`, features files written by an earlier extraction (`NAME=PATH` names
    a file's model; else its spec's name) and/or the teachers of cache stores (their stored CLS of view 0).
    Writes the JSON and a heatmap PNG beside it."""
    features: dict[str, Features] = {}
    models: dict[str, dict[str, Any]] = {}

    def add(name: str, spec: str, values: Features) -> None:
        if name in features:
            raise DistilleryError(f"two feature sets are named {name!r}; name them apart with NAME=PATH")
        features[name], models[name] = values, {"spec": spec, "fingerprint": values.fingerprint["model"]}

    if specs and data is None:
        raise DistilleryError(f"eval {task}: give --data, the images the models are compared on")
    for spec in specs:
        name = teacher_name(spec)
        model = EvalModel.load(name, spec, device or default_device())
        add(name, spec, cka_features(model, data, _cached_under(extraction, results_root, name)))
    for entry in feature_files:
        name, _, path = entry.rpartition("=")
        spec, values = read_features_file(path)
        add(name or teacher_name(spec), spec, values)
    for name, (spec, values) in (store_features(list(stores)) if stores else {}).items():
        add(name, spec, values)
    result = cka_task(features, models, settings)
    path = save_result(result, out or Path(results_root) / f"{task}.json")
    heatmap = plot_cka_heatmap(result.metrics["names"], result.metrics["linear"], path.with_suffix(".png"),
                               title=f"Linear CKA on {source_name(Path(data)) if data else 'stored features'}")
    return result, path, heatmap


# ---------------------------------------------------------------------------------------------- the suite

TOP_KEYS = ("models", "data", "tasks", "settings", "out", "batch_size", "workers", "device")
DATA_KEYS = ("train", "val", "ood", "retrieval", "extra", "extra_classes", "cka", "davis", "segmentation",
             "robustness", "probes", "transfer")


@dataclass(frozen=True)
class SuiteConfig:
    models: dict[str, str]
    data: EvalData
    tasks: tuple[str, ...]
    settings: dict[str, Any] = field(default_factory=dict)  # task -> its settings object
    out: Path = RESULTS_DIR / "suite"
    batch_size: int = 128
    workers: int = 2
    device: str | None = None


def _mapping(value: Any, where: str, source: Path) -> dict:
    if not isinstance(value, dict):
        raise DistilleryError(f"{source}: {where} must be a mapping, got {type(value).__name__}")
    return value


def _suite_data(values: dict, source: Path) -> EvalData:
    check_keys(values, f"{source}: data", DATA_KEYS)
    ood, groups = {}, {}
    for group, dirs in _mapping(values.get("ood", {}), "data.ood", source).items():
        paths = [Path(d) for d in (dirs if isinstance(dirs, list) else [dirs])]
        names = [str(group)] if len(paths) == 1 else [source_name(p) for p in paths]
        ood.update(zip(names, paths))
        groups[str(group)] = names
    retrieval = None
    if "retrieval" in values:
        entry = check_keys(values["retrieval"], f"{source}: data.retrieval", (), required=("dataset", "root"))
        retrieval = RetrievalData(str(entry["dataset"]), Path(entry["root"]))
    path = lambda key: Path(values[key]) if values.get(key) else None  # noqa: E731
    paths = lambda key: {str(k): Path(v) for k, v in _mapping(values.get(key, {}), f"data.{key}", source).items()}  # noqa: E731
    robustness = paths("robustness")
    check_keys(robustness, f"{source}: data.robustness", ROBUSTNESS_SETS)
    transfer = {str(name): _transfer_set(entry, f"data.transfer.{name}", source)
                for name, entry in _mapping(values.get("transfer", {}), "data.transfer", source).items()}
    return EvalData(train=path("train"), val=path("val"), ood=ood, ood_groups=groups, retrieval=retrieval,
                    extra=paths("extra"), extra_classes=paths("extra_classes"), cka=path("cka"), davis=path("davis"),
                    segmentation=path("segmentation"), robustness=robustness, probes=path("probes"), transfer=transfer)


def _transfer_set(entry: Any, where: str, source: Path) -> TransferSet:
    """A directory holding train/ and val/, or a mapping {train, val}."""
    if isinstance(entry, str):
        return TransferSet.under(Path(entry))
    entry = check_keys(_mapping(entry, where, source), f"{source}: {where}", (), required=("train", "val"))
    return TransferSet(Path(entry["train"]), Path(entry["val"]))


LABELLED_TASKS = ("knn", "linear")


def split_task(entry: str) -> tuple[str, str]:
    """`knn:pattern` -> (`knn`, `pattern`); `knn` -> (`knn`, `class`)."""
    task, _, label = str(entry).partition(":")
    return task, label or CLASS_LABEL


def task_settings(config: SuiteConfig, entry: str) -> Any:
    task, label = split_task(entry)
    settings = config.settings[task]
    return dataclasses.replace(settings, label=label) if task in LABELLED_TASKS else settings


def suite_config_values(models: dict[str, str], train: str, val: str, tasks: list[str], settings: dict[str, Any],
                        out: str, ood: dict[str, str] | None = None, retrieval: tuple[str, str] | None = None,
                        davis: str | None = None, segmentation: str | None = None,
                        robustness: dict[str, str] | None = None,
                        transfer: dict[str, str] | None = None) -> dict[str, Any]:
    """The mapping of a suite YAML file (what `read_suite_config` reads), for the applications that write one;
    `retrieval` is (revisitop dataset name, root); `transfer` maps a name to a directory with train/ and val/."""
    data: dict[str, Any] = {"train": train, "val": val}
    if ood:
        data["ood"] = dict(ood)
    if retrieval:
        data["retrieval"] = {"dataset": retrieval[0], "root": retrieval[1]}
    if davis:
        data["davis"] = davis
    if segmentation:
        data["segmentation"] = segmentation
    if robustness:
        data["robustness"] = dict(robustness)
    if transfer:
        data["transfer"] = dict(transfer)
    return {"models": dict(models), "data": data, "tasks": list(tasks), "settings": dict(settings), "out": out}


def write_suite_config(path: str | Path, values: dict[str, Any]) -> Path:
    return write_atomic(path, yaml.safe_dump(values, sort_keys=False))


def read_suite_config(path: str | Path) -> SuiteConfig:
    """Parse and check a suite config; an unknown key anywhere is a one-line error naming the file and key."""
    path = Path(path)
    values = read_yaml(path)
    check_keys(values, str(path), TOP_KEYS)
    models = {str(k): str(v) for k, v in _mapping(values.get("models"), "models", path).items()}
    if not models:
        raise DistilleryError(f"{path}: models is empty; give name: spec entries")
    tasks = values.get("tasks") or list(TASKS)
    unknown = [t for t in tasks if split_task(t)[0] not in TASKS]
    if unknown:
        raise DistilleryError(f"{path}: unknown task {unknown[0]!r} in tasks; known: {', '.join(TASKS)}")
    unlabelled = [t for t in tasks if ":" in t and split_task(t)[0] not in LABELLED_TASKS]
    if unlabelled:
        raise DistilleryError(f"{path}: task {unlabelled[0]!r}: only {' and '.join(LABELLED_TASKS)} take a :label")
    if "cka" in tasks and len(models) < 2:
        raise DistilleryError(f"{path}: the cka task compares models; list at least two under models")
    settings_values = _mapping(values.get("settings") or {}, "settings", path)
    check_keys(settings_values, f"{path}: settings", tuple(SETTINGS))
    settings = {task: _task_settings(task, settings_values.get(task), path) for task in SETTINGS}
    out = Path(values.get("out") or SuiteConfig.out)
    data = _suite_data(_mapping(values.get("data"), "data", path), path)
    if data.probes is None:  # the robustness task reads the probes this suite's linear task saves
        data = dataclasses.replace(data, probes=out)
    if "robustness" in tasks and "linear" in tasks and tasks.index("robustness") < tasks.index("linear"):
        raise DistilleryError(f"{path}: list linear before robustness in tasks (robustness reuses its probe)")
    return SuiteConfig(models, data, tuple(tasks), settings, out, int(values.get("batch_size", SuiteConfig.batch_size)),
                       int(values.get("workers", SuiteConfig.workers)), values.get("device"))


def _task_settings(task: str, value: Any, path: Path) -> Any:
    """A task's settings: a mapping, or the path of a YAML file holding one (configs/eval/segmentation_synth.yaml)."""
    if isinstance(value, str):
        return settings_from_dict(task, _mapping(read_yaml(value), "its settings", Path(value)), value)
    return settings_from_dict(task, _mapping(value or {}, f"settings.{task}", path), str(path))


@dataclass
class SuiteSummary:
    columns: tuple[str, ...]
    rows: list[tuple[str, ...]]
    markdown: Path
    json: Path


def data_sha256(data: EvalData) -> str | None:
    """A hash of the name, size and modification time of every file under every local path `data` names (the
    probes apart, which the robustness key covers itself); None when a path is not a local file or directory
    (a URL). Stat, not bytes, as make does: any rewrite moves the time, and an ImageNet-sized set is not read
    again for every suite run."""
    roots = [data.train, data.val, *data.ood.values(), data.retrieval.root if data.retrieval else None,
             *data.extra.values(), *data.extra_classes.values(), data.cka, data.davis, data.segmentation,
             *data.robustness.values(), *(p for t in data.transfer.values() for p in (t.train, t.val))]
    digest = hashlib.sha256()
    for root in sorted({str(r) for r in roots if r is not None}):
        path = Path(root)
        if not path.exists():
            return None
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        for file in files:
            stat = file.stat()
            digest.update(f"{file}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def inputs_sha256(entry: str, model: EvalModel, settings: Any, data: str, probes: Path | None) -> str:
    """The key a result is reused by: task, model fingerprint, settings, data files, version (and the probe
    robustness scores, which the same suite's linear task may just have retrained)."""
    probe = None
    if split_task(entry)[0] == "robustness" and probes is not None:
        path = probe_path(probes, model.name, settings.label)
        probe = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
    key = {"task": entry, "model": model.teacher.fingerprint(), "settings": dataclasses.asdict(settings), "data": data,
           "probe": probe, "version": distillery.__version__}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def reusable_result(path: Path, key: str) -> TaskResult | None:
    """The result at `path` when it was computed from the inputs `key` names, else None."""
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return TaskResult.from_json(values) if isinstance(values, dict) and values.get("inputs_sha256") == key else None


def run_suite(config: SuiteConfig | str | Path, show_progress: bool = True, recompute: bool = False) -> SuiteSummary:
    """Every task for every model, one model loaded at a time; then CKA across models and the summary.
    `config` is a SuiteConfig or the path of a suite YAML file. A result whose inputs are those of its file on
    disk is read back instead of recomputed, unless `recompute`."""
    if not isinstance(config, SuiteConfig):
        config = read_suite_config(config)
    for task in config.tasks:
        config.data.require(split_task(task)[0])
    device = config.device or default_device()
    data = data_sha256(config.data)
    results: dict[str, dict[str, TaskResult]] = {}
    cka_inputs: dict[str, Features] = {}
    models: dict[str, dict[str, Any]] = {}
    for name, spec in config.models.items():
        console.print(f"[bold]{name}[/] ({spec})")
        model = EvalModel.load(name, spec, device, any_size=any(t in ANY_SIZE_TASKS for t in config.tasks))
        extraction = Extraction(config.batch_size, config.workers, features_dir(config.out, name), show_progress)
        results[name] = {}
        for task in config.tasks:
            if task == "cka":
                cka_inputs[name] = cka_features(model, config.data.cka or config.data.val, extraction)
                models.update(model.describe())
                continue
            settings, path = task_settings(config, task), default_path(name, labelled_task(*split_task(task)), config.out)
            key = inputs_sha256(task, model, settings, data, config.data.probes) if data else None
            result = reusable_result(path, key) if key and not recompute else None
            if result is not None:
                console.print(f"reusing {path} (model, data and settings unchanged)")
            else:
                result = SINGLE_MODEL_TASKS[split_task(task)[0]](model, config.data, settings, extraction)
                result.inputs_sha256 = key
                save_result(result, path)
            results[name][task] = result
    cka_result = None
    if cka_inputs:
        cka_result = cka_task(cka_inputs, models, config.settings["cka"])
        save_result(cka_result, config.out / "cka.json")
        plot_cka_heatmap(cka_result.metrics["names"], cka_result.metrics["linear"], config.out / "cka.png",
                         title=f"Linear CKA on {source_name(config.data.cka or config.data.val)}")
    columns, rows = summary_table(results, config)
    markdown = write_atomic(config.out / "summary.md", summary_markdown(columns, rows, config, cka_result))
    summary = write_json(config.out / "summary.json", {
        "columns": columns, "rows": rows, "models": config.models, "tasks": list(config.tasks),
        "settings": {task: dataclasses.asdict(s) for task, s in config.settings.items()},
        "results": {name: {task: r.to_json() for task, r in by_task.items()} for name, by_task in results.items()},
        "cka": cka_result.to_json() if cka_result else None})
    print_table(f"eval suite -> {markdown}", columns, rows)
    return SuiteSummary(columns, rows, markdown, summary)


def summary_columns(task: str, config: SuiteConfig) -> list[tuple[str, MetricPath]]:
    """(column, where its number is) for what a task adds to its model's summary row."""
    task, label = split_task(task)
    about = "" if label == CLASS_LABEL else f" {label}"
    if task == "knn":
        ks = config.settings["knn"].ks
        k = 20 if 20 in ks else ks[0]
        return [(f"kNN{about} top-1 (k={k})", knn_top1(k, label))]
    if task == "linear":
        return [(f"linear{about} top-1", linear_top1(label))]
    if task == "retrieval":
        return [("retrieval M mAP", retrieval_map("medium")), ("retrieval H mAP", retrieval_map("hard"))]
    if task == "davis":
        return [("DAVIS J&F", davis_score("J&F-Mean")), ("DAVIS J", davis_score("J-Mean")), ("DAVIS F", davis_score("F-Mean"))]
    if task == "segmentation":
        return [("seg mIoU", segmentation_score("mIoU"))]
    if task == "transfer":
        return [(f"transfer top-1 (mean of {len(config.data.transfer)})", MetricPath("transfer", ("mean", "top1")))]
    if task == "clustering":
        return [("NMI", MetricPath("clustering", ("nmi",))), ("silhouette x100", MetricPath("clustering", ("silhouette",)))]
    if task == "robustness":
        sets = config.data.robustness
        return [(title, MetricPath("robustness", keys)) for name, title, keys in ROBUSTNESS_COLUMNS if name in sets]
    grouped = bool(config.data.ood_groups)
    return [column for name in (config.data.ood_groups if grouped else config.data.ood)
            for column in ((f"OOD {name} AUROC", ood_metric(name, "auroc", grouped)),
                           (f"OOD {name} FPR@95", ood_metric(name, "fpr95_id_tpr", grouped)))]


def summary_table(results: dict[str, dict[str, TaskResult]], config: SuiteConfig) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    cells = {name: {column: percent(where.lookup(result.metrics, f"{task} result of {name}"))
                    for task, result in by_task.items() for column, where in summary_columns(task, config)}
             for name, by_task in results.items()}
    columns = list(dict.fromkeys(column for row in cells.values() for column in row))
    return ("model", *columns), [(name, *(row.get(column, "-") for column in columns)) for name, row in cells.items()]


def summary_markdown(columns: tuple[str, ...], rows: list[tuple[str, ...]], config: SuiteConfig,
                     cka_result: TaskResult | None) -> str:
    lines = [f"# Evaluation: {', '.join(config.models)}", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    notes = ["All numbers are percentages."]
    if "knn" in config.tasks:
        s = config.settings["knn"]
        notes.append(f"kNN: L2-normalised CLS, weighted vote exp(sim/{s.temperature:g}), k in {list(s.ks)}.")
    if "linear" in config.tasks:
        s = config.settings["linear"]
        notes.append(f"Linear: {s.grid} LR grid, {s.epochs} epochs, {s.pooling} features; LR chosen on a held-out "
                     f"{s.holdout:.0%} of train, probe retrained on all of train, top-1 on val.")
    if "retrieval" in config.tasks:
        s = config.settings["retrieval"]
        notes.append(f"Retrieval ({config.data.retrieval.dataset}): revisitop Medium/Hard mAP; queries "
                     f"{'cropped to bbx' if s.crop_queries else 'not cropped'}; "
                     f"{'multi-scale' if s.multiscale else 'single scale'}.")
    if "davis" in config.tasks:
        s = config.settings["davis"]
        notes.append(f"DAVIS ({config.data.davis}): label propagation (context 1 + {s.n_last_frames} frames, "
                     f"top {s.topk} within {s.neighbourhood} patches, T={s.temperature:g}), frames at short side "
                     f"{s.short_side}; J&F-Mean as davis2017-evaluation computes it.")
    if "segmentation" in config.tasks:
        s = config.settings["segmentation"]
        notes.append(f"Segmentation ({config.data.segmentation}): DINOv2's linear probe (BatchNorm + 1x1 conv on "
                     f"last-block patch tokens), {s.iterations} iterations of {s.batch_size} {s.crop_size}-px crops, "
                     f"slide inference; mIoU as mmseg computes it.")
    if "transfer" in config.tasks:
        s = config.settings["transfer"]
        notes.append(f"Transfer ({', '.join(config.data.transfer)}): a linear probe per set on its own classes, "
                     f"{s.grid} LR grid chosen on a held-out {s.holdout:.0%} of its train, {s.epochs} epochs, "
                     f"{s.pooling} features; the column is the mean top-1 over the sets.")
    if "ood" in config.tasks:
        s = config.settings["ood"]
        notes.append(f"OOD: KNN score, k={s.k}, {s.train_fraction:.0%} of ID train; FPR@95 = share of OOD accepted "
                     "at 95% ID TPR (fpr95_id_tpr; the OpenOOD convention is in the JSON).")
    lines += ["", *(f"- {note}" for note in notes)]
    if cka_result is not None:
        names = cka_result.metrics["names"]
        lines += ["", "## Linear CKA (debiased in brackets)", "", "| | " + " | ".join(names) + " |",
                  "|" + "---|" * (len(names) + 1)]
        for i, name in enumerate(names):
            lines.append(f"| {name} | " + " | ".join(f"{cka_result.metrics['linear'][i][j]:.3f} "
                                                     f"({cka_result.metrics['debiased'][i][j]:.3f})"
                                                     for j in range(len(names))) + " |")
        lines += ["", "![CKA](cka.png)"]
    return "\n".join(lines) + "\n"
