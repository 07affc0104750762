"""An experiment's plan: every check, each step's command, the cache size and the GPU-hours (`printing` shows
it, `running` runs its steps).

A plan runs nothing. User-fixable errors become one-line problems; in a dry run, inputs that are simply not
here yet (DATA, weights) are notes saying what a run will need, and in a run (`strict`) they are problems.
"""

from __future__ import annotations


import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

from distillery.apps.experiments.architectures import ModelGeometry, PlannedTeacher, architecture, locate_weights, plan_teacher, probe
from distillery.apps.experiments.costs import Hours, Throughput, bytes_per_view, forward_rate, gpu_hours, store_name, train_rate
from distillery.apps.experiments.definition import EXPERIMENTS_DIR, Experiment, ExperimentError, MissingInput, Split, load_experiment
from distillery.apps.experiments.metrics import HEAD_TASKS
from distillery.errors import DistilleryError

STEPS = ("cache", "train", "export", "eval", "analyze", "report")  # analyze: the heads' kNN, for runs with a head
THROUGHPUT_FILE = Path("benchmarks/gpu_throughput.json")


@dataclass(frozen=True)
class PlanInputs:
    data: Path | None = None  # shard root: train/, val/, ood/<set>/, retrieval/<dataset>/
    weights: Path | None = None  # an HF_HOME (with hub/), or a directory of local-dir teachers named like the teachers
    gpus: int = 1
    out: Path | None = None  # this experiment's directory (default: RESULTS/NAME)
    results: Path = Path("results")
    cache_dir: Path | None = None  # default RESULTS/caches, shared by experiments with the same teachers and settings
    throughput: Path = THROUGHPUT_FILE
    strict: bool = False  # a run: missing data or weights are problems, not notes
    max_steps: int | None = None  # a smoke run: training stops there, everything after the cache goes to OUT/smoke-N


class Command(NamedTuple):
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return " ".join([f"{k}={_quote(v)}" for k, v in self.env] + [_quote(a) for a in self.argv])


def _quote(text: str) -> str:
    return text if re.fullmatch(r"[\w@%+=:,./${}-]+", text) else shlex.quote(text)


class Count(NamedTuple):
    images: int
    source: str


@dataclass
class ExperimentPlan:
    experiment: Experiment
    inputs: PlanInputs
    out: Path
    data_root: str  # DATA, or ${DATA} when it is not given
    counts: dict[str, Count] = field(default_factory=dict)
    teachers: list[PlannedTeacher] = field(default_factory=list)
    weights_found: dict[str, str] = field(default_factory=dict)
    method: str | None = None
    epochs: int = 0
    train_summary: str = ""
    store: Path | None = None
    bytes_per_view: dict[str, int] = field(default_factory=dict)
    cache_bytes: int | None = None
    hours: dict[str, Hours] = field(default_factory=dict)
    device: str | None = None
    steps: dict[str, Command] = field(default_factory=dict)
    suite: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)
    needs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def teachers_known(self) -> bool:
        return len(self.teachers) == len(self.experiment.teachers)

    def check(self, function: Callable, *args) -> Any:
        """Run one check; a user-fixable error becomes a problem (or, for an input not here in a dry run, a need)."""
        try:
            return function(*args)
        except MissingInput as error:
            self.missing(str(error))
        except DistilleryError as error:
            self.problems.append(str(error))
        return None

    def missing(self, message: str) -> None:
        (self.problems if self.inputs.strict else self.needs).append(message)

    @property
    def total_hours(self) -> float | None:
        values = [h.gpu_hours for h in self.hours.values()]
        return None if not values or None in values else sum(values)


def plan_experiments(names: list[str], inputs: PlanInputs, directory: Path = EXPERIMENTS_DIR) -> tuple[list[ExperimentPlan], list[str]]:
    """Plan each experiment; returns the plans and every problem, one line each, named by its experiment."""
    plans, problems = [], []
    for name in names:
        try:
            plan = plan_experiment(name, inputs, directory)
        except DistilleryError as error:
            problems.append(f"{name}: {error}")
            continue
        plans.append(plan)
        problems += [f"{name}: {problem}" for problem in plan.problems]
    return plans, problems


