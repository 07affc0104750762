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


def main() -> None:
    """Console entry point: a DistilleryError becomes one line on stderr and exit status 2."""
    try:
        app()
    except DistilleryError as error:
        console.print(f"[red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
