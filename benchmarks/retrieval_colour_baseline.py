"""How much of a retrieval set a colour histogram solves: the revisitop score of a model-free descriptor.

    python benchmarks/retrieval_colour_baseline.py --dataset synth --data-root work/demo/synth/retrieval

The descriptor (distillery.evaluate.baselines.colour_histogram) is a joint RGB histogram (`--bins` levels per
channel) of the image at 32 x 32, square-rooted and L2-normalised (Hellinger), with queries cropped to their
bbx as in `distillery eval retrieval`. A learned model that scores below it on a set is being beaten by
colour alone. The embedded synth set changes each view's colour balance, so colour finds few of its
landmarks; `distillery eval baselines` writes the same score as a result file (the demo's report row).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import distillery  # noqa: F401

from distillery.evaluate.baselines import colour_histogram_retrieval
from distillery.evaluate.tasks import RetrievalData


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="synth")
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--bins", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    metrics = colour_histogram_retrieval(RetrievalData(args.dataset, args.data_root), args.bins).metrics
    result = {"dataset": args.dataset, "data_root": str(args.data_root), "descriptor": f"RGB histogram, {args.bins}^3 bins, "
              "Hellinger, queries cropped to bbx", **{level: {"map": round(100 * metrics[level]["map"], 2),
                                                            "mp@1,5,10": [round(100 * p, 2) for p in metrics[level]["mp"]]}
                                                    for level in ("medium", "hard")}}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
