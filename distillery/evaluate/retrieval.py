"""Image retrieval on the revisited Oxford and Paris sets (Radenović et al. 2018, "Revisiting Oxford and
Paris"; the revisitop code, `python/evaluate.py` and `python/dataset.py`).

What is exact about it:
- `gnd_<name>.pkl` holds `imlist` (database names), `qimlist` (query names) and `gnd`, one dict per query
  with `easy`, `hard`, `junk` (0-based indices into `imlist`) and `bbx` (the query box, x1 y1 x2 y2).
  Images are `jpg/<name>.jpg` beside it. The file is read by an unpickler that builds only plain
  containers, numbers, strings and numpy arrays, because a pickle can otherwise run any code it names.
- Medium: positives easy + hard, junk ignored. Hard: positives hard, easy + junk ignored.
- AP and mP@k are revisitop's `compute_ap` / `compute_map`, written with numpy: junk is removed from each
  ranking, AP is its trapezoid rule (not sklearn's average precision: one positive at 0-based rank 1
  scores 0.25, not 0.5), and P@k divides by min(k, the 1-based position of the last positive found).
  A query with no positives is left out of both means.
- `ranks` is revisitop's layout: [n_database, n_queries], each column best first.
- The protocol crops every query to its `bbx` before any processing (`example_process_images.py`);
  `crop_box` is that crop. DINO's retrieval script does not crop, so callers must say which they did.

Results are fractions; the papers print 100 x these, rounded to 2 decimals.
"""

from __future__ import annotations

import codecs
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from distillery.errors import DistilleryError
from distillery.evaluate.knn import l2_normalize

DATASETS = {"roxford": "roxford5k", "roxford5k": "roxford5k", "rparis": "rparis6k", "rparis6k": "rparis6k",
            "synth": "synth"}
KAPPAS = (1, 5, 10)
# protocol -> (groups that are positives, groups that are ignored as junk); revisitop's example_evaluate.py
PROTOCOLS = {"medium": (("easy", "hard"), ("junk",)), "hard": (("hard",), ("easy", "junk"))}
GROUND_TRUTH_KEYS = ("easy", "hard", "junk", "bbx")


# ---------------------------------------------------------------- reading gnd_<name>.pkl without running code

def _allowed_globals() -> dict[tuple[str, str], Any]:
    """What a pickle of containers, numbers, strings and numpy arrays asks for, under every module name that
    numpy 1.x and 2.x pickles use (numpy 2 moved numpy.core to numpy._core)."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5 arrays
    for builtins in ("builtins", "__builtin__"):  # protocols 0-2 spell it the Python 2 way
        for kind in (set, frozenset, slice, complex, bytes, bytearray):
            allowed[(builtins, kind.__name__)] = kind
    # Protocols 0-2 store bytes (numpy's array buffers among them) as _codecs.encode(text, "latin1").
    allowed[("_codecs", "encode")] = codecs.encode
    return allowed


class _DataOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, path: Path):
        super().__init__(file)
        self.path = path
        self.allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        # Every callable a pickle can invoke comes through here, so refusing here means nothing else runs.
        found = self.allowed.get((module, name))
        if found is None:
            raise DistilleryError(f"{self.path}: refused to load, the pickle asks for {module}.{name}; a ground-truth "
                                  "file may hold only lists, dicts, numbers, strings and numpy arrays")
        return found


def load_data_pickle(path: str | Path) -> Any:
    """Unpickle `path`, refusing (with a DistilleryError) any pickle that names something other than plain
    containers, numbers, strings and numpy arrays."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            return _DataOnlyUnpickler(f, path).load()
        except DistilleryError:
            raise
        except Exception as e:  # truncated or corrupt: pickle raises many types, all meaning "unreadable"
            raise DistilleryError(f"{path}: not a readable ground-truth pickle ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------- the dataset

@dataclass(frozen=True)
class RetrievalSet:
    """A revisitop-format retrieval set. `gnd[q]` holds int64 arrays `easy`, `hard`, `junk` and the tuple `bbx`."""

    name: str
    root: Path
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict[str, Any]]

    @property
    def database_paths(self) -> list[Path]:
        return [self.root / "jpg" / f"{name}.jpg" for name in self.imlist]

    @property
    def query_paths(self) -> list[Path]:
        return [self.root / "jpg" / f"{name}.jpg" for name in self.qimlist]

    @property
    def query_boxes(self) -> list[tuple[float, float, float, float]]:
        return [entry["bbx"] for entry in self.gnd]


