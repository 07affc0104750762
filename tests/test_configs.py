import dataclasses
from pathlib import Path

import pytest

from distillery.train.config import read_yaml, resolve
from distillery.train.methods import MethodContext, TeacherInfo, create_method, method_class

NOT_METHOD_CONFIGS = {"demo.yaml", "eval_synth.yaml"}  # the demo's plan and an evaluation suite
ROOT = Path(__file__).parents[1] / "configs"
CONFIGS = sorted([*(p for p in ROOT.glob("*.yaml") if p.name not in NOT_METHOD_CONFIGS), *ROOT.glob("teachers/*.yaml")])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_method_config_resolves_and_builds_its_method(path):
    config = resolve(read_yaml(path), {"data": "shards", "out": "run"}, str(path))
    teachers = (TeacherInfo("vit_small_patch16_224.dino", 64, (4, 4)), TeacherInfo("b", 96, (2, 2)))  # timm names hold dots
    context = MethodContext(student_dim=32, student_grid=(4, 4), student_size=(32, 32), student_depth=2,
                            teachers=teachers, label_classes={"class": 10, "shape": 10, "pattern": 4},
                            total_steps=10, steps_per_epoch=2, seed=0)
    if method_class(config.method).max_teachers == 1:
        context = dataclasses.replace(context, teachers=teachers[:1])
    method = create_method(config.method, config.method_config, context)
    assert method.name == config.method == ("supervised" if path.parent.name == "teachers" else path.name.split("_")[0])
