"""The results report: one comparison table in the layout of the SeFA paper's Table 2, plus figures.

Rows: baselines (e.g. an untrained model), every teacher, "best teacher" (per column, the best of the
teachers), every student. Every number is
read from the evaluation suite's JSON files (OUT/<model>/<task>.json, OUT/cka.json); a missing file or key
stops the report with the path that is missing, so a table cell is never left blank or typed in.
Figures: training-loss curves per run, a bar chart of the table, the CKA heatmap of all models, and the
first three principal components of the patch tokens of a few validation images per model as RGB (the
TinTeM paper's Fig. 2).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distillery.files import write_atomic
from distillery.config import read_yaml
from distillery.errors import DistilleryError
from distillery.evaluate.baselines import COLOUR_HISTOGRAM, RAW_PIXELS
from distillery.evaluate.claims import Roles, all_claims, claims_markdown
from distillery.data.shards import CLASS_LABEL
from distillery.evaluate.results import (LINEAR_TOP1, MetricPath, higher_is_better, knn_top1, labelled_task, ood_metric,
                                         read_metric, read_result, retrieval_map, write_json)
from distillery.evaluate.suite import SuiteConfig, summary_columns
from distillery.train.curves import read_metrics


@dataclass(frozen=True)
class Column:
    title: str
    where: MetricPath
    higher_is_better: bool = True


# The one place that says which numbers the demo's table shows and where each lives in the result files.
COLUMNS = (
    Column("kNN top-1 (k=20)", knn_top1(20)),
    Column("linear top-1", LINEAR_TOP1),
    Column("retrieval Medium mAP", retrieval_map("medium")),
    Column("retrieval Hard mAP", retrieval_map("hard")),
    Column("OOD near AUROC", ood_metric("near", "auroc", grouped=True)),
    Column("OOD far AUROC", ood_metric("far", "auroc", grouped=True)),
    Column("OOD near FPR@95", ood_metric("near", "fpr95_id_tpr", grouped=True), higher_is_better=False),
    Column("OOD far FPR@95", ood_metric("far", "fpr95_id_tpr", grouped=True), higher_is_better=False),
)


def suite_columns(suite: SuiteConfig) -> tuple[Column, ...]:
    """The columns of a suite's summary (every task but CKA, labelled tasks included), FPR lower-is-better."""
    return tuple(Column(title, where, higher_is_better=higher_is_better(where))
                 for task in suite.tasks if task != "cka" for title, where in summary_columns(task, suite))


def comparison_rows(eval_dir: Path, teachers: list[str], students: list[str], baselines: tuple[str, ...] = (),
                    columns: tuple[Column, ...] = COLUMNS, alone: str | None = None) -> list[dict[str, Any]]:
    """Rows of the table as percentages: baselines, teachers, the best teacher per column, students, and the
    student trained alone."""
    models = (*baselines, *teachers, *students, *([alone] if alone else []))
    values = {m: [100 * read_metric(eval_dir, m, c.where) for c in columns] for m in models}
    best = [(max if c.higher_is_better else min)(values[t][i] for t in teachers) for i, c in enumerate(columns)]
    rows = [{"model": b, "role": "baseline", "values": values[b]} for b in baselines]
    rows += [{"model": t, "role": "teacher", "values": values[t]} for t in teachers]
    rows.append({"model": "best teacher", "role": "best teacher", "values": best})
    rows += [{"model": s, "role": "student", "values": values[s]} for s in students]
    if alone:
        rows.append({"model": f"{alone} (student alone)", "role": "student alone", "values": values[alone]})
    return rows


# The model-free floor each kind of column is held against (evaluate/baselines.py writes them).
FLOORS = {"knn": RAW_PIXELS, "retrieval": COLOUR_HISTOGRAM}


def floor_rows(eval_dir: Path, rows: list[dict[str, Any]], columns: tuple[Column, ...]) -> list[dict[str, Any]]:
    """For every kNN and retrieval column: the model-free baseline's number beside the best teacher's."""
    best = next(r for r in rows if r["role"] == "best teacher")["values"]
    out = []
    for i, column in enumerate(columns):
        floor = FLOORS.get(column.where.task.split("-")[0])
        if floor is not None:
            value = 100 * read_metric(eval_dir, floor, column.where)
            out.append({"baseline": floor, "column": column.title, "value": value, "best_teacher": best[i],
                        "below_best_teacher": value < best[i]})
    return out


