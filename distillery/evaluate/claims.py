"""The papers' claims, tested on the result files of one evaluation: each a verdict computed from numbers.

A claim names its source, says what it asserts, lists the numbers it compares (read from the result files,
never typed) and holds or does not: the verdict is a function of those files, so a report cannot show a
verdict its numbers do not support. What is tested, at whatever scale the evaluation ran:

- inheritance: each distilled student reaches `INHERITANCE` x its teacher's kNN on that teacher's expertise;
- SeFA Table 2 / UNIC: a multi-teacher student is at least the best teacher (per task, the best of the
  teachers) on the mean over tasks;
- SeFA: with self-supervision (SeFA) the multi-teacher student beats UNIC's from the same teachers;
- TinTeM: from one teacher, TinTeM's student is more faithful than Proteus's (TinTeM's own comparison) and
  than UNIC's: kNN-prediction agreement with the teacher, linear CKA with it, and |ΔAUROC| of KNN OOD near
  and far;
- TinTeM Table 3: the teacher head's projection keeps the teacher's kNN (within `HEAD_TOLERANCE`), beside the
  student's;
- distillation against the same student trained alone on the labels of the same images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillery.errors import DistilleryError
from distillery.evaluate.knn import prediction_agreement
from distillery.evaluate.results import (MetricPath, default_path, knn_top1, ood_metric, read_metric, read_result,
                                        teacher_head_top1)

K = 20  # the kNN every claim reads (DINO's and the papers' headline k)
INHERITANCE = 0.8  # a student inherits a teacher's expertise when it reaches 0.8x the teacher's kNN on it
HEAD_TOLERANCE = 0.01  # TinTeM Table 3: the head keeps the teacher's kNN to within one point
STRONG_TEACHER = 0.8  # the embedded world's teachers: >= 80% kNN on their expertise
CKA_RANGE = (0.3, 0.7)  # ... and different: linear CKA between them in this range (SeFA: pairs near 0.5 distil best)


@dataclass(frozen=True)
class Roles:
    """Who is who in an evaluation: teachers with their expertise (a label), students with their method and
    teachers, the student trained alone, and the columns whose mean is the "mean over tasks"."""

    teachers: dict[str, str]  # teacher -> the label it is expert on (shape, pattern, ...)
    students: dict[str, tuple[str, tuple[str, ...]]]  # student -> (method, teachers it was distilled from)
    tasks: tuple[MetricPath, ...]  # higher-is-better numbers averaged into the mean over tasks
    alone: str | None = None  # the student architecture trained alone on the labels


@dataclass(frozen=True)
class Claim:
    source: str
    statement: str
    numbers: dict[str, float]  # name -> value
    rule: str  # how the verdict follows from the numbers
    holds: bool = False
    unit: str = "%"  # "%": fractions shown as percentages; "": shown as they are (CKA)

    @property
    def verdict(self) -> str:
        return "holds" if self.holds else "does not hold at this scale"


class Results:
    """Reads numbers from one evaluation's result files, naming the file when one is missing."""

    def __init__(self, eval_dir: Path):
        self.eval_dir = Path(eval_dir)

    def metric(self, model: str, where: MetricPath) -> float:
        return read_metric(self.eval_dir, model, where)

    def knn(self, model: str, label: str) -> float:
        return self.metric(model, knn_top1(K, label))

    def predictions(self, model: str, label: str) -> tuple[list[int], Any]:
        path = default_path(model, knn_top1(K, label).task, self.eval_dir)
        result = read_result(path)
        predictions = MetricPath(path.stem, ("predictions", f"k={K}")).lookup(result.get("metrics"), path)
        return predictions, (result.get("data") or {}).get("val")

    def agreement(self, student: str, teacher: str, label: str) -> float:
        (a, data_a), (b, data_b) = self.predictions(student, label), self.predictions(teacher, label)
        if data_a != data_b:
            raise DistilleryError(f"{self.eval_dir}: {student} and {teacher} were scored on different val sets")
        return prediction_agreement(a, b)

    def cka(self, a: str, b: str) -> float:
        path = self.eval_dir / "cka.json"
        metrics = read_result(path).get("metrics") or {}
        names = metrics.get("names") or []
        for name in (a, b):
            if name not in names:
                raise DistilleryError(f"{path}: holds no CKA for {name}; rerun the suite's cka task")
        return float(metrics["linear"][names.index(a)][names.index(b)])

    def auroc(self, model: str, group: str) -> float:
        return self.metric(model, ood_metric(group, "auroc", grouped=True))

    def mean_over_tasks(self, model: str, tasks: tuple[MetricPath, ...]) -> float:
        return sum(self.metric(model, t) for t in tasks) / len(tasks)

    def best_teacher_mean(self, teachers: list[str], tasks: tuple[MetricPath, ...]) -> float:
        return sum(max(self.metric(t, task) for t in teachers) for task in tasks) / len(tasks)


