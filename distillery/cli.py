"""The `distillery` command line: one thin command per verb. Each parses options and calls one function."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import distillery  # registers torchvision op schemas before anything imports timm
import typer

from distillery.console import console, print_mapping, print_table, progress_bar, stdout
from distillery.errors import DistilleryError

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _print_version(value: bool) -> None:
    if value:
        stdout.print(f"distillery {distillery.__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                   help="Print the version and exit.")] = False) -> None:
    """The `distillery` command line: one thin command per verb. Each parses options and calls one function."""
data_app = typer.Typer(help="Make, convert and inspect webdataset image shards.", no_args_is_help=True)
app.add_typer(data_app, name="data")


# ---------------------------------------------------------------------------------------------------- data

@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Directory to create (train/, val/, ood/, transfer/, retrieval/, davis/, seg/, val-v2/, val-r/, val-c/, val-9/).")],
    seed: Annotated[int, typer.Option(help="Same seed, byte-identical files.")] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels (retrieval images are drawn at twice this).")] = 32,
    train: Annotated[int, typer.Option(help="Training images (10 balanced classes).")] = 5000,
    val: Annotated[int, typer.Option(help="Validation images.")] = 1000,
    ood_near: Annotated[int, typer.Option(help="Near-OOD images (5 held-out look-alike shapes).")] = 500,
    ood_far: Annotated[int, typer.Option(help="Far-OOD images (textures and noise).")] = 500,
    landmarks: Annotated[int, typer.Option(help="Retrieval landmarks (2 queries and 10 database views each).")] = 12,
    distractors: Annotated[int, typer.Option(help="Retrieval distractor images.")] = 120,
    shard_size: Annotated[int, typer.Option(help="Samples per shard.")] = 500,
    image_format: Annotated[str, typer.Option("--format", help="jpg or png.")] = "jpg",
    workers: Annotated[int, typer.Option(help="Rendering processes.")] = 2,
    davis_sequences: Annotated[int, typer.Option(help="Videos in davis/, the DAVIS-2017-layout set (0: none).")] = 6,
    seg_train: Annotated[int, typer.Option(help="Training scenes in seg/, the Pascal-VOC-layout segmentation set.")] = 400,
    seg_val: Annotated[int, typer.Option(help="Validation scenes in seg/ (both 0: no seg/).")] = 100,
    robustness_images: Annotated[int, typer.Option(help="Images per set in val-v2/, val-r/, val-c/ (per corruption and severity), val-9/ (per variant); 0: none.")] = 200,
    transfer_train: Annotated[int, typer.Option(help="Training images of transfer/novel-shapes/ (the 5 held-out shapes as classes of their own).")] = 1000,
    transfer_val: Annotated[int, typer.Option(help="Validation images of transfer/novel-shapes/ (both 0: none).")] = 500,
) -> None:
    """Write the embedded procedural dataset (seeded; same seed, same bytes)."""
    from distillery.data.synth import SynthConfig, generate, image_counts
    from distillery.data.synth_sets import generate_evaluation_sets

    config = SynthConfig(seed=seed, size=size, train=train, val=val, ood_near=ood_near, ood_far=ood_far,
                         landmarks=landmarks, distractors=distractors, shard_size=shard_size,
                         image_format=image_format, workers=workers)
    with progress_bar() as progress:
        tasks = {split: progress.add_task(split, total=n) for split, n in image_counts(config).items()}
        counts = generate(config, out, progress=lambda split, n: progress.advance(tasks[split], n))
    counts.update(generate_evaluation_sets(out, seed, size, davis_sequences, seg_train, seg_val, robustness_images,
                                           transfer_train, transfer_val))
    print_table(f"synth data in {out}", ("part", "images"), list(counts.items()))


@data_app.command("shards")
def data_shards(
    root: Annotated[Path, typer.Argument(help="ImageFolder tree: root/<class>/<image>.")],
    out: Annotated[Path, typer.Option(help="New directory for the shards.")],
    shard_size: Annotated[int, typer.Option(help="Samples per shard.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the sample order (shards mix classes).")] = 0,
    classes: Annotated[Optional[Path], typer.Option(help="classes.json of another split, so labels agree (use the train split's for val).")] = None,
    workers: Annotated[int, typer.Option(help="Decoding processes.")] = 2,
) -> None:
    """Convert an ImageFolder tree to webdataset shards; corrupt and non-image files are skipped and listed."""
    from distillery.data.imagefolder import convert_image_folder

    with progress_bar() as progress:
        task = progress.add_task("converting", total=None)
        report = convert_image_folder(root, out, shard_size, seed, classes, workers,
                                      progress=lambda n: progress.advance(task, n),
                                      on_start=lambda total: progress.update(task, total=total))
    for path, reason in report.skipped[:20]:
        console.print(f"[yellow]skipped[/] {path}: {reason}")
    if len(report.skipped) > 20:
        console.print(f"[yellow]... and {len(report.skipped) - 20} more (all listed in {out}/conversion.json)")
    print_mapping(f"shards in {out}", {"images written": report.written, "shards": report.shards,
                                        "classes": len(report.classes), "skipped": len(report.skipped)})


@data_app.command("info")
def data_info(directory: Annotated[str, typer.Argument(help="A shard directory (a path or an fsspec URL: s3://bucket/train), one .tar, a brace pattern of them (shards/train-{000000..000009}.tar) or pipe: commands.")]) -> None:
    """Print shard count, sample count, classes and image size range."""
    from distillery.data.shards import ShardSet, describe

    shard_set = ShardSet.open(directory)
    with progress_bar() as progress:
        task = progress.add_task("reading image headers", total=shard_set.num_samples, visible=False)
        info = describe(shard_set, progress=lambda n: progress.update(task, advance=n, visible=True))
    names = info.pop("class_names")
    info["class names"] = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
    print_mapping(directory, info)


# ---------------------------------------------------------------------------------------------------- cache

cache_app = typer.Typer(help="Inspect and verify teacher-feature caches.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@app.command("cache-teachers")
def cache_teachers(
    data: Annotated[str, typer.Option(help="Shards: a directory (a path or an fsspec URL, e.g. s3://bucket/train), one .tar, a brace pattern or pipe: commands.")],
    teacher: Annotated[list[str], typer.Option(help="Teacher spec: timm name.tag, hf-hub:org/repo or local-dir:PATH. Repeat for several.")],
    out: Annotated[str, typer.Option(help="Zarr store: a local path or an fsspec URL.")],
    views: Annotated[Optional[int], typer.Option(help="Augmented views cached per image (default 4).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the views: view v of image i is a function of (seed, i, v) (default 0).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per teacher forward (each with all its views).")] = 32,
    workers: Annotated[int, typer.Option(help="DataLoader processes decoding and rendering views.")] = 2,
    dtype: Annotated[Optional[str], typer.Option(help="float16 (default), bfloat16 or int8 (symmetric per token, float16 scale).")] = None,
    patch_pool: Annotated[Optional[int], typer.Option(help="Average-pool the patch grid by 1 (default), 2 or 4 before storing.")] = None,
    cls_only: Annotated[Optional[bool], typer.Option("--cls-only", help="Store CLS tokens only.")] = None,
    view_config: Annotated[Optional[Path], typer.Option(help="YAML with view settings (scale, ratio, flip_p, jitter_p, ..., *_p: 0 turns an op off).")] = None,
    max_invalid: Annotated[float, typer.Option(help="Leave the store incomplete, exit status 2, when a teacher's outputs are not finite for more than this fraction of the images.")] = 0.01,
    add: Annotated[bool, typer.Option(help="Add the --teacher models to the finished store --out, under its own data, views and storage; the arrays already there are not touched.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite/--resume", help="Rebuild from scratch, or (default) resume a store built with the same settings.")] = False,
) -> None:
    """Run every teacher once over V seeded views of every image and store CLS/patch tokens in a Zarr store.

    Several writers: `torchrun --nproc_per_node=K -m distillery.cli cache-teachers ...`, or plain processes
    with RANK and WORLD_SIZE set; each image shard is written by exactly one of them."""
    from distillery.cache.writer import CacheConfig, addition_config, cache_teachers as run
    from distillery.config import read_yaml
    from distillery.data.views import ViewConfig

    given = {"views": views, "seed": seed, "dtype": dtype, "patch_pool": patch_pool, "cls_only": cls_only,
             "view_config": ViewConfig.from_dict(read_yaml(view_config), str(view_config)) if view_config else None}
    given = {key: value for key, value in given.items() if value is not None}
    if add:
        config = addition_config(out, tuple(teacher), batch_size, workers, max_invalid)
        conflicting = [key for key, value in given.items() if getattr(config, key) != value]
        if conflicting:
            raise DistilleryError(f"--add takes the views and storage of {out}; its {conflicting[0]} is "
                                  f"{getattr(config, conflicting[0])!r}, not {given[conflicting[0]]!r} (drop the option)")
    else:
        config = CacheConfig(teachers=tuple(teacher), batch_size=batch_size, workers=workers, max_invalid=max_invalid,
                             **given)
    summary = run(data, out, config, overwrite=overwrite, add=add)
    print_mapping(f"cache {out}", summary)


@cache_app.command("info")
def cache_info(store: Annotated[str, typer.Argument(help="A cache store (path or URL).")]) -> None:
    """Teachers, dims, N, V, size on disk, bytes per view, completeness."""
    from distillery.cache.store import CacheStore
    from distillery.cache.verify import describe_store

    print_mapping(store, describe_store(CacheStore.open(store)))


@cache_app.command("verify")
def cache_verify(
    store: Annotated[str, typer.Argument(help="A cache store (path or URL).")],
    data: Annotated[str, typer.Option(help="The shards the store was built from (as --data of cache-teachers).")],
    recompute: Annotated[int, typer.Option(help="Random rows to recompute from the images and teachers.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the rows picked for --recompute.")] = 0,
    max_invalid: Annotated[float, typer.Option(help="Fail when a teacher's outputs were not finite for more than this fraction of the images.")] = 0.01,
) -> None:
    """Check completeness, keys, NaN/Inf, invalid rows, statistics and recomputed rows; exit status 1 if any check fails."""
    from distillery.cache.store import CacheStore
    from distillery.cache.verify import verify_store

    opened = CacheStore.open(store)
    with progress_bar() as progress:
        task = progress.add_task("verifying shards", total=opened.num_shards)
        report = verify_store(opened, str(data), recompute, seed, progress=lambda n: progress.advance(task, n),
                              max_invalid=max_invalid)
    print_table(f"verify {store}", ("check", "ok", "detail"), [(n, "yes" if ok else "NO", d) for n, ok, d in report["checks"]])
    if not report["ok"]:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------------- train

@app.command("train")
def train(
    method: Annotated[Optional[str], typer.Option(help="supervised, dino, unic, sefa or tintem.")] = None,
    data: Annotated[Optional[str], typer.Option(help="Training shards: a directory (a path or an fsspec URL, e.g. s3://bucket/train), one .tar, a brace pattern or pipe: commands.")] = None,
    out: Annotated[Optional[str], typer.Option(help="Run directory (config.yaml, metrics.jsonl, checkpoints/).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML whose keys mirror these options; the command line wins.")] = None,
    student: Annotated[Optional[str], typer.Option(help="timm architecture: a ViT for distillation (vit_small_patch16_224, vit_convstem_tiny_patch4_32, ...), any timm model for supervised.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs; the LR and other schedules span them.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many steps (schedules still span --epochs).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Global batch size, split over ranks.")] = None,
    grad_accum_steps: Annotated[Optional[int], typer.Option(help="Gradient accumulation: each step averages the gradients of K micro-batches of batch-size / K (per rank), for a batch that does not fit in memory.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Base learning rate (at batch 256 when lr_scaling is linear).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed: a CPU run repeats bit for bit.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader worker processes (0: in the training process).")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Save a checkpoint every N steps (and always at the end).")] = None,
    tensorboard: Annotated[Optional[bool], typer.Option("--tensorboard", help="Also log every metrics.jsonl record as TensorBoard scalars in OUT/tensorboard (needs the tensorboard extra).")] = None,
    cache: Annotated[Optional[list[str]], typer.Option(help="Teacher-feature store from cache-teachers; repeat to join stores of other teachers built on the same data and views (one store per teacher, combined here).")] = None,
    cache_teacher: Annotated[Optional[list[str]], typer.Option(help="Train from only this teacher of the --cache store (repeat; default: all).")] = None,
    teacher: Annotated[Optional[list[str]], typer.Option(help="Run this teacher online instead of reading a cache (repeat).")] = None,
    stats_from: Annotated[Optional[str], typer.Option(help="Online teachers: standardisation statistics from this store.")] = None,
    init: Annotated[Optional[str], typer.Option(help="Start the student from these weights: local-dir:PATH (an export), a timm name.tag or hf-hub:ORG/REPO (a ViT's position embedding is resampled to its grid).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its newest checkpoint.")] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda (this process's GPU, cuda:LOCAL_RANK) or cuda:N (default: cuda when available).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="KEY=VALUE on top of the config, nested keys dotted (student_args.depth=6, unic.drop_prob=0.3); repeat.")] = None,
    recipe: Annotated[Optional[str], typer.Option(help="With --method and no --config, the packaged config to start from: paper (the default where the method has one: configs/<method>_<paper scale>.yaml), synth, none (generic defaults) or NAME (configs/<method>_NAME.yaml).")] = None,
) -> None:
    """Train a student with one method; DDP with `torchrun --nproc_per_node=K -m distillery.cli train ...`."""
    from distillery.train.config import recipe_path
    from distillery.train.loop import train as run

    if recipe and (config or not method):
        raise DistilleryError("--recipe picks the config a --method starts from; give --recipe with --method, not with --config")
    origin = None
    if method and not config and not resume:
        config = recipe_path(method, recipe)
        origin = f"{method}: starting from {config or 'the generic defaults (--recipe none)'}; the command line wins"

    values = {"method": method, "data": data, "out": out, "student": student, "epochs": epochs, "max_steps": max_steps,
              "batch_size": batch_size, "grad_accum_steps": grad_accum_steps, "lr": lr, "seed": seed, "workers": workers,
              "checkpoint_every": checkpoint_every, "tensorboard": tensorboard,
              "cache": (cache[0] if len(cache) == 1 else cache) if cache else None,
              "cache_teachers": cache_teacher or None, "teachers": teacher or None, "stats_from": stats_from, "init": init}
    summary = run(values, config, resume=resume, device=device, overrides=tuple(set_ or ()), origin=origin)
    print_mapping(f"run {summary['run']}", summary)


@app.command("export")
def export(
    run: Annotated[Path, typer.Argument(help="A run directory.")],
    out: Annotated[Path, typer.Option(help="Directory for config.json + model.safetensors.")],
    ema: Annotated[bool, typer.Option(help="Export the EMA weights (DINO's teacher) instead of the student's.")] = False,
    checkpoint: Annotated[Optional[Path], typer.Option(help="A specific checkpoint (default: the newest).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace what a non-empty --out holds.")] = False,
) -> None:
    """Write a run's backbone as a timm local-dir model: timm.create_model('local-dir:OUT', pretrained=True)."""
    from distillery.train.export import export_run

    path = export_run(run, out, ema=ema, checkpoint=checkpoint, overwrite=overwrite)
    console.print(f"exported {run} to local-dir:{path}")


