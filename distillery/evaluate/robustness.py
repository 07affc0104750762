"""Robustness of a trained linear probe: ImageNet-V2, -R, -A, -C and ImageNet-9 (SeFA Tables 2 and 21, TinTeM
Table 7), scored with the probe `eval linear` saved (`<results>/<model>/linear.safetensors`), so nothing is
retrained and every set sees the same head.

- **V2** (matched-frequency): the probe's own classes. Its release names class folders by class *index*
  (`0` ... `999`); a set whose folders are all decimal numbers is read that way (folder `k` is class k, not
  the k-th folder in sorted order, which would put `10` before `2`), a set with wnid folders by name.
- **R** and **A**: 200-class subsets; the 1000-way head is restricted to the subset's logits, as their
  authors evaluate (hendrycks/imagenet-r and natural-adv-examples `eval.py`). The subset lists ship in
  `evaluate/data/` with their source; a class folder outside the list is an error.
- **C**: `<corruption>/<severity>/<class>/` for each corruption of the normaliser file and severities 1-5.
  The corruption error is CE_c = mean_s E(c, s) / the baseline's mean error on c; mCE = mean_c CE_c
  (Hendrycks & Dietterich 2019, normalised by AlexNet's errors, which ship in `evaluate/data/`). A set may
  carry its own `normaliser.json` ({"baseline", "errors"}), as the synth set does.
- **ImageNet-9** (Xiao et al. 2021, MadryLab/backgrounds_challenge): `<variant>/val/<class>/` (or
  `<variant>/<class>/`) for the variants present among original, mixed_same, mixed_rand, mixed_next, only_fg,
  no_fg, only_bg_b and only_bg_t. The head's top-1 class is mapped to a superclass by `in_to_in9` (-1, a class
  outside the nine, is wrong), as their `eval_model` does; BG-gap = acc(mixed_same) - acc(mixed_rand). A set may
  carry its own `in_to_in9.json`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distillery.errors import DistilleryError
from distillery.evaluate.features import Extraction, Pooling
from distillery.evaluate.linear import LinearHeads, accuracy
from distillery.data.shards import CLASS_LABEL
from distillery.evaluate.results import RESULTS_DIR, TaskResult, default_path, labelled_task, percent, tensors_path

SETS = ("v2", "r", "a", "c", "in9")
SEVERITIES = (1, 2, 3, 4, 5)
# (set, summary column, where in the metrics): what a suite's summary shows of each set
COLUMNS = (("v2", "IN-V2 top-1", ("v2", "top1")), ("r", "IN-R top-1", ("r", "top1")), ("a", "IN-A top-1", ("a", "top1")),
           ("c", "IN-C mCE", ("c", "mCE")), ("in9", "IN-9 BG-gap", ("in9", "bg_gap")))
IN9_VARIANTS = ("original", "mixed_same", "mixed_rand", "mixed_next", "only_fg", "no_fg", "only_bg_b", "only_bg_t")


def shipped(name: str) -> Path:
    """A data file of evaluate/data (subset lists, normalisers, mappings)."""
    return Path(str(resources.files("distillery.evaluate") / "data" / name))


def read_data_file(path: Path, key: str) -> Any:
    """`key` of a JSON data file ({"source": ..., key: ...}), the error naming the file."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DistilleryError(f"{path}: not a readable JSON data file ({error})") from error
    if not isinstance(values, dict) or key not in values:
        raise DistilleryError(f"{path}: expected a JSON object with {key!r}")
    return values[key]


@dataclass(frozen=True)
class RobustnessSettings:
    r_classes: str | None = None  # JSON {"classes": [...]}; default: <r>/classes.json, else the ImageNet-R list
    a_classes: str | None = None  # default: <a>/classes.json, else the shipped ImageNet-A list
    c_normaliser: str | None = None  # default: <c>/normaliser.json, else AlexNet's ImageNet-C errors
    in9_mapping: str | None = None  # default: <in9>/in_to_in9.json, else MadryLab's ImageNet mapping
    label: str = CLASS_LABEL  # whose probe: `eval linear --label` (the class, or a factor the shards record)


# ---------------------------------------------------------------------------------------------- the probe

@dataclass(frozen=True)
class Probe:
    head: LinearHeads  # one head: weight [1, C, D], bias [1, C]
    classes: tuple[str, ...] | None
    pooling: Pooling
    path: Path


def probe_path(root: Path, model_name: str, label: str = CLASS_LABEL) -> Path:
    """Where `eval linear [--label]` saved a model's probe."""
    return tensors_path(default_path(model_name, labelled_task("linear", label), Path(root)))


