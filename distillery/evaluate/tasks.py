"""The evaluation protocols as tasks: a loaded model, the data and the task's settings in, a TaskResult out.

Every task reads its features through `features.extract_features`, so tasks that share a data set share its
cached features (kNN, the linear probe and OOD all read train/val CLS from the same files). The metrics
are those of `knn`, `linear`, `retrieval`, `ood` and `cka`; this module only wires data to them and says,
in the result, which protocol settings produced each number.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distillery.config import from_mapping
from distillery.data.shards import CLASS_LABEL, ShardSet, is_url, names_shards
from distillery.errors import DistilleryError
from distillery.evaluate import cka, ood, retrieval
from distillery.evaluate.analysis import ClusteringSettings, clustering_task
from distillery.evaluate.davis import DavisSettings, davis_result
from distillery.evaluate.robustness import RobustnessSettings, robustness_task
from distillery.evaluate.segmentation import SegmentationSettings, segmentation_result
from distillery.evaluate.features import (MULTI_SCALES, Extraction, Features, FileSource, ImageFile,
                                          KeepAspect, Pooling, extract_features, load_model, open_images, patch_size)
from distillery.evaluate.knn import DEFAULT_KS, TEMPERATURE, knn_accuracy
from distillery.evaluate.linear import LabelledSet, LinearConfig, linear_probe
from distillery.evaluate.results import TaskResult, labelled_task, percent
from distillery.models.teachers import Teacher


# ---------------------------------------------------------------------------------------------- inputs

@dataclass(frozen=True)
class RetrievalData:
    dataset: str  # roxford5k, rparis6k, synth (or roxford, rparis)
    root: Path  # the directory holding gnd_<dataset>.pkl and jpg/


@dataclass(frozen=True)
class TransferSet:
    """A labelled data set with its own classes: the probe trains on `train` and is scored on `val`."""

    train: Path
    val: Path

    @classmethod
    def under(cls, root: Path) -> TransferSet:
        """ROOT/train and ROOT/val, the layout `distillery data shards` writes for each split."""
        return cls(Path(root) / "train", Path(root) / "val")


@dataclass(frozen=True)
class EvalData:
    train: Path | None = None  # labelled; also the ID-train set of OOD
    val: Path | None = None  # labelled; also the ID-test set of OOD
    ood: dict[str, Path] = field(default_factory=dict)  # OOD set name -> directory
    ood_groups: dict[str, list[str]] = field(default_factory=dict)  # group (near, far) -> OOD set names
    retrieval: RetrievalData | None = None
    extra: dict[str, Path] = field(default_factory=dict)  # more labelled sets the linear probe is scored on
    extra_classes: dict[str, Path] = field(default_factory=dict)  # extra set name -> JSON list of its classes
    cka: Path | None = None  # the images CKA compares models on (default: val)
    davis: Path | None = None  # a DAVIS-2017 layout (JPEGImages/, Annotations/, ImageSets/)
    segmentation: Path | None = None  # a Pascal VOC layout (JPEGImages/, SegmentationClass/, ImageSets/)
    robustness: dict[str, Path] = field(default_factory=dict)  # v2, r, a, c, in9 -> its directory
    probes: Path | None = None  # where <model>/linear.safetensors lie (default: results/)
    transfer: dict[str, TransferSet] = field(default_factory=dict)  # transfer set name -> its train and val

    def require(self, task: str) -> None:
        """Fail before any model runs when `task` lacks data."""
        missing = [name for name in REQUIRED_DATA[task] if not getattr(self, name)]
        if task == "cka" and not (self.cka or self.val):
            missing = ["cka or val"]
        if missing:
            raise DistilleryError(f"eval {task}: no {', '.join(missing)} data given")


REQUIRED_DATA = {"knn": ("train", "val"), "linear": ("train", "val"), "retrieval": ("retrieval",),
                 "ood": ("train", "val", "ood"), "cka": (), "davis": ("davis",),
                 "segmentation": ("segmentation",), "robustness": ("robustness",),
                 "clustering": ("val",), "transfer": ("transfer",)}


@dataclass(frozen=True)
class KnnSettings:
    ks: tuple[int, ...] = DEFAULT_KS
    temperature: float = TEMPERATURE
    label: str = CLASS_LABEL  # the class, or a factor the shards record (factors.json)


@dataclass(frozen=True)
class LinearSettings(LinearConfig):
    pooling: str = "cls"  # cls, patch_mean or last_blocks (DINO's linear input: last 4 CLS for ViT-S)
    last_blocks: int = 4
    label: str = CLASS_LABEL  # the class, or a factor the shards record (factors.json)

    def features_pooling(self) -> Pooling:
        return Pooling(self.pooling, self.last_blocks)


@dataclass(frozen=True)
class RetrievalSettings:
    crop_queries: bool = True  # the revisitop protocol crops queries to bbx; DINO's script does not
    multiscale: bool = False
    max_side: int | None = None  # longer image side; None: the model's input size


@dataclass(frozen=True)
class OodSettings:
    k: int = 10  # Sun et al. 2022: k = 10 with 1% of ImageNet train, 1000 with all of it, 50 on CIFAR
    train_fraction: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class CkaSettings:
    target: float = cka.SEFA_TARGET  # SeFA: teacher pairs near CKA 0.5 distil best
    tolerance: float = 0.1


SETTINGS = {"knn": KnnSettings, "linear": LinearSettings, "retrieval": RetrievalSettings, "ood": OodSettings,
            "cka": CkaSettings, "davis": DavisSettings, "segmentation": SegmentationSettings,
            "robustness": RobustnessSettings, "clustering": ClusteringSettings,
            "transfer": LinearSettings}  # transfer probes are linear probes, each set with its own classes


def settings_from_dict(task: str, values: dict[str, Any], source: str) -> Any:
    return from_mapping(SETTINGS[task], values, f"{source}: settings.{task}")


@dataclass
class EvalModel:
    name: str
    spec: str
    teacher: Teacher
    device: str

    @classmethod
    def load(cls, name: str, spec: str, device: str, any_size: bool = False) -> EvalModel:
        return cls(name, spec, load_model(spec, device, any_size), device)

    def describe(self) -> dict[str, dict[str, Any]]:
        return {self.name: {"spec": self.spec, "fingerprint": self.teacher.fingerprint()}}


# ---------------------------------------------------------------------------------------------- labelled data

def labelled_features(model: EvalModel, path: Path, extraction: Extraction, pooling: Pooling = Pooling(),
                      normalized: bool = True, label: str = CLASS_LABEL) -> tuple[tuple[str, ...] | None, Features]:
    """Features of a labelled set with its label names. `label` is the class, or a factor the shards record;
    features do not depend on it, so every label reuses one extraction."""
    source = open_images(path)
    features = extract_features(model.teacher, source, extraction, pooling=pooling, normalized=normalized)
    if label != CLASS_LABEL:
        return factor_labels(path, label, features)
    if features.labels is None:
        raise DistilleryError(f"{path}: these images have no labels (no .cls in the shards, or not class directories)")
    return source.classes, features


def factor_labels(path: Path, label: str, features: Features) -> tuple[tuple[str, ...], Features]:
    """`features` labelled by a factor of the shards' factors.json, read from each sample's .json by key."""
    if not names_shards(path) and not is_url(path) and (not Path(path).is_dir() or not any(Path(path).glob("*.tar"))):
        raise DistilleryError(f"{path}: label {label!r} needs shards that record factors (factors.json)")
    shard_set = ShardSet.open(path)
    names = shard_set.label_names(label)
    by_key = _factor_values(str(path), shard_set.fingerprint()["keys_sha256"], label)
    missing = [key for key in features.keys if by_key.get(key) is None]
    if missing:
        raise DistilleryError(f"{path}: sample {missing[0]} has no {label!r} factor in its .json")
    labels = np.array([by_key[key] for key in features.keys], np.int64)
    return names, features._replace(labels=labels)


@functools.lru_cache(maxsize=32)
def _factor_values(spec: str, keys_sha256: str, label: str) -> dict[str, int | None]:
    """Sample key -> its `label` value for a shard set. Every labelled task of every model reads these for train
    and val; reading them means reading every tar, so a process reads each set once (per key hash)."""
    shard_set = ShardSet.open(spec)
    return {r.key: shard_set.label_of(r, label) for shard in range(len(shard_set)) for r in shard_set.records(shard)}


def train_label_space(train_path: Path, train_classes: tuple[str, ...] | None, train: Features, path: Path,
                      classes: tuple[str, ...] | None, features: Features) -> np.ndarray:
    """`features`' labels as indices of the train classes: as they are when both sets list the same classes
    (or either lists none), else mapped by class name (a set of some of the train classes)."""
    num_classes = len(train_classes) if train_classes else int(train.labels.max()) + 1
    labels = features.labels
    if train_classes and classes and tuple(classes) != tuple(train_classes):
        missing = [name for name in classes if name not in train_classes]
        if missing:
            raise DistilleryError(f"{path}: class {missing[0]!r} is not one of the {len(train_classes)} classes of "
                                  f"{train_path}; convert it with --classes {train_path}/classes.json")
        labels = np.array([train_classes.index(name) for name in classes], np.int64)[labels]
    if labels.max() >= num_classes:
        raise DistilleryError(f"{path}: label {int(labels.max())} is outside the {num_classes} classes of {train_path}")
    return labels


def class_mask(path: Path, train_classes: tuple[str, ...] | None, num_classes: int) -> np.ndarray:
    """A JSON list of class names or indices (the classes a set contains) as a bool mask over the train classes."""
    try:
        listed = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DistilleryError(f"{path}: not a readable JSON list of classes ({error})") from error
    if isinstance(listed, dict):  # a data file with its source: {"source": ..., "classes": [...]}
        listed = listed.get("classes")
    if not isinstance(listed, list) or not listed:
        raise DistilleryError(f"{path}: expected a non-empty JSON list of class names or indices")
    mask = np.zeros(num_classes, bool)
    for entry in listed:
        if isinstance(entry, str):
            if not train_classes or entry not in train_classes:
                raise DistilleryError(f"{path}: {entry!r} is not a class of the train set")
            mask[train_classes.index(entry)] = True
        elif isinstance(entry, int) and 0 <= entry < num_classes:
            mask[entry] = True
        else:
            raise DistilleryError(f"{path}: {entry!r} is neither a train class name nor an index below {num_classes}")
    return mask


# ---------------------------------------------------------------------------------------------- tasks

def score_knn(data: EvalData, settings: KnnSettings, train: tuple[tuple[str, ...] | None, Features],
              val: tuple[tuple[str, ...] | None, Features]) -> tuple[dict[str, Any], list[tuple[str, ...]]]:
    """kNN metrics and table rows for labelled (label names, features) of train and val, any features at all
    (a model's, raw pixels, a projection)."""
    (train_classes, train_features), (val_classes, val_features) = train, val
    val_labels = train_label_space(data.train, train_classes, train_features, data.val, val_classes, val_features)
    num_classes = (len(train_classes) if train_classes
                   else int(max(train_features.labels.max(), val_labels.max())) + 1)
    metrics = knn_accuracy(train_features.features, train_features.labels, val_features.features, val_labels,
                           settings.ks, settings.temperature, num_classes)
    rows = [(k.removeprefix("k="), percent(v["top1"]), percent(v["top5"])) for k, v in metrics.items() if k != "predictions"]
    return metrics, rows


def knn_task(model: EvalModel, data: EvalData, settings: KnnSettings, extraction: Extraction) -> TaskResult:
    """Weighted kNN (DINO): L2-normalised CLS, votes exp(sim / T), top-1/top-5 per k."""
    data.require("knn")
    train_classes, train = labelled_features(model, data.train, extraction, label=settings.label)
    val_classes, val = labelled_features(model, data.val, extraction, label=settings.label)
    metrics, rows = score_knn(data, settings, (train_classes, train), (val_classes, val))
    return TaskResult(labelled_task("knn", settings.label), model.describe(),
                      {"train": train.fingerprint["data"], "val": val.fingerprint["data"]},
                      {**dataclasses.asdict(settings), "features": "L2-normalised CLS after the final norm"},
                      metrics, ("k", "top-1 %", "top-5 %"), rows)


def linear_task(model: EvalModel, data: EvalData, settings: LinearSettings, extraction: Extraction) -> TaskResult:
    """Linear probe with an LR sweep, the LR chosen on held-out train; scored on val and the extra sets."""
    data.require("linear")
    unknown = sorted(set(data.extra_classes) - set(data.extra))
    if unknown:
        raise DistilleryError(f"eval linear: class list given for {unknown[0]!r}, which is not an extra set")
    pooling = settings.features_pooling()
    # raw features, as DINO's and DINOv2's probes take them: the LR grids are tuned for that scale
    train_classes, train = labelled_features(model, data.train, extraction, pooling, normalized=False, label=settings.label)
    num_classes = len(train_classes) if train_classes else int(train.labels.max()) + 1
    sets, fingerprints = {}, {"train": train.fingerprint["data"]}
    for name, path in {"val": data.val, **data.extra}.items():
        classes, features = labelled_features(model, path, extraction, pooling, normalized=False, label=settings.label)
        labels = train_label_space(data.train, train_classes, train, path, classes, features)
        mask = class_mask(data.extra_classes[name], train_classes, num_classes) if name in data.extra_classes else None
        sets[name], fingerprints[name] = LabelledSet(features.features, labels, mask), features.fingerprint["data"]
    val = sets.pop("val")
    metrics, probe = linear_probe(LabelledSet(train.features, train.labels), val, num_classes, settings, sets,
                                  model.device)
    rows = [("val", percent(metrics["val"]["top1"]), percent(metrics["val"]["top5"]), "")]
    rows += [(name, percent(m["top1"]), percent(m["top5"]), f"{int(sets[name].class_mask.sum())} classes"
              if sets[name].class_mask is not None else "") for name, m in metrics["extra"].items()]
    rows.append((f"held-out {settings.holdout:.0%} of train", percent(metrics["holdout_top1_at_chosen_lr"]), "",
                 f"chosen LR {metrics['chosen_lr']:.3g} (best of {len(metrics['sweep'])})"))
    selection = (f"LR with the best top-1 on a stratified {settings.holdout:.0%} of train (seed {settings.seed}); "
                 "the probe is then retrained on all of train at that LR")
    return TaskResult(labelled_task("linear", settings.label), model.describe(), fingerprints,
                      {**dataclasses.asdict(settings), "selection": selection, "features": pooling.describe(),
                       "classes": list(train_classes) if train_classes else None},
                      metrics, ("set", "top-1 %", "top-5 %", ""), rows,
                      tensors={"weight": probe.weight[0], "bias": probe.bias[0]})


def transfer_task(model: EvalModel, data: EvalData, settings: LinearSettings, extraction: Extraction) -> TaskResult:
    """The linear probe on every transfer set, each with its own classes (the fine-grained suites of SeFA and
    TinTeM: CIFAR, Food, CUB, DTD, Pets, Cars, Aircraft, Flowers), and the mean top-1 over the sets."""
    data.require("transfer")
    per_set, fingerprints, rows = {}, {}, []
    for name, split in data.transfer.items():
        result = linear_task(model, EvalData(train=split.train, val=split.val), settings, extraction)
        metrics = result.metrics
        per_set[name] = {**metrics["val"], "chosen_lr": metrics["chosen_lr"],
                         "classes": int(result.tensors["weight"].shape[0]), "train": str(split.train), "val": str(split.val)}
        fingerprints |= {f"{name}/{part}": value for part, value in result.data.items()}
        rows.append((name, str(per_set[name]["classes"]), percent(metrics["val"]["top1"]), percent(metrics["val"]["top5"]),
                     f"{metrics['chosen_lr']:.3g}"))
    mean = float(np.mean([m["top1"] for m in per_set.values()]))
    rows.append((f"mean of {len(per_set)}", "", percent(mean), "", ""))
    return TaskResult("transfer", model.describe(), fingerprints,
                      {**dataclasses.asdict(settings), "features": settings.features_pooling().describe(),
                       "selection": "per set: the LR with the best top-1 on a stratified held-out part of its train; "
                       "the probe is then retrained on all of its train and scored on its val"},
                      {"sets": per_set, "mean": {"top1": mean}}, ("set", "classes", "top-1 %", "top-5 %", "chosen LR"), rows)


def retrieval_task(model: EvalModel, data: EvalData, settings: RetrievalSettings, extraction: Extraction) -> TaskResult:
    """Revisited Oxford/Paris protocol: Medium and Hard mAP and mP@1,5,10 from cosine ranking of CLS descriptors."""
    data.require("retrieval")
    gnd = retrieval.load_ground_truth(data.retrieval.root, data.retrieval.dataset)
    teacher = model.teacher
    if getattr(teacher.model, "dynamic_img_size", True) is False:
        raise ValueError(f"{model.spec}: retrieval needs the model loaded with any_size=True (timm dynamic_img_size)")
    max_side = settings.max_side or max(teacher.preprocessing.input_size)
    transform = KeepAspect(max_side, patch_size(teacher), MULTI_SCALES if settings.multiscale else (1.0,))
    database = FileSource([ImageFile(path, name) for path, name in zip(gnd.database_paths, gnd.imlist)],
                          f"{gnd.name}_database")
    boxes = gnd.query_boxes if settings.crop_queries else [None] * len(gnd.qimlist)
    queries = FileSource([ImageFile(path, name, box=box) for path, name, box in zip(gnd.query_paths, gnd.qimlist, boxes)],
                         f"{gnd.name}_queries{'_cropped' if settings.crop_queries else ''}")
    database_features = extract_features(teacher, database, extraction, transform)
    query_features = extract_features(teacher, queries, extraction, transform)
    ranks = retrieval.rank_database(query_features.features, database_features.features)
    metrics = {**retrieval.revisited_map(ranks, gnd.gnd), "queries_cropped": settings.crop_queries}
    cropped = "cropped to bbx" if settings.crop_queries else "full image (not cropped)"
    rows = [(protocol, percent(metrics[protocol]["map"]), *(percent(p) for p in metrics[protocol]["mp"]), cropped)
            for protocol in ("medium", "hard")]
    return TaskResult("retrieval", model.describe(),
                      {"database": database_features.fingerprint["data"], "queries": query_features.fingerprint["data"]},
                      {**dataclasses.asdict(settings), "dataset": gnd.name, "max_side": max_side,
                       "transform": transform.describe(), "kappas": list(retrieval.KAPPAS)},
                      metrics, ("protocol", "mAP %", "mP@1 %", "mP@5 %", "mP@10 %", "queries"), rows)


def ood_task(model: EvalModel, data: EvalData, settings: OodSettings, extraction: Extraction) -> TaskResult:
    """KNN OOD score (Sun et al. 2022) against ID train; per OOD set and per group, AUROC, AUPR and both FPR@95."""
    data.require("ood")

    def features_of(path: Path) -> Features:
        return extract_features(model.teacher, open_images(path), extraction)

    id_train, id_test = features_of(data.train), features_of(data.val)

    def scores(features: Features) -> np.ndarray:
        return ood.knn_ood_scores(id_train.features, features.features, settings.k, settings.train_fraction, settings.seed)

    id_scores = scores(id_test)
    per_set, fingerprints = {}, {"id_train": id_train.fingerprint["data"], "id_test": id_test.fingerprint["data"]}
    for name, path in data.ood.items():
        features = features_of(path)
        per_set[name], fingerprints[name] = ood.ood_metrics(id_scores, scores(features)), features.fingerprint["data"]
    groups = ood.group_means(per_set, data.ood_groups)
    metric_names = ("auroc", "aupr_in", "aupr_out", "fpr95_id_tpr", "fpr95_ood_tpr")
    rows = [(name, *(percent(values[m]) for m in metric_names)) for name, values in per_set.items()]
    rows += [(f"{group} (mean of {', '.join(data.ood_groups[group])})", *(percent(values[m]) for m in metric_names))
             for group, values in groups.items()]
    return TaskResult("ood", model.describe(), fingerprints,
                      {**dataclasses.asdict(settings), "groups": data.ood_groups,
                       "score": "-(Euclidean distance to the k-th nearest L2-normalised ID-train feature)"},
                      {"sets": per_set, "groups": groups},
                      ("set", "AUROC %", "AUPR-In %", "AUPR-Out %", "FPR@95 ID-TPR %", "FPR@95 OOD-TPR %"), rows)


def davis_suite_task(model: EvalModel, data: EvalData, settings: DavisSettings, extraction: Extraction) -> TaskResult:
    """Label propagation on the DAVIS set (its frames are read per sequence; no feature cache)."""
    return davis_result(model.teacher, model.name, model.spec, data.davis, settings)


def segmentation_suite_task(model: EvalModel, data: EvalData, settings: SegmentationSettings,
                            extraction: Extraction) -> TaskResult:
    """The linear segmentation probe (it augments every crop, so no feature cache)."""
    return segmentation_result(model.teacher, model.name, model.spec, data.segmentation, settings)


SINGLE_MODEL_TASKS = {"knn": knn_task, "linear": linear_task, "retrieval": retrieval_task, "ood": ood_task,
                      "davis": davis_suite_task, "segmentation": segmentation_suite_task,
                      "robustness": robustness_task, "clustering": clustering_task, "transfer": transfer_task}
ANY_SIZE_TASKS = ("retrieval", "davis", "segmentation")  # their images keep their own shape: ViTs need dynamic_img_size
TASKS = (*SINGLE_MODEL_TASKS, "cka")


def cka_features(model: EvalModel, path: Path, extraction: Extraction) -> Features:
    """What CKA compares: raw (not normalised) post-norm CLS of every image, one row per image."""
    return extract_features(model.teacher, open_images(path), extraction, normalized=False)


def cka_task(features: dict[str, Features], models: dict[str, dict[str, Any]], settings: CkaSettings) -> TaskResult:
    """Linear and debiased CKA between every pair of models on the same images, and the pairs ranked by their
    distance to the target CKA. Rows are matched by sample key."""
    names = list(features)
    if len(names) < 2:
        raise DistilleryError(f"CKA compares at least two models; got {len(names)}")
    reference = features[names[0]]
    for name in names[1:]:
        if features[name].keys != reference.keys:
            raise DistilleryError(f"CKA: the features of {name} and {names[0]} are not of the same images "
                                  "(sample keys differ); extract both on one data set")
    arrays = {name: f.features for name, f in features.items()}
    _, linear = cka.cka_matrix(arrays)
    _, debiased = cka.cka_matrix(arrays, debiased=True)
    pairs = cka.rank_teacher_pairs(names, linear, settings.target, settings.tolerance)
    index = {name: i for i, name in enumerate(names)}
    for pair in pairs:
        pair["debiased_cka"] = float(debiased[index[pair["pair"][0]], index[pair["pair"][1]]])
    rows = [(name, *(f"{v:.3f}" for v in linear[i])) for i, name in enumerate(names)]
    rows += [(f"{name} (debiased)", *(f"{v:.3f}" for v in debiased[i])) for i, name in enumerate(names)]
    return TaskResult("cka", models, {"images": reference.fingerprint["data"]},
                      {**dataclasses.asdict(settings), "features": "raw post-norm CLS, one row per image"},
                      {"names": names, "linear": linear, "debiased": debiased, "pairs": pairs},
                      ("linear CKA", *names), rows)


def pairs_table(result: TaskResult) -> TaskResult:
    """The CKA result shown as teacher pairs, closest to the target first."""
    target = result.settings["target"]
    rows = [(*pair["pair"], f"{pair['cka']:.3f}", f"{pair['debiased_cka']:.3f}", "yes" if pair["near_target"] else "")
            for pair in result.metrics["pairs"]]
    return dataclasses.replace(result, columns=("teacher", "teacher", "CKA", "debiased CKA", f"near {target:g}"), rows=rows)