@app.command("export-init")
def export_init(
    config: Annotated[Path, typer.Argument(help="A train config: its student, student_args and seed.")],
    out: Annotated[Path, typer.Option(help="Directory for config.json + model.safetensors.")],
    seed: Annotated[Optional[int], typer.Option(help="Initialisation seed (default: the config's).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace what a non-empty --out holds.")] = False,
) -> None:
    """Write a config's student untrained, as a local-dir model: the random-init baseline for `distillery eval`."""
    from distillery.train.export import export_initial

    path = export_initial(config, out, seed, overwrite=overwrite)
    console.print(f"exported the initial {config} student to local-dir:{path}")


# ---------------------------------------------------------------------------------------------------- experiment

experiment_app = typer.Typer(help="Paper experiments on real data (configs/experiments): plan, run a step, report.",
                             no_args_is_help=True)
app.add_typer(experiment_app, name="experiment")

ExperimentData = Annotated[Optional[Path], typer.Option(help="Shard root with train/, val/, ood/..., retrieval/ (make's DATA=).")]
ExperimentWeights = Annotated[Optional[Path], typer.Option(
    help="Pretrained weights: an HF_HOME (with hub/), or a directory of local-dir teachers named like the teachers (WEIGHTS=).")]
ExperimentGpus = Annotated[int, typer.Option(help="GPUs for the cache and train steps (torchrun when more than 1).")]
ExperimentOut = Annotated[Optional[Path], typer.Option(help="This experiment's directory (default: RESULTS/NAME).")]
ExperimentResults = Annotated[Optional[Path], typer.Option(
    help="Where experiments write by default, one directory each (default: results).")]
