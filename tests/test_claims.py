"""The claims table: every verdict is a function of the result files, and follows from the numbers it shows."""

import json

import numpy as np
import pytest

from distillery.errors import DistilleryError
from distillery.evaluate.claims import Roles, all_claims, claims_markdown
from distillery.evaluate.results import knn_top1, ood_metric

TEACHERS = {"shape_t": "shape", "pattern_t": "pattern"}
STUDENTS = {"unic": ("unic", ("shape_t", "pattern_t")), "sefa": ("sefa", ("shape_t", "pattern_t")),
            "unic_shape": ("unic", ("shape_t",)), "tintem_shape": ("tintem", ("shape_t",)),
            "proteus_shape": ("proteus", ("shape_t",))}
TASKS = (knn_top1(20, "shape"), knn_top1(20, "pattern"), ood_metric("near", "auroc", True))
ROLES = Roles(TEACHERS, STUDENTS, TASKS, alone="alone")
VAL = {"keys_sha256": "same images"}


def _write(eval_dir, model, task, metrics, data=None):
    (eval_dir / model).mkdir(parents=True, exist_ok=True)
    (eval_dir / model / f"{task}.json").write_text(json.dumps({"task": task, "metrics": metrics, "data": data or {}}))


def _world(eval_dir, rng, scores=None):
    """Result files for every model of ROLES: kNN per label (with predictions), OOD, CKA, the teacher head."""
    truth = rng.integers(0, 10, 200)
    models = [*TEACHERS, *STUDENTS, "alone"]
    scores = scores or {m: {"shape": rng.uniform(0.3, 0.95), "pattern": rng.uniform(0.3, 0.95),
                            "near": rng.uniform(0.5, 0.9), "far": rng.uniform(0.5, 0.99)} for m in models}
    for model in models:
        for label in ("shape", "pattern"):
            flips = rng.random(200) > scores[model][label]
            predictions = np.where(flips, (truth + 1) % 10, truth).tolist()
            _write(eval_dir, model, f"knn-{label}", {"k=20": {"top1": scores[model][label]},
                                                     "predictions": {"k=20": predictions}}, {"val": VAL})
        _write(eval_dir, model, "ood", {"groups": {g: {"auroc": scores[model][g]} for g in ("near", "far")}})
    _write(eval_dir, "tintem_shape", "teacher_head_knn-shape", {"k=20": {"top1": rng.uniform(0.5, 0.95)}})
    a = rng.normal(size=(len(models), len(models)))
    matrix = np.clip(np.abs(np.corrcoef(a)), 0, 1)
    (eval_dir / "cka.json").write_text(json.dumps({"metrics": {"names": models, "linear": matrix.tolist()}}))
    return scores


# Each rule, re-derived from the numbers alone (in the order the claim lists them).
RULES = {
    "kNN ≥ 80%": lambda n: n[0] >= 0.8,
    "0.3 ≤ linear CKA ≤ 0.7": lambda n: 0.3 <= n[0] <= 0.7,
    "student ≥ 0.8 × teacher": lambda n: n[0] >= 0.8 * n[1],
    "student ≥ best teacher": lambda n: n[0] >= n[1],
    "SeFA ≥ UNIC": lambda n: n[0] >= n[1],
    "TinTeM > UNIC": lambda n: n[0] > n[1],
    "TinTeM < UNIC": lambda n: n[0] < n[1],
    "TinTeM > Proteus": lambda n: n[0] > n[1],
    "TinTeM < Proteus": lambda n: n[0] < n[1],
    "head ≥ teacher − 1 pt": lambda n: n[0] >= n[1] - 0.01,
    "distilled ≥ alone": lambda n: n[0] >= n[1],
}


@pytest.mark.parametrize("seed", range(6))
def test_every_verdict_follows_from_the_numbers_it_shows(tmp_path, seed):
    _world(tmp_path, np.random.default_rng(seed))
    sections = all_claims(tmp_path, ROLES)
    claims = [c for section in sections.values() for c in section]
    assert {c.rule for c in claims} == set(RULES)
    for claim in claims:
        assert claim.holds == RULES[claim.rule](list(claim.numbers.values())), claim
        assert claim.verdict in claims_markdown([claim])


def test_claims_read_the_files_and_change_when_they_do(tmp_path):
    scores = _world(tmp_path, np.random.default_rng(0))
    for model, s in scores.items():
        s.update(shape=0.9 if model in ("sefa", "shape_t") else 0.5, pattern=0.9 if model == "sefa" else 0.5)
    _world(tmp_path, np.random.default_rng(0), scores)
    claims = all_claims(tmp_path, ROLES)["claims"]
    sefa_vs_unic = next(c for c in claims if c.rule == "SeFA ≥ UNIC")
    assert sefa_vs_unic.holds and sefa_vs_unic.numbers["sefa mean over tasks"] == pytest.approx(
        np.mean([0.9, 0.9, scores["sefa"]["near"]]))
    scores["unic"].update(shape=0.95, pattern=0.95, near=0.99)
    _world(tmp_path, np.random.default_rng(0), scores)
    assert not next(c for c in all_claims(tmp_path, ROLES)["claims"] if c.rule == "SeFA ≥ UNIC").holds


def test_agreement_counts_matching_predictions_and_refuses_other_val_sets(tmp_path):
    _world(tmp_path, np.random.default_rng(1))
    for model, predictions in (("tintem_shape", [1, 2, 3, 4]), ("unic_shape", [1, 0, 0, 0]), ("shape_t", [1, 2, 3, 0]),
                               ("proteus_shape", [1, 2, 0, 0])):
        _write(tmp_path, model, "knn-shape", {"k=20": {"top1": 0.9}, "predictions": {"k=20": predictions}}, {"val": VAL})
    agreements = [c for c in all_claims(tmp_path, ROLES)["claims"] if "agreement" in c.statement]
    unic = next(c for c in agreements if "UNIC" in c.statement)
    assert unic.numbers == {"tintem_shape": 0.75, "unic_shape": 0.5} and unic.holds
    proteus = next(c for c in agreements if "Proteus" in c.statement)
    assert proteus.numbers == {"tintem_shape": 0.75, "proteus_shape": 0.75} and not proteus.holds  # a tie is not more
    _write(tmp_path, "shape_t", "knn-shape", {"k=20": {"top1": 0.9}, "predictions": {"k=20": [1, 2, 3, 0]}},
           {"val": {"keys_sha256": "other images"}})
    with pytest.raises(DistilleryError, match="different val sets"):
        all_claims(tmp_path, ROLES)


def test_a_missing_result_stops_the_claims_and_names_the_file(tmp_path):
    _world(tmp_path, np.random.default_rng(2))
    (tmp_path / "tintem_shape" / "teacher_head_knn-shape.json").unlink()
    with pytest.raises(DistilleryError, match=r"tintem_shape/teacher_head_knn-shape\.json: result file missing"):
        all_claims(tmp_path, ROLES)
