"""Teacher forward images/s: the compute `cache-teachers` spends per view, without data loading or writing.

    python benchmarks/teacher_forward.py --arch vit_small_patch16_224 --arch vit_base_patch16_224 \
        --arch vit_small_patch14_dinov2@224 --batch-size 256

Random weights (timm architecture, `pretrained=False`: the speed does not depend on the values), eval mode,
`Teacher.forward` as the cache writer calls it (bf16 autocast on CUDA, fp32 on CPU), timed after warm-up with
the device synchronised, so the figure is the ceiling the whole pipeline can reach per GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import distillery  # noqa: F401
import timm
import torch

from common import synchronize
from distillery.models.teachers import Teacher, split_size


def images_per_second(spec: str, batch_size: int, steps: int, device: torch.device) -> float:
    arch, size = split_size(spec)
    model = timm.create_model(arch, pretrained=False, num_classes=0, **({"img_size": size} if size else {}))
    if size:
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, size, size)}
    teacher = Teacher(spec, model).to(device)
    images = torch.randn(batch_size, 3, *teacher.preprocessing.input_size, device=device)
    for _ in range(3):
        teacher(images)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        teacher(images)
    synchronize(device)
    return batch_size * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", help="timm architecture, optionally @SIZE (repeat).")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    archs = args.arch or ["vit_small_patch16_224", "vit_base_patch16_224"]
    result = {"device": name, "torch": torch.__version__, "batch_size": args.batch_size,
              "precision": "bfloat16 autocast" if device.type == "cuda" else "float32",
              "images_per_s": {a: round(images_per_second(a, args.batch_size, args.steps, device), 1) for a in archs}}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
