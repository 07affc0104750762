"""Kill and resume, many times: every interrupted cache or run, resumed, must equal the uninterrupted one.

    python benchmarks/kill_soak.py --trials 50 --out results/benchmarks/kill_soak.json

Each trial picks a job and a mode at random: `cache-teachers` in one process, with 2 DataLoader workers, or as
2 plain ranks (RANK/WORLD_SIZE); `train` (UNIC from the cache, a checkpoint every 2 steps) in one process or
with 2 workers. It starts the job, kills every process of it with SIGKILL after a random 0.3-6 s, resumes
it with the same command (`train --resume`), and compares the result with the same job run once without a
kill: every file of the store byte for byte, or every tensor of the final checkpoint and every logged loss.
The embedded data (256 images, 8 shards) and two random-weight ViT teachers keep a trial to seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

# In turn, so that any N >= 5 covers every mode and N = 2 (the suite's) one cache and one training run.
MODES = [("cache", "single"), ("train", "single"), ("cache", "workers"), ("train", "workers"), ("cache", "ranks")]


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "DISTILLERY_PROGRESS_SECONDS": "3600", **extra}


class Soak:
    def __init__(self, work: Path):
        from common import random_teachers, synth_train

        self.work = work
        self.data = synth_train(work, 256, 32, workers=2)
        self.teachers = random_teachers(work, "vit_tiny_patch16_224:8,vit_tiny_patch16_224:4", 32)
        subprocess.run(self.cache_command(work / "store.zarr", "single"), env=_env(), check=True, capture_output=True)
        self.references: dict[tuple[str, str], object] = {}

    def cache_command(self, out: Path, mode: str) -> list[str]:
        command = [sys.executable, "-m", "distillery.cli", "cache-teachers", "--data", self.data, "--out", str(out),
                   "--views", "2", "--batch-size", "8", "--workers", "2" if mode == "workers" else "0"]
        return command + [arg for spec in self.teachers for arg in ("--teacher", spec)]

    def train_command(self, out: Path, mode: str, resume: bool) -> list[str]:
        command = [sys.executable, "-m", "distillery.cli", "train", "--out", str(out)]
        if resume:
            return command + ["--resume"]
        return command + ["--method", "unic", "--recipe", "none", "--data", self.data, "--cache",
                          str(self.work / "store.zarr"), "--student", "vit_tiny_patch16_224", "--epochs", "4",
                          "--max-steps", "16", "--batch-size", "32", "--checkpoint-every", "2",
                          "--workers", "2" if mode == "workers" else "0", "--set", "student_args.img_size=32",
                          "--set", "student_args.patch_size=8", "--set", "student_args.depth=2",
                          "--set", "log_every=1", "--set", "warmup_epochs=0"]

    def start(self, job: str, mode: str, out: Path, resume: bool = False) -> list[subprocess.Popen]:
        if job == "train":
            return [subprocess.Popen(self.train_command(out, mode, resume), env=_env(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)]
        ranks = [(0, 1)] if mode != "ranks" else [(1, 2), (0, 2)]
        return [subprocess.Popen(self.cache_command(out, mode), env=_env(RANK=str(r), WORLD_SIZE=str(w)),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
                for r, w in ranks]

    def run(self, job: str, mode: str, out: Path, resume: bool = False) -> None:
        for process in self.start(job, mode, out, resume):
            if process.wait(timeout=600):
                raise RuntimeError(f"{job} ({mode}) exited with {process.returncode}")

    def result(self, job: str, out: Path):
        if job == "cache":
            return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                    for p in sorted(out.rglob("*")) if p.is_file()}
        import torch

        checkpoints = sorted((out / "checkpoints").glob("step-*.pt"))
        state = torch.load(checkpoints[-1], map_location="cpu", weights_only=True)
        model = {k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in state["model"].items()}
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {"step": state["step"], "model": model, "losses": losses}

    def reference(self, job: str, mode: str):
        if (job, mode) not in self.references:
            out = self.work / f"reference-{job}-{mode}"
            self.run(job, mode, out)
            self.references[(job, mode)] = self.result(job, out)
        return self.references[(job, mode)]

    def trial(self, index: int, job: str, mode: str, delay: float) -> dict:
        expected = self.reference(job, mode)
        out = self.work / f"trial-{index}"
        processes = self.start(job, mode, out)
        time.sleep(delay)
        finished_first = all(p.poll() is not None for p in processes)
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)  # the job and its DataLoader workers
            process.wait()
        self.run(job, mode, out, resume=job == "train" and any((out / "checkpoints").glob("step-*.pt")))
        same = self.result(job, out) == expected
        shutil.rmtree(out)
        return {"trial": index, "job": job, "mode": mode, "kill_after_s": round(delay, 2),
                "finished_before_the_kill": finished_first, "identical": same}


def soak(trials: int, seed: int = 0, work: Path | None = None) -> list[dict]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        runner = Soak(Path(work or tmp))
        return [runner.trial(i, *MODES[i % len(MODES)], rng.uniform(0.3, 6.0)) for i in range(trials)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = soak(args.trials, args.seed)
    summary = {"trials": len(results), "identical": sum(r["identical"] for r in results),
               "killed_mid_run": sum(not r["finished_before_the_kill"] for r in results),
               "by_mode": {f"{job} {mode}": sum(r["job"] == job and r["mode"] == mode for r in results)
                           for job, mode in MODES},
               "failures": [r for r in results if not r["identical"]]}
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"summary": summary, "trials": results}, indent=1))
    sys.exit(0 if summary["identical"] == summary["trials"] else 1)


if __name__ == "__main__":
    main()
