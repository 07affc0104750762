"""How much of a retrieval set a colour histogram solves: the revisitop score of a model-free descriptor.

    python benchmarks/retrieval_colour_baseline.py --dataset synth --data-root work/demo/synth/retrieval

The descriptor is a joint RGB histogram (`--bins` levels per channel) of the image at 32 x 32, square-rooted
and L2-normalised (Hellinger), with queries cropped to their bbx as in `distillery eval retrieval`. A
learned model that scores below it on a set is being beaten by colour alone: on the embedded synth set the
landmarks and their easy views share colours that the distractors lack, so this floor is high there, and a
model trained to be colour-invariant (DINO's augmentations) can score below an untrained one
(BENCHMARKS.md, "DINO on synth"). Any public retrieval set in the revisitop layout works the same way.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import distillery  # noqa: F401
import numpy as np
from PIL import Image

from distillery.evaluate.retrieval import crop_box, load_ground_truth, revisited_map


def colour_histogram(image: Image.Image, bins: int) -> np.ndarray:
    levels = np.asarray(image.convert("RGB").resize((32, 32), Image.BILINEAR), np.int64) * bins // 256
    cells = (levels[..., 0] * bins + levels[..., 1]) * bins + levels[..., 2]
    counts = np.bincount(cells.ravel(), minlength=bins ** 3).astype(np.float64)
    descriptor = np.sqrt(counts / counts.sum())
    return descriptor / np.linalg.norm(descriptor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="synth")
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--bins", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    dataset = load_ground_truth(args.data_root, args.dataset)
    database = np.stack([colour_histogram(Image.open(path), args.bins) for path in dataset.database_paths])
    queries = np.stack([colour_histogram(crop_box(Image.open(path), box), args.bins)
                        for path, box in zip(dataset.query_paths, dataset.query_boxes)])
    ranks = np.argsort(-(database @ queries.T), axis=0, kind="stable")
    scores = revisited_map(ranks, dataset.gnd)
    result = {"dataset": args.dataset, "data_root": str(args.data_root), "descriptor": f"RGB histogram, {args.bins}^3 bins, "
              "Hellinger, queries cropped to bbx", **{level: {"map": round(100 * scores[level]["map"], 2),
                                                            "mp@1,5,10": [round(100 * p, 2) for p in scores[level]["mp"]]}
                                                    for level in ("medium", "hard")}}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
