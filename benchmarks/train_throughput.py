"""Training images/s on the embedded data: student alone, distillation from the cache, online teachers.

    python benchmarks/train_throughput.py --steps 40 --out /tmp/train_throughput.json          # CPU, 32 px
    python benchmarks/train_throughput.py --size 224 --teachers vit_small_patch16_224:16,vit_small_patch16_224:16 \
        --distil-student vit_s16 --students vit_ti16,vit_s16 --batch-size 256 --workers 14  # GPU, ViT-S/16

Student-alone is `supervised` (the floor a cache should approach: data + student, no teacher); `unic`
and `tintem` train the same student from a cache of two teachers (ViT-Ti/4 and ViT-S/8 at the synth size),
and again with the same teachers run online on the same views. Rates are measured over the steps after a
warm-up (`metrics.jsonl`'s images_per_s, logged every 10 steps), same data, seed and workers everywhere.
`*_cached_data_path_only` iterates the same cached run's DataLoader with no model: where the cached run
falls short of student-alone while its data path is far faster, the difference is the method's own heads
and losses, not the cache.
Also: `supervised` and `dino` images/s for a tiny and a small student.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import distillery  # noqa: F401
import torch

from common import CPU_TEACHERS, random_teachers, synth_train
from distillery.cache.writer import CacheConfig, cache_teachers
from distillery.train.config import TrainConfig
from distillery.train.distributed import init_distributed
from distillery.train.loop import Trainer

# name: (timm architecture, overrides); the 32 px ones are the synth configs' students, the /16 ones the papers'.
STUDENTS = {
    "tiny": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 6, "embed_dim": 96, "num_heads": 3}),
    "small": ("vit_small_patch16_224", {"img_size": 32, "patch_size": 4}),
    "vit_ti16": ("vit_tiny_patch16_224", {}),
    "vit_s16": ("vit_small_patch16_224", {}),
}
METHOD_SETTINGS = {
    "supervised": {},
    "dino": {"out_dim": 1024, "hidden_dim": 512, "bottleneck_dim": 128, "local_crops": 4},
    "unic": {"mlp_hidden_dim": 384},
    "sefa": {"head_hidden_dim": 384, "dino": {"out_dim": 1024, "hidden_dim": 512, "bottleneck_dim": 128, "local_crops": 4}},
    "tintem": {},
}


def trainer(work: Path, name: str, data: str, method: str, student: str, steps: int, batch_size: int, workers: int,
            device: str | None = None, **extra) -> Trainer:
    """A run on `device` (default: the first GPU when there is one)."""
    arch, student_args = STUDENTS[student]
    config = TrainConfig(method=method, data=data, out=str(work / name), student=arch, student_args=student_args,
                         epochs=100, max_steps=steps, batch_size=batch_size, warmup_epochs=0, workers=workers,
                         log_every=10, method_config=METHOD_SETTINGS[method], **extra)
    return Trainer(config, init_distributed(device))


def rate(work: Path, name: str, *args, **kwargs) -> float:
    """Training images/s: forward, losses, backward and the optimizer step, data loading overlapped."""
    trainer(work, name, *args, **kwargs).fit()
    logged = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    steady = logged[1:]  # the first interval holds DataLoader start-up
    return round(sum(r["images_per_s"] for r in steady) / len(steady), 1)


def loader_rate(work: Path, name: str, *args, **kwargs) -> float:
    """Images/s of the data path alone (shard and cache reads, decoding, view replay, batching), no model:
    the ceiling the data path puts on training."""
    loader = iter(trainer(work, name, *args, **kwargs).loader)
    batch = next(loader)  # DataLoader start-up
    tick, images = time.perf_counter(), 0
    for _, batch in zip(range(kwargs["steps"]), loader):
        images += len(batch["index"])
    return round(images / (time.perf_counter() - tick), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=32, help="Image side of the synth data.")
    parser.add_argument("--teachers", default=CPU_TEACHERS,
                        help="Random-weight teachers as arch:patch, at --size.")
    parser.add_argument("--distil-student", default="tiny", choices=sorted(STUDENTS),
                        help="Student of the cached/online/alone comparison.")
    parser.add_argument("--students", default="tiny,small", help="Students whose supervised and dino rates are measured.")
    parser.add_argument("--methods", default="unic,tintem", help="Distillation methods compared cached vs online.")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="train_bench_"))
    data = synth_train(work, args.images, args.size, args.workers)
    specs = random_teachers(work, args.teachers, args.size)
    store = str(work / "cache.zarr")
    cache_teachers(data, store, CacheConfig(tuple(specs), views=4, workers=args.workers,
                                            batch_size=max(32, args.batch_size // 4)), show_progress=False)
    common = dict(steps=args.steps, batch_size=args.batch_size, workers=args.workers)
    student = args.distil_student
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} torch threads"
    result = {"machine": f"{platform.machine()}, {device}", "torch": torch.__version__, "images": args.images,
              "size": args.size, "teachers": args.teachers, "distil_student": student, "batch_size": args.batch_size,
              "workers": args.workers, "steps": args.steps,
              "student_alone": rate(work, "alone", data, "supervised", student, **common)}
    for method in args.methods.split(","):
        result[f"{method}_cached"] = rate(work, f"{method}_cached", data, method, student, cache=store, **common)
        result[f"{method}_cached_data_path_only"] = loader_rate(work, f"{method}_loader", data, method, student,
                                                                cache=store, **common)
        result[f"{method}_online"] = rate(work, f"{method}_online", data, method, student, teachers=specs,
                                          stats_from=store, **common)
        result[f"{method}_cached_vs_alone"] = round(result[f"{method}_cached"] / result["student_alone"], 3)
        result[f"{method}_cached_vs_online"] = round(result[f"{method}_cached"] / result[f"{method}_online"], 2)
    for name in args.students.split(","):
        for method in ("supervised", "dino"):
            result[f"{method}_{name}"] = rate(work, f"{method}_{name}", data, method, name, **common)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