def dataset_name(dataset: str) -> str:
    """The canonical name (`roxford5k`, `rparis6k`, `synth`) for a dataset name or its short form."""
    if dataset not in DATASETS:
        raise DistilleryError(f"unknown retrieval dataset {dataset!r}; known: {', '.join(DATASETS)}")
    return DATASETS[dataset]


def _find_ground_truth(data_root: Path, name: str) -> Path:
    # DATA_ROOT/gnd_<name>.pkl, or revisitop's own data/datasets/<name>/gnd_<name>.pkl tree
    candidates = [data_root / f"gnd_{name}.pkl", data_root / name / f"gnd_{name}.pkl"]
    for path in candidates:
        if path.is_file():
            return path
    raise DistilleryError(f"{candidates[0]}: no such file (nor {candidates[1]}); "
                          f"the {name} ground truth is gnd_{name}.pkl beside its jpg/ folder")


def _query_entry(path: Path, q: int, query: str, raw: Any, n_database: int) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise DistilleryError(f"{path}: gnd[{q}] ({query}) is a {type(raw).__name__}, not a dict")
    missing = [key for key in GROUND_TRUTH_KEYS if key not in raw]
    if missing:
        raise DistilleryError(f"{path}: gnd[{q}] ({query}) has no {', '.join(missing)}")
    entry: dict[str, Any] = {}
    for group in ("easy", "hard", "junk"):
        indices = np.asarray(raw[group]).reshape(-1)
        if indices.size and not np.issubdtype(indices.dtype, np.integer):
            raise DistilleryError(f"{path}: gnd[{q}] ({query}) {group} holds {indices.dtype} values, not indices")
        indices = indices.astype(np.int64)
        bad = indices[(indices < 0) | (indices >= n_database)]
        if bad.size:
            raise DistilleryError(f"{path}: gnd[{q}] ({query}) {group} lists index {bad[0]}, "
                                  f"but imlist has {n_database} images")
        entry[group] = indices
    box = np.asarray(raw["bbx"], dtype=np.float64).reshape(-1)
    if box.size != 4:
        raise DistilleryError(f"{path}: gnd[{q}] ({query}) bbx has {box.size} values, expected x1 y1 x2 y2")
    entry["bbx"] = tuple(float(v) for v in box)
    return entry


def _parse_ground_truth(path: Path, name: str, raw: Any) -> RetrievalSet:
    if not isinstance(raw, dict):
        raise DistilleryError(f"{path}: holds a {type(raw).__name__}, expected a dict with imlist, qimlist and gnd")
    missing = [key for key in ("imlist", "qimlist", "gnd") if key not in raw]
    if missing:
        raise DistilleryError(f"{path}: no {', '.join(missing)} key (expected imlist, qimlist and gnd)")
    imlist, qimlist = [str(n) for n in raw["imlist"]], [str(n) for n in raw["qimlist"]]
    if len(raw["gnd"]) != len(qimlist):
        raise DistilleryError(f"{path}: gnd has {len(raw['gnd'])} entries for {len(qimlist)} queries in qimlist")
    gnd = [_query_entry(path, q, query, entry, len(imlist))
           for q, (query, entry) in enumerate(zip(qimlist, raw["gnd"]))]
    return RetrievalSet(name, path.parent, imlist, qimlist, gnd)


def _check_images(dataset: RetrievalSet) -> None:
    paths = dataset.database_paths + dataset.query_paths
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DistilleryError(f"{dataset.root / 'jpg'}: {len(missing)} of {len(paths)} images are missing, "
                              f"the first is {missing[0].name}")


def load_ground_truth(data_root: str | Path, dataset: str) -> RetrievalSet:
    """Read and check `gnd_<name>.pkl` under `data_root` (or `data_root/<name>/`) and that every image exists."""
    name = dataset_name(dataset)
    path = _find_ground_truth(Path(data_root), name)
    retrieval_set = _parse_ground_truth(path, name, load_data_pickle(path))
    _check_images(retrieval_set)
    return retrieval_set


