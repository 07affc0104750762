"""Training images/s on the embedded data: student alone, distillation from the cache, online teachers.

    python benchmarks/train_throughput.py --steps 40 --out /tmp/train_throughput.json

Student-alone is `supervised` (the floor a cache should approach: data + student, no teacher); `unic`
and `tintem` train the same student from a cache of two teachers (ViT-Ti/4 and ViT-S/8 at the synth size),
and again with the same teachers run online on the same views. Rates are measured over the steps after a
warm-up (`metrics.jsonl`'s images_per_s, logged every 10 steps), same data, seed and workers everywhere.
Also: `supervised` and `dino` images/s for a tiny and a small student (issue 4's figure).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
from pathlib import Path

import distillery  # noqa: F401
import torch

from distillery.cache.writer import CacheConfig, cache_teachers
from distillery.data.synth import SynthConfig, generate
from distillery.models.students import create_student, export_local_dir
from distillery.train.config import TrainConfig
from distillery.train.distributed import DistInfo
from distillery.train.loop import Trainer

STUDENTS = {
    "tiny": {"img_size": 32, "patch_size": 8, "depth": 6, "embed_dim": 96, "num_heads": 3},
    "small": {"img_size": 32, "patch_size": 4, "depth": 12, "embed_dim": 384, "num_heads": 6},
}
METHOD_SETTINGS = {
    "supervised": {},
    "dino": {"out_dim": 1024, "hidden_dim": 512, "bottleneck_dim": 128, "local_crops": 4},
    "unic": {"mlp_hidden_dim": 384},
    "tintem": {},
}


def rate(work: Path, name: str, data: str, method: str, student: dict, steps: int, batch_size: int, workers: int,
         **extra) -> float:
    out = work / name
    config = TrainConfig(method=method, data=data, out=str(out), student_args=student, epochs=100, max_steps=steps,
                         batch_size=batch_size, warmup_epochs=0, workers=workers, log_every=10,
                         method_config=METHOD_SETTINGS[method], **extra)
    Trainer(config, DistInfo()).fit()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = logged[1:]  # the first interval holds DataLoader start-up
    return round(sum(r["images_per_s"] for r in steady) / len(steady), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="train_bench_"))
    generate(SynthConfig(train=args.images, val=0, ood_near=0, ood_far=0, landmarks=0, distractors=0, shard_size=250),
             work / "synth")
    data = str(work / "synth" / "train")
    torch.manual_seed(0)
    specs = []
    for name, arch, patch in (("vit_ti_p4", "vit_tiny_patch16_224", 4), ("vit_s_p8", "vit_small_patch16_224", 8)):
        export_local_dir(create_student(arch, img_size=32, patch_size=patch), work / name)
        specs.append(f"local-dir:{work / name}")
    store = str(work / "cache.zarr")
    cache_teachers(data, store, CacheConfig(tuple(specs), views=4, workers=args.workers), show_progress=False)
    common = dict(steps=args.steps, batch_size=args.batch_size, workers=args.workers)
    tiny = STUDENTS["tiny"]
    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "images": args.images,
              "batch_size": args.batch_size, "workers": args.workers, "steps": args.steps,
              "student_alone": rate(work, "alone", data, "supervised", tiny, **common)}
    for method in ("unic", "tintem"):
        result[f"{method}_cached"] = rate(work, f"{method}_cached", data, method, tiny, cache=store, **common)
        result[f"{method}_online"] = rate(work, f"{method}_online", data, method, tiny, teachers=specs, stats_from=store,
                                          **common)
        result[f"{method}_cached_vs_alone"] = round(result[f"{method}_cached"] / result["student_alone"], 3)
        result[f"{method}_cached_vs_online"] = round(result[f"{method}_cached"] / result[f"{method}_online"], 2)
    for size, student in STUDENTS.items():
        for method in ("supervised", "dino"):
            result[f"{method}_{size}"] = rate(work, f"{method}_{size}", data, method, student, **common)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
