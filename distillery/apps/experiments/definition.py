"""An experiment definition (`configs/experiments/NAME.yaml`) and the dataset file it points at, read and checked.

```yaml
paper: "SeFA ..., Tables 2/3"
student: SeFA                      # the trained student's name in eval results and the report
teachers: [vit_small_patch16_224.dino, ...]
cache: {views: 4, dtype: float16, patch_pool: 1, ...}   # cache-teachers settings
train: configs/sefa_vits16_in1k.yaml
data: configs/experiments/datasets/imagenet-1k.yaml
eval: {tasks: [knn, linear, retrieval, ood], settings: {knn: {ks: [10, 20, 100, 200]}}}
paper_results:                     # every number with its source; null: not published (the source says why)
  - {model: SeFA, metric: linear top-1, value: 77.92, source: "SeFA Table 2, ..."}
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from distillery.config import check_keys, project_path, read_yaml
from distillery.errors import DistilleryError
from distillery.apps.experiments.metrics import STUDENT_ONLY, TASKS, MetricPath, metric_paths
from distillery.evaluate.robustness import SETS as ROBUSTNESS_SETS

EXPERIMENTS_DIR = Path("configs/experiments")
# CacheConfig fields an experiment may set (the teachers are its own key). `view_config` is a YAML file of
# ViewConfig settings, as `cache-teachers --view-config` takes it; without one, views use the defaults.
CACHE_KEYS = ("views", "seed", "dtype", "patch_pool", "cls_only", "batch_size", "workers", "view_config")


class ExperimentError(DistilleryError):
    """A definition, config, teacher spec or path that cannot be used as it is."""


class MissingInput(ExperimentError):
    """Something a run needs that is not here (data, weights): a problem for a run, a note for a dry-run plan."""


class Split(NamedTuple):
    path: str  # under DATA=
    images: int  # the published count, used by the plan when DATA is not there


@dataclass(frozen=True)
class Dataset:
    """Where a dataset's splits lie under DATA=, as `distillery data shards` writes them."""

    name: str
    train: Split
    val: Split
    ood: dict[str, Split] = field(default_factory=dict)
    retrieval: tuple[str, Split] | None = None  # (revisitop dataset name, root holding <name>/gnd_<name>.pkl)
    davis: Split | None = None  # a DAVIS-2017 layout; images = frames of the split
    segmentation: Split | None = None  # a Pascal VOC layout; images = train + val
    robustness: dict[str, Split] = field(default_factory=dict)  # v2, r, a, c, in9 (evaluate/robustness.py)
    transfer: dict[str, Split] = field(default_factory=dict)  # name -> a directory holding train/ and val/


class PaperResult(NamedTuple):
    model: str
    metric: str
    value: float | None  # None: not published (or not found); the source says which
    source: str


@dataclass(frozen=True)
class Experiment:
    name: str
    path: Path
    paper: str
    student: str
    teachers: tuple[str, ...]
    cache: dict[str, Any]  # every CACHE_KEYS setting, cache-teachers' default where the file gives none
    train: Path
    dataset: Dataset
    tasks: tuple[str, ...]
    eval_settings: dict[str, Any]
    paper_results: tuple[PaperResult, ...]

    @property
    def reference(self) -> str:
        """How a command names it: by name from configs/experiments, else by its path."""
        return self.name if self.path == EXPERIMENTS_DIR / f"{self.name}.yaml" else str(self.path)

    @property
    def teacher_names(self) -> list[str]:
        from distillery.models.teachers import teacher_name

        return [teacher_name(spec) for spec in self.teachers]

    @property
    def models(self) -> list[str]:
        """Every model the evaluation scores: the student, then the teachers."""
        return [self.student, *self.teacher_names]

    @property
    def metrics(self) -> dict[str, MetricPath]:
        """Every metric the report shows, and where the evaluation JSON keeps it."""
        retrieval = self.dataset.retrieval[0] if self.dataset.retrieval else None
        return metric_paths(self.tasks, list(self.dataset.ood), retrieval, tuple(self.dataset.robustness),
                            tuple(self.dataset.transfer))

    def metrics_of(self, model: str) -> dict[str, MetricPath]:
        """The metrics `model` has: the heads' are the student's alone."""
        return {name: where for name, where in self.metrics.items()
                if model == self.student or where.task not in STUDENT_ONLY}


def experiment_names(directory: Path = EXPERIMENTS_DIR) -> list[str]:
    return sorted(p.stem for p in project_path(directory).glob("*.yaml"))


