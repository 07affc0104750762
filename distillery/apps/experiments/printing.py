"""An experiment plan as the text `distillery experiment plan` and `make all DRY_RUN=1` print."""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from distillery.apps.experiments.plan import ExperimentPlan

def format_plans(plans: list[ExperimentPlan]) -> str:
    """Every plan, naming the experiments each cache is shared with, then (for several) the summary."""
    users: dict[Path | None, list[str]] = {}
    for plan in plans:
        users.setdefault(plan.store, []).append(plan.experiment.name)
    texts = [format_plan(p, [n for n in users[p.store] if n != p.experiment.name] if p.store else []) for p in plans]
    if len(plans) > 1:
        texts.append(format_summary(plans))
    return "\n\n".join(texts)


def format_plan(plan: ExperimentPlan, shared_with: list[str] = ()) -> str:
    e, inputs, cache = plan.experiment, plan.inputs, plan.experiment.cache
    lines = [f"== {e.name}: {e.paper}", f"   definition {e.path}; out {plan.out}; GPUS={inputs.gpus}", "data:"]
    lines += [f"   {label:<16} {c.images:>10,} images  ({c.source})" for label, c in plan.counts.items()]
    lines.append("teachers:")
    for t in plan.teachers:
        g = t.geometry
        lines.append(f"   {t.spec}: {g.arch} at {g.input_size[0]} px, {g.dim}-d, grid {g.grid[0]}x{g.grid[1]}, "
                     f"{g.gflops:.3g} GFLOPs/image; run as {t.run_spec}; weights: {plan.weights_found.get(t.name)}")
    if plan.store is None:
        lines.append("cache: size unknown until every teacher is known")
    else:
        lines.append(f"cache: {plan.store}" + (f" (shared with {', '.join(shared_with)})" if shared_with else ""))
        per_view = " + ".join(f"{name} {n:,}" for name, n in plan.bytes_per_view.items())
        storage = f"{cache['dtype']}, " + ("cls only" if cache["cls_only"] else f"patch pool {cache['patch_pool']}")
        lines.append(f"   {plan.counts['train'].images:,} images x {cache['views']} views x ({per_view}) bytes per view "
                     f"[{storage}] = {plan.cache_bytes:,} bytes = {_size(plan.cache_bytes)} of teacher tokens on disk")
    if plan.train_summary:
        lines.append(f"train: {plan.train_summary}")
    if plan.hours:
        lines.append(f"GPU-hours on {plan.device or 'no measured device'} ({inputs.throughput}; "
                     f"wall-clock = GPU-hours / GPUS at ideal scaling):")
        for step, hours in plan.hours.items():
            value = "not measured" if hours.gpu_hours is None else f"{hours.gpu_hours:,.1f}"
            lines.append(f"   {step:<6} {value:>12}   {hours.detail}")
        total = plan.total_hours
        lines.append(f"   {'total':<6} " + ("not measured" if total is None else
                                            f"{total:>12,.1f}   = {total / inputs.gpus:,.1f} h wall-clock on {inputs.gpus} GPU(s)"))
    lines.append("commands:")
    lines += [f"   [{step}] {command}" for step, command in plan.steps.items()]
    lines.append(f"eval suite ({plan.out / 'eval_suite.yaml'}, written by the eval step):")
    lines += ["   " + line for line in yaml.safe_dump(plan.suite, sort_keys=False).splitlines()]
    lines.append("paper numbers compared (the report reads the reproduced ones from the eval JSON files):")
    for row in e.paper_results:
        lines.append(f"   {row.model} | {row.metric} | {'not published' if row.value is None else f'{row.value:g}'} | {row.source}")
    lines += [f"note: {n}" for n in plan.notes]
    lines += [f"will need: {n}" for n in plan.needs]
    return "\n".join(lines)


def format_summary(plans: list[ExperimentPlan]) -> str:
    """All experiments: each cache counted once, where the first experiment using it builds it."""
    stores = {p.store: p.cache_bytes for p in plans if p.store is not None}
    lines = ["== all experiments", f"   {'experiment':<32} {'cache':>10} {'cache h':>9} {'train h':>9} {'eval h':>8}"]
    built, total = set(), 0.0
    for p in plans:
        hours = {step: p.hours[step].gpu_hours if step in p.hours else None for step in ("cache", "train", "eval")}
        shared = p.store is not None and p.store in built
        if shared:
            hours["cache"] = 0.0
        built.add(p.store)
        size = "(shared)" if shared else _size(p.cache_bytes) if p.cache_bytes else "n/a"
        cells = ["n/a" if v is None else f"{v:,.1f}" for v in hours.values()]
        lines.append(f"   {p.experiment.name:<32} {size:>10} {cells[0]:>9} {cells[1]:>9} {cells[2]:>8}")
        total += math.nan if None in hours.values() else sum(hours.values())
    lines.append(f"   caches on disk: {len(stores)} store(s), {_size(sum(stores.values()))} in all")
    device = next((p.device for p in plans if p.device), None)
    lines.append("   GPU-hours in all: " + ("not measured" if math.isnan(total) or device is None else f"{total:,.1f} on {device}"))
    return "\n".join(lines)


def _size(n: float) -> str:
    return f"{n / 1e12:.2f} TB" if n >= 1e12 else f"{n / 1e9:.1f} GB"
