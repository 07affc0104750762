"""What a cache costs: the same student and method for the same steps from caches of V views, stored in
float16, bfloat16 or int8, with patch tokens pooled or not, over training seeds.

    python benchmarks/cache_budget.py --work work/demo --views 1,2,4,8 --methods unic,tintem --epochs 7
    python benchmarks/cache_budget.py --work work/demo --views 4 --storage float16,bfloat16,int8,float16/p2,float16/p4 \
        --methods unic --seeds 0,1

On the demo's world (`make demo` first: its synth/ under --work and the shipped teachers): for each V and
storage (DTYPE or DTYPE/pN, N the `--patch-pool`) a cache of both teachers (the demo's view settings, seed 0);
for each method, epoch budget E and training seed, the method's demo config (`configs/<method>_synth.yaml`, as
`configs/demo.yaml` runs it; single-teacher methods from `shape_cnn`) trained for E epochs from each cache, so
every run takes the same steps. In epoch e a shard uses view (e + offset) mod V, so a cache with V >= E shows
every image a view it has not seen in every epoch: that run is the fresh-view reference, what an online run
with a new view each epoch trains on (online and cached runs of the same views train identically:
tests/test_distill.py). Per run: kNN top-1 (k=20) on shape and on pattern, linear top-1 on shape, the
kNN-prediction agreement with the shape teacher on shape, and with --retrieval-ood the synth retrieval
Medium mAP and the near/far OOD AUROC (kNN, k=10); per cache: its bytes per view, its size on disk and how far
its targets lie from the default storage's (`target_difference`, in standard deviations: no training noise).
`--set KEY=VALUE --tag NAME` trains a variant of the method (e.g. `--set sefa.shared_view=true --tag shared`).

Writes OUT/cache_budget.json and OUT/cache_budget.md (every run under OUT, this call's and earlier calls', then
the mean and spread over seeds of each setting) and OUT/view_budget.png (each method and epoch budget measured
at several V, default storage, seed 0); every cache, run and result stays under OUT, and a second call reuses
each finished one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import distillery  # noqa: F401  (registers the torchvision op schemas timm needs)
import torch

from distillery.apps.demo import DemoConfig, ModelRun, with_overrides
from distillery.cache.store import CacheStore, SideFiles
from distillery.cache.verify import bytes_per_view
from distillery.cache.writer import CacheConfig, cache_teachers
from distillery.config import read_yaml
from distillery.evaluate.features import Extraction
from distillery.evaluate.knn import prediction_agreement
from distillery.evaluate.results import knn_top1, linear_top1, ood_metric, retrieval_map
from distillery.evaluate.suite import run_task
from distillery.evaluate.tasks import EvalData, KnnSettings, LinearSettings, OodSettings, RetrievalData, RetrievalSettings
from distillery.files import write_atomic
from distillery.models.students import initial_student
from distillery.models.teachers import Tokens
from distillery.train.export import export_run
from distillery.train.loop import train
from distillery.train.targets import TargetSource

ROOT = Path(__file__).parents[1]
SINGLE_TEACHER = {"tintem", "proteus"}  # TinTeM's setting: one teacher (the demo's tintem_shape)
DEFAULT_STORAGE = "float16"
METRICS = ("knn_shape", "knn_pattern", "linear_shape", "agreement_shape", "retrieval_medium", "ood_near", "ood_far")


def parse_storage(storage: str) -> tuple[str, int]:
    """"int8" -> ("int8", 1); "float16/p2" -> ("float16", 2)."""
    dtype, _, pool = storage.partition("/p")
    return dtype, int(pool or 1)


def suffix(storage: str, seed: int | None = None) -> str:
    """Names keep the first study's (cache_v4, unic_e7_v4) for the default storage and seed 0, so it is reused."""
    return ("" if storage == DEFAULT_STORAGE else "_" + storage.replace("/", "_")) + (f"_s{seed}" if seed else "")


def cache(synth: Path, out: Path, teachers: list[str], views: int, storage: str) -> tuple[str, float]:
    store = out / f"cache_v{views}{suffix(storage)}.zarr"
    if store.exists() and CacheStore.open(str(store)).is_complete:
        return str(store), 0.0
    dtype, pool = parse_storage(storage)
    tick = time.perf_counter()
    cache_teachers(str(synth / "train"), str(store), CacheConfig(tuple(teachers), views=views, batch_size=128, workers=2,
                                                                 dtype=dtype, patch_pool=pool), show_progress=False)
    return str(store), time.perf_counter() - tick


def trained_targets(store: CacheStore, student_grid: tuple[int, int], shard: int) -> dict[str, Tokens]:
    """The targets a run trains on from `store` for one shard's rows, view 0: decoded, resized to the student's
    grid and standardised by training's own TargetSource."""
    names = [t.name for t in store.teachers]
    block = store.read_block(shard, view=0, decoded=False)
    source = TargetSource(names, [t.stored_grid for t in store.teachers], student_grid,
                          {name: store.stats(name) for name in names}, torch.device("cpu"),
                          {name: store.dtype for name in names})
    return source({f"targets/{key}": values for key, values in block.items() if "/" in key})


