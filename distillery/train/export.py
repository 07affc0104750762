"""`distillery export`: a run's backbone (heads dropped) as a timm `local-dir` model."""

from __future__ import annotations

from pathlib import Path

from distillery.models.students import Student, export_local_dir, initial_student
from distillery.train import checkpoint as ckpt
from distillery.config import ConfigError, read_yaml
from distillery.errors import DistilleryError

BACKBONE_PREFIX = "student.model."
EMA_BACKBONE_PREFIX = "module.backbone.model."


def refuse_non_empty(out: str | Path, overwrite: bool) -> None:
    """An export replaces what a directory holds only when asked: another model's files would be mixed in."""
    out = Path(out)
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise DistilleryError(f"{out}: not empty; give --overwrite to replace what it holds")


def export_run(run_dir: str | Path, out: str | Path, ema: bool = False, checkpoint: str | Path | None = None,
               overwrite: bool = False) -> Path:
    """Export the newest checkpoint of `run_dir` (or `checkpoint`); `ema` takes the EMA weights (DINO's teacher)."""
    refuse_non_empty(out, overwrite)
    path = Path(checkpoint) if checkpoint else ckpt.latest_checkpoint(run_dir)
    state = ckpt.load_checkpoint(path)
    student = Student.from_config(state["student_config"])
    if ema:
        if state.get("ema") is None:
            raise ckpt.CheckpointError(f"{path}: this run kept no EMA model (its method has none); export without --ema")
        weights, prefix = state["ema"], EMA_BACKBONE_PREFIX
    else:
        weights, prefix = state["model"], BACKBONE_PREFIX
    backbone = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    try:
        student.model.load_state_dict(backbone)
    except RuntimeError as error:
        raise ckpt.CheckpointError(f"{path}: backbone weights do not fit {student.arch} ({str(error).splitlines()[0]})") from error
    return export_local_dir(student, out, tag=f"distillery-{'ema' if ema else 'student'}-step{state['step']}")


def export_initial(config_file: str | Path, out: str | Path, seed: int | None = None, overwrite: bool = False) -> Path:
    """Export the student a train config starts from, untrained: the random-init baseline of an evaluation.
    With the config's seed it is bit for bit the starting point of a run of that config."""
    refuse_non_empty(out, overwrite)
    values = read_yaml(config_file)
    if not values.get("student"):
        raise ConfigError(f"{config_file}: no student given")
    seed = values.get("seed", 0) if seed is None else seed
    student = initial_student(values["student"], values.get("student_args") or {}, seed)
    return export_local_dir(student, out, tag=f"distillery-init-seed{seed}")
