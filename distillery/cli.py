"""The `distillery` command line: one thin command per verb. Each parses options and calls one function."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import distillery  # noqa: F401  (registers torchvision op schemas before anything imports timm)
import typer

from distillery.console import console, print_mapping, print_table, progress_bar
from distillery.errors import DistilleryError

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Make, convert and inspect webdataset image shards.", no_args_is_help=True)
app.add_typer(data_app, name="data")


# ---------------------------------------------------------------------------------------------------- data

@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Directory to create (train/, val/, ood/near/, ood/far/, retrieval/).")],
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
) -> None:
    """Write the embedded procedural dataset (seeded; same seed, same bytes)."""
    from distillery.data.synth import SynthConfig, generate, image_counts

    config = SynthConfig(seed=seed, size=size, train=train, val=val, ood_near=ood_near, ood_far=ood_far,
                         landmarks=landmarks, distractors=distractors, shard_size=shard_size,
                         image_format=image_format, workers=workers)
    with progress_bar() as progress:
        tasks = {split: progress.add_task(split, total=n) for split, n in image_counts(config).items()}
        counts = generate(config, out, progress=lambda split, n: progress.advance(tasks[split], n))
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
def data_info(directory: Annotated[Path, typer.Argument(help="A shard directory.")]) -> None:
    """Print shard count, sample count, classes and image size range."""
    from distillery.data.shards import ShardSet, describe

    shard_set = ShardSet.open(directory)
    with progress_bar() as progress:
        task = progress.add_task("reading image headers", total=shard_set.num_samples, visible=False)
        info = describe(shard_set, progress=lambda n: progress.update(task, advance=n, visible=True))
    names = info.pop("class_names")
    info["class names"] = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
    print_mapping(str(directory), info)


# ---------------------------------------------------------------------------------------------------- cache

cache_app = typer.Typer(help="Inspect and verify teacher-feature caches.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


def _load_yaml(path: Optional[Path]) -> dict:
    if path is None:
        return {}
    import yaml

    if not path.exists():
        raise DistilleryError(f"{path}: no such config file")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise DistilleryError(f"{path}: expected a mapping of option names to values")
    return values


@app.command("cache-teachers")
def cache_teachers(
    data: Annotated[Path, typer.Option(help="Shard directory (e.g. synth/train).")],
    teacher: Annotated[list[str], typer.Option(help="Teacher spec: timm name.tag, hf-hub:org/repo or local-dir:PATH. Repeat for several.")],
    out: Annotated[str, typer.Option(help="Zarr store: a local path or an fsspec URL.")],
    views: Annotated[int, typer.Option(help="Augmented views cached per image.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the views: view v of image i is a function of (seed, i, v).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per teacher forward (each with all its views).")] = 32,
    workers: Annotated[int, typer.Option(help="DataLoader processes decoding and rendering views.")] = 2,
    dtype: Annotated[str, typer.Option(help="float16, bfloat16 or int8 (symmetric per token, float16 scale).")] = "float16",
    patch_pool: Annotated[int, typer.Option(help="Average-pool the patch grid by 1, 2 or 4 before storing.")] = 1,
    cls_only: Annotated[bool, typer.Option(help="Store CLS tokens only.")] = False,
    view_config: Annotated[Optional[Path], typer.Option(help="YAML with view settings (scale, ratio, flip_p, jitter_p, ..., *_p: 0 turns an op off).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite/--resume", help="Rebuild from scratch, or (default) resume a store built with the same settings.")] = False,
) -> None:
    """Run every teacher once over V seeded views of every image and store CLS/patch tokens in a Zarr store.

    Several writers: `torchrun --nproc_per_node=K -m distillery.cli cache-teachers ...`, or plain processes
    with RANK and WORLD_SIZE set; each image shard is written by exactly one of them."""
    from distillery.cache.writer import CacheConfig, cache_teachers as run
    from distillery.data.views import ViewConfig

    config = CacheConfig(teachers=tuple(teacher), views=views, seed=seed, view_config=ViewConfig.from_dict(_load_yaml(view_config)),
                         dtype=dtype, patch_pool=patch_pool, cls_only=cls_only, batch_size=batch_size, workers=workers)
    summary = run(str(data), out, config, overwrite=overwrite)
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
    data: Annotated[Path, typer.Option(help="The shard directory the store was built from.")],
    recompute: Annotated[int, typer.Option(help="Random rows to recompute from the images and teachers.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the rows picked for --recompute.")] = 0,
) -> None:
    """Check completeness, keys, NaN/Inf, and recomputed rows; exit status 1 if any check fails."""
    from distillery.cache.store import CacheStore
    from distillery.cache.verify import verify_store

    opened = CacheStore.open(store)
    with progress_bar() as progress:
        task = progress.add_task("verifying shards", total=opened.num_shards)
        report = verify_store(opened, str(data), recompute, seed, progress=lambda n: progress.advance(task, n))
    print_table(f"verify {store}", ("check", "ok", "detail"), [(n, "yes" if ok else "NO", d) for n, ok, d in report["checks"]])
    if not report["ok"]:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------------- train

@app.command("train")
def train(
    method: Annotated[Optional[str], typer.Option(help="supervised, dino, unic, sefa or tintem.")] = None,
    data: Annotated[Optional[str], typer.Option(help="Training shard directory.")] = None,
    out: Annotated[Optional[str], typer.Option(help="Run directory (config.yaml, metrics.jsonl, checkpoints/).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML whose keys mirror these options; the command line wins.")] = None,
    student: Annotated[Optional[str], typer.Option(help="timm ViT architecture (vit_tiny_patch16_224, vit_small_patch16_224, ...).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs; the LR and other schedules span them.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many steps (schedules still span --epochs).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Global batch size, split over ranks.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Base learning rate (at batch 256 when lr_scaling is linear).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed: a CPU run repeats bit for bit.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader worker processes (0: in the training process).")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Save a checkpoint every N steps (and always at the end).")] = None,
    cache: Annotated[Optional[str], typer.Option(help="Teacher-feature store from cache-teachers (unic, sefa, tintem).")] = None,
    teacher: Annotated[Optional[list[str]], typer.Option(help="Run this teacher online instead of reading a cache (repeat).")] = None,
    stats_from: Annotated[Optional[str], typer.Option(help="Online teachers: standardisation statistics from this store.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its newest checkpoint.")] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: cuda when available).")] = None,
) -> None:
    """Train a student with one method; DDP with `torchrun --nproc_per_node=K -m distillery.cli train ...`."""
    from distillery.train.loop import train as run

    values = {"method": method, "data": data, "out": out, "student": student, "epochs": epochs, "max_steps": max_steps,
              "batch_size": batch_size, "lr": lr, "seed": seed, "workers": workers, "checkpoint_every": checkpoint_every,
              "cache": cache, "teachers": teacher or None, "stats_from": stats_from}
    summary = run(values, config, resume=resume, device=device)
    print_mapping(f"run {summary['run']}", summary)


@app.command("export")
def export(
    run: Annotated[Path, typer.Argument(help="A run directory.")],
    out: Annotated[Path, typer.Option(help="Directory for config.json + model.safetensors.")],
    ema: Annotated[bool, typer.Option(help="Export the EMA weights (DINO's teacher) instead of the student's.")] = False,
    checkpoint: Annotated[Optional[Path], typer.Option(help="A specific checkpoint (default: the newest).")] = None,
) -> None:
    """Write a run's backbone as a timm local-dir model: timm.create_model('local-dir:OUT', pretrained=True)."""
    from distillery.train.export import export_run

    path = export_run(run, out, ema=ema, checkpoint=checkpoint)
    console.print(f"exported {run} to local-dir:{path}")


def main() -> None:
    """Console entry point: a DistilleryError becomes one line on stderr and exit status 2."""
    try:
        app()
    except DistilleryError as error:
        console.print(f"[red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