def load_experiment(name: str, directory: Path = EXPERIMENTS_DIR) -> Experiment:
    """Read and check `directory/NAME.yaml` (or a path to a .yaml): keys, cache settings, tasks and paper rows."""
    from distillery.cache.writer import CacheConfig

    path = Path(name) if name.endswith(".yaml") else Path(directory) / f"{name}.yaml"
    if not project_path(path).exists():
        raise ExperimentError(f"{path}: no such experiment; known: {', '.join(experiment_names(directory))}")
    values = _check_keys(read_yaml(path), str(path),
                         ("paper", "student", "teachers", "cache", "train", "data", "eval", "paper_results"))
    teachers = values["teachers"]
    if not isinstance(teachers, list) or not teachers or not all(isinstance(t, str) and t for t in teachers):
        raise ExperimentError(f"{path}: teachers must be a non-empty list of teacher specs")
    cache = dict(_check_keys(values["cache"], f"{path}: cache", (), CACHE_KEYS))
    view_file = cache.pop("view_config", None)
    try:
        cache_config = CacheConfig(teachers=tuple(teachers), **cache, view_config=_view_config(view_file, path))
    except (DistilleryError, TypeError) as error:
        raise ExperimentError(f"{path}: cache: {error}") from error
    evaluation = _check_keys(values["eval"], f"{path}: eval", ("tasks",), ("settings",))
    tasks = tuple(evaluation["tasks"] or ())
    if not tasks or any(t not in TASKS for t in tasks):
        raise ExperimentError(f"{path}: eval: tasks must be some of {', '.join(TASKS)}, got {list(tasks)}")
    settings = dict(evaluation.get("settings") or {})
    stray = sorted(set(settings) - set(tasks))
    if stray:
        raise ExperimentError(f"{path}: eval: settings for {stray[0]!r}, which is not one of the tasks {list(tasks)}")
    experiment = Experiment(
        name=path.stem, path=path, paper=str(values["paper"]), student=str(values["student"]), teachers=tuple(teachers),
        cache={**{key: getattr(cache_config, key) for key in CACHE_KEYS if key != "view_config"},
               "view_config": view_file}, train=Path(values["train"]),
        dataset=load_dataset(Path(values["data"])), tasks=tasks, eval_settings=settings,
        paper_results=_paper_results(values["paper_results"], path))
    for task in ("davis", "segmentation", "robustness", "transfer"):
        if task in experiment.tasks and not getattr(experiment.dataset, task):
            raise ExperimentError(f"{path}: eval: the {task} task needs a {task}: entry in {values['data']}")
    _check_paper_results(experiment)
    return experiment


def load_dataset(path: Path) -> Dataset:
    values = _check_keys(read_yaml(path), str(path), ("name", "train", "val"), ("ood", "retrieval", "davis", "segmentation",
                                                                                   "robustness", "transfer"))
    ood = values.get("ood") or {}
    if not isinstance(ood, dict):
        raise ExperimentError(f"{path}: ood: expected a mapping of set names to {{path, images}}")
    retrieval = None
    if values.get("retrieval") is not None:
        entry = _check_keys(values["retrieval"], f"{path}: retrieval", ("dataset", "path", "images"))
        retrieval = (str(entry["dataset"]), _split({"path": entry["path"], "images": entry["images"]}, f"{path}: retrieval"))
    davis, segmentation = (_split(values[key], f"{path}: {key}") if values.get(key) is not None else None
                           for key in ("davis", "segmentation"))
    robustness = _check_keys(values.get("robustness") or {}, f"{path}: robustness", (), ROBUSTNESS_SETS)
    transfer = values.get("transfer") or {}
    if not isinstance(transfer, dict):
        raise ExperimentError(f"{path}: transfer: expected a mapping of set names to {{path, images}}")
    return Dataset(str(values["name"]), _split(values["train"], f"{path}: train"), _split(values["val"], f"{path}: val"),
                   {str(name): _split(split, f"{path}: ood: {name}") for name, split in ood.items()}, retrieval, davis,
                   segmentation, {name: _split(split, f"{path}: robustness: {name}") for name, split in robustness.items()},
                   {str(name): _split(split, f"{path}: transfer: {name}") for name, split in transfer.items()})


def _check_keys(values: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    return check_keys(values, where, optional, required, error=ExperimentError)


def _split(values: Any, where: str) -> Split:
    _check_keys(values, where, ("path", "images"))
    if isinstance(values["images"], bool) or not isinstance(values["images"], int) or values["images"] < 1:
        raise ExperimentError(f"{where}: images must be a positive integer, got {values['images']!r}")
    return Split(str(values["path"]), values["images"])


def _view_config(view_file: str | None, path: Path):
    from distillery.data.views import ViewConfig

    if view_file is None:
        return ViewConfig()
    try:  # read_yaml and from_dict name the file; the prefix says which experiment asked for it
        return ViewConfig.from_dict(read_yaml(view_file), str(view_file))
    except ValueError as error:
        raise ExperimentError(f"{path}: cache: view_config: {error}") from error


def _paper_results(rows: Any, path: Path) -> tuple[PaperResult, ...]:
    if not isinstance(rows, list):
        raise ExperimentError(f"{path}: paper_results must be a list of {{model, metric, value, source}}")
    results = []
    for number, row in enumerate(rows, 1):
        where = f"{path}: paper_results row {number}"
        _check_keys(row, where, ("model", "metric", "value", "source"))
        value = row["value"]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ExperimentError(f"{where}: value must be a number or null, got {value!r}")
        if not isinstance(row["source"], str) or not row["source"].strip():
            raise ExperimentError(f"{where}: every number needs its source (for null: why it is not there)")
        results.append(PaperResult(str(row["model"]), str(row["metric"]), None if value is None else float(value), row["source"]))
    return tuple(results)


def _check_paper_results(experiment: Experiment) -> None:
    """Every paper row must name a model the evaluation scores and a metric the report can read."""
    for number, row in enumerate(experiment.paper_results, 1):
        where = f"{experiment.path}: paper_results row {number}"
        if row.model not in experiment.models:
            raise ExperimentError(f"{where}: model {row.model!r} is not evaluated here; models: {', '.join(experiment.models)}")
        metrics = experiment.metrics_of(row.model)
        if row.metric not in metrics:
            raise ExperimentError(f"{where}: metric {row.metric!r} is not reported by this experiment's tasks; "
                                  f"metrics: {', '.join(metrics)}")