def _claim(source: str, statement: str, numbers: dict[str, float], rule: str,
           verdict: Callable[[dict[str, float]], bool], unit: str = "%") -> Claim:
    return Claim(source, statement, numbers, rule, bool(verdict(numbers)), unit)


def teacher_checks(results: Results, roles: Roles) -> list[Claim]:
    """The world's premise: every teacher is strong on its expertise, and each pair of teachers differs."""
    checks = [_claim("embedded world", f"{t} is strong on {label}", {f"{t} kNN {label}": results.knn(t, label)},
                     f"kNN ≥ {STRONG_TEACHER:.0%}", lambda n: _first(n) >= STRONG_TEACHER)
              for t, label in roles.teachers.items()]
    names = list(roles.teachers)
    low, high = CKA_RANGE
    checks += [_claim("embedded world", f"{a} and {b} differ", {f"CKA {a}–{b}": results.cka(a, b)},
                      f"{low} ≤ linear CKA ≤ {high}", lambda n: low <= _first(n) <= high, unit="")
               for i, a in enumerate(names) for b in names[i + 1:]]
    return checks


def inheritance(results: Results, roles: Roles) -> list[Claim]:
    """Per distilled student and teacher: the student's kNN on the teacher's expertise against the teacher's."""
    rows = []
    for student, (method, teachers) in roles.students.items():
        for teacher in teachers:
            label = roles.teachers[teacher]
            numbers = {f"{student} kNN {label}": results.knn(student, label),
                       f"{teacher} kNN {label}": results.knn(teacher, label)}
            rows.append(_claim(method, f"{student} inherits {teacher}'s {label} expertise", numbers,
                               f"student ≥ {INHERITANCE:g} × teacher", lambda n: _first(n) >= INHERITANCE * _second(n)))
    return rows


def paper_claims(results: Results, roles: Roles) -> list[Claim]:
    claims = []
    multi = {s: m for s, (m, ts) in roles.students.items() if len(ts) >= 2}
    for student, method in multi.items():
        teachers = list(roles.students[student][1])
        numbers = {f"{student} mean over tasks": results.mean_over_tasks(student, roles.tasks),
                   "best teacher mean over tasks": results.best_teacher_mean(teachers, roles.tasks)}
        claims.append(_claim("SeFA Table 2 / UNIC", f"the multi-teacher {method} student is at least the best teacher "
                             "on the mean over tasks", numbers, "student ≥ best teacher", lambda n: _first(n) >= _second(n)))
    sefa = [s for s, m in multi.items() if m == "sefa"]
    unic = [s for s, m in multi.items() if m == "unic"]
    for s in sefa:
        for u in (u for u in unic if set(roles.students[u][1]) == set(roles.students[s][1])):
            numbers = {f"{s} mean over tasks": results.mean_over_tasks(s, roles.tasks),
                       f"{u} mean over tasks": results.mean_over_tasks(u, roles.tasks)}
            claims.append(_claim("SeFA", "self-supervision improves multi-teacher distillation (SeFA beats UNIC)",
                                 numbers, "SeFA ≥ UNIC", lambda n: _first(n) >= _second(n)))
    claims += _fidelity_claims(results, roles)
    if roles.alone is not None and roles.students:
        label = next(iter(roles.teachers.values()))
        best_student = max(roles.students, key=lambda s: results.knn(s, label))
        numbers = {f"{best_student} kNN {label}": results.knn(best_student, label),
                   f"{roles.alone} kNN {label}": results.knn(roles.alone, label)}
        claims.append(_claim("distillation", f"the best distilled student beats the same student trained alone on "
                             f"{label} labels", numbers, "distilled ≥ alone", lambda n: _first(n) >= _second(n)))
    return claims


