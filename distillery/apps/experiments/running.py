"""Running one step of a checked experiment plan (make/experiments.mk chains the steps)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from distillery.apps.experiments.definition import ExperimentError
from distillery.console import console
from distillery.apps.experiments.plan import STEPS, ExperimentPlan
from distillery.evaluate.suite import write_suite_config

def run_step(plan: ExperimentPlan, step: str) -> None:
    """Execute one step of a checked plan (planned with strict=True). Each step resumes the work it finds done."""
    from distillery.train.checkpoint import list_checkpoints

    if step not in STEPS:
        raise ExperimentError(f"unknown step {step!r}; steps: {', '.join(STEPS)}")
    if plan.problems:
        raise ExperimentError(f"{plan.experiment.name}: {plan.problems[0]}")
    if step not in plan.steps:  # analyze, for a method without a head
        console.print(f"{plan.experiment.name}: no {step} step for {plan.method} (it has no head to score)")
        return
    command = plan.steps[step]
    argv = list(command.argv)
    if step == "train" and list_checkpoints(plan.out / "runs" / plan.method):
        argv.append("--resume")  # an interrupted run continues exactly from its newest checkpoint
    if step == "eval":
        write_suite_config(plan.out / "eval_suite.yaml", plan.suite)
    argv[0] = _executable(argv[0])
    completed = subprocess.run(argv, env={**os.environ, **dict(command.env)}, check=False)
    if completed.returncode != 0:
        raise ExperimentError(f"{plan.experiment.name}: step {step} failed (exit status {completed.returncode}): {command}")


def _executable(name: str) -> str:
    """`distillery` and `torchrun` from the environment this process runs in."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name
