"""The report reads every number from the evaluation JSON files and refuses to leave a cell blank."""

import json

import numpy as np
import pytest
import yaml

from distillery.errors import DistilleryError
from distillery.apps.report import COLUMNS, comparison_rows, markdown_table, write_report
from distillery.evaluate.results import read_metric

TEACHERS, STUDENTS = ["sup", "dino"], ["unic"]


def _metrics(base: float) -> dict:
    return {"knn": {"k=20": {"top1": base}},
            "linear": {"val": {"top1": base + 0.01}},
            "retrieval": {"medium": {"map": base / 2}, "hard": {"map": base / 4}},
            "ood": {"groups": {g: {"auroc": base + d, "fpr95_id_tpr": 1 - base - d} for g, d in (("near", 0.0), ("far", 0.1))}}}


def _write_results(eval_dir, scores: dict[str, float]) -> None:
    for model, base in scores.items():
        (eval_dir / model).mkdir(parents=True)
        for task, metrics in _metrics(base).items():
            (eval_dir / model / f"{task}.json").write_text(json.dumps({"task": task, "metrics": metrics}))
    names = list(scores)
    matrix = np.eye(len(names)) * 0.5 + 0.5
    (eval_dir / "cka.json").write_text(json.dumps({"task": "cka", "metrics": {
        "names": names, "linear": matrix.tolist(), "debiased": (matrix - 0.1).tolist()}}))


def test_rows_come_from_the_result_files_with_the_best_teacher_per_column(tmp_path):
    _write_results(tmp_path, {"sup": 0.6, "dino": 0.5, "unic": 0.7})
    rows = comparison_rows(tmp_path, TEACHERS, STUDENTS)
    assert [r["model"] for r in rows] == ["sup", "dino", "best teacher", "unic"]
    knn = [c.title for c in COLUMNS].index("kNN top-1 (k=20)")
    fpr = [c.title for c in COLUMNS].index("OOD near FPR@95")
    assert rows[2]["values"][knn] == pytest.approx(60.0)  # higher is better: sup's
    assert rows[2]["values"][fpr] == pytest.approx(40.0)  # lower is better: sup's 1 - 0.6
    assert rows[3]["values"][knn] == pytest.approx(70.0)
    table = markdown_table(rows)
    assert "| **best teacher** | 60.0 |" in table and table.count("\n") == len(rows) + 1


def test_a_missing_result_file_or_key_stops_the_report_and_names_it(tmp_path):
    _write_results(tmp_path, {"sup": 0.6, "dino": 0.5, "unic": 0.7})
    (tmp_path / "dino" / "retrieval.json").unlink()
    with pytest.raises(DistilleryError, match=r"dino/retrieval\.json: result file missing"):
        comparison_rows(tmp_path, TEACHERS, STUDENTS)
    (tmp_path / "unic" / "knn.json").write_text(json.dumps({"metrics": {"k=10": {"top1": 0.1}}}))
    with pytest.raises(DistilleryError, match=r"unic/knn\.json: no metrics/k=20 \(found: k=10\)"):
        read_metric(tmp_path, "unic", COLUMNS[0].where)
    (tmp_path / "unic" / "knn.json").write_text(json.dumps({"metrics": {"k=20": {"top1": None}}}))
    with pytest.raises(DistilleryError, match="is None, not a number"):
        read_metric(tmp_path, "unic", COLUMNS[0].where)


def test_the_report_holds_every_cell_and_figure(tmp_path):
    eval_dir = tmp_path / "eval"
    _write_results(eval_dir, {"sup": 0.6, "dino": 0.5, "unic": 0.7})
    runs = {}
    for name in (*TEACHERS, *STUDENTS):
        runs[name] = tmp_path / "runs" / name
        runs[name].mkdir(parents=True)
        runs[name].joinpath("metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)))
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"models": {}, "out": str(eval_dir)}))
    report = write_report(suite, TEACHERS, STUDENTS, runs, tmp_path / "report")
    text = report.read_text()
    assert "| sup – dino | 0.500 | 0.400 |" in text
    assert "nan" not in text.lower() and "| |" not in text
    for figure in ("losses.png", "metrics.png", "cka.png"):
        assert (tmp_path / "report" / figure).stat().st_size > 1000 and f"({figure})" in text
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert len(saved["rows"]) == 4 and all(len(r["values"]) == len(COLUMNS) for r in saved["rows"])
