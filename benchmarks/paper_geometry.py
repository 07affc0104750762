"""Step time of each method at the papers' geometry: from the cache, online, with targets in memory, and the
student alone, with a profile of the cached step.

    python benchmarks/paper_geometry.py --batch-size 8 --steps 2 --rounds 3                     # CPU
    python benchmarks/paper_geometry.py --methods sefa --set sefa.shared_view=true             # a variant
    python benchmarks/paper_geometry.py --device cuda --batch-size 128 --images 1024 --steps 10 --workers 8

A ViT-S/16 student at 224 px learns from a ViT-S/16 and a ViT-B/16 teacher (random weights: the time does not
depend on them) with each method's paper recipe (configs/<method>_vits16_in1k.yaml, its heads, crops and
losses) at --batch-size, on embedded images at 224 px cached with V = 2 views in float16. Four modes:

- cache: the run as `distillery train --cache` runs it, the DataLoader reading images and cached targets;
- online: the same run with the teachers run on every batch (`--teachers`), the same views;
- in memory: the cached run's batches taken from its DataLoader before the clock starts, so the time leaves the
  data path out: cache minus in memory is what the whole data path (decoding, views, crops, the cache read)
  costs the step where its workers cannot keep up;
- alone: the same student supervised on the class labels (`supervised`), nothing else, with its DataLoader.

Every run is built once and takes a step before timing starts. A method's runs are built together (one
method at a time: each run holds its models and DataLoader workers); in each of --rounds rounds its four
modes run --steps steps in turn, so drift in the machine's speed reaches all four alike, and each ratio is
taken between figures of the same rounds. A figure is the median over rounds of that round's mean step
time. On a GPU the clock is read after a device synchronisation.

The profile splits the in-memory step of each method: the student's forward and backward on the batch's
student view (its tokens through a plain mean-square loss), and the rest: the method's heads and losses and
their backward, any further student forwards (SeFA's DINO crops), gradient clipping, the optimizer and EMA.
Waiting for data is the cache row minus the in-memory row.

Writes --out (JSON) and prints it.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import distillery  # noqa: F401  (registers the torchvision op schemas timm needs)
import torch

from common import random_teachers, synchronize, synth_train
from distillery.cache.writer import CacheConfig, cache_teachers
from distillery.config import read_yaml
from distillery.train.config import resolve
from distillery.train.distributed import init_distributed
from distillery.train.loop import Trainer, prepare_batch

ROOT = Path(__file__).parents[1]
TEACHERS = "vit_small_patch16_224:16,vit_base_patch16_224:16"


def build(recipe: Path, work: Path, name: str, device: str | None, sets: tuple[str, ...] = (), **values) -> Trainer:
    """A run of `recipe` with these values in place of its own and the `--set` overrides; no checkpoints, no
    logging within the timing."""
    file_values = read_yaml(recipe)
    values = {"out": str(work / name), "epochs": 1000, "warmup_epochs": 0, "checkpoint_every": 0, "log_every": 10**9,
              **values}
    return Trainer(resolve(file_values, values, str(recipe), sets), init_distributed(device))


class Timed:
    """One mode of one method: a built run, its batches, and the step times of each round."""

    def __init__(self, trainer: Trainer, in_memory: bool):
        # Its own iterator, so its own DataLoader workers: the cached run's two modes do not take each other's batches.
        self.trainer, self.in_memory = trainer, in_memory
        self.batches = iter(trainer.loader)
        self.step = 0
        self.rounds: list[float] = []
        trainer.model.train()
        self.run(1)  # the warm-up step: DataLoader start-up, allocator, lazy initialisation

    def run(self, steps: int) -> float:
        if self.in_memory:
            ready = [next(self.batches) for _ in range(steps)]
        else:
            # While other modes ran, the DataLoader filled its queue; batches taken from a full queue would hide
            # a data path slower than the step. Emptied, every timed step waits for what the workers make now.
            loader = self.trainer.loader
            for _ in range(loader.num_workers * (loader.prefetch_factor or 0)):
                next(self.batches)
            ready = None
        synchronize(self.trainer.dist.device)
        tick = time.perf_counter()
        for k in range(steps):
            batch = ready[k] if ready is not None else next(self.batches)
            self.trainer.train_step(batch, self.step)
            self.step += 1
        synchronize(self.trainer.dist.device)
        return (time.perf_counter() - tick) / steps

    def round(self, steps: int) -> None:
        self.rounds.append(self.run(steps))


def student_seconds(timed: Timed, rounds: int) -> float:
    """Median time of the student's own forward and backward on one batch's student view, in the run's precision."""
    trainer = timed.trainer
    student, device = trainer.student, trainer.dist.device
    batch = prepare_batch(next(timed.batches), device, student.preprocessing.mean, student.preprocessing.std)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = student(batch["student"])
            loss = out.cls.float().pow(2).mean() + out.patch.float().pow(2).mean()
        loss.backward()
        student.zero_grad(set_to_none=True)

    return median_seconds(step, device, rounds)


