"""Paper vs reproduced: the papers' numbers beside the ones read from the evaluation JSON files, never typed in.

A missing or malformed result file is an error naming the file, never a blank cell; report.md and
report.json are written only after every number was read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distillery.apps.experiments.definition import Experiment, ExperimentError, PaperResult
from distillery.apps.experiments.metrics import PERCENT, MetricPath
from distillery.apps.report import write_report_files
from distillery.errors import DistilleryError
from distillery.evaluate.results import default_path, read_metric


def build_report(experiment: Experiment, results: Path) -> dict[str, Any]:
    """The papers' rows with the reproduced numbers beside them, then every other metric of every model."""
    reproduced = {}
    for model in experiment.models:
        for metric, where in experiment.metrics_of(model).items():
            path = default_path(model, where.task, results / "eval")
            reproduced[model, metric] = (_read_metric(results / "eval", model, where, metric), f"{path}#{where.describe()}")

    def row(model: str, metric: str, paper: PaperResult | None) -> dict[str, Any]:
        value, result = reproduced[model, metric]
        published = paper.value if paper else None
        return {"model": model, "metric": metric, "paper": published, "reproduced": round(value, 2),
                "difference": None if published is None else round(value - published, 2),
                "paper_source": paper.source if paper else "no paper row", "result": result}

    compared = {(r.model, r.metric) for r in experiment.paper_results}
    rows = [row(r.model, r.metric, r) for r in experiment.paper_results]
    rows += [row(model, metric, None) for model, metric in reproduced if (model, metric) not in compared]
    return {"experiment": experiment.name, "paper": experiment.paper, "definition": str(experiment.path),
            "results": str(results), "unit": "percent", "rows": rows}


def _read_metric(eval_dir: Path, model: str, where: MetricPath, metric: str) -> float:
    try:
        return read_metric(eval_dir, model, where) * PERCENT
    except DistilleryError as error:
        raise ExperimentError(f"{error} (for {metric!r})") from error


def format_report(report: dict[str, Any]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "not published"
        return f"{value:.2f}" if isinstance(value, float) else str(value).replace("|", "\\|")

    lines = [f"# {report['experiment']}: paper vs reproduced", "", report["paper"], "",
             f"Reproduced numbers are read from `{report['results']}/eval/<model>/<task>.json` (fractions, shown x100); "
             f"\"not published\" means the paper gives no such number or it could not be found (the source says which).",
             "", "| model | metric | paper | reproduced | reproduced - paper | paper's source |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        difference = "" if r["difference"] is None else f"{r['difference']:+.2f}"
        lines.append(f"| {cell(r['model'])} | {cell(r['metric'])} | {cell(r['paper'])} | {cell(r['reproduced'])} | "
                     f"{difference} | {cell(r['paper_source'])} |")
    return "\n".join(lines) + "\n"


def write_report(experiment: Experiment, results: Path) -> tuple[Path, Path]:
    """Write `results`/report.md and report.json; returns their paths."""
    report = build_report(experiment, results)
    return write_report_files(results, format_report(report), report)
