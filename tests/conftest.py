"""Shared fixtures: one small embedded dataset per test session (the real formats, tiny counts)."""

import distillery  # noqa: F401  (first: registers the torchvision op schemas before timm is imported)

import pytest

from distillery.data.synth import SynthConfig, generate

SMALL_SYNTH = SynthConfig(seed=0, size=32, train=400, val=200, ood_near=100, ood_far=100, landmarks=4,
                          distractors=16, shard_size=100, workers=2)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    generate(SMALL_SYNTH, out)
    return out
