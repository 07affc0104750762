"""An experiment's plan: every check, each step's command, the cache size and the GPU-hours; and running a step.

A plan runs nothing. User-fixable errors become one-line problems; in a dry run, inputs that are simply not
here yet (DATA, weights) are notes saying what a run will need, and in a run (`strict`) they are problems.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import yaml

from distillery.errors import DistilleryError
from distillery.experiments.architectures import ModelGeometry, PlannedTeacher, architecture, locate_weights, plan_teacher, probe
from distillery.experiments.costs import Hours, Throughput, bytes_per_view, forward_rate, gpu_hours, store_name, train_rate
from distillery.experiments.definition import EXPERIMENTS_DIR, Experiment, ExperimentError, MissingInput, Split, load_experiment

STEPS = ("cache", "train", "export", "eval", "report")
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
    plan = ExperimentPlan(experiment, inputs, inputs.out or inputs.results / experiment.name,
                          str(inputs.data) if inputs.data else "${DATA}")
    if inputs.gpus < 1:
        plan.problems.append(f"GPUS must be at least 1, got {inputs.gpus}")
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


def _count_shards(data: Path, split: Split, label: str) -> Count:
    from distillery.data.shards import INDEX_FILE, ShardSet

    directory = data / split.path
    if not directory.is_dir():
        raise MissingInput(f"DATA={data}: no {split.path}/ (the {label} shards; write them with `distillery data shards`)")
    if not (directory / INDEX_FILE).exists():  # counting by reading every tar would take as long as the data is big
        return Count(split.images, f"published count ({directory} has no {INDEX_FILE} to count from)")
    return Count(ShardSet.open(directory).num_samples, str(directory / INDEX_FILE))


def _count_retrieval(data: Path, name: str, split: Split) -> Count:
    root = data / split.path / name
    if not (root / f"gnd_{name}.pkl").exists():
        raise MissingInput(f"DATA={data}: no {split.path}/{name}/gnd_{name}.pkl (revisitop layout: gnd_{name}.pkl + jpg/)")
    return Count(len(list((root / "jpg").glob("*.jpg"))), f"{root}/jpg")


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
            sample = create_method(config.method, config.method_config, context).sample_spec()
        except DistilleryError:
            raise
        except Exception as error:  # the real teachers' names and dims reach code that tests with tiny teachers never do
            raise ExperimentError(f"{path}: building method {config.method} for the teachers {list(infos)} fails "
                                  f"({type(error).__name__}: {error})") from error
        geometry = architecture(config.student, **config.student_args)
        passes = [(1, geometry.input_size)] if sample.teacher_view or sample.random_view else []
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
    plan.hours["eval"] = gpu_hours([(images, forward_rate(throughput, g), f"{name} features") for name, g in models])
    plan.notes.append("cache hours count teacher forwards; decoding and view rendering run on the CPU workers "
                      "(cache: workers) and bound the rate when they are slower")
    plan.notes.append("eval hours count one forward per image of every split for every model (features are extracted "
                      "once; probe fitting and search are not counted)")


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
                          "--out", str(run_dir)), env),
        "export": Command(("distillery", "export", str(run_dir), "--out", str(student_dir))),
        "eval": Command(("distillery", "eval", "suite", str(out / "eval_suite.yaml")), env),
        "report": Command(("distillery", "experiment", "report", experiment.reference, "--results", str(out))),
    }
    plan.suite = eval_suite(plan, dict(zip(experiment.teacher_names, teacher_specs)), student_dir)


def _weights_env(plan: ExperimentPlan) -> tuple[tuple[str, str], ...]:
    """HF_HOME=WEIGHTS when some teacher's weights come from a Hugging Face cache there."""
    weights = plan.inputs.weights
    if weights and weights.is_dir() and any(not t.run_spec.startswith("local-dir:") for t in plan.teachers):
        return (("HF_HOME", str(weights)),)
    return ()


def eval_suite(plan: ExperimentPlan, teachers: dict[str, str], student_dir: Path) -> dict[str, Any]:
    """The `distillery eval suite` config: the student and every teacher, on the experiment's tasks and data."""
    experiment, data = plan.experiment, plan.data_root
    dataset = experiment.dataset
    suite_data: dict[str, Any] = {"train": f"{data}/{dataset.train.path}", "val": f"{data}/{dataset.val.path}"}
    if "ood" in experiment.tasks:
        suite_data["ood"] = {name: f"{data}/{split.path}" for name, split in dataset.ood.items()}
    if "retrieval" in experiment.tasks and dataset.retrieval:
        suite_data["retrieval"] = {"dataset": dataset.retrieval[0], "root": f"{data}/{dataset.retrieval[1].path}"}
    return {"models": {experiment.student: f"local-dir:{student_dir}", **teachers}, "data": suite_data,
            "tasks": list(experiment.tasks), "settings": experiment.eval_settings, "out": str(plan.out / "eval")}


# ------------------------------------------------------------------------------------------------ printing

def format_plans(plans: list[ExperimentPlan]) -> str:
    """Every plan, naming the experiments each cache is shared with, then (for several) the summary."""
    users: dict[Path | None, list[str]] = {}
    for plan in plans:
        users.setdefault(plan.store, []).append(plan.experiment.name)
    texts = [format_plan(p, [n for n in users[p.store] if n != p.experiment.name] if p.store else []) for p in plans]
    if len(plans) > 1:
        texts.append(format_summary(plans))
    return "\n\n".join(texts)


