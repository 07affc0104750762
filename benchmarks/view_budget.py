"""How many cached views a run needs: the same student and method for the same steps from caches of V views.

    python benchmarks/view_budget.py --work work/demo --views 1,2,4,8 --methods unic,tintem --epochs 7

On the demo's world (`make demo` first: its synth/ under --work and the shipped teachers): for each V a cache
of both teachers with V views (the demo's view settings, seed 0); for each method and epoch budget E, the
method's demo config (`configs/<method>_synth.yaml`, as `configs/demo.yaml` runs it; single-teacher methods
from `shape_cnn`) trained for E epochs from each cache, so every run takes the same steps. In epoch e a shard
uses view (e + offset) mod V, so a cache with V >= E shows every image a view it has not seen in every epoch:
that run is the fresh-view reference, what an online run with a new view each epoch trains on (online and
cached runs of the same views train identically: tests/test_distill.py). Per run: kNN top-1 (k=20) on shape
and on pattern, linear top-1 on shape, and the kNN-prediction agreement with the shape teacher on shape.

Writes OUT/view_budget.json, OUT/view_budget.md and OUT/view_budget.png; every cache, run and result stays
under OUT, and a second call reuses each finished one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import distillery  # noqa: F401  (registers the torchvision op schemas timm needs)

from distillery.apps.demo import DemoConfig, ModelRun, with_overrides
from distillery.cache.store import CacheStore
from distillery.cache.writer import CacheConfig, cache_teachers
from distillery.evaluate.features import Extraction
from distillery.evaluate.knn import prediction_agreement
from distillery.evaluate.results import knn_top1, linear_top1
from distillery.evaluate.suite import run_task
from distillery.evaluate.tasks import EvalData, KnnSettings, LinearSettings
from distillery.files import write_atomic
from distillery.train.export import export_run
from distillery.train.loop import train

ROOT = Path(__file__).parents[1]
SINGLE_TEACHER = {"tintem", "proteus"}  # TinTeM's setting: one teacher (the demo's tintem_shape)


def cache(synth: Path, out: Path, teachers: list[str], views: int) -> tuple[str, float]:
    store = out / f"cache_v{views}.zarr"
    if store.exists() and CacheStore.open(str(store)).is_complete:
        return str(store), 0.0
    tick = time.perf_counter()
    cache_teachers(str(synth / "train"), str(store), CacheConfig(tuple(teachers), views=views, batch_size=128, workers=2),
                   show_progress=False)
    return str(store), time.perf_counter() - tick


def trained(synth: Path, out: Path, method: str, store: str, views: int, epochs: int) -> tuple[Path, float]:
    name = f"{method}_e{epochs}_v{views}"
    model = out / "models" / name
    if (model / "model.safetensors").exists():
        return model, 0.0
    overrides = {"epochs": epochs, **({"cache_teachers": ["shape_cnn"]} if method in SINGLE_TEACHER else {})}
    config = with_overrides(ModelRun(name, str(ROOT / "configs" / f"{method}_synth.yaml"), overrides), out)
    run = out / "runs" / name
    tick = time.perf_counter()
    train({"data": str(synth / "train"), "out": str(run), "cache": store}, config)
    export_run(run, model, overwrite=True)
    return model, time.perf_counter() - tick


def scores(spec: str, data: EvalData, out: Path) -> dict:
    extraction = Extraction(cache_dir=out / "features", show_progress=False)
    metrics = {}
    for label in ("shape", "pattern"):
        result, _ = run_task("knn", spec, data, KnnSettings(ks=(20,), label=label), extraction, "cpu",
                             out / f"knn-{label}.json")
        metrics[f"knn_{label}"] = knn_top1(20, label).lookup(result.metrics, spec)
        metrics[f"predictions_{label}"] = result.metrics["predictions"]["k=20"]
    result, _ = run_task("linear", spec, data, LinearSettings(label="shape"), extraction, "cpu", out / "linear-shape.json")
    metrics["linear_shape"] = linear_top1("shape").lookup(result.metrics, spec)
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "work" / "demo", help="the demo's work directory")
    parser.add_argument("--views", default="1,2,4,8")
    parser.add_argument("--methods", default="unic,tintem")
    parser.add_argument("--epochs", type=int, action="append", help="epoch budgets (repeat; default 7)")
    parser.add_argument("--out", type=Path, default=ROOT / "work" / "view_budget")
    args = parser.parse_args()
    demo = DemoConfig.load(ROOT / "configs" / "demo.yaml")
    teachers = [f"local-dir:{ROOT / run.shipped}" for run in demo.teachers]
    synth = args.work / "synth"
    data = EvalData(train=synth / "train", val=synth / "val")
    shape_teacher = scores(teachers[0], data, args.out / "eval" / "shape_cnn")
    rows = []
    for views in (int(v) for v in args.views.split(",")):
        store, cache_seconds = cache(synth, args.out, teachers, views)
        for method in args.methods.split(","):
            for epochs in args.epochs or [7]:
                model, seconds = trained(synth, args.out, method, store, views, epochs)
                got = scores(f"local-dir:{model}", data, args.out / "eval" / model.name)
                rows.append({"method": method, "epochs": epochs, "views": views, "fresh": views >= epochs,
                             "train_seconds": round(seconds), "cache_seconds": round(cache_seconds),
                             **{k: v for k, v in got.items() if not k.startswith("predictions")},
                             "agreement_shape": prediction_agreement(got["predictions_shape"],
                                                                     shape_teacher["predictions_shape"])})
                print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "view_budget.json", json.dumps({"rows": rows}, indent=1))
    lines = ["| method | epochs | V | kNN shape | kNN pattern | linear shape | agreement with shape_cnn |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['epochs']} | {r['views']}{' (fresh)' if r['fresh'] else ''} | "
              f"{100 * r['knn_shape']:.1f} | {100 * r['knn_pattern']:.1f} | {100 * r['linear_shape']:.1f} | "
              f"{100 * r['agreement_shape']:.1f} |" for r in rows]
    write_atomic(args.out / "view_budget.md", "\n".join(lines) + "\n")
    plot(rows, args.out / "view_budget.png")
    print("\n".join(lines))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("knn_shape", "knn_pattern", "linear_shape", "agreement_shape")
    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for key in dict.fromkeys((r["method"], r["epochs"]) for r in rows):
            line = sorted((r["views"], 100 * r[metric]) for r in rows if (r["method"], r["epochs"]) == key)
            ax.plot(*zip(*line, strict=True), marker="o", label=f"{key[0]}, {key[1]} epochs")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("cached views V")
        ax.set_title(metric.replace("_", " "))
    axes[0][0].set_ylabel("%")
    axes[0][-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
