"""The prepared GPU check (`make device-check`): every figure the paper-scale plan needs, from one GPU, in one run.

    python benchmarks/device_check.py --out results/device_check.json --throughput benchmarks/gpu_throughput.json
    python benchmarks/device_check.py --cpu --tiny --out /tmp/device_check.json   # the same code, in seconds (CI)

It measures, each with the peak GPU memory it took:
- bf16 teacher forward images/s of ViT-S/16, ViT-B/16 and DINOv2-S/14 at 224 px (`teacher_forward.py`);
- `cache-teachers` end to end on JPEG shards of synth images at ImageNet-like size (256 px, views cropped to
  224), with its decode, forward and write rates, and so how many CPU decode workers keep one GPU busy;
- training images/s of UNIC, SeFA and TinTeM with a ViT-S/16 student, from that cache and with the teachers
  online, and of the student alone (`train_throughput.py`);
- exact kNN search (`distillery eval knn`'s FAISS flat index) on the GPU against the CPU.

Teachers have random weights (no download; speed does not depend on the values). `--throughput FILE` also
writes the figures in the format `distillery experiment plan` reads for GPU-hours (benchmarks/gpu_throughput.json).
`--tiny` shrinks every size (32 px, tiny models, a few steps) so the script runs in the test suite and cannot rot.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import distillery  # noqa: F401
import numpy as np
import torch

from common import random_teachers, synth_train
from teacher_forward import images_per_second
from train_throughput import STUDENTS, rate
from distillery.cache.writer import CacheConfig, cache_teachers


@dataclass(frozen=True)
class Sizes:
    forward_archs: tuple[str, ...]
    forward_batch: int
    forward_steps: int
    cache_teachers: str  # arch:patch, random weights at `image_size`
    images: int
    image_size: int  # synth side; the cached views are resized to each teacher's input size
    views: int
    student: str  # a train_throughput.STUDENTS name
    train_batch: int
    train_steps: int
    knn: tuple[int, int, int, int]  # bank, queries, dim, k


FULL = Sizes(("vit_small_patch16_224@224", "vit_base_patch16_224@224", "vit_small_patch14_dinov2@224"), 256, 20,
             "vit_small_patch16_224:16,vit_base_patch16_224:16", 4000, 256, 4, "vit_s16", 128, 40,
             (1_000_000, 5_000, 384, 200))
TINY = Sizes(("vit_tiny_patch16_224@32",), 8, 2, "vit_tiny_patch16_224:8", 64, 32, 2, "tiny", 16, 20, (2000, 200, 64, 20))
METHODS = ("unic", "sefa", "tintem")


def measured(on: torch.device, fn, *args, **kwargs) -> dict:
    """fn's figure with the peak GPU memory (GiB) it took on `on`; None on the CPU."""
    if on.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(on)
    value = fn(*args, **kwargs)
    peak = round(torch.cuda.max_memory_allocated(on) / 2**30, 2) if on.type == "cuda" else None
    return {"value": value, "peak_gib": peak}


def teacher_forward(sizes: Sizes, device: torch.device) -> dict:
    return {spec: measured(device, lambda: round(images_per_second(spec, sizes.forward_batch, sizes.forward_steps,
                                                                   device), 1))
            for spec in sizes.forward_archs}