def target_difference(store: CacheStore, reference: CacheStore, student_grid: tuple[int, int], shard: int = 0) -> float:
    """RMS difference, in units of the per-dimension standard deviation, between the targets a run trains on
    from `store` and from `reference` (the default storage): one shard's rows, view 0, every teacher, CLS and
    patch tokens. Deterministic: no training run's noise."""
    mine, theirs = trained_targets(store, student_grid, shard), trained_targets(reference, student_grid, shard)
    squares = [(getattr(mine[name], part) - getattr(theirs[name], part)).pow(2).mean()
               for name in theirs for part in ("cls", "patch")]
    return float(torch.stack(squares).mean().sqrt())


def trained(synth: Path, out: Path, method: str, store: str, name: str, epochs: int, seed: int,
            sets: list[str]) -> tuple[Path, float]:
    model = out / "models" / name
    if (model / "model.safetensors").exists():
        return model, 0.0
    overrides = {"epochs": epochs, "seed": seed,
                 **({"cache_teachers": ["shape_cnn"]} if method in SINGLE_TEACHER else {})}
    config = with_overrides(ModelRun(name, str(ROOT / "configs" / f"{method}_synth.yaml"), overrides), out)
    run = out / "runs" / name
    tick = time.perf_counter()
    train({"data": str(synth / "train"), "out": str(run), "cache": store}, config, overrides=tuple(sets))
    export_run(run, model, overwrite=True)
    return model, time.perf_counter() - tick


def scores(spec: str, data: EvalData, out: Path, retrieval_ood: bool) -> dict:
    extraction = Extraction(cache_dir=out / "features", show_progress=False)
    metrics = {}
    for label in ("shape", "pattern"):
        result, _ = run_task("knn", spec, data, KnnSettings(ks=(20,), label=label), extraction, "cpu",
                             out / f"knn-{label}.json")
        metrics[f"knn_{label}"] = knn_top1(20, label).lookup(result.metrics, spec)
        metrics[f"predictions_{label}"] = result.metrics["predictions"]["k=20"]
    result, _ = run_task("linear", spec, data, LinearSettings(label="shape"), extraction, "cpu", out / "linear-shape.json")
    metrics["linear_shape"] = linear_top1("shape").lookup(result.metrics, spec)
    if retrieval_ood:
        result, _ = run_task("retrieval", spec, data, RetrievalSettings(), extraction, "cpu", out / "retrieval.json")
        metrics["retrieval_medium"] = retrieval_map("medium").lookup(result.metrics, spec)
        result, _ = run_task("ood", spec, data, OodSettings(k=10), extraction, "cpu", out / "ood.json")
        for group in ("near", "far"):
            metrics[f"ood_{group}"] = ood_metric(group, "auroc", grouped=True).lookup(result.metrics, spec)
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "work" / "demo", help="the demo's work directory")
    parser.add_argument("--views", default="1,2,4,8")
    parser.add_argument("--storage", default=DEFAULT_STORAGE, help="comma-separated DTYPE or DTYPE/pPOOL")
    parser.add_argument("--methods", default="unic,tintem")
    parser.add_argument("--epochs", type=int, action="append", help="epoch budgets (repeat; default 7)")
    parser.add_argument("--seeds", default="0", help="training seeds")
    parser.add_argument("--retrieval-ood", action="store_true", help="also score retrieval and OOD")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="KEY=VALUE for every run's config, as `distillery train --set` (repeat; needs --tag)")
    parser.add_argument("--tag", default="", help="a name for the --set variant, added to its runs' names")
    parser.add_argument("--out", type=Path, default=ROOT / "work" / "cache_budget")
    args = parser.parse_args()
    if bool(args.sets) != bool(args.tag):
        parser.error("--set and --tag go together: runs of a variant need their own names")
    demo = DemoConfig.load(ROOT / "configs" / "demo.yaml")
    teachers = [f"local-dir:{ROOT / run.shipped}" for run in demo.teachers]
    synth = args.work / "synth"
    data = EvalData(train=synth / "train", val=synth / "val", ood={"near": synth / "ood" / "near",
                                                                    "far": synth / "ood" / "far"},
                    ood_groups={"near": ["near"], "far": ["far"]}, retrieval=RetrievalData("synth", synth / "retrieval"))
    student = read_yaml(ROOT / "configs" / "unic_synth.yaml")  # every demo student has this architecture
    student_grid = initial_student(student["student"], student["student_args"], 0).grid
    shape_teacher = scores(teachers[0], data, args.out / "eval" / "shape_cnn", retrieval_ood=False)
    rows = []
    for views in (int(v) for v in args.views.split(",")):
        for storage in args.storage.split(","):
            store, cache_seconds = cache(synth, args.out, teachers, views, storage)
            stored = CacheStore.open(store)
            reference, _ = cache(synth, args.out, teachers, views, DEFAULT_STORAGE)
            difference = target_difference(stored, CacheStore.open(reference), student_grid)
            for method in args.methods.split(","):
                for epochs in args.epochs or [7]:
                    for seed in (int(s) for s in args.seeds.split(",")):
                        name = f"{method}{'_' + args.tag if args.tag else ''}_e{epochs}_v{views}{suffix(storage, seed)}"
                        model, seconds = trained(synth, args.out, method, store, name, epochs, seed, args.sets)
                        got = scores(f"local-dir:{model}", data, args.out / "eval" / name, args.retrieval_ood)
                        rows.append({"method": f"{method} {args.tag}".strip(), "epochs": epochs, "views": views, "storage": storage,
                                     "seed": seed, "fresh": views >= epochs, "train_seconds": round(seconds),
                                     "cache_seconds": round(cache_seconds),
                                     "bytes_per_view": sum(bytes_per_view(stored).values()),
                                     "store_mib": round(SideFiles(store).size() / 2**20, 1),
                                     "target_difference": difference,
                                     **{k: v for k, v in got.items() if not k.startswith("predictions")},
                                     "agreement_shape": prediction_agreement(got["predictions_shape"],
                                                                             shape_teacher["predictions_shape"])})
                        print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = recorded(args.out / "cache_budget.json", rows)
    write_atomic(args.out / "cache_budget.json", json.dumps({"rows": rows}, indent=1))
    tables = "\n".join(table(rows)) + "\n\n" + "\n".join(spread_table(rows)) + "\n"
    write_atomic(args.out / "cache_budget.md", tables)
    default = [r for r in rows if r["storage"] == DEFAULT_STORAGE and r["seed"] == 0]
    curves = [r for r in default if len({d["views"] for d in default if (d["method"], d["epochs"]) == (r["method"], r["epochs"])}) > 1]
    if curves:
        plot(curves, args.out / "view_budget.png")
    print(tables)