def markdown_table(rows: list[dict[str, Any]], columns: tuple[Column, ...] = COLUMNS) -> str:
    header = "| model | " + " | ".join(c.title + (" ↓" if not c.higher_is_better else "") for c in columns) + " |"
    lines = [header, "|---|" + "---:|" * len(columns)]
    for row in rows:
        name = f"**{row['model']}**" if row["role"] == "best teacher" else row["model"]
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in row["values"]) + " |")
    return "\n".join(lines)


def floors_markdown(floors: list[dict[str, Any]]) -> str:
    lines = ["| baseline | on | baseline % | best teacher % | below the best teacher |", "|---|---|---:|---:|---|"]
    lines += [f"| {f['baseline']} | {f['column']} | {f['value']:.1f} | {f['best_teacher']:.1f} | "
              f"{'yes' if f['below_best_teacher'] else '**no**'} |" for f in floors]
    return "\n".join(lines)


def robustness_markdown(rows: list[dict[str, Any]], columns: tuple[Column, ...], probe_task: str) -> str | None:
    """The probe's own top-1 beside its robustness and transfer columns, as SeFA's Table 2 lays them out (IN-1k,
    V2, R, A, C, transfer); None when the suite has no robustness task."""
    chosen = [i for i, c in enumerate(columns) if c.where.task in ("robustness", probe_task, "transfer")]
    if not any(columns[i].where.task == "robustness" for i in chosen):
        return None
    return markdown_table([{**row, "values": [row["values"][i] for i in chosen]} for row in rows],
                          tuple(columns[i] for i in chosen))


def heads_markdown(eval_dir: Path, roles: Roles) -> str | None:
    """TinTeM Table 3 for every single-teacher run with a head: the backbone's kNN, the head's and the teacher's,
    on the teacher's expertise; None when no run has a head."""
    from distillery.evaluate.claims import K, Results
    from distillery.evaluate.results import HEAD_KNN_TASKS, head_top1

    results = Results(eval_dir)
    lines = ["| run | on | backbone kNN | head | head kNN | teacher | teacher kNN |", "|---|---|---:|---|---:|---|---:|"]
    for run, (method, teachers) in roles.students.items():
        if method not in HEAD_KNN_TASKS or len(teachers) != 1:
            continue
        task, teacher = HEAD_KNN_TASKS[method], teachers[0]
        head, label = task.removesuffix("_knn").replace("_", " "), roles.teachers[teacher]  # "teacher head"
        knn = results.metric(run, head_top1(task, K, label))
        lines.append(f"| {run} | {label} | {100 * results.knn(run, label):.1f} | {head} | {100 * knn:.1f} | {teacher} | "
                     f"{100 * results.knn(teacher, label):.1f} |")
    return "\n".join(lines) if len(lines) > 2 else None


def analysis_figures(models: dict[str, str], runs: dict[str, Path], data: str, out: Path) -> tuple[dict[str, Path], list[str]]:
    """SeFA appendix F's attention maps of every ViT, and TinTeM Table 4 / Fig. 4 for every run whose method
    has linear heads; returns the figures and the markdown lines of the orthogonality table."""
    from distillery.evaluate.analysis import attention_figure, head_orthogonality
    from distillery.evaluate.features import load_model
    from distillery.evaluate.results import save_result
    from distillery.train.loop import CONFIG_FILE

    figures: dict[str, Path] = {}
    for name, spec in models.items():
        model = load_model(spec, device="cpu")
        if model.has_class_token and hasattr(model.model, "blocks"):
            figures[f"{name}: last-block CLS attention"] = attention_figure(model, name, data, out / f"attention-{name}.png")
    lines = ["| run | head map | shape | ‖A/α − I‖_F |", "|---|---|---|---:|"]
    for name, run_dir in runs.items():
        if read_yaml(run_dir / CONFIG_FILE).get("method") != "tintem":  # the run's resolved config, not its weights
            continue
        result, figure = head_orthogonality(run_dir, out / f"orthogonality-{name}.json")
        save_result(result, out / f"orthogonality-{name}.json")
        figures[f"{name}: Gram entries of the teacher head"] = figure
        lines += [f"| {name} | {head} | {shape} | {score} |" for head, shape, score in result.rows]
    return figures, lines


