"""Model-free baselines, scored by the same protocols as every model: what a set gives away without learning.

- raw pixels: each image resized to `size` x `size`, flattened and L2-normalised, classified by the weighted
  kNN of `knn` (DINO's protocol). A model below it has learned less than the pixels already hold.
- colour histogram: a joint RGB histogram (`bins` levels per channel) of the image at 32 x 32, square-rooted
  and L2-normalised (Hellinger), ranked by cosine under the revisitop protocol, with queries cropped to
  their bbx as `eval retrieval` crops them. A model below it is beaten by colour alone.

Each writes a result file like a model's (OUT/raw_pixels/knn.json, OUT/colour_histogram/retrieval.json), so
reports read them through the same paths.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from distillery.data.shards import CLASS_LABEL, ShardSet, decode_image
from distillery.errors import DistilleryError
from distillery.evaluate.features import Features
from distillery.evaluate.results import RESULTS_DIR, TaskResult, default_path, labelled_task, percent, save_result
from distillery.evaluate.retrieval import crop_box, load_ground_truth, rank_database, revisited_map
from distillery.evaluate.tasks import EvalData, KnnSettings, RetrievalData, factor_labels, score_knn

RAW_PIXELS = "raw_pixels"
COLOUR_HISTOGRAM = "colour_histogram"


def pixel_features(path, size: int = 32) -> tuple[tuple[str, ...] | None, Features]:
    """Every image of a shard set as flattened RGB pixels at `size` x `size`, with its class labels."""
    shard_set = ShardSet.open(path)
    rows, labels, keys = [], [], []
    for shard in range(len(shard_set)):
        for record in shard_set.records(shard):
            image = decode_image(record.image_bytes, f"{record.shard}:{record.key}")
            if image.size != (size, size):
                image = image.resize((size, size), Image.BICUBIC)
            rows.append(np.asarray(image, np.float32).ravel())
            labels.append(-1 if record.label is None else record.label)
            keys.append(record.key)
    labelled = np.asarray(labels, np.int64)
    fingerprint = {"model": {"baseline": f"raw RGB pixels at {size}x{size}"}, "data": shard_set.fingerprint()}
    return shard_set.classes, Features(np.stack(rows), labelled if (labelled >= 0).all() else None, keys, fingerprint)


def raw_pixel_knn(data: EvalData, settings: KnnSettings = KnnSettings(), size: int = 32) -> TaskResult:
    """The weighted kNN of L2-normalised raw pixels, on the class or a factor (`settings.label`)."""
    data.require("knn")
    (train_classes, train), (val_classes, val) = (pixel_features(p, size) for p in (data.train, data.val))
    if settings.label != CLASS_LABEL:
        (train_classes, train), (val_classes, val) = (factor_labels(p, settings.label, f)
                                                      for p, f in ((data.train, train), (data.val, val)))
    if train.labels is None or val.labels is None:
        raise DistilleryError(f"{data.train} / {data.val}: raw-pixel kNN needs labelled images")
    metrics, rows = score_knn(data, settings, (train_classes, train), (val_classes, val))
    return TaskResult(labelled_task("knn", settings.label), {RAW_PIXELS: {"spec": f"raw-pixels@{size}", "fingerprint": train.fingerprint["model"]}},
                      {"train": train.fingerprint["data"], "val": val.fingerprint["data"]},
                      {**dataclasses.asdict(settings), "features": f"L2-normalised raw RGB pixels at {size}x{size}"},
                      metrics, ("k", "top-1 %", "top-5 %"), rows)


def colour_histogram(image: Image.Image, bins: int = 4) -> np.ndarray:
    """The Hellinger-normalised joint RGB histogram of `image` at 32 x 32 (`bins`^3 cells)."""
    levels = np.asarray(image.convert("RGB").resize((32, 32), Image.BILINEAR), np.int64) * bins // 256
    cells = (levels[..., 0] * bins + levels[..., 1]) * bins + levels[..., 2]
    counts = np.bincount(cells.ravel(), minlength=bins ** 3).astype(np.float64)
    descriptor = np.sqrt(counts / counts.sum())
    return descriptor / np.linalg.norm(descriptor)


def colour_histogram_retrieval(data: RetrievalData, bins: int = 4) -> TaskResult:
    """Revisitop Medium/Hard mAP and mP@k of the colour-histogram descriptor, queries cropped to their bbx."""
    gnd = load_ground_truth(data.root, data.dataset)

    def describe(path, box=None) -> np.ndarray:
        with Image.open(path) as image:
            return colour_histogram(crop_box(image, box) if box is not None else image, bins)

    database = np.stack([describe(path) for path in gnd.database_paths])
    queries = np.stack([describe(path, box) for path, box in zip(gnd.query_paths, gnd.query_boxes)])
    metrics = {**revisited_map(rank_database(queries, database), gnd.gnd), "queries_cropped": True}
    rows = [(protocol, percent(metrics[protocol]["map"]), *(percent(p) for p in metrics[protocol]["mp"]), "cropped to bbx")
            for protocol in ("medium", "hard")]
    descriptor = f"RGB histogram, {bins}^3 bins, Hellinger, at 32x32"
    return TaskResult("retrieval", {COLOUR_HISTOGRAM: {"spec": f"colour-histogram@{bins}", "fingerprint": {"baseline": descriptor}}},
                      {"dataset": gnd.name}, {"crop_queries": True, "dataset": gnd.name, "descriptor": descriptor},
                      metrics, ("protocol", "mAP %", "mP@1 %", "mP@5 %", "mP@10 %", "queries"), rows)


def run_baselines(data: EvalData, labels: tuple[str, ...] = (CLASS_LABEL,), out: Path = RESULTS_DIR,
                  settings: KnnSettings = KnnSettings(), bins: int = 4, size: int = 32) -> list[tuple[TaskResult, Path]]:
    """Raw-pixel kNN on each label (when train and val are given) and colour-histogram retrieval (when a
    retrieval set is), written to OUT/raw_pixels/knn[-label].json and OUT/colour_histogram/retrieval.json."""
    results = []
    if data.train and data.val:
        for label in labels:
            result = raw_pixel_knn(data, dataclasses.replace(settings, label=label), size)
            results.append((result, save_result(result, default_path(RAW_PIXELS, result.task, out))))
    if data.retrieval:
        result = colour_histogram_retrieval(data.retrieval, bins)
        results.append((result, save_result(result, default_path(COLOUR_HISTOGRAM, result.task, out))))
    if not results:
        raise DistilleryError("eval baselines: give --train and --val, or a retrieval set, to score")
    return results