def plan_experiment(name: str, inputs: PlanInputs, directory: Path = EXPERIMENTS_DIR) -> ExperimentPlan:
    """Check everything an experiment needs and work out its commands, cache size and GPU-hours; runs nothing."""
    experiment = load_experiment(name, directory)
    out = inputs.out or inputs.results / experiment.name
    plan = ExperimentPlan(experiment, inputs, out / f"smoke-{inputs.max_steps}" if inputs.max_steps else out,
                          str(inputs.data) if inputs.data else "${DATA}")
    if inputs.gpus < 1:
        plan.problems.append(f"GPUS must be at least 1, got {inputs.gpus}")
    if inputs.max_steps is not None and inputs.max_steps < 1:
        plan.problems.append(f"--max-steps must be at least 1, got {inputs.max_steps}")
    _plan_data(plan)
    weights = inputs.weights
    if weights is not None and not weights.is_dir():
        plan.missing(f"WEIGHTS={weights}: no such directory")
        weights = None
    for spec in experiment.teachers:
        teacher = plan.check(plan_teacher, spec, weights, str(experiment.path))
        if teacher is not None:
            plan.teachers.append(teacher)
            plan.weights_found[teacher.name] = plan.check(locate_weights, teacher, weights) or "not here"
    cache = experiment.cache
    if plan.teachers_known:
        plan.store = (inputs.cache_dir or inputs.results / "caches") / store_name(plan.teachers, cache)
        plan.bytes_per_view = bytes_per_view(plan.teachers, cache["dtype"], cache["patch_pool"], cache["cls_only"])
        plan.cache_bytes = plan.counts["train"].images * cache["views"] * sum(plan.bytes_per_view.values())
    student = plan.check(_plan_training, plan)
    if not inputs.strict:  # a run needs no estimate, and a broken benchmark file must not stop it
        throughput = plan.check(Throughput.load, inputs.throughput)
        plan.device = throughput.device if throughput else None
        if not inputs.throughput.exists():
            plan.notes.append(f"GPU-hours not measured: no {inputs.throughput}")
        if student is not None and plan.teachers_known:
            _plan_hours(plan, throughput, *student)
    _plan_steps(plan)
    return plan


def _plan_data(plan: ExperimentPlan) -> None:
    """Image counts per split: from DATA's shard indexes when DATA is here, else the dataset file's published ones."""
    experiment, data = plan.experiment, plan.inputs.data
    dataset = experiment.dataset
    splits = {"train": dataset.train, "val": dataset.val}
    if "ood" in experiment.tasks:
        splits |= {f"ood/{name}": split for name, split in dataset.ood.items()}
    retrieval = dataset.retrieval if "retrieval" in experiment.tasks else None
    if data is None or not data.is_dir():
        layout = [s.path + "/" for s in splits.values()] + ([f"{retrieval[1].path}/{retrieval[0]}/"] if retrieval else [])
        layout += [f"{getattr(dataset, task).path}/" for task in ("davis", "segmentation") if task in experiment.tasks]
        layout += [f"{split.path}/" for split in dataset.robustness.values()] if "robustness" in experiment.tasks else []
        layout += [f"{split.path}/{{train,val}}/" for split in dataset.transfer.values()] if "transfer" in experiment.tasks else []
        plan.missing(("DATA= not given" if data is None else f"DATA={data}: no such directory")
                     + f": a run needs DATA=DIR holding {dataset.name} as shards ({', '.join(layout)})"
                     + ("" if plan.inputs.strict else "; the plan uses the published image counts"))
        data = None
    for label, split in splits.items():
        count = plan.check(_count_shards, data, split, label) if data else None
        plan.counts[label] = count or Count(split.images, f"published count ({dataset.name} {label})")
    if retrieval:
        name, split = retrieval
        count = plan.check(_count_retrieval, data, name, split) if data else None
        plan.counts["retrieval"] = count or Count(split.images, f"published count ({name})")
    if "davis" in experiment.tasks:  # the definition made sure the dataset file has a davis: entry
        count = plan.check(_count_davis, data, dataset.davis) if data else None
        plan.counts["davis"] = count or Count(dataset.davis.images, "published count (DAVIS-2017 val frames)")
    if "robustness" in experiment.tasks:
        for name, split in dataset.robustness.items():
            if data and not (data / split.path).is_dir():
                plan.missing(f"DATA={data}: no {split.path}/ (the robustness set {name}; evaluate/robustness.py says its layout)")
            plan.counts[f"robustness {name}"] = Count(split.images, f"published count ({name})")
    if "transfer" in experiment.tasks:
        for name, split in dataset.transfer.items():
            count = plan.check(_count_transfer, data, name, split) if data else None
            plan.counts[f"transfer {name}"] = count or Count(split.images, f"published count ({name} train + val)")
    if "segmentation" in experiment.tasks:
        count = plan.check(_count_segmentation, data, dataset.segmentation) if data else None
        plan.counts["segmentation"] = count or Count(dataset.segmentation.images,
                                                     "published count (segmentation train + val)")


