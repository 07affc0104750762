"""A run's training curves: `metrics.jsonl` read back, and drawn as `losses.png` beside it when a run ends
(timm's and DINO's runs leave a log to plot; this leaves the plot too)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distillery.errors import DistilleryError

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "losses.png"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every logged record of a run, in step order; a missing log is one line naming it."""
    log = Path(run_dir) / METRICS_FILE
    if not log.exists():
        raise DistilleryError(f"{log}: training log missing")
    return [json.loads(line) for line in log.read_text().splitlines() if line]


def plot_run(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """The total loss and each logged term against the step (left), the learning rate (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(run_dir)
    path = Path(path or Path(run_dir) / CURVES_FILE)
    figure = Figure(figsize=(10, 3.5))
    FigureCanvasAgg(figure)  # a figure of its own on Agg: no pyplot state, no display needed
    losses, schedule = figure.subplots(1, 2)
    steps = [r["step"] for r in records]
    terms = sorted({k for r in records for k in r if k.startswith("loss/")})
    for key in ("loss", *terms):
        losses.plot(steps, [r.get(key, float("nan")) for r in records], label=key, linewidth=2 if key == "loss" else 1)
    losses.set_xlabel("step")
    losses.set_ylabel("loss")
    losses.legend(fontsize=7)
    schedule.plot(steps, [r.get("lr", float("nan")) for r in records])
    schedule.set_xlabel("step")
    schedule.set_ylabel("learning rate")
    figure.suptitle(Path(run_dir).name)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path
