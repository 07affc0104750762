"""A run's training curves: `metrics.jsonl` read back, drawn as `losses.png` beside it when a run ends
(timm's and DINO's runs leave a log to plot; this leaves the plot too), and with `tensorboard: true` the
same records as TensorBoard scalars while the run goes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distillery.errors import DistilleryError

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "losses.png"
TENSORBOARD_DIR = "tensorboard"


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


def summary_writer_class() -> type:
    """torch.utils.tensorboard's SummaryWriter; without the tensorboard package, one line saying what to install
    (every rank asks before training, so none is left waiting for the others)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise DistilleryError("tensorboard: true needs the tensorboard package: "
                              "pip install -c constraints.txt -e '.[tensorboard]'") from error
    return SummaryWriter


class TensorBoardLog:
    """The run's records as TensorBoard scalars in `<run>/tensorboard` (torch.utils.tensorboard). A resumed
    run purges what its old event files hold past the resumed step; a run that turns it on when resumed
    first writes the records metrics.jsonl already holds."""

    def __init__(self, run_dir: str | Path, start_step: int):
        SummaryWriter = summary_writer_class()
        log_dir = Path(run_dir) / TENSORBOARD_DIR
        fresh = not log_dir.exists()
        self.writer = SummaryWriter(str(log_dir), purge_step=None if fresh or not start_step else start_step + 1)
        if fresh and start_step:
            for record in read_metrics(run_dir):
                self.add(record)

    def add(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        self.writer.close()