def load_probe(path: Path, model_name: str, fingerprint: dict[str, Any]) -> Probe:
    """The probe `eval linear` saved for this model; a probe of other weights is refused, naming the file."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise DistilleryError(f"{path}: no saved linear probe; run `eval linear` for {model_name} first "
                              "(it writes linear.safetensors beside linear.json)")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["result"])
        weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
    (trained_for, about), = meta["models"].items()
    if about["fingerprint"] != fingerprint:
        raise DistilleryError(f"{path}: a probe of {trained_for} ({about['spec']}), not of these {model_name} weights; "
                              f"train one with `eval linear` for {model_name}")
    settings = meta["settings"]
    classes = tuple(settings["classes"]) if settings.get("classes") else None
    pooling = Pooling(settings["features"]["kind"], settings["features"].get("last_blocks", 4))
    return Probe(LinearHeads(weight[None], bias[None]), classes, pooling, Path(path))


def probe_label_space(probe: Probe, path: Path, classes: tuple[str, ...] | None, labels: np.ndarray) -> np.ndarray:
    """A set's labels as indices of the probe's classes: by name, or by number where every class folder is a
    decimal index (ImageNet-V2's layout)."""
    num_classes = probe.head.weight.shape[1]
    if classes is None:
        mapping = np.arange(int(labels.max()) + 1)
    elif all(name.isdigit() for name in classes):
        mapping = np.array([int(name) for name in classes])
    else:
        if probe.classes is None:
            raise DistilleryError(f"{path}: class folders are named, but the probe ({probe.path}) has no class names")
        unknown = [name for name in classes if name not in probe.classes]
        if unknown:
            raise DistilleryError(f"{path}: class folder {unknown[0]!r} is not a class of the probe ({probe.path})")
        mapping = np.array([probe.classes.index(name) for name in classes])
    if mapping.max() >= num_classes:
        raise DistilleryError(f"{path}: class {int(mapping.max())} is outside the probe's {num_classes} classes")
    return mapping[labels]


def subset_mask(probe: Probe, path: Path, classes: tuple[str, ...] | None, listing: Path) -> np.ndarray:
    """The subset's classes as a mask over the probe's (`class_mask`, as the linear probe's extra sets read
    theirs); the set's folders must all be in the list."""
    from distillery.evaluate.tasks import class_mask

    subset = [str(name) for name in read_data_file(listing, "classes")]
    if classes:
        outside = [name for name in classes if name not in subset]
        if outside:
            raise DistilleryError(f"{path}: class folder {outside[0]!r} is not in the subset list {listing}")
    if probe.classes is None:
        raise DistilleryError(f"{path}: a class subset needs a probe with class names ({probe.path} has none)")
    return class_mask(listing, probe.classes, probe.head.weight.shape[1])


# ---------------------------------------------------------------------------------------------- scores

def corruption_errors(top1: dict[str, dict[int, float]], normaliser: dict[str, float]) -> dict[str, Any]:
    """CE per corruption (mean error over severities / the baseline's mean error) and their mean, mCE."""
    ce = {c: float(np.mean([1 - top1[c][s] for s in SEVERITIES]) / normaliser[c]) for c in normaliser}
    return {"ce": ce, "mCE": float(np.mean(list(ce.values()))),
            "mean_error": {c: float(np.mean([1 - top1[c][s] for s in SEVERITIES])) for c in normaliser}}


def in9_accuracy(predictions: np.ndarray, labels: np.ndarray, in_to_in9: np.ndarray) -> float:
    """Top-1 on an ImageNet-9 variant: the predicted class through `in_to_in9` (-1 never matches)."""
    return float((in_to_in9[predictions] == labels).mean())


def bg_gap(variants: dict[str, float]) -> float | None:
    """mixed_same - mixed_rand: how much a correct background helps a correct foreground."""
    if "mixed_same" in variants and "mixed_rand" in variants:
        return variants["mixed_same"] - variants["mixed_rand"]
    return None


def _in9_mapping(probe: Probe, root: Path, settings: RobustnessSettings) -> np.ndarray:
    source = Path(settings.in9_mapping) if settings.in9_mapping else root / "in_to_in9.json"
    if not source.exists():
        source = shipped("imagenet9.json")
    mapping = read_data_file(source, "in_to_in9")
    num_classes = probe.head.weight.shape[1]
    out = np.full(num_classes, -1, np.int64)
    for index, target in mapping.items():
        if not 0 <= int(index) < num_classes:
            raise DistilleryError(f"{source}: class index {index} is outside the probe's {num_classes} classes")
        out[int(index)] = int(target)
    return out


def _in9_variants(root: Path) -> dict[str, Path]:
    found = {}
    for variant in IN9_VARIANTS:
        directory = root / variant / "val" if (root / variant / "val").is_dir() else root / variant
        if directory.is_dir():
            found[variant] = directory
    if not found:
        raise DistilleryError(f"{root}: no ImageNet-9 variant ({', '.join(IN9_VARIANTS)}) under it")
    return found


def _normaliser(root: Path, settings: RobustnessSettings) -> tuple[dict[str, float], str, Path]:
    source = Path(settings.c_normaliser) if settings.c_normaliser else root / "normaliser.json"
    if not source.exists():
        source = shipped("imagenet_c_alexnet.json")
    errors = read_data_file(source, "errors")
    baseline = read_data_file(source, "baseline")
    return {str(c): float(e) for c, e in errors.items()}, str(baseline), source


def corruption_dirs(root: Path, normaliser: dict[str, float], source: Path) -> dict[str, dict[int, Path]]:
    """`<corruption>/<severity>` of every normalised corruption, checked before any model runs."""
    stray = sorted({p.name for p in root.iterdir() if p.is_dir()} - set(normaliser))
    if stray:
        raise DistilleryError(f"{root}: corruption {stray[0]!r} has no normaliser in {source}")
    dirs: dict[str, dict[int, Path]] = {}
    for corruption in normaliser:
        dirs[corruption] = {}
        for severity in SEVERITIES:
            directory = root / corruption / str(severity)
            if not directory.is_dir():
                raise DistilleryError(f"{root}: no {corruption}/{severity}/ (the ImageNet-C layout: "
                                      "<corruption>/<severity 1-5>/<class>/)")
            dirs[corruption][severity] = directory
    return dirs


def robustness_task(model, data, settings: RobustnessSettings, extraction: Extraction) -> TaskResult:
    """Every robustness set in `data.robustness`, scored with the model's saved probe."""
    from distillery.evaluate.tasks import labelled_features

    data.require("robustness")
    probe = load_probe(probe_path(data.probes or RESULTS_DIR, model.name, settings.label), model.name,
                       model.teacher.fingerprint())

    def read(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
        classes, features = labelled_features(model, path, extraction, probe.pooling, normalized=False)
        logits = probe.head.logits(torch.as_tensor(features.features, dtype=torch.float32))[0]
        return logits, features.labels, classes

    metrics: dict[str, Any] = {}
    rows: list[tuple[str, str, str]] = []
    sets = data.robustness
    if "v2" in sets:
        logits, labels, classes = read(sets["v2"])
        metrics["v2"] = accuracy(logits, probe_label_space(probe, sets["v2"], classes, labels))
        rows.append(("ImageNet-V2 top-1", percent(metrics["v2"]["top1"]), str(sets["v2"])))
    for name, title in (("r", "ImageNet-R"), ("a", "ImageNet-A")):
        if name in sets:
            logits, labels, classes = read(sets[name])
            listing = (getattr(settings, f"{name}_classes") or
                       (sets[name] / "classes.json" if (sets[name] / "classes.json").exists() else
                        shipped(f"imagenet_{name}_classes.json")))
            mask = subset_mask(probe, sets[name], classes, Path(listing))
            metrics[name] = {**accuracy(logits, probe_label_space(probe, sets[name], classes, labels), mask),
                             "classes": int(mask.sum()), "subset": str(listing)}
            rows.append((f"{title} top-1 ({int(mask.sum())} classes)", percent(metrics[name]["top1"]), str(sets[name])))
    if "c" in sets:
        root = Path(sets["c"])
        normaliser, baseline, source = _normaliser(root, settings)
        top1: dict[str, dict[int, float]] = {}
        for corruption, by_severity in corruption_dirs(root, normaliser, source).items():
            top1[corruption] = {}
            for severity, directory in by_severity.items():
                logits, labels, classes = read(directory)
                top1[corruption][severity] = accuracy(logits, probe_label_space(probe, directory, classes, labels))["top1"]
        metrics["c"] = {**corruption_errors(top1, normaliser), "top1": top1, "baseline": baseline, "normaliser": str(source)}
        rows.append((f"ImageNet-C mCE (vs {baseline})", percent(metrics["c"]["mCE"]), str(root)))
        rows += [(f"  CE {c}", percent(v), "") for c, v in metrics["c"]["ce"].items()]
    if "in9" in sets:
        root = Path(sets["in9"])
        mapping = _in9_mapping(probe, root, settings)
        variants = {}
        for variant, directory in _in9_variants(root).items():
            logits, labels, _ = read(directory)
            variants[variant] = in9_accuracy(logits.argmax(1).numpy(), labels, mapping)
            rows.append((f"ImageNet-9 {variant}", percent(variants[variant]), str(directory)))
        metrics["in9"] = {"variants": variants, "bg_gap": bg_gap(variants)}
        rows.append(("ImageNet-9 BG-gap (mixed_same - mixed_rand)", percent(metrics["in9"]["bg_gap"]), ""))
    return TaskResult("robustness", model.describe(), {name: str(path) for name, path in sets.items()},
                      {"probe": str(probe.path), "pooling": probe.pooling.describe(), **dataclasses.asdict(settings)},
                      metrics, ("set", "%", "data"), rows)