def median_seconds(fn: Callable[[], None], device: torch.device, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        synchronize(device)
        tick = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="unic,tintem,sefa")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--images", type=int, default=64, help="embedded images at 224 px (the runs cycle over them)")
    parser.add_argument("--steps", type=int, default=2, help="steps per mode per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default=None, help="cuda (cuda:LOCAL_RANK) or cpu; default: a GPU if there is one")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="KEY=VALUE for the methods' runs, as `distillery train --set` (e.g. sefa.shared_view=true)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="paper_geometry_"))
    try:
        result = measure(args, work)
    finally:
        shutil.rmtree(work)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


def measure(args: argparse.Namespace, work: Path) -> dict:
    data = synth_train(work, args.images, 224, args.workers, shard_size=max(1, args.images // (2 * args.workers)))  # 2 shards a worker
    specs = random_teachers(work, TEACHERS, 224)
    store = str(work / "cache.zarr")
    device = init_distributed(args.device).device
    cache_teachers(data, store, CacheConfig(tuple(specs), views=2, workers=args.workers, batch_size=args.batch_size),
                   device=args.device, show_progress=False)
    common = {"data": data, "batch_size": args.batch_size, "workers": args.workers}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} torch threads"
    result = {"machine": f"{platform.machine()}, {name}", "torch": torch.__version__, "batch_size": args.batch_size,
              "steps": args.steps, "rounds": args.rounds, "workers": args.workers, "teachers": TEACHERS, "set": args.sets,
              "methods": {}}
    # Built before any method's models, so its DataLoader workers fork a small process.
    alone = Timed(build(ROOT / "configs" / "supervised_synth.yaml", work, "alone", args.device,
                        student="vit_small_patch16_224", student_args={}, **common), in_memory=False)
    for method in args.methods.split(","):
        # One method's runs at a time: every run holds its models, optimizer and DataLoader workers.
        recipe = ROOT / "configs" / f"{method}_vits16_in1k.yaml"
        sets = tuple(args.sets)
        cached = build(recipe, work, f"{method}_cache", args.device, sets, cache=store, **common)
        modes = {"cache": Timed(cached, in_memory=False), "in_memory": Timed(cached, in_memory=True),
                 "online": Timed(build(recipe, work, f"{method}_online", args.device, sets, teachers=specs, stats_from=store,
                                       views=2, **common), in_memory=False),
                 "alone": alone}
        first_alone_round = len(alone.rounds)
        for _ in range(args.rounds):
            for timed in modes.values():
                timed.round(args.steps)
        seconds = {mode: statistics.median(timed.rounds) for mode, timed in modes.items() if mode != "alone"}
        seconds["alone"] = statistics.median(alone.rounds[first_alone_round:])  # the rounds run beside this method's
        student = student_seconds(modes["cache"], args.rounds)
        cache, in_memory = seconds["cache"], seconds["in_memory"]
        result["methods"][method] = {
            **{f"{mode}_s": round(value, 3) for mode, value in seconds.items()},
            "cache_vs_in_memory": round(cache / in_memory, 2),
            "online_vs_cache": round(seconds["online"] / cache, 2),
            "cache_vs_alone": round(cache / seconds["alone"], 2),
            "profile_share": {"waiting_for_data": round(max(cache - in_memory, 0) / cache, 2),
                              "student_forward_backward": round(student / cache, 2),
                              "heads_losses_optimizer": round(max(in_memory - student, 0) / cache, 2)},
        }
        print(json.dumps({method: result["methods"][method]}), flush=True)
        del modes, cached
        gc.collect()
    return result


if __name__ == "__main__":
    main()
