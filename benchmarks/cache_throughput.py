"""Cache writer throughput on the embedded data: single decode vs a naive loop, storage per view, writes.

    python benchmarks/cache_throughput.py --images 1000 --views 4 --workers 2                 # CPU, 32 px
    python benchmarks/cache_throughput.py --size 224 --images 4000 --workers 14 --batch-size 64 \
        --teachers vit_small_patch16_224:16,vit_base_patch16_224:16                        # GPU, 224 px

Two random-weight teachers of different width and patch size (by default ViT-Ti/4 and ViT-S/8 at the synth
size).
The naive loop is what a cache without this design does: for every teacher and every view it walks the
data again, decoding each image once per (teacher, view); it encodes, takes the statistics and writes the
same arrays as the writer. Both use the same DataLoader workers, batch size and teachers; images/s counts
images fully cached (all views, all teachers) per wall-clock second.
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
import numpy as np
import torch
import zarr

from common import CPU_TEACHERS, random_teachers, synth_train
from distillery.cache.stats import Moments, mean_and_m2
from distillery.cache.store import CacheStore, as_stored_array, encode, encode_tensor
from distillery.cache.verify import bytes_per_view
from distillery.cache.writer import CacheConfig, cache_teachers
from distillery.data.shards import ShardSet, decode_image
from distillery.data.views import ViewConfig, draw_view, normalize, replay
from distillery.models.teachers import create_teacher


class NaivePass(torch.utils.data.IterableDataset):
    """One (teacher, view) pass over the data: every image decoded again for it."""

    def __init__(self, shard_set, view, size, seed):
        self.shard_set, self.view, self.size, self.seed = shard_set, view, size, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for shard in range(worker, len(self.shard_set), workers):
            for record in self.shard_set.records(shard):
                image = decode_image(record.image_bytes, record.key)
                params = draw_view(ViewConfig(), self.seed, record.index, self.view, image.height, image.width)
                yield record.index, replay(image, params, self.size)


def naive(data, specs, views, batch_size, workers, out: Path):
    """The same stored work as the writer's (encoding, per-image statistics, whole-chunk Zarr writes of every
    teacher's CLS and patch tokens), but each (teacher, view) pass decodes and renders the images again."""
    shard_set = ShardSet.open(data)
    teachers = [create_teacher(s) for s in specs]
    group = zarr.open_group(str(out), mode="w")
    start = time.perf_counter()
    for teacher in teachers:
        p = teacher.preprocessing
        arrays = {part: group.create_array(f"{teacher.name}/{part}", shape=(shard_set.num_samples, views, *tail),
                                           dtype="float16", chunks=(250, 1, *tail), compressors=None, fill_value=0)
                  for part, tail in (("cls", (teacher.embed_dim,)), ("patch", (teacher.num_patches, teacher.embed_dim)))}
        for view in range(views):
            rows = {part: np.zeros((shard_set.num_samples, *array.shape[2:]), np.float16) for part, array in arrays.items()}
            moments = Moments.empty(teacher.embed_dim)
            loader = torch.utils.data.DataLoader(NaivePass(shard_set, view, p.input_size, 0), batch_size=batch_size,
                                                 num_workers=workers)
            for indices, pixels in loader:
                tokens = teacher(normalize(pixels, p.mean, p.std))
                for part, values in (("cls", tokens.cls), ("patch", tokens.patch)):
                    stored, _ = encode_tensor(values, "float16")
                    rows[part][indices.numpy()] = as_stored_array(stored, "float16")
                    for k in range(len(indices)):
                        moments = moments.merge(Moments(float(values[k].numel() // values.shape[-1]),
                                                        *mean_and_m2(stored[k]).numpy()))
            for part, array in arrays.items():
                array[:, view] = rows[part]
    return shard_set.num_samples / (time.perf_counter() - start)


def write_throughput(slots: int, tokens: int, dim: int, views: int, rounds: int = 3) -> float:
    """MiB/s of whole-block writes of float16 patch tokens in the store's layout."""
    from distillery.cache.store import inner_chunk_rows

    tmp = Path(tempfile.mkdtemp())
    array = zarr.create_array(store=str(tmp / "w.zarr"), shape=(slots * rounds, views, tokens, dim), dtype="float16",
                              shards=(slots, 1, tokens, dim), chunks=(inner_chunk_rows(slots), 1, tokens, dim),
                              compressors=None, fill_value=0)
    data = np.random.default_rng(0).standard_normal((slots, views, tokens, dim)).astype(np.float16)
    start = time.perf_counter()
    for r in range(rounds):
        array[r * slots:(r + 1) * slots] = data
    seconds = time.perf_counter() - start
    shutil.rmtree(tmp)
    return data.nbytes * rounds / seconds / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--teachers", default=CPU_TEACHERS, help="Random-weight teachers as arch:patch, at --size.")
    parser.add_argument("--out", type=Path, default=None, help="Write the figures as JSON here too.")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cache_bench_"))
    data = synth_train(work, args.images, args.size, args.workers)
    specs = random_teachers(work, args.teachers, args.size)
    config = CacheConfig(tuple(specs), views=args.views, batch_size=args.batch_size, workers=args.workers)
    summary = cache_teachers(data, str(work / "f16.zarr"), config, show_progress=False)
    naive_rate = naive(data, specs, args.views, args.batch_size, args.workers, work / "naive.zarr")
    store = CacheStore.open(str(work / "f16.zarr"))
    sizes = {"float16": bytes_per_view(store)}
    for label, extra in (("int8", {"dtype": "int8"}), ("float16, patch-pool 2", {"patch_pool": 2})):
        out = work / f"{label.split(',')[0]}{extra.get('patch_pool', '')}.zarr"
        cache_teachers(data, str(out), CacheConfig(tuple(specs), views=1, workers=args.workers, **extra), show_progress=False)
        sizes[label] = bytes_per_view(CacheStore.open(str(out)))
    vit_s_224 = {"float16": 197 * 384 * 2, "int8": 197 * 384 + 197 * 2, "float16, patch-pool 2": (1 + 49) * 384 * 2}
    result = {
        "machine": f"{platform.machine()}, " + (torch.cuda.get_device_name() if torch.cuda.is_available()
                                                 else f"CPU, {torch.get_num_threads()} torch threads"),
        "torch": torch.__version__, "teachers": args.teachers,
        "images": args.images, "size": args.size, "views": args.views, "workers": args.workers,
        "single_decode_images_per_s": summary["images_per_second"],
        "naive_images_per_s": round(naive_rate, 1),
        "speedup": round(summary["images_per_second"] / naive_rate, 2),
        "stage_rates": {k: v for k, v in summary.items() if k.endswith("_images_per_second")},
        "bytes_per_view": sizes,
        "bytes_per_view_vit_s16_224": vit_s_224,
        "write_mib_per_s_vit_s16_blocks": round(write_throughput(250, 196, 384, args.views), 1),
        "encode_int8_ms_per_1000_tokens": round(_encode_ms(), 2),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    shutil.rmtree(work)


def _encode_ms() -> float:
    x = torch.randn(1000, 384)
    start = time.perf_counter()
    for _ in range(20):
        encode(x, "int8")
    return (time.perf_counter() - start) / 20 * 1e3


if __name__ == "__main__":
    main()
