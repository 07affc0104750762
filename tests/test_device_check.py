"""The prepared GPU check runs, in its tiny CPU mode, so the script cannot rot before a GPU runs it."""

from __future__ import annotations

import json

import pytest
import subprocess
import sys
from pathlib import Path

from distillery.apps.experiments.costs import Throughput

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_device_check_tiny_cpu_mode_writes_every_figure(tmp_path):
    out, throughput = tmp_path / "check.json", tmp_path / "gpu_throughput.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--cpu", "--tiny",
                             "--workers", "1", "--out", str(out), "--throughput", str(throughput)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["sizes"] == "tiny" and figures["precision"] == "float32"
    assert figures["teacher_forward"]["vit_tiny_patch16_224@32"]["value"] > 0
    assert figures["cache"]["images"] == 64 and figures["cache"]["decode_workers_per_gpu"] >= 1
    for name in ("student_alone", "unic_cached", "unic_online", "sefa_cached", "sefa_online", "tintem_cached",
                 "tintem_online"):
        assert figures["train"][name]["value"] > 0, name
    assert figures["knn"]["faiss_cpu_s"] > 0 and figures["knn"]["faiss_gpu_s"] is None
    plan_input = Throughput.load(throughput)  # what `distillery experiment plan` reads
    assert plan_input.train["unic:vit_tiny_patch16_224"] == figures["train"]["unic_cached"]["value"]
    assert plan_input.forward["vit_tiny_patch16_224@32"] == figures["teacher_forward"]["vit_tiny_patch16_224@32"]["value"]
