"""Run checkpoints: plain dicts of tensors and JSON-like values, read back with `weights_only=True`.

Written to a temporary name and renamed, so a crash never leaves a half checkpoint under a real name; the
newest `keep` are kept. A corrupt file is reported in one line naming it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from distillery.errors import DistilleryError
from distillery.files import atomic_path

FORMAT = "distillery-run/1"
PATTERN = re.compile(r"step-(\d{8})\.pt$")


class CheckpointError(DistilleryError):
    pass


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    directory = Path(run_dir) / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if PATTERN.search(p.name))


def save_checkpoint(state: dict[str, Any], run_dir: str | Path, step: int, keep: int) -> Path:
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as partial:
        torch.save({"format": FORMAT, "step": step, **state}, partial)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink()
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as error:  # torch raises several types for truncated or foreign files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a distillery checkpoint (format {state.get('format') if isinstance(state, dict) else None!r})")
    return state


def latest_checkpoint(run_dir: str | Path) -> Path:
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"{run_dir}: no checkpoints (expected {Path(run_dir) / 'checkpoints'}/step-*.pt)")
    return found[-1]