def cache_run(work: Path, data: str, specs: list[str], sizes: Sizes, workers: int, device: torch.device) -> dict:
    config = CacheConfig(tuple(specs), views=sizes.views, batch_size=max(8, sizes.forward_batch // 4), workers=workers)
    run = measured(device, cache_teachers, data, str(work / "cache.zarr"), config, show_progress=False)
    summary = run["value"]
    # Each worker's decode time is summed over workers, so this rate is per worker.
    per_worker = summary["decode_images_per_second"]
    return {"teachers": sizes.cache_teachers, "images": summary["images"], "image_size": sizes.image_size,
            "views": sizes.views, "workers": workers, "images_per_s": summary["images_per_second"],
            "decode_images_per_s_per_worker": per_worker, "forward_images_per_s": summary["forward_images_per_second"],
            "write_images_per_s": summary["write_images_per_second"],
            "decode_workers_per_gpu": math.ceil(summary["forward_images_per_second"] / max(per_worker, 1e-9)),
            "peak_gib": run["peak_gib"]}


def training(work: Path, data: str, store: str, specs: list[str], sizes: Sizes, workers: int,
             device: torch.device) -> dict:
    common = dict(steps=sizes.train_steps, batch_size=sizes.train_batch, workers=workers, device=str(device))
    out = {"student": STUDENTS[sizes.student][0], "batch_size": sizes.train_batch,
           "student_alone": measured(device, rate, work, "alone", data, "supervised", sizes.student, **common)}
    for method in METHODS:
        out[f"{method}_cached"] = measured(device, rate, work, f"{method}_cached", data, method, sizes.student,
                                           cache=store, **common)
        out[f"{method}_online"] = measured(device, rate, work, f"{method}_online", data, method, sizes.student,
                                           teachers=specs, stats_from=store, **common)
    return out


def knn_search(sizes: Sizes, device: torch.device) -> dict:
    from distillery.evaluate.knn import nearest_neighbours

    bank, queries, dim, k = sizes.knn
    rng = np.random.default_rng(0)
    train = rng.standard_normal((bank, dim), dtype=np.float32)
    test = rng.standard_normal((queries, dim), dtype=np.float32)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    test /= np.linalg.norm(test, axis=1, keepdims=True)
    out = {"bank": bank, "queries": queries, "dim": dim, "k": k}
    tick = time.perf_counter()
    cpu, _ = nearest_neighbours(train, test, k, use_gpu=False)
    out["faiss_cpu_s"] = round(time.perf_counter() - tick, 3)
    import faiss

    if device.type == "cuda" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        nearest_neighbours(train[:1000], test[:10], k, use_gpu=True)  # warm-up: GPU resources and kernels
        run = measured(device, lambda: _timed(nearest_neighbours, train, test, k, use_gpu=True))
        (gpu, _), seconds = run["value"]
        out |= {"faiss_gpu_s": round(seconds, 3), "max_similarity_difference": float(np.abs(gpu - cpu).max()),
                "peak_gib": run["peak_gib"]}
    else:
        out["faiss_gpu_s"] = "this faiss has no GPU support (install faiss-gpu)" if device.type == "cuda" else None
    return out


def _timed(fn, *args, **kwargs):
    tick = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - tick


def throughput_file(result: dict) -> dict:
    """The figures in benchmarks/gpu_throughput.json's format, which `distillery experiment plan` reads."""
    train, student = result["train"], result["train"]["student"]
    return {
        "about": "GPU images/s used by `distillery experiment plan` to estimate GPU-hours, measured by "
                 "benchmarks/device_check.py (`make device-check`) on the device below; results/device_check.json "
                 "has every figure with its peak memory.",
        "device": f"{result['device']} ({result['precision']}, torch {result['torch']})",
        "sources": {"teacher_images_per_s": "benchmarks/device_check.py: Teacher.forward, random weights",
                    "train_images_per_s": "benchmarks/device_check.py: whole training steps from the cache "
                                          "(method:arch), and the student alone (student:arch)"},
        "teacher_images_per_s": {spec: r["value"] for spec, r in result["teacher_forward"].items()},
        "train_images_per_s": {f"student:{student}": train["student_alone"]["value"],
                               **{f"{m}:{student}": train[f"{m}_cached"]["value"] for m in METHODS}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="Run on the CPU even when a GPU is there.")
    parser.add_argument("--tiny", action="store_true", help="Tiny sizes: the test suite's smoke run.")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: CPU cores - 2, at least 1).")
    parser.add_argument("--out", type=Path, required=True, help="Every figure, as JSON.")
    parser.add_argument("--throughput", type=Path, default=None,
                        help="Also write the plan's throughput file here (benchmarks/gpu_throughput.json).")
    args = parser.parse_args()
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda:0")
    sizes = TINY if args.tiny else FULL
    workers = args.workers if args.workers is not None else max(1, (torch.multiprocessing.cpu_count() or 2) - 2)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    result = {"device": name, "torch": torch.__version__, "sizes": "tiny" if args.tiny else "full",
              "precision": "bfloat16 autocast" if device.type == "cuda" else "float32", "workers": workers}
    work = Path(tempfile.mkdtemp(prefix="device_check_"))
    try:
        started = time.perf_counter()
        result["teacher_forward"] = teacher_forward(sizes, device)
        data = synth_train(work, sizes.images, sizes.image_size, workers)
        specs = random_teachers(work, sizes.cache_teachers, sizes.image_size if args.tiny else 224)
        result["cache"] = cache_run(work, data, specs, sizes, workers, device)
        result["train"] = training(work, data, str(work / "cache.zarr"), specs, sizes, workers, device)
        result["knn"] = knn_search(sizes, device)
        result["seconds"] = round(time.perf_counter() - started, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.throughput:
        args.throughput.write_text(json.dumps(throughput_file(result), indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