FIDELITY_BASELINES = {"proteus": "Proteus", "unic": "UNIC"}  # what TinTeM's faithfulness is held against


def _fidelity_claims(results: Results, roles: Roles) -> list[Claim]:
    """TinTeM against Proteus and UNIC from the same single teacher, and TinTeM's Table 3."""
    single = {s: (m, ts[0]) for s, (m, ts) in roles.students.items() if len(ts) == 1}
    claims = []
    for tintem, (method, teacher) in single.items():
        if method != "tintem":
            continue
        label = roles.teachers[teacher]
        for other, (other_method, _) in ((s, mt) for s, mt in single.items()
                                         if mt[0] in FIDELITY_BASELINES and mt[1] == teacher):
            rival = FIDELITY_BASELINES[other_method]
            measures = [
                ("kNN-prediction agreement with the teacher", lambda s: results.agreement(s, teacher, label), True, "%"),
                ("linear CKA with the teacher", lambda s: results.cka(s, teacher), True, ""),
                ("|ΔAUROC| OOD near", lambda s: abs(results.auroc(s, "near") - results.auroc(teacher, "near")), False, "%"),
                ("|ΔAUROC| OOD far", lambda s: abs(results.auroc(s, "far") - results.auroc(teacher, "far")), False, "%")]
            for title, measure, higher, unit in measures:
                numbers = {tintem: measure(tintem), other: measure(other)}
                claims.append(_claim("TinTeM", f"from {teacher}, TinTeM's student is more faithful than {rival}'s: {title}",
                                     numbers, f"TinTeM > {rival}" if higher else f"TinTeM < {rival}",
                                     (lambda n: _first(n) > _second(n)) if higher else (lambda n: _first(n) < _second(n)),
                                     unit))
        head = results.metric(tintem, teacher_head_top1(K, label))
        numbers = {f"teacher head kNN {label}": head, f"{teacher} kNN {label}": results.knn(teacher, label),
                   f"{tintem} kNN {label}": results.knn(tintem, label)}
        claims.append(_claim("TinTeM Table 3", f"the teacher head's projection of {teacher} keeps its kNN", numbers,
                             f"head ≥ teacher − {100 * HEAD_TOLERANCE:g} pt",
                             lambda n: _first(n) >= _second(n) - HEAD_TOLERANCE))
    return claims


def _first(numbers: dict[str, float]) -> float:
    return list(numbers.values())[0]


def _second(numbers: dict[str, float]) -> float:
    return list(numbers.values())[1]


def all_claims(eval_dir: Path, roles: Roles) -> dict[str, list[Claim]]:
    results = Results(eval_dir)
    return {"teachers": teacher_checks(results, roles), "inheritance": inheritance(results, roles),
            "claims": paper_claims(results, roles)}


def format_numbers(claim: Claim) -> str:
    return "; ".join(f"{name} {100 * value:.1f}" if claim.unit == "%" else f"{name} {value:.3f}"
                     for name, value in claim.numbers.items())


def claims_markdown(claims: list[Claim]) -> str:
    lines = ["| source | claim | numbers | rule | verdict |", "|---|---|---|---|---|"]
    for claim in claims:
        numbers = format_numbers(claim)
        lines.append(f"| {claim.source} | {claim.statement} | {numbers} | {claim.rule} | **{claim.verdict}** |")
    return "\n".join(lines)
