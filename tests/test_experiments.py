"""The paper experiments: every definition plans, the plan's arithmetic is the store's, bad input is one line,
`make all DRY_RUN=1` works, and the report reads (never invents) the reproduced numbers."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distillery.apps.experiments import (STEPS, ExperimentError, PlanInputs, build_report, bytes_per_view, experiment_names,
                                    load_experiment, plan_experiment, plan_teacher, write_report)

ROOT = Path(__file__).parents[1]
EXPERIMENTS = experiment_names(ROOT / "configs" / "experiments")


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
    """Experiment files name their configs relative to the repository root, where make runs."""
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def throughput(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "gpu_throughput.json"
    path.write_text(json.dumps({
        "device": "Test GPU",
        "teacher_images_per_s": {"vit_small_patch16_224@224": 4000.0, "vit_tiny_patch16_224@224": 9000.0},
        "train_images_per_s": {"unic:vit_small_patch16_224": 800.0, "student:vit_small_patch16_224": 1000.0,
                               "student:vit_tiny_patch16_224": 2000.0},
    }))
    return path


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_plans_without_error(name, throughput):
    plan = plan_experiment(name, PlanInputs(throughput=throughput))
    assert plan.problems == []
    heads = [t for t in plan.experiment.tasks if t.endswith("_head")]
    assert set(plan.steps) == set(STEPS) - (set() if heads else {"analyze"})  # analyze: only a run with a head
    assert not set(heads) & set(plan.suite["tasks"])
    assert plan.cache_bytes > 0 and plan.store is not None
    assert all(hours.gpu_hours is not None for hours in plan.hours.values()), plan.hours
    assert set(plan.suite["models"]) == set(plan.experiment.models)
    assert any("DATA= not given" in need for need in plan.needs)  # a note in a dry run, not a problem


def test_measured_figures_are_used_as_they_are_and_others_scaled(throughput):
    plan = plan_experiment("unic-vits16-dino-augreg", PlanInputs(throughput=throughput, gpus=4))
    images = 1_281_167
    assert plan.hours["train"].gpu_hours == pytest.approx(200 * images / 800.0 / 3600)
    assert "measured as unic:vit_small_patch16_224" in plan.hours["train"].detail
    assert plan.hours["cache"].gpu_hours == pytest.approx(2 * 4 * images / 4000.0 / 3600)
    assert plan.device == "Test GPU"
    assert plan.steps["train"].argv[:2] == ("torchrun", "--nproc_per_node=4")
    sefa = plan_experiment("sefa-vits16-dino-augreg", PlanInputs(throughput=throughput))
    # no sefa:... figure: the bare student's, scaled by the FLOPs of the cached view, 2 global and 8 local crops
    assert "scaled from student:vit_small_patch16_224" in sefa.hours["train"].detail
    assert "lower bound" in sefa.hours["train"].detail
    assert sefa.hours["train"].gpu_hours > 3 * 200 * images / 1000.0 / 3600


def test_shared_cache_for_the_same_teachers_and_settings(throughput):
    unic = plan_experiment("unic-vits16-dino-augreg", PlanInputs(throughput=throughput))
    sefa = plan_experiment("sefa-vits16-dino-augreg", PlanInputs(throughput=throughput))
    tintem = plan_experiment("tintem-vitt14-dinov2s", PlanInputs(throughput=throughput))
    assert unic.store == sefa.store != tintem.store
    assert unic.cache_bytes == 1_281_167 * 4 * 2 * (1 + 196) * 384 * 2  # README: 1.55 TB, the full patch grid


def test_cache_bytes_per_view_for_a_vit_s16_teacher():
    teacher = [plan_teacher("vit_small_patch16_224.dino", None, "test")]
    name = "vit_small_patch16_224.dino"
    assert bytes_per_view(teacher, "float16", 1, False) == {name: 1 * (1 + 196) * 384 * 2}
    assert bytes_per_view(teacher, "int8", 1, False) == {name: (1 + 196) * 384 * 1 + (1 + 196) * 2}  # + fp16 scale per token
    assert bytes_per_view(teacher, "float16", 2, False) == {name: (1 + 7 * 7) * 384 * 2}
    assert bytes_per_view(teacher, "float16", 1, True) == {name: 384 * 2}
    dinov2 = plan_teacher("vit_small_patch14_dinov2.lvd142m@224", None, "test")
    assert dinov2.geometry.grid == (16, 16)  # at 224 px, not its pretrained 518


@pytest.mark.parametrize("dtype, pool", [("float16", 1), ("int8", 2)])
def test_planned_size_is_the_size_a_written_store_has_on_disk(tmp_path, teacher_specs, dtype, pool):
    from distillery.cache.store import CacheStore
    from distillery.cache.verify import bytes_per_view as stored_bytes_per_view
    from distillery.cache.writer import CacheConfig, cache_teachers
    from distillery.data.synth import SynthConfig, generate

    generate(SynthConfig(train=16, val=0, ood_near=0, ood_far=0, landmarks=0, distractors=0, shard_size=8, workers=1),
             tmp_path / "data")
    out = tmp_path / "store.zarr"
    cache_teachers(str(tmp_path / "data" / "train"), str(out),
                   CacheConfig(tuple(teacher_specs), views=2, dtype=dtype, patch_pool=pool, workers=0), show_progress=False)
    store = CacheStore.open(str(out))
    planned = bytes_per_view([plan_teacher(spec, None, "test") for spec in teacher_specs], dtype, pool, False)
    assert planned == stored_bytes_per_view(store)
    on_disk = sum(path.stat().st_size for part in ("cls", "patch", "cls_scale", "patch_scale")
                  for path in (out / "teachers").glob(f"*/{part}/c/**/*") if path.is_file())
    expected = 16 * 2 * sum(planned.values())
    assert expected <= on_disk < expected * 1.01  # the rest is zarr's shard index: 16 bytes per inner chunk


def test_weights_are_found_in_an_hf_home_or_as_local_dirs(tmp_path, teacher_specs):
    from distillery.apps.experiments.architectures import locate_weights

    repo = tmp_path / "hf" / "hub" / "models--timm--vit_small_patch14_dinov2.lvd142m"  # huggingface_hub's cache layout
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "abc" / "model.safetensors").write_bytes(b"")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    teacher = plan_teacher("vit_small_patch14_dinov2.lvd142m@224", tmp_path / "hf", "test")
    assert locate_weights(teacher, tmp_path / "hf").endswith("snapshots/abc/model.safetensors")
    with pytest.raises(ExperimentError, match="will need WEIGHTS=DIR"):
        locate_weights(teacher, tmp_path)
    # a directory of local-dir teachers: WEIGHTS/<teacher name>/ replaces the hub name, the input size stays
    local = tmp_path / "local" / "vit_small_patch14_dinov2.lvd142m"
    shutil.copytree(teacher_specs[0].removeprefix("local-dir:"), local)
    teacher = plan_teacher("vit_small_patch14_dinov2.lvd142m@224", tmp_path / "local", "test")
    assert teacher.run_spec == f"local-dir:{local}@224" and locate_weights(teacher, tmp_path / "local") == f"local-dir:{local}"


def _write_experiment(tmp_path: Path, **changes) -> str:
    values = yaml.safe_load((ROOT / "configs/experiments/tintem-vitt14-dinov2s.yaml").read_text())
    values.update(changes)
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


@pytest.mark.parametrize("teacher, says", [("vit_small_patch16_224.nonexistent", "no pretrained tag 'nonexistent'"),
                                           ("vit_smal_patch16_224.dino", "is not a timm architecture"),
                                           ("weights/dino", "looks like a path")])
def test_a_bad_teacher_is_one_problem_line(tmp_path, throughput, teacher, says):
    plan = plan_experiment(_write_experiment(tmp_path, teachers=[teacher], paper_results=[]), PlanInputs(throughput=throughput))
    assert len(plan.problems) == 1
    assert says in plan.problems[0] and "custom.yaml" in plan.problems[0] and "\n" not in plan.problems[0]


def test_unknown_keys_are_refused_in_one_line(tmp_path, throughput):
    with pytest.raises(ExperimentError, match=r"custom.yaml: unknown key 'epochz'") as error:
        load_experiment(_write_experiment(tmp_path, epochz=3))
    assert "\n" not in str(error.value)
    with pytest.raises(ExperimentError, match=r"custom.yaml: cache: unknown key 'view'"):
        load_experiment(_write_experiment(tmp_path, cache={"view": 4}))
    config = yaml.safe_load((ROOT / "configs/tintem_vitt14_in1k.yaml").read_text()) | {"lrr": 0.1}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    plan = plan_experiment(_write_experiment(tmp_path, train=str(tmp_path / "train.yaml")), PlanInputs(throughput=throughput))
    assert len(plan.problems) == 1 and "unknown config key 'lrr'" in plan.problems[0]


def test_a_paper_row_must_name_an_evaluated_model_and_a_reported_metric(tmp_path):
    row = {"model": "TinTeM", "metric": "knn top-1 (k=7)", "value": 1.0, "source": "x"}
    with pytest.raises(ExperimentError, match=r"metric 'knn top-1 \(k=7\)' is not reported"):
        load_experiment(_write_experiment(tmp_path, paper_results=[row]))
    with pytest.raises(ExperimentError, match="every number needs its source"):
        load_experiment(_write_experiment(tmp_path, paper_results=[row | {"metric": "linear top-1", "source": ""}]))


def test_make_all_dry_run_checks_and_lists_every_experiment(throughput):
    """What CI runs. Through the experiments makefile itself, so the test never triggers the Makefile's install."""
    completed = subprocess.run(["make", "--no-print-directory", "-f", "make/experiments.mk", "all", "DRY_RUN=1",
                                f"BIN={Path(sys.executable).parent}", f"THROUGHPUT={throughput}"],
                               cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                               timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    for name in EXPERIMENTS:
        assert f"== {name}:" in completed.stdout
    assert completed.stdout.count("[cache] ") == len(EXPERIMENTS)
    assert "GPU-hours in all:" in completed.stdout and "Test GPU" in completed.stdout
    assert "paper numbers compared" in completed.stdout


def _fake_results(results: Path, experiment) -> None:
    """What `distillery eval suite` writes: eval/<model>/<task>.json with fractions under "metrics"."""
    for number, model in enumerate(experiment.models):
        directory = results / "eval" / model
        directory.mkdir(parents=True)
        top1 = 0.70 + number / 20
        (directory / "knn.json").write_text(json.dumps({"metrics": {f"k={k}": {"top1": top1, "top5": 0.9} for k in (10, 20, 100, 200)}}))
        (directory / "linear.json").write_text(json.dumps({"metrics": {"val": {"top1": top1 + 0.05}, "chosen_lr": 0.01}}))
        sets = {name: {"auroc": 0.9, "fpr95_idtpr": 0.3} for name in experiment.dataset.ood}
        (directory / "ood.json").write_text(json.dumps({"metrics": {"sets": sets, "groups": {}}}))
        scores = {"J&F-Mean": 0.6, "J-Mean": 0.58, "F-Mean": 0.62}
        (directory / "davis.json").write_text(json.dumps({"metrics": {"global": scores}}))
        (directory / "segmentation.json").write_text(json.dumps({"metrics": {"mIoU": 0.7, "mAcc": 0.8, "aAcc": 0.9}}))
        robust = {"v2": {"top1": 0.6}, "r": {"top1": 0.4}, "a": {"top1": 0.2}, "c": {"mCE": 0.5}, "in9": {"bg_gap": 0.1}}
        (directory / "robustness.json").write_text(json.dumps({"metrics": robust}))
        transfer = {name: {"top1": 0.8 + i / 100} for i, name in enumerate(experiment.dataset.transfer)}
        (directory / "transfer.json").write_text(json.dumps({"metrics": {"sets": transfer, "mean": {"top1": 0.84}}}))
        if model == experiment.student:
            for head in ("teacher_head_knn", "student_head_knn"):
                (directory / f"{head}.json").write_text(json.dumps({"metrics": {"k=20": {"top1": 0.77}, "k=10": {"top1": 0.76}}}))


def test_report_sets_reproduced_beside_the_papers_numbers(tmp_path):
    experiment = load_experiment("tintem-vitt14-dinov2s")
    _fake_results(tmp_path, experiment)
    markdown, report_json = write_report(experiment, tmp_path)
    text = markdown.read_text()
    # DINOv2 ViT-S/14 (the second model, top-1 0.75) against the README's 79.0 kNN and 81.1 linear
    assert "| vit_small_patch14_dinov2.lvd142m@224 | knn top-1 (k=20) | 79.00 | 75.00 | -4.00 |" in text
    assert "| vit_small_patch14_dinov2.lvd142m@224 | linear top-1 | 81.10 | 80.00 | -1.10 |" in text
    assert "| TinTeM | knn top-1 (k=20) | 74.30 | 70.00 | -4.30 | TinTeM Table 2" in text
    assert "| TinTeM | teacher-head knn top-1 (k=20) | not published | 77.00 |  | TinTeM Table 3" in text
    assert "| TinTeM | transfer cifar100 top-1 | not published | 81.00 |  | TinTeM Table 5, cifar100" in text
    assert "| TinTeM | transfer mean top-1 | not published | 84.00 |  | no paper row |" in text
    rows = json.loads(report_json.read_text())["rows"]
    heads = {"teacher-head knn top-1 (k=10)", "teacher-head knn top-1 (k=20)"}  # the student's alone
    assert len(rows) == len(experiment.models) * len(experiment.metrics) - (len(experiment.models) - 1) * len(heads)
    assert {r["metric"] for r in rows if r["model"] != "TinTeM"}.isdisjoint(heads)
    assert all(r["reproduced"] is not None for r in rows)
    papers = experiment.paper_results
    assert [(r["model"], r["metric"]) for r in rows[:len(papers)]] == [(r.model, r.metric) for r in papers]
    assert rows[0]["result"].endswith("eval/vit_small_patch14_dinov2.lvd142m@224/knn.json#metrics/k=20/top1")


def test_report_fails_loudly_on_a_missing_or_malformed_result(tmp_path):
    experiment = load_experiment("tintem-vitt14-dinov2s")
    _fake_results(tmp_path, experiment)
    missing = tmp_path / "eval" / "TinTeM" / "linear.json"
    missing.unlink()
    with pytest.raises(ExperimentError, match=r"eval/TinTeM/linear.json: result file missing.* \(for 'linear top-1'\)"):
        write_report(experiment, tmp_path)
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "report.json").exists()
    missing.write_text(json.dumps({"metrics": {"test": {"top1": 0.8}}}))
    with pytest.raises(ExperimentError, match=r"linear.json: no metrics/val \(found: test\) \(for 'linear top-1'\)"):
        build_report(experiment, tmp_path)