ExperimentCacheDir = Annotated[Optional[Path], typer.Option(
    help="Where caches go; experiments with the same teachers and cache settings share one (default: RESULTS/caches).")]
ExperimentThroughput = Annotated[Optional[Path], typer.Option(
    help="Measured GPU images/s for the GPU-hours (default: benchmarks/gpu_throughput.json).")]


def _experiment_inputs(strict: bool, **options):
    """PlanInputs from the options given; an option left out keeps PlanInputs' default."""
    from distillery.apps.experiments import PlanInputs

    return PlanInputs(strict=strict, **{k: v for k, v in options.items() if v is not None})


def _exit_on_problems(problems: list[str]) -> None:
    for problem in problems:
        console.print(f"[red]error:[/] {problem}", highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(2)


@experiment_app.command("plan")
def experiment_plan(
    name: Annotated[str, typer.Argument(help="An experiment of configs/experiments (file name without .yaml), or all.")],
    data: ExperimentData = None,
    weights: ExperimentWeights = None,
    gpus: ExperimentGpus = 1,
    out: ExperimentOut = None,
    results: ExperimentResults = None,
    cache_dir: ExperimentCacheDir = None,
    throughput: ExperimentThroughput = None,
) -> None:
    """Check every config, teacher and path; print each step's commands, the cache size, the GPU-hours and the
    paper numbers. Runs nothing; exit status 2 with one line per problem (missing DATA or weights are notes)."""
    from distillery.apps.experiments import experiment_names, format_plans, plan_experiments

    if name == "all" and out is not None:
        raise DistilleryError("--out names one experiment's directory; for all of them give --results")
    inputs = _experiment_inputs(False, data=data, weights=weights, gpus=gpus, out=out, results=results, cache_dir=cache_dir,
                                throughput=throughput)
    plans, problems = plan_experiments(experiment_names() if name == "all" else [name], inputs)
    typer.echo(format_plans(plans))
    _exit_on_problems(problems)


@experiment_app.command("run")
def experiment_run(
    name: Annotated[str, typer.Argument(help="An experiment of configs/experiments.")],
    step: Annotated[Optional[list[str]], typer.Option(help="cache, train, export, eval, analyze (the heads of a TinTeM or Proteus run) or report (repeat; default: all in order).")] = None,
    data: ExperimentData = None,
    weights: ExperimentWeights = None,
    gpus: ExperimentGpus = 1,
    out: ExperimentOut = None,
    results: ExperimentResults = None,
    cache_dir: ExperimentCacheDir = None,
    max_steps: Annotated[Optional[int], typer.Option(help="A smoke run: train N steps, and write the run, export, evaluation and report under OUT/smoke-N (the cache is the real one, shared).")] = None,
) -> None:
    """Run steps of an experiment (make/experiments.mk calls this once per step); each step resumes its work."""
    from distillery.apps.experiments import STEPS, plan_experiments, run_step

    inputs = _experiment_inputs(True, data=data, weights=weights, gpus=gpus, out=out, results=results, cache_dir=cache_dir,
                                max_steps=max_steps)
    plans, problems = plan_experiments([name], inputs)
    _exit_on_problems(problems)
    for one in step or STEPS:
        run_step(plans[0], one)


@experiment_app.command("report")
def experiment_report(
    name: Annotated[str, typer.Argument(help="An experiment of configs/experiments.")],
    results: Annotated[Path, typer.Option(help="The experiment's directory (holding eval/<model>/<task>.json).")],
) -> None:
    """Paper vs reproduced: write RESULTS/report.md and report.json from the evaluation JSON files."""
    from distillery.apps.experiments import load_experiment, write_report

    markdown, _ = write_report(load_experiment(name), results)
    typer.echo(markdown.read_text())


# ---------------------------------------------------------------------------------------------------- demo

@app.command("demo")
def demo(
    config: Annotated[Path, typer.Option(help="What the demo trains and evaluates.")] = Path("configs/demo.yaml"),
    work: Annotated[Optional[Path], typer.Option(help="Data, runs, models, cache and evaluation (default: the config's).")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Directory of report.md and its figures (default: the config's).")] = None,
    train_teachers: Annotated[bool, typer.Option("--train-teachers", help="Only (re)train the shipped teachers from their recipes into their directories (`make teachers`).")] = False,
    teacher: Annotated[Optional[list[str]], typer.Option(help="With --train-teachers: only this shipped teacher (repeat).")] = None,
) -> None:
    """The whole pipeline on the embedded data, ending in a report; a re-run reuses every finished step."""
    from rich.markdown import Markdown

    from distillery.apps.demo import DemoConfig, run_demo, train_shipped_teachers

    if train_teachers:
        for out in train_shipped_teachers(DemoConfig.load(config, work, report), tuple(teacher or ())):
            console.print(f"shipped teacher written: {out}")
        return
    path = run_demo(DemoConfig.load(config, work, report))
    stdout.print(Markdown(path.read_text().split("\n## Figures")[0]))
    console.print(f"report: {path}")


# ---------------------------------------------------------------------------------------------------- eval

eval_app = typer.Typer(help="Score frozen features: kNN, linear probe, retrieval, OOD, CKA, or a suite of them.",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")

EvalModelSpec = Annotated[str, typer.Option("--model", help="Model spec: timm name.tag, hf-hub:org/repo, local-dir:PATH (an exported student), or SPEC@SIZE.")]
EvalOut = Annotated[Optional[Path], typer.Option(help="Result JSON (default: results/<model>/<task>.json).")]
EvalFeaturesDir = Annotated[Optional[Path], typer.Option(help="Feature cache, reused while model, data and settings match (default: results/<model>/features).")]
EvalBatchSize = Annotated[int, typer.Option(help="Images per forward.")]
EvalWorkers = Annotated[int, typer.Option(help="Image decoding processes (0: in this process).")]
EvalDevice = Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: cuda when available).")]
EvalLabel = Annotated[Optional[str], typer.Option(help="What is predicted: class (the .cls labels), or a factor the shards record in factors.json (synth: shape, pattern, background, colour); results go to <task>-<label>.json.")]


def _given(**options):
    """The options given on the command line; one left out keeps the settings' default."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items() if v is not None and v != []}


def _named(values: Optional[list[str]], option: str) -> dict[str, str]:
    """Repeated NAME=VALUE options as a mapping."""
    named = {}
    for value in values or []:
        name, sep, rest = value.partition("=")
        if not (sep and name and rest):
            raise DistilleryError(f"{option} {value!r}: expected NAME=VALUE")
        named[name] = rest
    return named


def _eval_task(task: str, spec: str, data, settings, out, features_dir, batch_size, workers, device) -> None:
    from distillery.evaluate.features import Extraction
    from distillery.evaluate.results import show_result
    from distillery.evaluate.suite import run_task

    result, path = run_task(task, spec, data, settings, Extraction(batch_size, workers, features_dir), device, out)
    show_result(result, path)


@eval_app.command("knn")
def eval_knn(
    model: EvalModelSpec,
    train: Annotated[Path, typer.Option(help="Labelled train images: shard directory or ImageFolder tree.")],
    val: Annotated[Path, typer.Option(help="Labelled images to classify (same classes as --train).")],
    k: Annotated[Optional[list[int]], typer.Option("--k", help="Neighbours (repeat; default 10, 20, 100, 200).")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Vote weight exp(sim / T) (default 0.07).")] = None,
    label: EvalLabel = None, out: EvalOut = None, features_dir: EvalFeaturesDir = None, batch_size: EvalBatchSize = 128,
    workers: EvalWorkers = 2, device: EvalDevice = None,
) -> None:
    """Weighted kNN on L2-normalised CLS features (DINO's protocol): top-1 and top-5 for each k."""
    from distillery.evaluate.tasks import EvalData, KnnSettings

    _eval_task("knn", model, EvalData(train=train, val=val), KnnSettings(**_given(ks=k, temperature=temperature, label=label)),
               out, features_dir, batch_size, workers, device)


ProbeGrid = Annotated[Optional[str], typer.Option(help="LR grid: dinov2 (13 values x batch/256) or sefa (45 log-spaced in [1e-4, 10]).")]
ProbeEpochs = Annotated[Optional[int], typer.Option(help="Probe epochs (default 100).")]
ProbeBatchSize = Annotated[Optional[int], typer.Option(help="Probe batch size (default 256).")]
ProbeHoldout = Annotated[Optional[float], typer.Option(help="Fraction of train the LR is chosen on (default 0.1, stratified).")]
ProbeSeed = Annotated[Optional[int], typer.Option(help="Seed of the split, the heads and the batch order.")]
ProbePooling = Annotated[Optional[str], typer.Option(help="cls, patch_mean or last_blocks (DINO's concatenated CLS of the last blocks).")]
ProbeLastBlocks = Annotated[Optional[int], typer.Option(help="Blocks for --pooling last_blocks (default 4).")]


@eval_app.command("linear")
def eval_linear(
    model: EvalModelSpec,
    train: Annotated[Path, typer.Option(help="Labelled train images: the probe trains on them, its LR is chosen on a held-out part.")],
    val: Annotated[Path, typer.Option(help="Labelled images the probe is scored on.")],
    grid: ProbeGrid = None, epochs: ProbeEpochs = None, probe_batch_size: ProbeBatchSize = None,
    holdout: ProbeHoldout = None, seed: ProbeSeed = None, pooling: ProbePooling = None, last_blocks: ProbeLastBlocks = None,
    extra: Annotated[Optional[list[str]], typer.Option(help="NAME=DIR: another labelled set to score (repeat).")] = None,
    extra_classes: Annotated[Optional[list[str]], typer.Option(help="NAME=FILE.json: the classes an extra set holds (names or indices); other logits are ignored.")] = None,
    label: EvalLabel = None, out: EvalOut = None, features_dir: EvalFeaturesDir = None, batch_size: EvalBatchSize = 128,
    workers: EvalWorkers = 2, device: EvalDevice = None,
) -> None:
    """Linear probe with an LR sweep; the LR is chosen on held-out train, then the probe is retrained on all of train."""
    from distillery.evaluate.tasks import EvalData, LinearSettings

    data = EvalData(train=train, val=val, extra={k: Path(v) for k, v in _named(extra, "--extra").items()},
                    extra_classes={k: Path(v) for k, v in _named(extra_classes, "--extra-classes").items()})
    settings = LinearSettings(**_given(grid=grid, epochs=epochs, batch_size=probe_batch_size, holdout=holdout, seed=seed,
                                       pooling=pooling, last_blocks=last_blocks, label=label))
    _eval_task("linear", model, data, settings, out, features_dir, batch_size, workers, device)


@eval_app.command("transfer")
def eval_transfer(
    model: EvalModelSpec,
    set_: Annotated[list[str], typer.Option("--set", help="NAME=DIR: a transfer set, DIR holding train/ and val/ with classes of their own (repeat).")],
    grid: ProbeGrid = None, epochs: ProbeEpochs = None, probe_batch_size: ProbeBatchSize = None,
    holdout: ProbeHoldout = None, seed: ProbeSeed = None, pooling: ProbePooling = None, last_blocks: ProbeLastBlocks = None,
    out: EvalOut = None, features_dir: EvalFeaturesDir = None, batch_size: EvalBatchSize = 128,
    workers: EvalWorkers = 2, device: EvalDevice = None,
) -> None:
    """A linear probe per transfer set on its own classes (the papers' fine-grained suites), and their mean top-1."""
    from distillery.evaluate.tasks import EvalData, LinearSettings, TransferSet

    data = EvalData(transfer={name: TransferSet.under(Path(root)) for name, root in _named(set_, "--set").items()})
    settings = LinearSettings(**_given(grid=grid, epochs=epochs, batch_size=probe_batch_size, holdout=holdout, seed=seed,
                                       pooling=pooling, last_blocks=last_blocks))
    _eval_task("transfer", model, data, settings, out, features_dir, batch_size, workers, device)


@eval_app.command("robustness")
def eval_robustness(
    model: EvalModelSpec,
    v2: Annotated[Optional[Path], typer.Option(help="ImageNet-V2: class folders by index (0..999) or by name.")] = None,
    r: Annotated[Optional[Path], typer.Option("--r", help="ImageNet-R (200 classes; the head is restricted to them).")] = None,
    a: Annotated[Optional[Path], typer.Option("--a", help="ImageNet-A (200 classes).")] = None,
    c: Annotated[Optional[Path], typer.Option("--c", help="ImageNet-C: <corruption>/<severity 1-5>/<class>/.")] = None,
    in9: Annotated[Optional[Path], typer.Option(help="ImageNet-9 (backgrounds challenge): <variant>/val/<class>/.")] = None,
    probes: Annotated[Optional[Path], typer.Option(help="Where eval linear wrote <model>/linear.safetensors (default: results).")] = None,
    r_classes: Annotated[Optional[Path], typer.Option(help="JSON {\"classes\": [...]} for --r (default: the shipped ImageNet-R list).")] = None,
    a_classes: Annotated[Optional[Path], typer.Option(help="JSON {\"classes\": [...]} for --a (default: the shipped ImageNet-A list).")] = None,
    c_normaliser: Annotated[Optional[Path], typer.Option(help="JSON {\"baseline\", \"errors\"} for mCE (default: <c>/normaliser.json, else AlexNet's).")] = None,
    in9_mapping: Annotated[Optional[Path], typer.Option(help="JSON {\"in_to_in9\": {index: superclass}} (default: <in9>/in_to_in9.json, else MadryLab's).")] = None,
    label: Annotated[Optional[str], typer.Option(help="Whose probe: the class (default) or the factor `eval linear --label` trained it on.")] = None,
    out: EvalOut = None, features_dir: EvalFeaturesDir = None, batch_size: EvalBatchSize = 128,
    workers: EvalWorkers = 2, device: EvalDevice = None,
) -> None:
    """The saved linear probe on ImageNet-V2/R/A/C and ImageNet-9: top-1, mCE and BG-gap, without retraining."""
    from distillery.evaluate.robustness import RobustnessSettings
    from distillery.evaluate.tasks import EvalData

    sets = {name: path for name, path in (("v2", v2), ("r", r), ("a", a), ("c", c), ("in9", in9)) if path is not None}
    settings = RobustnessSettings(**_given(r_classes=r_classes and str(r_classes), a_classes=a_classes and str(a_classes),
                                           c_normaliser=c_normaliser and str(c_normaliser),
                                           in9_mapping=in9_mapping and str(in9_mapping), label=label))
    _eval_task("robustness", model, EvalData(robustness=sets, probes=probes), settings, out, features_dir, batch_size,
               workers, device)


@eval_app.command("retrieval")
def eval_retrieval(
    model: EvalModelSpec,
    dataset: Annotated[str, typer.Option(help="roxford5k, rparis6k (or roxford, rparis), or synth.")],
    data_root: Annotated[Path, typer.Option(help="Directory with gnd_<dataset>.pkl and jpg/ (or <dataset>/ holding them).")],
    crop_queries: Annotated[Optional[bool], typer.Option("--crop-queries/--no-crop-queries", help="Crop queries to their bbx (the protocol's rule; default on).")] = None,
    multiscale: Annotated[Optional[bool], typer.Option("--multiscale/--single-scale", help="Average descriptors at scales 1, 1/sqrt(2), 1/2.")] = None,
    max_side: Annotated[Optional[int], typer.Option(help="Longer image side in pixels (default: the model's input size).")] = None,
    out: EvalOut = None, features_dir: EvalFeaturesDir = None, batch_size: EvalBatchSize = 128,
    workers: EvalWorkers = 2, device: EvalDevice = None,
) -> None:
    """Revisited Oxford/Paris retrieval: Medium and Hard mAP and mP@1,5,10."""
    from distillery.evaluate.tasks import EvalData, RetrievalData, RetrievalSettings

    settings = RetrievalSettings(**_given(crop_queries=crop_queries, multiscale=multiscale, max_side=max_side))
    _eval_task("retrieval", model, EvalData(retrieval=RetrievalData(dataset, data_root)), settings, out, features_dir,
               batch_size, workers, device)


@eval_app.command("ood")
def eval_ood(
    model: EvalModelSpec,
    id_train: Annotated[Path, typer.Option(help="In-distribution train images: the KNN bank.")],
    id_test: Annotated[Path, typer.Option(help="In-distribution test images.")],
    ood: Annotated[list[str], typer.Option(help="NAME=DIR: an OOD set (repeat).")],
    group: Annotated[Optional[list[str]], typer.Option(help="GROUP=NAME,NAME: average these sets' metrics (repeat, e.g. near=a,b).")] = None,
    k: Annotated[Optional[int], typer.Option("--k", help="The k-th neighbour's distance is the score (default 10).")] = None,
    train_fraction: Annotated[Optional[float], typer.Option(help="Random fraction of ID train searched (default 1.0).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of that fraction.")] = None,
    out: EvalOut = None, features_dir: EvalFeaturesDir = None, batch_size: EvalBatchSize = 128,
    workers: EvalWorkers = 2, device: EvalDevice = None,
) -> None:
    """KNN OOD detection: per OOD set and group, AUROC, AUPR-In/Out and FPR@95 under both conventions."""
    from distillery.evaluate.tasks import EvalData, OodSettings

    groups = {name: sets.split(",") for name, sets in _named(group, "--group").items()}
    data = EvalData(train=id_train, val=id_test, ood={k: Path(v) for k, v in _named(ood, "--ood").items()}, ood_groups=groups)
    settings = OodSettings(**_given(k=k, train_fraction=train_fraction, seed=seed))
    _eval_task("ood", model, data, settings, out, features_dir, batch_size, workers, device)


def _cka(task: str, specs, features, data, settings, out, features_dir, batch_size, workers, device, stores=None):
    from distillery.evaluate.features import Extraction
    from distillery.evaluate.suite import run_cka

    result, path, heatmap = run_cka(specs or [], features or [], data, settings,
                                    Extraction(batch_size, workers, features_dir), device, out, task, stores=stores or [])
    console.print(f"heatmap: {heatmap}")
    return result, path


@eval_app.command("baselines")
def eval_baselines(
    train: Annotated[Optional[Path], typer.Option(help="Labelled train shards: the raw-pixel kNN bank.")] = None,
    val: Annotated[Optional[Path], typer.Option(help="Labelled shards the raw-pixel kNN classifies.")] = None,
    label: Annotated[Optional[list[str]], typer.Option(help="What the kNN predicts: class, or a factor of factors.json (repeat; default class).")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Retrieval set for the colour histogram: roxford5k, rparis6k or synth.")] = None,
    data_root: Annotated[Optional[Path], typer.Option(help="Directory with gnd_<dataset>.pkl and jpg/.")] = None,
    size: Annotated[int, typer.Option(help="Side the images are resized to before their pixels are flattened.")] = 32,
    bins: Annotated[int, typer.Option(help="Colour-histogram levels per RGB channel.")] = 4,
    out: Annotated[Path, typer.Option(help="Results root: OUT/raw_pixels/knn[-label].json, OUT/colour_histogram/retrieval.json.")] = Path("results"),
) -> None:
    """Model-free floors: raw-pixel kNN (the weighted vote on L2-normalised pixels) and colour-histogram retrieval."""
    from distillery.evaluate.baselines import run_baselines
    from distillery.evaluate.results import show_result
    from distillery.evaluate.tasks import EvalData, KnnSettings, RetrievalData

    if (dataset is None) != (data_root is None):
        raise DistilleryError("eval baselines: give --dataset and --data-root together")
    data = EvalData(train=train, val=val, retrieval=RetrievalData(dataset, data_root) if dataset else None)
    if (train is None) != (val is None):
        raise DistilleryError("eval baselines: give --train and --val together")
    for result, path in run_baselines(data, tuple(label or ("class",)), out, KnnSettings(), bins, size):
        show_result(result, path)


@eval_app.command("cka")
def eval_cka(
    model: Annotated[Optional[list[str]], typer.Option("--model", help="Model spec (repeat).")] = None,
    features: Annotated[Optional[list[str]], typer.Option(help="[NAME=]FILE.npz written by an earlier eval (repeat).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="The images --model specs are compared on.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Result JSON; the heatmap PNG goes beside it (default: results/cka.json).")] = None,
    features_dir: EvalFeaturesDir = None, batch_size: EvalBatchSize = 128, workers: EvalWorkers = 2, device: EvalDevice = None,
) -> None:
    """Linear and debiased CKA between models (raw CLS on the same images), with a heatmap."""
    from distillery.evaluate.results import show_result
    from distillery.evaluate.tasks import CkaSettings

    show_result(*_cka("cka", model, features, data, CkaSettings(), out, features_dir, batch_size, workers, device))


@eval_app.command("davis")
def eval_davis(
    model: EvalModelSpec,
    data_root: Annotated[Path, typer.Option(help="DAVIS-2017 layout: JPEGImages/480p/, Annotations/480p/, ImageSets/2017/ (synth: DIR/davis).")],
    split: Annotated[str, typer.Option(help="ImageSets/2017/<split>.txt.")] = "val",
    short_side: Annotated[int, typer.Option(help="Frames: short side to this (DINO: 480), long side floored to --multiple.")] = 480,
    multiple: Annotated[int, typer.Option(help="The long side is floored to a multiple of this (DINO: 64).")] = 64,
    save_masks: Annotated[Optional[Path], typer.Option(help="Write the predicted indexed PNGs here, one folder per sequence.")] = None,
    out: EvalOut = None, device: EvalDevice = None,
) -> None:
    """Semi-supervised video object segmentation by label propagation (DINO's protocol), J&F as davis2017-evaluation scores it."""
    from distillery.evaluate.davis import DavisSettings, davis_task
    from distillery.evaluate.results import show_result

    settings = DavisSettings(short_side=short_side, multiple=multiple, split=split)
    show_result(*davis_task(model, data_root, settings, out, save_masks, device))


@eval_app.command("segmentation")
def eval_segmentation(
    model: EvalModelSpec,
    data_root: Annotated[Path, typer.Option(help="Pascal VOC layout: JPEGImages/, SegmentationClass/, ImageSets/Segmentation/ (synth: DIR/seg).")],
    settings: Annotated[Optional[Path], typer.Option(help="YAML of protocol settings (configs/eval/segmentation_synth.yaml for the synth set); default: DINOv2's VOC linear config.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="KEY=VALUE on top of the settings (iterations=2000, crop_size=448); repeat.")] = None,
    out: EvalOut = None, device: EvalDevice = None,
) -> None:
    """Linear segmentation probe (BatchNorm + 1x1 conv) on frozen last-block patch tokens: DINOv2's protocol, mIoU as mmseg scores it."""
    from distillery.evaluate.results import show_result
    from distillery.evaluate.segmentation import read_settings, segmentation_task

    show_result(*segmentation_task(model, data_root, read_settings(settings, tuple(set_ or ())), out, device))


@eval_app.command("clustering")
def eval_clustering(
    model: EvalModelSpec,
    val: Annotated[Path, typer.Option(help="Labelled images: k-means with k = their classes, and the labels' silhouette.")],
    seed: Annotated[int, typer.Option(help="Seed of k-means' restarts.")] = 0,
    out: EvalOut = None, features_dir: EvalFeaturesDir = None, batch_size: EvalBatchSize = 128,
    workers: EvalWorkers = 2, device: EvalDevice = None,
) -> None:
    """NMI of k-means clusters against the labels and the labels' silhouette score on CLS features (SeFA Table 25)."""
    from distillery.evaluate.analysis import ClusteringSettings
    from distillery.evaluate.tasks import EvalData

    _eval_task("clustering", model, EvalData(val=val), ClusteringSettings(seed=seed), out, features_dir, batch_size,
               workers, device)


@eval_app.command("suite")
def eval_suite(
    config: Annotated[Path, typer.Argument(help="Suite YAML: models, data, tasks, settings, out (see configs/eval_synth.yaml).")],
    recompute: Annotated[bool, typer.Option(help="Recompute every result, even those whose model, data and settings "
                                                 "are those recorded in their file.")] = False,
) -> None:
    """Several tasks for several models; writes OUT/<model>/<task>.json and the comparison OUT/summary.md + .json.
    A result whose inputs (model weights, data files, settings) are unchanged is reused."""
    from distillery.evaluate.suite import run_suite

    run_suite(config, recompute=recompute)


teachers_app = typer.Typer(help="Choose teachers before distilling.", no_args_is_help=True)
app.add_typer(teachers_app, name="teachers")


@teachers_app.command("rank")
def teachers_rank(
    teacher: Annotated[Optional[list[str]], typer.Option(help="Teacher spec, run on --data (repeat).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="The images the --teacher models are compared on.")] = None,
    store: Annotated[Optional[list[str]], typer.Option(help="A cache store: its teachers compared on their stored CLS of view 0, no teacher run (repeat; one store per teacher works, built on the same shards).")] = None,
    target: Annotated[Optional[float], typer.Option(help="The CKA to aim for (default 0.5, the SeFA paper's finding).")] = None,
    tolerance: Annotated[Optional[float], typer.Option(help="Pairs within this of the target are flagged (default 0.1).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Result JSON; the heatmap PNG goes beside it (default: results/teachers-rank.json).")] = None,
    features_dir: EvalFeaturesDir = None, batch_size: EvalBatchSize = 128, workers: EvalWorkers = 2, device: EvalDevice = None,
) -> None:
    """Teacher pairs by their CKA, closest to the target first (SeFA: pairs near 0.5 distil best)."""
    from distillery.evaluate.results import show_result
    from distillery.evaluate.tasks import CkaSettings, pairs_table

    settings = CkaSettings(**_given(target=target, tolerance=tolerance))
    result, path = _cka("teachers-rank", teacher, None, data, settings, out, features_dir, batch_size, workers, device,
                        store)
    show_result(pairs_table(result), path)


analyze_app = typer.Typer(help="The papers' analyses of trained models: head kNN, head orthogonality, attention maps.",
                          no_args_is_help=True)
app.add_typer(analyze_app, name="analyze")


@analyze_app.command("orthogonality")
def analyze_orthogonality(
    run: Annotated[Path, typer.Argument(help="A training run directory (its newest checkpoint is read).")],
    out: Annotated[Optional[Path], typer.Option(help="Result JSON; the density PNG goes beside it (default: results/<run>/orthogonality.json).")] = None,
) -> None:
    """||A/α - I||_F of every linear head map of a run (TinTeM Table 4) and the density of A/α's entries (Fig. 4)."""
    from distillery.evaluate.analysis import head_orthogonality
    from distillery.evaluate.results import default_path, save_result, show_result

    path = out or default_path(run.name, "orthogonality")
    result, _ = head_orthogonality(run, path)
    show_result(result, save_result(result, path))


def _model_entry(value: str) -> tuple[str, str]:
    """NAME=SPEC (the name the suite gave the model, so its feature cache is found) or SPEC (named by its spec)."""
    from distillery.models.teachers import teacher_name

    name, sep, spec = value.partition("=")
    if sep and name and spec and not any(c in name for c in ":/"):
        return name, spec
    return teacher_name(value), value


@analyze_app.command("heads")
def analyze_heads(
    run: Annotated[Path, typer.Argument(help="A TinTeM or Proteus run directory (its newest checkpoint holds the head).")],
    train: Annotated[Path, typer.Option(help="Labelled train images of the kNN.")],
    val: Annotated[Path, typer.Option(help="Labelled images to classify.")],
    teacher: Annotated[Optional[list[str]], typer.Option(help="[NAME=]SPEC of the run's teachers, in its order (TinTeM's teacher head maps them).")] = None,
    student: Annotated[Optional[str], typer.Option(help="[NAME=]SPEC of the run's export (Proteus' student head maps it).")] = None,
    k: Annotated[Optional[list[int]], typer.Option("--k", help="Neighbours (repeat; default 10, 20, 100, 200).")] = None,
    label: EvalLabel = None,
    results: Annotated[Path, typer.Option(help="Evaluation root: features are read from and cached in RESULTS/<model>/features, as the suite keeps them.")] = Path("results"),
    out: Annotated[Optional[Path], typer.Option(help="Result JSON (default: RESULTS/<student name or run name>/<task>.json).")] = None,
    batch_size: EvalBatchSize = 128, workers: EvalWorkers = 2, device: EvalDevice = None,
) -> None:
    """kNN of a run's head (TinTeM Table 3): TinTeM's teacher head over its teachers, or Proteus' student head."""
    from distillery.evaluate.features import Extraction, default_device
    from distillery.evaluate.heads import head_knn
    from distillery.evaluate.results import default_path, save_result, show_result
    from distillery.evaluate.suite import features_dir
    from distillery.evaluate.tasks import EvalData, EvalModel, KnnSettings

    device = device or default_device()
    load = lambda entry: EvalModel.load(*_model_entry(entry), device)  # noqa: E731
    student_model = load(student) if student else None
    teachers = [load(t) for t in teacher or []]
    result = head_knn(run, student_model, teachers, EvalData(train=train, val=val), KnnSettings(**_given(ks=k, label=label)),
                      lambda model: Extraction(batch_size, workers, features_dir(results, model.name)))
    name = student_model.name if student_model else run.name
    show_result(result, save_result(result, out or default_path(name, result.task, results)))


@analyze_app.command("attention")
def analyze_attention(
    model: EvalModelSpec,
    data: Annotated[Path, typer.Option(help="Images (shards or an ImageFolder tree); the first --images are drawn.")],
    images: Annotated[int, typer.Option(help="How many images.")] = 6,
    out: Annotated[Optional[Path], typer.Option(help="PNG (default: results/<model>/attention.png).")] = None,
    device: EvalDevice = None,
) -> None:
    """The last block's CLS attention per head over a few images, as one PNG (SeFA appendix F)."""
    from distillery.evaluate.analysis import attention_figure
    from distillery.evaluate.features import load_model
    from distillery.evaluate.results import RESULTS_DIR

    teacher = load_model(model, device)
    path = attention_figure(teacher, teacher.name, data, out or RESULTS_DIR / teacher.name / "attention.png", images)
    console.print(f"attention maps of {teacher.name} -> {path}")


def hub_offline() -> None:
    """The command line never reaches the network: a missing pretrained file fails at once instead of after a
    minute of retries. HF_HUB_OFFLINE=0 in the environment allows downloads. huggingface_hub reads the
    variable when it is imported, which `import distillery` (timm) has done already, so its flag is set too."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = os.environ["HF_HUB_OFFLINE"].strip().upper() in {"1", "ON", "YES", "TRUE"}


def main() -> None:
    """Console entry point: a DistilleryError becomes one line on stderr and exit status 2."""
    hub_offline()
    try:
        app()
    except DistilleryError as error:
        console.print(f"[red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