def write_report(suite_config: str | Path, teachers: list[str], students: list[str], runs: dict[str, Path],
                 out: str | Path, pca_data: str | None = None, pca_images: int = 4, baselines: tuple[str, ...] = (),
                 columns: tuple[Column, ...] = COLUMNS, roles: Roles | None = None) -> Path:
    """Write OUT/report.md, OUT/report.json and the PNG figures; returns the report's path. With `roles`, the
    report also holds the model-free floors, the teachers' checks, what each student inherited, the student
    trained alone and the papers' claims, each verdict computed from the result files (evaluate/claims.py)."""
    suite = read_yaml(suite_config)
    eval_dir = Path(suite["out"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    alone = roles.alone if roles else None
    rows = comparison_rows(eval_dir, teachers, students, tuple(baselines), columns, alone)
    cka_path = eval_dir / "cka.json"
    cka = read_result(cka_path).get("metrics") or {}
    if not {"names", "linear", "debiased"} <= set(cka):
        raise DistilleryError(f"{cka_path}: no metrics/names, linear and debiased; rerun the suite's cka task")
    names, matrix = cka["names"], np.asarray(cka["linear"], dtype=np.float64)
    debiased = np.asarray(cka["debiased"], dtype=np.float64)
    models = (*baselines, *teachers, *students, *([alone] if alone else []))
    missing = [m for m in models if m not in names]
    if missing:
        raise DistilleryError(f"{cka_path}: holds no CKA for {', '.join(missing)}; rerun the suite's cka task")
    if len(teachers) < 2:
        raise DistilleryError("the report compares teachers by CKA: give at least two teachers")
    pairs = [(a, b, matrix[names.index(a), names.index(b)], debiased[names.index(a), names.index(b)])
             for i, a in enumerate(teachers) for b in teachers[i + 1:]]

    figures = {"training losses": plot_losses(runs, out / "losses.png"),
               "metrics": plot_metrics(rows, out / "metrics.png", columns),
               "CKA between models": _cka_figure(names, matrix, out / "cka.png")}
    orthogonality: list[str] = []
    if pca_data:
        figures["patch features, first 3 principal components as RGB"] = plot_patch_pca(
            {m: suite["models"][m] for m in models}, pca_data, pca_images, out / "patch_pca.png")
        analyses, orthogonality = analysis_figures({m: suite["models"][m] for m in models}, runs, pca_data, out)
        figures.update(analyses)

    lines = ["# distillery demo report", "",
             f"Evaluation: `{suite_config}` (results in `{eval_dir}`). Percentages; ↓ lower is better. "
             "kNN: weighted vote exp(sim/0.07); linear: LR chosen on held-out train; retrieval: revisited "
             "Medium/Hard mAP on the synth landmarks; OOD: −distance to the k-th ID-train neighbour, "
             "FPR@95 at 95% of ID kept.", "",
             markdown_table(rows, columns), "", "## Teachers' CKA (on the validation set)", "",
             "| teacher pair | linear CKA | debiased CKA |", "|---|---:|---:|"]
    lines += [f"| {a} – {b} | {c:.3f} | {d:.3f} |" for a, b, c, d in pairs]
    probe_label = ((suite.get("settings") or {}).get("robustness") or {}).get("label", CLASS_LABEL)
    robustness = robustness_markdown(rows, columns, labelled_task("linear", probe_label))
    if robustness:
        lines += ["", "## Robustness (the layout of SeFA's Table 2)", "",
                  f"The `{labelled_task('linear', probe_label)}` probe, trained once, on the synth analogues of "
                  "ImageNet-V2 (a fresh draw), -R (renditions of 6 shapes, the head restricted to them), -C (mCE "
                  "against raw-pixel kNN's errors) and ImageNet-9 (BG-gap = mixed_same − mixed_rand); transfer: a "
                  "probe of its own on the five held-out shapes.", "", robustness]
    if len(orthogonality) > 2:
        lines += ["", "## Teacher-head orthogonality (TinTeM Table 4)", "", *orthogonality]
    saved: dict[str, Any] = {"columns": [c.title for c in columns], "rows": rows,
                             "teacher_cka": [{"pair": [a, b], "linear": c, "debiased": d} for a, b, c, d in pairs]}
    if roles is not None:
        floors = floor_rows(eval_dir, rows, columns)
        sections = all_claims(eval_dir, roles)
        heads = heads_markdown(eval_dir, roles)
        if heads:
            lines += ["", "## Heads (TinTeM Table 3, kNN top-1 at k=20)", "", heads]
        lines += ["", "## Model-free baselines", "", floors_markdown(floors),
                  "", "## Teachers: strong and different", "", claims_markdown(sections["teachers"]),
                  "", "## What the students inherit", "", claims_markdown(sections["inheritance"]),
                  "", "## The papers' claims at this scale", "", claims_markdown(sections["claims"])]
        saved["floors"] = floors
        saved.update({name: [dataclasses.asdict(c) | {"verdict": c.verdict} for c in claims]
                      for name, claims in sections.items()})
    lines += ["", "## Figures", ""] + [f"![{title}]({path.name})" for title, path in figures.items()]
    return write_report_files(out, "\n".join(lines) + "\n", {**saved, "figures": {t: p.name for t, p in figures.items()}})[0]


def write_report_files(out: Path, markdown: str, values: dict[str, Any]) -> tuple[Path, Path]:
    """The one way a report reaches disk: OUT/report.md for people and OUT/report.json with the same numbers."""
    return write_atomic(Path(out) / "report.md", markdown), write_json(Path(out) / "report.json", values)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(runs: dict[str, Path], path: Path) -> Path:
    """One panel per run: its total loss against the step, from metrics.jsonl."""
    plt = _pyplot()
    columns = min(3, len(runs))
    rows = -(-len(runs) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for ax, (name, run) in zip(axes.flat, runs.items()):
        records = read_metrics(run)
        ax.plot([r["step"] for r in records], [r["loss"] for r in records])
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_metrics(rows: list[dict[str, Any]], path: Path, columns: tuple[Column, ...] = COLUMNS) -> Path:
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / len(rows)
    positions = np.arange(len(columns))
    for i, row in enumerate(rows):
        ax.bar(positions + i * width, row["values"], width, label=row["model"])
    ax.set_xticks(positions + 0.4 - width / 2, [c.title for c in columns], rotation=20, ha="right")
    ax.set_ylabel("%")
    ax.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _cka_figure(names: list[str], matrix: np.ndarray, path: Path) -> Path:
    from distillery.evaluate.cka import plot_cka_heatmap

    plot_cka_heatmap(names, matrix, path, title="Linear CKA of CLS features (val)")
    return path


def plot_patch_pca(models: dict[str, str], data: str, count: int, path: Path) -> Path:
    """Rows: the images, then each model's patch tokens projected on their first 3 principal components (RGB)."""
    import torch

    from distillery.data.shards import ShardSet, decode_image
    from distillery.data.views import eval_view, normalize, replay
    from distillery.evaluate.features import load_model

    shard_set = ShardSet.open(data)
    images = [decode_image(r.image_bytes, r.key) for _, r in zip(range(count), shard_set.records(0))]
    plt = _pyplot()
    figure, axes = plt.subplots(len(models) + 1, count, figsize=(1.6 * count, 1.6 * (len(models) + 1)), squeeze=False)
    for ax, image in zip(axes[0], images):
        ax.imshow(image)
    axes[0][0].set_ylabel("image", fontsize=8)
    for row, (name, spec) in enumerate(models.items(), start=1):
        model = load_model(spec, device="cpu")
        p = model.preprocessing
        pixels = torch.stack([replay(im, eval_view(im.height, im.width, p.crop_pct), p.input_size) for im in images])
        with torch.inference_mode():
            patch = model(normalize(pixels, p.mean, p.std)).patch.numpy()  # [count, T, D]
        rgb = _pca_rgb(patch.reshape(-1, patch.shape[-1])).reshape(count, *model.grid, 3)
        for ax, tile in zip(axes[row], rgb):
            ax.imshow(tile, interpolation="nearest")
        axes[row][0].set_ylabel(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _pca_rgb(tokens: np.ndarray) -> np.ndarray:
    """The first three principal components of the tokens, each min-max scaled to [0, 1]."""
    from sklearn.decomposition import PCA

    components = PCA(n_components=3, random_state=0).fit_transform(tokens.astype(np.float64))
    low, high = components.min(0), components.max(0)
    return (components - low) / np.maximum(high - low, 1e-12)