def _count_shards(data: Path, split: Split, label: str) -> Count:
    from distillery.data.shards import INDEX_FILE, ShardSet

    directory = data / split.path
    if not directory.is_dir():
        raise MissingInput(f"DATA={data}: no {split.path}/ (the {label} shards; write them with `distillery data shards`)")
    if not (directory / INDEX_FILE).exists():  # counting by reading every tar would take as long as the data is big
        return Count(split.images, f"published count ({directory} has no {INDEX_FILE} to count from)")
    return Count(ShardSet.open(directory).num_samples, str(directory / INDEX_FILE))


def _count_transfer(data: Path, name: str, split: Split) -> Count:
    """A transfer set's train + val, from their shard indexes (the published count when one has none)."""
    counts = [_count_shards(data, Split(f"{split.path}/{part}", split.images), f"transfer set {name} {part}")
              for part in ("train", "val")]
    if any(c.source.startswith("published") for c in counts):
        return Count(split.images, f"published count ({name}: {data / split.path} has a split without an index)")
    return Count(sum(c.images for c in counts), f"{data / split.path}/{{train,val}}")


def _count_retrieval(data: Path, name: str, split: Split) -> Count:
    root = data / split.path / name
    if not (root / f"gnd_{name}.pkl").exists():
        raise MissingInput(f"DATA={data}: no {split.path}/{name}/gnd_{name}.pkl (revisitop layout: gnd_{name}.pkl + jpg/)")
    return Count(len(list((root / "jpg").glob("*.jpg"))), f"{root}/jpg")


def _count_segmentation(data: Path, split: Split) -> Count:
    root = data / split.path / "ImageSets" / "Segmentation"
    listings = [root / f"{name}.txt" for name in ("train", "val")]
    missing = [p for p in listings if not p.exists()]
    if missing:
        raise MissingInput(f"DATA={data}: no {missing[0].relative_to(data)} (the Pascal VOC layout)")
    images = sum(len([n for n in p.read_text().splitlines() if n.strip()]) for p in listings)
    return Count(images, f"{root} (train + val)")


def _count_davis(data: Path, split: Split) -> Count:
    root = data / split.path
    listing = root / "ImageSets" / "2017" / "val.txt"
    if not listing.exists():
        raise MissingInput(f"DATA={data}: no {split.path}/ImageSets/2017/val.txt (the DAVIS-2017 layout)")
    names = [n.strip() for n in listing.read_text().splitlines() if n.strip()]
    frames = sum(len(list((root / "JPEGImages" / "480p" / n).glob("*.jpg"))) for n in names)
    return Count(frames, f"{root}/JPEGImages/480p ({len(names)} sequences)")