def format_plan(plan: ExperimentPlan, shared_with: list[str] = ()) -> str:
    e, inputs, cache = plan.experiment, plan.inputs, plan.experiment.cache
    lines = [f"== {e.name}: {e.paper}", f"   definition {e.path}; out {plan.out}; GPUS={inputs.gpus}", "data:"]
    lines += [f"   {label:<16} {c.images:>10,} images  ({c.source})" for label, c in plan.counts.items()]
    lines.append("teachers:")
    for t in plan.teachers:
        g = t.geometry
        lines.append(f"   {t.spec}: {g.arch} at {g.input_size[0]} px, {g.dim}-d, grid {g.grid[0]}x{g.grid[1]}, "
                     f"{g.gflops:.3g} GFLOPs/image; run as {t.run_spec}; weights: {plan.weights_found.get(t.name)}")
    if plan.store is None:
        lines.append("cache: size unknown until every teacher is known")
    else:
        lines.append(f"cache: {plan.store}" + (f" (shared with {', '.join(shared_with)})" if shared_with else ""))
        per_view = " + ".join(f"{name} {n:,}" for name, n in plan.bytes_per_view.items())
        storage = f"{cache['dtype']}, " + ("cls only" if cache["cls_only"] else f"patch pool {cache['patch_pool']}")
        lines.append(f"   {plan.counts['train'].images:,} images x {cache['views']} views x ({per_view}) bytes per view "
                     f"[{storage}] = {plan.cache_bytes:,} bytes = {_size(plan.cache_bytes)} of teacher tokens on disk")
    if plan.train_summary:
        lines.append(f"train: {plan.train_summary}")
    if plan.hours:
        lines.append(f"GPU-hours on {plan.device or 'no measured device'} ({inputs.throughput}; "
                     f"wall-clock = GPU-hours / GPUS at ideal scaling):")
        for step, hours in plan.hours.items():
            value = "not measured" if hours.gpu_hours is None else f"{hours.gpu_hours:,.1f}"
            lines.append(f"   {step:<6} {value:>12}   {hours.detail}")
        total = plan.total_hours
        lines.append(f"   {'total':<6} " + ("not measured" if total is None else
                                            f"{total:>12,.1f}   = {total / inputs.gpus:,.1f} h wall-clock on {inputs.gpus} GPU(s)"))
    lines.append("commands:")
    lines += [f"   [{step}] {command}" for step, command in plan.steps.items()]
    lines.append(f"eval suite ({plan.out / 'eval_suite.yaml'}, written by the eval step):")
    lines += ["   " + line for line in yaml.safe_dump(plan.suite, sort_keys=False).splitlines()]
    lines.append("paper numbers compared (the report reads the reproduced ones from the eval JSON files):")
    for row in e.paper_results:
        lines.append(f"   {row.model} | {row.metric} | {'not published' if row.value is None else f'{row.value:g}'} | {row.source}")
    lines += [f"note: {n}" for n in plan.notes]
    lines += [f"will need: {n}" for n in plan.needs]
    return "\n".join(lines)


def format_summary(plans: list[ExperimentPlan]) -> str:
    """All experiments: each cache counted once, where the first experiment using it builds it."""
    stores = {p.store: p.cache_bytes for p in plans if p.store is not None}
    lines = ["== all experiments", f"   {'experiment':<32} {'cache':>10} {'cache h':>9} {'train h':>9} {'eval h':>8}"]
    built, total = set(), 0.0
    for p in plans:
        hours = {step: p.hours[step].gpu_hours if step in p.hours else None for step in ("cache", "train", "eval")}
        shared = p.store is not None and p.store in built
        if shared:
            hours["cache"] = 0.0
        built.add(p.store)
        size = "(shared)" if shared else _size(p.cache_bytes) if p.cache_bytes else "n/a"
        cells = ["n/a" if v is None else f"{v:,.1f}" for v in hours.values()]
        lines.append(f"   {p.experiment.name:<32} {size:>10} {cells[0]:>9} {cells[1]:>9} {cells[2]:>8}")
        total += math.nan if None in hours.values() else sum(hours.values())
    lines.append(f"   caches on disk: {len(stores)} store(s), {_size(sum(stores.values()))} in all")
    device = next((p.device for p in plans if p.device), None)
    lines.append("   GPU-hours in all: " + ("not measured" if math.isnan(total) or device is None else f"{total:,.1f} on {device}"))
    return "\n".join(lines)


def _size(n: float) -> str:
    return f"{n / 1e12:.2f} TB" if n >= 1e12 else f"{n / 1e9:.1f} GB"


# ------------------------------------------------------------------------------------------------- running

def run_step(plan: ExperimentPlan, step: str) -> None:
    """Execute one step of a checked plan (planned with strict=True). Each step resumes the work it finds done."""
    from distillery.train.checkpoint import list_checkpoints

    if step not in STEPS:
        raise ExperimentError(f"unknown step {step!r}; steps: {', '.join(STEPS)}")
    if plan.problems:
        raise ExperimentError(f"{plan.experiment.name}: {plan.problems[0]}")
    command = plan.steps[step]
    argv = list(command.argv)
    if step == "train" and list_checkpoints(plan.out / "runs" / plan.method):
        argv.append("--resume")  # an interrupted run continues exactly from its newest checkpoint
    if step == "eval":
        plan.out.mkdir(parents=True, exist_ok=True)
        (plan.out / "eval_suite.yaml").write_text(yaml.safe_dump(plan.suite, sort_keys=False))
    argv[0] = _executable(argv[0])
    completed = subprocess.run(argv, env={**os.environ, **dict(command.env)}, check=False)
    if completed.returncode != 0:
        raise ExperimentError(f"{plan.experiment.name}: step {step} failed (exit status {completed.returncode}): {command}")


def _executable(name: str) -> str:
    """`distillery` and `torchrun` from the environment this process runs in."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name
