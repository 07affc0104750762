"""Replayable RandAugment and random erasing (Proteus' and TinTeM's training views) against timm's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment

from distillery.data.views import (ERASE_AT, NUM_PARAMS, RANDAUGMENT_AT, RANDAUGMENT_CHOICES, RANDAUGMENT_FILL,
                                   RANDAUGMENT_OPS, ViewConfig, draw_view, eval_view, parse_randaugment,
                                   randaugment_args, replay)

TINTEM_VIEWS = ViewConfig(randaugment="rand-m9-mstd0.5-inc1", erasing_p=0.25, jitter_p=0.0, grayscale_p=0.0,
                          blur_p=0.0, solarize_p=0.0)


def _image(seed=0, size=(40, 52)):
    return Image.fromarray((np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8))


@pytest.mark.parametrize("name", RANDAUGMENT_OPS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_each_replayed_op_is_timms_augment_op(name, sign, monkeypatch):
    magnitude = 7.25  # a float32 number: the stored magnitude is float32
    # timm draws the sign inside its level functions with `random.random() > 0.5`: fix it to the stored one
    monkeypatch.setattr(auto_augment.random, "random", lambda: 1.0 if sign < 0 else 0.0)
    op = auto_augment.AugmentOp(name, prob=1.0, magnitude=magnitude,
                                hparams={"img_mean": RANDAUGMENT_FILL, "interpolation": Image.BICUBIC})
    if op.level_fn is not None:
        assert randaugment_args(name, magnitude, sign) == pytest.approx(op.level_fn(magnitude, op.hparams))
    image = _image()
    params = eval_view(image.height, image.width, 1.0)
    params[:4] = (0, 0, image.height, image.width)
    params[RANDAUGMENT_AT:RANDAUGMENT_AT + 3] = (RANDAUGMENT_OPS.index(name) + 1, magnitude, sign)
    replayed = replay(image, params, (image.height, image.width))
    expected = np.asarray(op(image.resize(image.size, Image.BICUBIC, box=(0, 0, image.width, image.height))))
    assert np.array_equal(replayed.permute(1, 2, 0).numpy(), expected)


def test_the_randaugment_string_is_read_as_timm_reads_it():
    config = parse_randaugment("rand-m9-mstd0.5-inc1")
    assert (config.magnitude, config.layers, config.prob, config.magnitude_std, config.increasing) == (9, 2, 0.5, 0.5, True)
    assert RANDAUGMENT_CHOICES[True] == tuple(auto_augment._RAND_INCREASING_TRANSFORMS)
    assert RANDAUGMENT_CHOICES[False] == tuple(auto_augment._RAND_TRANSFORMS)
    with pytest.raises(ValueError, match="unknown section 'x3'"):
        ViewConfig(randaugment="rand-m9-x3")


def test_views_draw_randaugment_and_erasing_at_the_configured_rates():
    views = np.stack([draw_view(TINTEM_VIEWS, 0, index, 0, 64, 64) for index in range(2000)])
    layers = views[:, RANDAUGMENT_AT:ERASE_AT].reshape(-1, 4, 3)
    assert (layers[:, 2:, 0] == 0).all()  # n = 2
    assert abs((layers[:, :2, 0] > 0).mean() - 0.5) < 0.03  # each layer applied with p = 0.5
    applied = layers[:, :2][layers[:, :2, 0] > 0]
    assert abs(applied[:, 1].mean() - 9.0) < 0.05 and applied[:, 1].max() <= 10  # N(9, 0.5) clipped to 10
    assert set(applied[:, 0].astype(int) - 1) <= {RANDAUGMENT_OPS.index(n) for n in RANDAUGMENT_CHOICES[True]}
    assert abs(views[:, ERASE_AT].mean() - 0.25) < 0.03
    areas = views[views[:, ERASE_AT] > 0][:, ERASE_AT + 3] * views[views[:, ERASE_AT] > 0][:, ERASE_AT + 4]
    assert 0.015 < areas.min() and areas.max() < 0.36
    # RandAugment and erasing are drawn after the other ops: switching them on moves no crop, flip or jitter
    plain = ViewConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
    assert np.array_equal(np.stack([draw_view(plain, 0, index, 0, 64, 64) for index in range(50)])[:, :RANDAUGMENT_AT],
                          views[:50, :RANDAUGMENT_AT])


def test_an_erased_box_scales_with_the_output_and_replays_the_same_bytes():
    image = _image(1)
    params = np.zeros(NUM_PARAMS, np.float32)
    params[:4] = (0, 0, image.height, image.width)
    params[5:13] = (1, 1, 1, 0, 0, 1, 2, 3)
    params[ERASE_AT:ERASE_AT + 6] = (1, 0.25, 0.5, 0.5, 0.25, 12345)
    a, b = replay(image, params, 32), replay(image, params, 32)
    assert torch.equal(a, b)
    clean = params.copy()
    clean[ERASE_AT] = 0
    for size in (32, 64):  # the box is a fraction of the output: rows 1/4-3/4, columns 1/2-3/4
        changed = (replay(image, params, size) != replay(image, clean, size)).any(0)
        assert changed.sum() == changed[size // 4:3 * size // 4, size // 2:3 * size // 4].sum()
        assert changed[size // 4:3 * size // 4, size // 2:3 * size // 4].float().mean() > 0.9


@pytest.fixture(scope="module")
def tintem_store(tiny_synth, teacher_specs, tmp_path_factory):
    """The first test teacher over the tiny train split, 3 views drawn with TinTeM's RandAugment and erasing."""
    from distillery.cache.writer import CacheConfig, cache_teachers

    config = CacheConfig((teacher_specs[0],), views=3, workers=0, view_config=TINTEM_VIEWS)
    out = tmp_path_factory.mktemp("tintem") / "store.zarr"
    cache_teachers(str(tiny_synth / "train"), str(out), config, show_progress=False)
    return out, config


