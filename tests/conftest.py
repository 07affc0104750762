"""Shared fixtures: one small embedded dataset per test session (the real formats, tiny counts)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as the CLI does: tests never reach the network

import distillery  # noqa: E402,F401  (registers the torchvision op schemas before timm is imported)

import pytest  # noqa: E402

from distillery.data.synth import SynthConfig, generate  # noqa: E402

SMALL_SYNTH = SynthConfig(seed=0, size=32, train=400, val=200, ood_near=100, ood_far=100, landmarks=4,
                          distractors=16, shard_size=100, workers=2)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    generate(SMALL_SYNTH, out)
    return out


def _tiny_vit(**overrides):
    from distillery.models.students import create_student

    return create_student("vit_tiny_patch16_224", img_size=32, depth=2, **overrides)


@pytest.fixture(scope="session")
def teacher_specs(tmp_path_factory):
    """Two random-weight ViT teachers of different width and patch size, saved as timm local-dir models."""
    import torch

    from distillery.models.students import export_local_dir

    root = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    export_local_dir(_tiny_vit(patch_size=4, embed_dim=48, num_heads=3), root / "teacher_a")
    export_local_dir(_tiny_vit(patch_size=8, embed_dim=64, num_heads=4), root / "teacher_b")
    return [f"local-dir:{root / 'teacher_a'}", f"local-dir:{root / 'teacher_b'}"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory, synth_dir, teacher_specs):
    """A float16 cache of both teachers over the small train split, 2 views per image."""
    from distillery.cache.writer import CacheConfig, cache_teachers

    out = tmp_path_factory.mktemp("cache") / "train.zarr"
    cache_teachers(str(synth_dir / "train"), str(out), CacheConfig(tuple(teacher_specs), views=2, workers=1),
                   show_progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory):
    """64 training images in two shards: small enough for a model to fit in a few dozen steps."""
    out = tmp_path_factory.mktemp("tiny") / "data"
    generate(SynthConfig(train=64, val=32, ood_near=16, ood_far=16, landmarks=1, distractors=2, shard_size=32, workers=1), out)
    return out


TINY_STUDENT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}
# DINO for a few dozen steps on 64 images: a fast teacher and a slow centre, so the student can catch up
# with the teacher before the centre flattens its targets.
TINY_DINO = {"out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32, "local_crops": 2, "momentum_teacher": 0.9,
             "center_momentum": 0.99}
# Supervised on 64 images: light augmentation, so fitting them shows within a few dozen steps.
TINY_SUPERVISED = {"crop_scale": (0.8, 1.0), "jitter": 0.0, "label_smoothing": 0.0}


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, tiny_synth, teacher_specs):
    """Both teachers over the 64-image set, 2 views; teacher_a's 8x8 grid differs from TINY_STUDENT's 4x4."""
    from distillery.cache.writer import CacheConfig, cache_teachers

    out = tmp_path_factory.mktemp("tiny_cache") / "store.zarr"
    cache_teachers(str(tiny_synth / "train"), str(out), CacheConfig(tuple(teacher_specs), views=2, workers=0),
                   show_progress=False)
    return out