def recorded(path: Path, rows: list[dict]) -> list[dict]:
    """Every run under OUT: this call's rows, and earlier calls' rows of runs it did not name. A run this
    call reused keeps the seconds and the metrics its first call measured."""
    key = lambda r: (r["method"], r["epochs"], r["views"], r["storage"], r["seed"])  # noqa: E731
    merged = {key(r): r for r in (json.loads(path.read_text())["rows"] if path.exists() else [])}
    for row in rows:
        earlier = merged.get(key(row), {})
        merged[key(row)] = {**earlier, **row, **{k: row[k] or earlier.get(k, 0) for k in ("train_seconds", "cache_seconds")}}
    return [merged[k] for k in sorted(merged)]


def measured(rows: list[dict]) -> list[str]:
    return [m for m in METRICS if any(m in r for r in rows)]


def cell(values: list[float]) -> str:
    return f"{100 * statistics.mean(values):.1f}" if values else "-"


def table(rows: list[dict]) -> list[str]:
    metrics = measured(rows)
    lines = ["| method | epochs | V | storage | seed | " + " | ".join(m.replace("_", " ") for m in metrics) + " |",
             "|---|---:|---:|---|---:|" + "---:|" * len(metrics)]
    lines += [f"| {r['method']} | {r['epochs']} | {r['views']}{' (fresh)' if r['fresh'] else ''} | {r['storage']} | "
              f"{r['seed']} | " + " | ".join(cell([r[m]] if m in r else []) for m in metrics) + " |" for r in rows]
    return lines


def spread_table(rows: list[dict]) -> list[str]:
    """Per setting: bytes, size, training time (the fastest of its runs: a run that shared the CPU is slower,
    never faster), and each metric's mean over seeds with its range (max - min)."""
    metrics = measured(rows)
    lines = ["| method | epochs | V | storage | seeds | bytes per view | store MiB | target difference | train s | "
             + " | ".join(f"{m.replace('_', ' ')} (range)" for m in metrics) + " |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|" + "---:|" * len(metrics)]
    for key in dict.fromkeys((r["method"], r["epochs"], r["views"], r["storage"]) for r in rows):
        group = [r for r in rows if (r["method"], r["epochs"], r["views"], r["storage"]) == key]
        values = {m: [r[m] for r in group if m in r] for m in metrics}
        cells = [cell(v) + (f" ({100 * (max(v) - min(v)):.1f})" if len(v) > 1 else "") for v in values.values()]
        seconds = [r["train_seconds"] for r in group if r["train_seconds"]]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {len(group)} | {group[0]['bytes_per_view']:,} | "
                     f"{group[0]['store_mib']} | {group[0]['target_difference']:.4f} | {min(seconds) if seconds else '-'} | "
                     + " | ".join(cells) + " |")
    return lines


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