def _plan_training(plan: ExperimentPlan) -> tuple[ModelGeometry, float] | None:
    """Resolve the training config and build its student and method on the meta device with the real teachers' dims.

    Returns the student's geometry and the GFLOPs of all student passes one sample takes (None while a teacher
    is unknown)."""
    import torch

    from distillery.cache.writer import pooled_grid
    from distillery.models.students import Student
    from distillery.config import read_yaml
    from distillery.train.config import resolve
    from distillery.train.methods import MethodContext, TeacherInfo, create_method, method_class

    experiment, path = plan.experiment, plan.experiment.train
    config = resolve(read_yaml(path), {"data": f"{plan.data_root}/{experiment.dataset.train.path}",
                                       "out": str(plan.out / "runs"), "cache": str(plan.store or "STORE")}, str(path))
    if not method_class(config.method).uses_teachers:
        raise ExperimentError(f"{path}: method {config.method} trains without teachers; an experiment distils from them")
    for task in experiment.tasks:
        if task in HEAD_TASKS and HEAD_TASKS[task] != config.method:
            raise ExperimentError(f"{experiment.path}: eval: the {task} task scores a {HEAD_TASKS[task]} run's head; "
                                  f"{path} trains {config.method}")
    if config.batch_size % plan.inputs.gpus:
        raise ExperimentError(f"{path}: batch_size {config.batch_size} does not split evenly over GPUS={plan.inputs.gpus}")
    plan.method, plan.epochs = config.method, config.epochs
    if not plan.teachers_known:
        return None
    pool = experiment.cache["patch_pool"]
    infos = {t.name: TeacherInfo(t.name, t.geometry.dim, pooled_grid(t.geometry.grid, pool)) for t in plan.teachers}
    unknown = [name for name in config.cache_teachers if name not in infos]
    if unknown:
        raise ExperimentError(f"{path}: cache_teachers names {unknown[0]!r}, not a teacher of {experiment.path}")
    steps_per_epoch = max(1, plan.counts["train"].images // config.batch_size)
    with torch.device("meta"):
        student = Student(config.student, {"dynamic_img_size": True, **config.student_args})
        context = MethodContext(
            student_dim=student.embed_dim, student_grid=student.grid, student_size=student.preprocessing.input_size,
            student_depth=student.depth, teachers=tuple(infos[n] for n in (config.cache_teachers or infos)),
            label_classes={}, total_steps=config.epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch, seed=config.seed)
        try:
            method = create_method(config.method, config.method_config, context)
            sample = method.sample_spec()
        except DistilleryError:
            raise
        except Exception as error:  # the real teachers' names and dims reach code that tests with tiny teachers never do
            raise ExperimentError(f"{path}: building method {config.method} for the teachers {list(infos)} fails "
                                  f"({type(error).__name__}: {error})") from error
        geometry = architecture(config.student, **config.student_args)
        passes = [(method.view_passes, geometry.input_size)] if sample.teacher_view or sample.random_view else []
        passes += [(crops.count, tuple(crops.size)) for crops in sample.crops]
        pass_gflops = sum(count * (geometry.gflops if size == geometry.input_size else probe(student.model, size)[2])
                          for count, size in passes)
    size, grid = geometry.input_size, geometry.grid
    plan.train_summary = (f"{path} -> {config.method}, {config.student} {dict(config.student_args)} ({geometry.dim}-d, "
                          f"{size[0]} px, grid {grid[0]}x{grid[1]}, {geometry.gflops:.3g} GFLOPs/image), {config.epochs} "
                          f"epochs, batch {config.batch_size}; student passes per sample: "
                          + " + ".join(f"{n} x {s[0]} px" for n, s in passes))
    return geometry, pass_gflops


def _plan_hours(plan: ExperimentPlan, throughput: Throughput | None, student: ModelGeometry, pass_gflops: float) -> None:
    views, n = plan.experiment.cache["views"], plan.counts["train"].images
    plan.hours["cache"] = gpu_hours([(n * views, forward_rate(throughput, t.geometry), f"{t.name}: {n:,} images x {views} views")
                                     for t in plan.teachers])
    plan.hours["train"] = gpu_hours([(n * plan.epochs, train_rate(throughput, plan.method, student, pass_gflops),
                                      f"{plan.method}: {n:,} images x {plan.epochs} epochs")])
    images = sum(c.images for c in plan.counts.values())
    models = [(plan.experiment.student, student)] + [(t.name, t.geometry) for t in plan.teachers]
    work = [(images, forward_rate(throughput, g), f"{name} features") for name, g in models]
    if "segmentation" in plan.experiment.tasks:
        work += _segmentation_work(plan, throughput, models)
    plan.hours["eval"] = gpu_hours(work)
    plan.notes.append("cache hours count teacher forwards; decoding and view rendering run on the CPU workers "
                      "(cache: workers) and bound the rate when they are slower")
    plan.notes.append("eval hours count one forward per image of every split for every model (features are extracted "
                      "once; probe fitting and search are not counted), plus the segmentation probe's crops")


def _segmentation_work(plan: ExperimentPlan, throughput: Throughput | None, models) -> list:
    """The segmentation probe's forwards: every training crop and slide window, in images of the model's own
    input size (a forward costs about the square of the side ratio)."""
    from distillery.evaluate.tasks import settings_from_dict

    settings = settings_from_dict("segmentation", plan.experiment.eval_settings.get("segmentation") or {},
                                  str(plan.experiment.path))
    crops = settings.iterations * settings.batch_size
    return [(crops * (settings.crop_size / g.input_size[0]) ** 2, forward_rate(throughput, g),
             f"{name} segmentation probe: {settings.iterations:,} x {settings.batch_size} crops of {settings.crop_size} px")
            for name, g in models]


def _plan_steps(plan: ExperimentPlan) -> None:
    experiment, inputs, out = plan.experiment, plan.inputs, plan.out
    train_data = f"{plan.data_root}/{experiment.dataset.train.path}"
    env = _weights_env(plan)
    launch = ("distillery",) if inputs.gpus == 1 else ("torchrun", f"--nproc_per_node={inputs.gpus}", "-m", "distillery.cli")
    store = str(plan.store or "${CACHE_DIR}/STORE.zarr")
    cache_options = []
    for key, value in experiment.cache.items():
        if value is None:
            continue
        option = "--" + key.replace("_", "-")
        cache_options += ([option] if value else []) if isinstance(value, bool) else [option, str(value)]
    method = plan.method or "student"
    run_dir, student_dir = out / "runs" / method, out / "students" / method
    teacher_specs = [t.run_spec for t in plan.teachers] if plan.teachers_known else list(experiment.teachers)
    plan.steps = {
        "cache": Command((*launch, "cache-teachers", "--data", train_data,
                          *[a for spec in teacher_specs for a in ("--teacher", spec)], "--out", store, *cache_options), env),
        "train": Command((*launch, "train", "--config", str(experiment.train), "--data", train_data, "--cache", store,
                          "--out", str(run_dir), *(("--max-steps", str(inputs.max_steps)) if inputs.max_steps else ())),
                         env),
        "export": Command(("distillery", "export", str(run_dir), "--out", str(student_dir))),
        "eval": Command(("distillery", "eval", "suite", str(out / "eval_suite.yaml")), env),
        "report": Command(("distillery", "experiment", "report", experiment.reference, "--results", str(out))),
    }
    if any(task in HEAD_TASKS for task in experiment.tasks):
        plan.steps["analyze"] = _analyze_command(plan, run_dir, student_dir, teacher_specs, env)
        plan.steps = {step: plan.steps[step] for step in STEPS if step in plan.steps}
    plan.suite = eval_suite(plan, dict(zip(experiment.teacher_names, teacher_specs)), student_dir)


def _analyze_command(plan: ExperimentPlan, run_dir: Path, student_dir: Path, teacher_specs: list[str],
                     env: tuple[tuple[str, str], ...]) -> Command:
    """`distillery analyze heads` over the suite's train and val, reading the features the eval step cached."""
    experiment, data = plan.experiment, plan.data_root
    models = (["--teacher", f"{name}={spec}"] for name, spec in zip(experiment.teacher_names, teacher_specs))
    ks = (plan.experiment.eval_settings.get("knn") or {}).get("ks") or ()
    return Command(("distillery", "analyze", "heads", str(run_dir), "--train", f"{data}/{experiment.dataset.train.path}",
                    "--val", f"{data}/{experiment.dataset.val.path}", *[a for pair in models for a in pair],
                    "--student", f"{experiment.student}=local-dir:{student_dir}", *[a for k in ks for a in ("--k", str(k))],
                    "--results", str(plan.out / "eval")), env)


def _weights_env(plan: ExperimentPlan) -> tuple[tuple[str, str], ...]:
    """HF_HOME=WEIGHTS when some teacher's weights come from a Hugging Face cache there."""
    weights = plan.inputs.weights
    if weights and weights.is_dir() and any(not t.run_spec.startswith("local-dir:") for t in plan.teachers):
        return (("HF_HOME", str(weights)),)
    return ()


def eval_suite(plan: ExperimentPlan, teachers: dict[str, str], student_dir: Path) -> dict[str, Any]:
    """The `distillery eval suite` config: the student and every teacher, on the experiment's tasks and data."""
    from distillery.evaluate.suite import suite_config_values

    experiment, data = plan.experiment, plan.data_root
    dataset = experiment.dataset
    ood = {name: f"{data}/{split.path}" for name, split in dataset.ood.items()} if "ood" in experiment.tasks else None
    retrieval = ((dataset.retrieval[0], f"{data}/{dataset.retrieval[1].path}")
                 if "retrieval" in experiment.tasks and dataset.retrieval else None)
    davis, segmentation = (f"{data}/{getattr(dataset, task).path}" if task in experiment.tasks else None
                           for task in ("davis", "segmentation"))
    sets = lambda task, splits: {n: f"{data}/{s.path}" for n, s in splits.items()} if task in experiment.tasks else None  # noqa: E731
    tasks = [task for task in experiment.tasks if task not in HEAD_TASKS]  # the analyze step scores the heads
    return suite_config_values({experiment.student: f"local-dir:{student_dir}", **teachers},
                               f"{data}/{dataset.train.path}", f"{data}/{dataset.val.path}", tasks,
                               {t: v for t, v in experiment.eval_settings.items() if t in tasks}, str(plan.out / "eval"),
                               ood, retrieval, davis, segmentation, sets("robustness", dataset.robustness),
                               sets("transfer", dataset.transfer))
