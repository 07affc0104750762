"""The papers' experiments on real data: one definition file each, checked and planned without running anything.

An experiment (`configs/experiments/NAME.yaml`) names its teachers, the cache settings, one training config,
the dataset layout, the evaluation tasks and the papers' reported numbers with their sources. Its parts:

- `definition`: read and check the file (keys, cache settings, tasks, paper rows);
- `architectures`: teachers and students built on the meta device (no weights, no memory) for their token width,
  patch grid and FLOPs; where the teachers' weights are;
- `costs`: the cache's bytes on disk (the arithmetic `cache info` reports) and GPU-hours from measured throughput;
- `plan`: every check, each step's command and the eval-suite config; `printing` shows a plan and
  `running.run_step` runs one step (make/experiments.mk chains them);
- `metrics` and `report`: where the evaluation JSON keeps each metric, and paper vs reproduced read from it.

Relative paths in an experiment file, and the defaults here, resolve from the current directory, else from
the project's root (`distillery.config.project_path`).
"""

from distillery.apps.experiments.architectures import architecture, plan_teacher
from distillery.apps.experiments.costs import Throughput, bytes_per_view
from distillery.apps.experiments.definition import (EXPERIMENTS_DIR, Experiment, ExperimentError, MissingInput, experiment_names,
                                               load_experiment)
from distillery.apps.experiments.plan import STEPS, ExperimentPlan, PlanInputs, plan_experiment, plan_experiments
from distillery.apps.experiments.printing import format_plans
from distillery.apps.experiments.report import build_report, write_report
from distillery.apps.experiments.running import run_step

__all__ = ["EXPERIMENTS_DIR", "STEPS", "Experiment", "ExperimentError", "ExperimentPlan", "MissingInput", "PlanInputs",
           "Throughput", "architecture", "build_report", "bytes_per_view", "experiment_names", "format_plans",
           "load_experiment", "plan_experiment", "plan_experiments", "plan_teacher", "run_step", "write_report"]