def crop_box(image: Image.Image, bbx) -> Image.Image:
    """The protocol's query crop: `bbx` = (x1, y1, x2, y2), rounded as PIL's crop rounds it, clipped to the
    image and kept at least 1 px wide and high."""
    width, height = image.size
    x1, y1, x2, y2 = (round(float(v)) for v in bbx)
    x1, y1 = min(max(x1, 0), width - 1), min(max(y1, 0), height - 1)
    x2, y2 = min(max(x2, x1 + 1), width), min(max(y2, y1 + 1), height)
    return image.crop((x1, y1, x2, y2))


# ---------------------------------------------------------------- ranking and scoring

def rank_database(query_features, database_features) -> np.ndarray:
    """ranks [n_database, n_queries]: database indices by descending cosine similarity, ties in index order."""
    similarity = l2_normalize(database_features) @ l2_normalize(query_features).T
    return np.argsort(-similarity, axis=0, kind="stable")


def _positive_positions(column: np.ndarray, positives: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based positions of the positives in the ranking once the junk entries are taken out of it."""
    positions = np.flatnonzero(np.isin(column, positives))
    junk_positions = np.flatnonzero(np.isin(column, junk))
    return positions - np.searchsorted(junk_positions, positions)


def revisitop_ap(positions: np.ndarray, n_positives: int) -> float:
    """revisitop's compute_ap: the trapezoid between precision j/r and (j+1)/(r+1) for the j-th positive
    found at 0-based position r (j/r taken as 1 at r = 0), each step worth 1/n_positives of recall.
    Hand-written because sklearn's average precision is the rectangle rule and scores differently."""
    found = np.arange(len(positions))
    before = np.divide(found, positions, out=np.ones(len(positions)), where=positions > 0)
    after = (found + 1) / (positions + 1)
    return float(np.sum((before + after) / 2) / n_positives)


def revisitop_precisions(positions: np.ndarray, kappas) -> list[float]:
    """revisitop's P@k: k is first cut to the 1-based position of the last positive found, so a query
    whose positives all come early is not penalised for having fewer than k of them."""
    if positions.size == 0:  # nothing found (a truncated ranking); revisitop's max() would raise here
        return [0.0] * len(kappas)
    one_based = positions + 1
    cuts = [min(int(one_based.max()), k) for k in kappas]
    return [float(np.count_nonzero(one_based <= cut) / cut) for cut in cuts]


def _groups(entry: dict[str, Any], groups: tuple[str, ...]) -> np.ndarray:
    return np.concatenate([np.asarray(entry[g], dtype=np.int64).reshape(-1) for g in groups])


def _protocol_scores(ranks: np.ndarray, gnd, positive_groups, junk_groups, kappas) -> dict[str, Any]:
    aps: list[float | None] = []
    precisions = []
    for q, entry in enumerate(gnd):
        positives = _groups(entry, positive_groups)
        if positives.size == 0:
            aps.append(None)
            continue
        positions = _positive_positions(ranks[:, q], positives, _groups(entry, junk_groups))
        aps.append(revisitop_ap(positions, positives.size))
        precisions.append(revisitop_precisions(positions, kappas))
    scored = [ap for ap in aps if ap is not None]
    if not scored:  # e.g. Hard on a set without hard positives: undefined, as in revisitop (0/0)
        return {"map": float("nan"), "mp": [float("nan")] * len(kappas), "aps": aps}
    return {"map": float(np.mean(scored)), "mp": np.mean(precisions, axis=0).tolist(), "aps": aps}


def revisited_map(ranks, gnd, kappas=KAPPAS) -> dict[str, dict[str, Any]]:
    """Medium and Hard mAP and mP@kappas (fractions) for `ranks` [n_database, n_queries], plus per-query APs
    under "aps" (None for a query without positives, which is left out of the means)."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[1] != len(gnd):
        raise DistilleryError(f"ranks of shape {ranks.shape} do not match {len(gnd)} queries; "
                              "expected [n_database, n_queries]")
    return {protocol: _protocol_scores(ranks, gnd, positives, junk, tuple(kappas))
            for protocol, (positives, junk) in PROTOCOLS.items()}
