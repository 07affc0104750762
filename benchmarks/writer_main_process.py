"""What the cache writer's main process spends per image besides the teachers' forward.

    python benchmarks/writer_main_process.py --images 96 --views 4 --dtype float16
    python benchmarks/writer_main_process.py --images 96 --views 4 --dtype int8
    python benchmarks/writer_main_process.py --decode 200 --views 4      # a decode worker's cost per image

The teachers are replaced by precomputed tokens at the paper geometry (ViT-S/16 and ViT-B/16 at 224 px:
384-d and 768-d, 196 patch tokens), so what is timed is the writer's own work on them: the finite checks,
zeroing invalid rows, encoding, the statistics and the Zarr write of each shard. CPU seconds of this process
(`time.process_time`, all threads), per image, the median of `--rounds` rounds.

`--decode N` times instead what a DataLoader worker spends per image: decoding a 224-px JPEG of the
embedded set and rendering its V views (`cache.writer.view_image`), on one thread; a GPU caching at R
images/s needs about R x that many seconds of decode workers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import distillery  # noqa: F401  (registers the torchvision op schemas timm needs)
import numpy as np
import torch

from distillery.cache.store import CacheStore
from distillery.cache.writer import CacheConfig, ShardBuffer, ViewedImage
from distillery.data.views import NUM_PARAMS
from distillery.models.teachers import Preprocessing, Tokens

GEOMETRY = {"vit_small_patch16_224": 384, "vit_base_patch16_224": 768}  # 224 px, 14 x 14 patches


class PrecomputedTeacher(torch.nn.Module):
    """A teacher whose forward hands back fixed tokens: the writer's own cost is all that remains."""

    def __init__(self, name: str, dim: int, views: int, batch: int, seed: int):
        super().__init__()
        self.name, self.embed_dim, self.grid = name, dim, (14, 14)
        # 1-px inputs: the tokens are fixed, so rendering and normalising 224-px views would only add noise
        self.preprocessing = Preprocessing((1, 1), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 1.0)
        generator = torch.Generator().manual_seed(seed)
        self.tokens = Tokens(torch.randn(batch * views, dim, generator=generator),
                             torch.randn(batch * views, 196, dim, generator=generator))

    def forward(self, images: torch.Tensor) -> Tokens:
        count = images.shape[0]
        return Tokens(self.tokens.cls[:count], self.tokens.patch[:count])


def identity(teachers: list[PrecomputedTeacher], images: int, views: int, dtype: str) -> dict:
    return {"dataset": {"shards": ["bench-000000.tar"], "counts": [images], "num_samples": images, "keys_sha256": ""},
            "views": {"count": views, "seed": 0, "config": {}},
            "storage": {"dtype": dtype, "patch_pool": 1, "cls_only": False, "slots": images, "forward_precision": "float32"},
            "teachers": [{"name": t.name, "spec": t.name, "dim": t.embed_dim, "grid": [14, 14], "stored_grid": [14, 14],
                          "fingerprint": {}} for t in teachers]}


def one_round(work: Path, images: int, views: int, batch: int, dtype: str) -> dict[str, float]:
    teachers = [PrecomputedTeacher(name, dim, views, batch, seed) for seed, (name, dim) in enumerate(GEOMETRY.items())]
    store = CacheStore.create(str(work / f"{time.perf_counter_ns()}.zarr"), identity(teachers, images, views, dtype))
    config = CacheConfig(tuple(t.name for t in teachers), views=views, dtype=dtype, batch_size=batch, workers=0)
    buffer = ShardBuffer(store, 0, config)
    pixels = {(1, 1): torch.zeros(views, 3, 1, 1, dtype=torch.uint8)}
    for position in range(images):
        buffer.add(ViewedImage(0, position, position, f"img{position:06d}", None,
                               np.zeros((views, NUM_PARAMS), np.float32), pixels, 0.0))
    seconds = {"batches": 0.0, "write": 0.0}
    start = time.process_time()
    while buffer.pending:
        buffer.run_batch(teachers, torch.device("cpu"))
    seconds["batches"] = time.process_time() - start
    start = time.process_time()
    buffer.flush()
    seconds["write"] = time.process_time() - start
    return {stage: 1000 * s / images for stage, s in seconds.items()}


def decode_cost(work: Path, images: int, views: int) -> float:
    """CPU ms per image of decoding it and rendering its views at 224 px, on one thread."""
    from common import synth_train

    from distillery.cache.writer import view_image
    from distillery.data.shards import ShardSet

    shard_set = ShardSet.open(synth_train(work, images, 224, workers=2))
    config = CacheConfig(("t",), views=views, workers=0)
    records = [(shard, record) for shard in range(len(shard_set)) for record in shard_set.records(shard)]
    torch.set_num_threads(1)
    start = time.process_time()
    for shard, record in records:
        view_image(record, shard, 0, config, [(224, 224)])
    return 1000 * (time.process_time() - start) / len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode", type=int, default=0, help="time decoding and rendering N 224-px images instead")
    parser.add_argument("--out", default="results/benchmarks/writer_main_process.json")
    args = parser.parse_args()
    if args.decode:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps({"decode_and_render_ms_cpu_per_image": round(decode_cost(Path(tmp), args.decode, args.views), 2),
                              "views": args.views}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        rounds = [one_round(Path(tmp), args.images, args.views, args.batch_size, args.dtype) for _ in range(args.rounds)]
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
              "settings": vars(args),
              "ms_cpu_per_image": {stage: round(statistics.median(r[stage] for r in rounds), 2) for stage in rounds[0]}}
    result["ms_cpu_per_image"]["total"] = round(sum(result["ms_cpu_per_image"].values()), 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["ms_cpu_per_image"]))


if __name__ == "__main__":
    main()