def test_the_sefa_plan_runs_davis_with_its_paper_numbers(tmp_path, throughput):
    sefa = plan_experiment("sefa-vits16-dino-augreg", PlanInputs(throughput=throughput))
    assert sefa.counts["davis"].images == 1999 and sefa.suite["data"]["davis"].endswith("/davis-2017")
    assert "davis" in sefa.suite["tasks"]
    rows = {(r.model, r.metric): r for r in sefa.experiment.paper_results}
    assert rows[("SeFA", "davis J&F-Mean")].value == 62.28 and "Table 4" in rows[("SeFA", "davis J&F-Mean")].source
    dataset = yaml.safe_load((ROOT / "configs/experiments/datasets/imagenet-1k.yaml").read_text())
    del dataset["davis"]
    (tmp_path / "no_davis.yaml").write_text(yaml.safe_dump(dataset))
    with pytest.raises(ExperimentError, match="the davis task needs a davis: entry"):
        load_experiment(_write_experiment(tmp_path, data=str(tmp_path / "no_davis.yaml"),
                                          eval={"tasks": ["knn", "davis"], "settings": {}}, paper_results=[]))


def test_the_plans_hold_every_column_of_sefa_table_2_and_tintem_tables_3_5_7(throughput):
    """Each column has a paper row (a number, or null with the reason), and the plan evaluates it."""
    sets = list(load_experiment("sefa-vits16-dino-augreg").dataset.transfer)
    wanted = {
        "sefa-vits16-dino-augreg": ("SeFA", ["linear top-1", "robustness IN-V2 top-1", "robustness IN-R top-1",
                                             "robustness IN-A top-1", "robustness IN-C mCE", "transfer mean top-1",
                                             "robustness IN-9 BG-gap"]),
        "tintem-vitt14-dinov2s": ("TinTeM", ["knn top-1 (k=20)", "teacher-head knn top-1 (k=20)",  # Table 3
                                             *[f"transfer {name} top-1" for name in sets],          # Table 5
                                             "robustness IN-V2 top-1", "robustness IN-C mCE"]),      # Table 7
        "proteus-vitt14-dinov2s": ("Proteus", ["student-head knn top-1 (k=20)", "transfer cub200 top-1"]),
    }
    assert {"cifar10", "cifar100", "food101", "cub200", "dtd", "pets", "cars", "aircraft", "flowers102"} <= set(sets)
    for name, (student, metrics) in wanted.items():
        plan = plan_experiment(name, PlanInputs(throughput=throughput))
        rows = {r.metric: r for r in plan.experiment.paper_results if r.model == student}
        missing = [m for m in metrics if m not in rows]
        assert not missing, (name, missing)
        assert all(rows[m].source for m in metrics)
        assert "transfer" in plan.suite["tasks"] and set(plan.suite["data"]["transfer"]) == set(sets)
    analyze = plan_experiment("tintem-vitt14-dinov2s", PlanInputs(throughput=throughput)).steps["analyze"]
    assert analyze.argv[:3] == ("distillery", "analyze", "heads") and "--teacher" in analyze.argv


def test_a_head_task_must_match_the_method(tmp_path, throughput):
    path = _write_experiment(tmp_path, eval={"tasks": ["knn", "student_head"], "settings": {}}, paper_results=[])
    plan = plan_experiment(path, PlanInputs(throughput=throughput))
    assert any("the student_head task scores a proteus run's head" in p for p in plan.problems), plan.problems


def test_a_smoke_run_trains_n_steps_into_its_own_directory_on_the_real_cache(tmp_path, throughput):
    full = plan_experiment("unic-vits16-dino-augreg", PlanInputs(throughput=throughput, results=tmp_path))
    smoke = plan_experiment("unic-vits16-dino-augreg", PlanInputs(throughput=throughput, results=tmp_path, max_steps=20))
    assert smoke.out == full.out / "smoke-20" and smoke.store == full.store
    assert smoke.steps["cache"] == full.steps["cache"]
    train = smoke.steps["train"].argv
    assert train[train.index("--max-steps") + 1] == "20" and str(smoke.out / "runs") in train[train.index("--out") + 1]
    assert "--max-steps" not in full.steps["train"].argv
    assert smoke.suite["out"] == str(smoke.out / "eval")
