"""Training memory against the dataset size, and how the cache reader reads.

    python benchmarks/train_memory.py --sizes 1250,2500,5000 --steps 30

For each size: the embedded train set at 32 px (shards of 250 images), one teacher cached with V = 2, then
`unic` for `--steps` steps at batch 64 with 2 DataLoader workers in a process of its own, whose peak RSS
and its workers' (the largest one) are read from getrusage. Memory should not grow with the data: the
stream holds one shard's records and its cache blocks per worker at a time. Then, in this process and with
no workers, every `CacheStore.read_block` call of a run is counted against its batches: the reader reads
each image shard's block of a view once, in one sequential read per array, not row by row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import distillery  # noqa: F401  (registers the torchvision op schemas timm needs)

from common import synth_train
from distillery.cache.store import CacheStore
from distillery.cache.writer import CacheConfig, cache_teachers

TEACHER = f"local-dir:{Path(__file__).parents[1] / 'teachers' / 'shape_cnn'}"
RUN = """
import json, resource, sys
from distillery.train.loop import train
train(json.loads(sys.argv[1]))
print(json.dumps({"main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "largest_worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def run_config(data: str, store: str, out: Path, steps: int, workers: int) -> dict:
    return {"method": "unic", "data": data, "cache": store, "out": str(out), "student": "vit_convstem_tiny_patch4_32",
            "epochs": 50, "max_steps": steps, "batch_size": 64, "workers": workers, "warmup_epochs": 0, "log_every": 10}


def read_counts(data: str, store: str, out: Path, steps: int) -> dict:
    from distillery.train.loop import train

    calls = []
    read_block = CacheStore.read_block

    def counted(self, shard_id, *args, **kwargs):
        calls.append(shard_id)
        return read_block(self, shard_id, *args, **kwargs)

    CacheStore.read_block = counted
    try:
        train(run_config(data, store, out, steps, workers=0))
    finally:
        CacheStore.read_block = read_block
    return {"batches": steps, "read_block_calls": len(calls), "distinct_shards_read": len(set(calls)),
            "images_per_read": round(steps * 64 / len(calls), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1250,2500,5000")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            work = Path(tmp) / str(size)
            data = synth_train(work, size, 32, workers=2)
            store = str(work / "store.zarr")
            cache_teachers(data, store, CacheConfig((TEACHER,), views=2, workers=2), show_progress=False)
            config = run_config(data, store, work / "run", args.steps, workers=2)
            measured = subprocess.run([sys.executable, "-c", RUN, json.dumps(config)], capture_output=True, text=True,
                                      check=True, cwd=Path(__file__).parents[1])
            memory = json.loads(measured.stdout.strip().splitlines()[-1])
            results.append({"images": size, **{k: round(v) for k, v in memory.items()}})
        reads = read_counts(data, store, Path(tmp) / "counted", args.steps)
    print(json.dumps({"memory": results, "reads": reads}, indent=1))


if __name__ == "__main__":
    main()
