"""What the benchmarks share: synth data of a given size and random-weight teachers saved as local-dir models."""

from __future__ import annotations

from pathlib import Path

import distillery  # noqa: F401
import torch

from distillery.data.synth import SynthConfig, generate
from distillery.models.students import create_student, export_local_dir

CPU_TEACHERS = "vit_tiny_patch16_224:4,vit_small_patch16_224:8"  # two widths and patch sizes at 32 px


def synth_train(work: Path, images: int, size: int, workers: int, shard_size: int = 250) -> str:
    generate(SynthConfig(train=images, val=0, ood_near=0, ood_far=0, landmarks=0, distractors=0, shard_size=shard_size,
                         size=size, workers=max(workers, 2)), work / "synth")
    return str(work / "synth" / "train")


def random_teachers(work: Path, teachers: str, size: int) -> list[str]:
    """`arch:patch,arch:patch` -> local-dir specs of seeded random-weight models at `size` px."""
    torch.manual_seed(0)
    specs = []
    for i, (arch, patch) in enumerate(t.split(":") for t in teachers.split(",")):
        path = work / f"teacher{i}_{arch}_p{patch}"
        export_local_dir(create_student(arch, img_size=size, patch_size=int(patch)), path)
        specs.append(f"local-dir:{path}")
    return specs


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock read after it times that work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