def test_training_replays_the_randaugment_views_the_teacher_saw_bit_for_bit(tiny_synth, tintem_store):
    from distillery.cache.store import CacheStore
    from distillery.cache.writer import view_image
    from distillery.data.shards import ShardSet
    from distillery.models.teachers import create_teacher
    from distillery.train.data import SampleSpec, TeacherViews, TrainStream

    out, config = tintem_store
    store, shard_set = CacheStore.open(str(out)), ShardSet.open(tiny_synth / "train")
    size = create_teacher(config.teachers[0]).preprocessing.input_size
    views = TeacherViews(3, config.seed, TINTEM_VIEWS, stores=((str(out), (store.teachers[0].name,)),))
    stream = TrainStream(shard_set, SampleSpec(teacher_view=True), size, 6, seed=0, num_workers=1,
                         teacher_views=views, repeats=3)
    batch = next(iter(stream))
    records = {r.index: r for shard in range(len(shard_set)) for r in shard_set.records(shard)}
    assert batch["index"].tolist()[:3] == [batch["index"][0].item()] * 3  # the copies share the step
    augmented, chosen = 0, []
    for row, index in enumerate(batch["index"].tolist()):
        record = records[index]
        seen = view_image(record, 0, 0, config, [size])  # what the cache writer fed the teacher, every view
        matches = [v for v in range(3) if torch.equal(seen.pixels[size][v], batch["student"][row])]
        assert len(matches) == 1, f"row {row} is not exactly one of the teacher's views"
        stored = store.read_rows([index], matches)
        assert torch.equal(stored[f"{store.teachers[0].name}/cls"][0],
                           batch[f"targets/{store.teachers[0].name}/cls"][row].float())
        augmented += int(seen.params[matches[0], RANDAUGMENT_AT:].any())
        chosen.append(matches[0])
    assert batch["index"][3:].tolist() == [batch["index"][3].item()] * 3
    assert sorted(chosen[:3]) == sorted(chosen[3:]) == [0, 1, 2]  # each sample's copies are its three views
    assert augmented > 0


def test_repeated_augmentation_needs_as_many_views(tiny_synth, tintem_store):
    from distillery.data.shards import ShardSet
    from distillery.errors import DistilleryError
    from distillery.train.data import SampleSpec, TeacherViews, TrainStream

    out, _ = tintem_store
    views = TeacherViews(3, 0, TINTEM_VIEWS, stores=((str(out), ()),))
    with pytest.raises(DistilleryError, match="at least 4 views per image \\(this run has 3\\)"):
        TrainStream(ShardSet.open(tiny_synth / "train"), SampleSpec(teacher_view=True), (32, 32), 6, 0,
                    teacher_views=views, repeats=4)
