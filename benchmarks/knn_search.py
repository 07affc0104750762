"""Exact kNN search for the kNN and OOD protocols: FAISS's flat inner-product index vs a plain torch matmul + topk.

    python benchmarks/knn_search.py --train 100000 --queries 10000 --dim 384 --k 200 --threads 2 --rounds 3

Both return the same neighbours (checked: the top-k similarities agree to float32 rounding). The torch
path runs the matmul in query chunks so the [queries, train] similarity matrix never has to fit at once; on
CUDA it runs on the GPU. The FAISS path is what `distillery eval knn|ood` use (the GPU index when the
installed faiss has GPU support). With `--rounds R` the two are run in turn R times and each time is the
median; `--threads` sets torch's and FAISS's (OpenMP) threads alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import distillery  # noqa: F401
import numpy as np
import torch


def torch_topk(train: torch.Tensor, queries: torch.Tensor, k: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    sims, idx = [], []
    for start in range(0, queries.shape[0], chunk):
        values, indices = (queries[start:start + chunk] @ train.T).topk(k, dim=1)
        sims.append(values)
        idx.append(indices)
    return torch.cat(sims), torch.cat(idx)


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    train = rng.standard_normal((args.train, args.dim), dtype=np.float32)
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    result = {"machine": f"{platform.machine()}, {args.threads} threads", "train": args.train,
              "queries": args.queries, "dim": args.dim, "k": args.k, "rounds": args.rounds}
    try:
        import faiss

        from distillery.evaluate.knn import nearest_neighbours as faiss_neighbours

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        faiss_neighbours = None
        result["faiss_flat_ip_s"] = "faiss not installed"
    times: dict[str, list[float]] = {"faiss_flat_ip_s": [], "torch_cpu_matmul_topk_s": []}
    for _ in range(args.rounds):  # in turn, so that a slow spell of the machine hits both
        if faiss_neighbours is not None:
            (faiss_sims, _), seconds = timed(faiss_neighbours, train, queries, args.k)
            times["faiss_flat_ip_s"].append(seconds)
        (torch_sims, _), seconds = timed(torch_topk, torch.from_numpy(train), torch.from_numpy(queries), args.k)
        times["torch_cpu_matmul_topk_s"].append(seconds)
    result.update({name: round(statistics.median(values), 2) for name, values in times.items() if values})
    if faiss_neighbours is not None:
        result["max_similarity_difference"] = float(np.abs(faiss_sims - torch_sims.numpy()).max())
    if torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name()
        gpu_train, gpu_queries = torch.from_numpy(train).cuda(), torch.from_numpy(queries).cuda()
        timed(torch_topk, gpu_train, gpu_queries, args.k)  # warm-up: CUDA context and kernels
        _, seconds = timed(torch_topk, gpu_train, gpu_queries, args.k)
        result["torch_gpu_matmul_topk_s"] = round(seconds, 3)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
