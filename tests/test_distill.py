import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distillery.cache.store import CacheError, CacheStore
from distillery.config import ConfigError
from distillery.errors import DistilleryError
from distillery.models.teachers import Tokens
from distillery.train.config import TrainConfig
from distillery.train.distributed import DistInfo
from distillery.train.loop import Trainer
from distillery.train.methods import MethodContext, TeacherInfo, create_method, method_class, method_names
from distillery.train.methods.losses import cls_token_loss, patch_token_loss
from distillery.train.methods.tintem import PAPER_TEMPERATURES, combine_teachers, sne_kl
from distillery.train.methods.unic import teacher_coefficients
from distillery.train.targets import resize_patch_grid
from tests.conftest import TINY_DINO, TINY_STUDENT, TINY_SUPERVISED

METHOD_SETTINGS = {"unic": {"mlp_hidden_dim": 64}, "sefa": {"head_hidden_dim": 64, "dino": TINY_DINO}, "tintem": {},
                   "dino": TINY_DINO, "supervised": TINY_SUPERVISED, "ibot": {**TINY_DINO, "pred_ratio": (0.3,),
                                                                             "pred_ratio_var": (0.1,)}}


# ------------------------------------------------------------------ losses on fixed tensors

def test_unic_token_loss_matches_a_hand_computation():
    prediction = torch.tensor([[[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]]])  # [B=1, T=2, D=3]
    target = torch.tensor([[[1.0, 1.0, 0.0], [0.0, 3.0, 0.0]]])

    def smooth_l1(a, b):
        d = abs(a - b)
        return 0.5 * d * d if d < 1 else d - 0.5

    expected = []
    for p, t in zip(prediction[0].tolist(), target[0].tolist()):
        cos = sum(a * b for a, b in zip(p, t)) / (math.sqrt(sum(a * a for a in p)) * math.sqrt(sum(b * b for b in t)))
        expected.append(0.5 * (1 - cos) + 0.5 * sum(smooth_l1(a, b) for a, b in zip(p, t)) / 3)
    assert patch_token_loss(prediction, target).item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert cls_token_loss(prediction[:, 0], target[:, 0]).item() == pytest.approx(expected[0], rel=1e-6)  # CLS: [B, D]


def test_proteus_losses_match_a_hand_computation():
    from distillery.train.methods.proteus import proteus_losses

    token = torch.tensor([[1.0, 2.0], [0.0, -1.0]])  # [B=2, D_t=2]: the token head's output
    fea = torch.tensor([[[1.0, 0.0]], [[2.0, 2.0]]])  # [B, T=1, D_t]: the fea head's output on the patches
    patch = torch.tensor([[[5.0, 5.0]], [[0.0, 4.0]]])  # the patch head on the masked pass
    t_cls = torch.tensor([[0.0, 2.0], [0.0, 1.0]])
    t_patch = torch.tensor([[[1.0, 1.0]], [[2.0, 0.0]]])
    losses = proteus_losses(token, fea, patch, t_cls, t_patch, torch.tensor([1]))  # only image 1's patch is masked
    assert losses["token"].item() == pytest.approx((1 + 0 + 0 + 4) / 4)
    # fea: [token_head(CLS), fea_head(patches)] against [teacher CLS, teacher patches], mean over 2 x 2 x 2
    assert losses["fea"].item() == pytest.approx(((1 + 0 + 0 + 1) + (0 + 4 + 0 + 4)) / 8)
    assert losses["patch"].item() == pytest.approx(((0 - 2) ** 2 + (4 - 0) ** 2) / 2)  # masked positions only
    assert proteus_losses(token, fea, patch, t_cls, t_patch, torch.tensor([], dtype=torch.long))["patch"].item() == 0


def test_proteus_masks_the_first_half_of_the_batch_at_half_its_patches():
    from distillery.train.methods.proteus import ProteusConfig, proteus_masks

    mask = proteus_masks(5, 16, ProteusConfig(), torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [8, 8, 0, 0, 0]  # int(5 x 0.5) images, int(16 x 0.5) patches each
    assert torch.equal(mask, proteus_masks(5, 16, ProteusConfig(), torch.Generator().manual_seed(0)))
    assert not torch.equal(mask, proteus_masks(5, 16, ProteusConfig(), torch.Generator().manual_seed(1)))


def test_a_single_teacher_method_refuses_two():
    teachers = (TeacherInfo("a", 8, (2, 2)), TeacherInfo("b", 8, (2, 2)))
    context = MethodContext(student_dim=4, student_grid=(2, 2), student_size=(8, 8), student_depth=1, teachers=teachers,
                            label_classes={}, total_steps=1, steps_per_epoch=1, seed=0)
    with pytest.raises(DistilleryError, match="proteus distils 1 teacher.*got 2 .a, b.: choose with --cache-teacher"):
        create_method("proteus", {}, context)


def test_teacher_dropping_keeps_the_worst_teacher_and_normalises_globally():
    losses = torch.tensor([[0.9, 0.1, 0.5, 0.2], [0.2, 0.8, 0.5, 0.1], [0.1, 0.3, 0.7, 0.3]])  # [3 teachers, 4 images]
    worst = losses.argmax(0)
    for seed in range(20):
        coefficients = teacher_coefficients(losses, 0.5, torch.Generator().manual_seed(seed))
        assert torch.all(coefficients[worst, torch.arange(4)] > 0)
        assert coefficients.sum().item() == pytest.approx(1.0)
        kept = coefficients > 0
        assert torch.allclose(coefficients[kept], torch.full((int(kept.sum()),), 1 / kept.sum().item()))
    only_worst = teacher_coefficients(losses, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(only_worst > 0, F.one_hot(worst, 3).T.bool())
    everything = teacher_coefficients(losses, 0.0, torch.Generator().manual_seed(0))
    assert torch.allclose(everything, torch.full_like(losses, 1 / 12))
    losses.requires_grad_(True)
    assert not teacher_coefficients(losses, 0.5, torch.Generator()).requires_grad


def _context(teachers=(TeacherInfo("a", 12, (4, 4)), TeacherInfo("b", 20, (4, 4)))) -> MethodContext:
    return MethodContext(student_dim=48, student_grid=(4, 4), student_size=(32, 32), student_depth=2, teachers=teachers,
                         label_classes={}, total_steps=10, steps_per_epoch=5, seed=0)


def _fixed_batch():
    from distillery.models.students import create_student

    torch.manual_seed(0)
    student = create_student("vit_tiny_patch16_224", dynamic_img_size=True, **TINY_STUDENT)
    batch = {"student": torch.randn(4, 3, 32, 32), "crops/global": torch.randn(4, 2, 3, 32, 32),
             "crops/local": torch.randn(4, 2, 3, 16, 16),
             "targets": {"a": Tokens(torch.randn(4, 12), torch.randn(4, 16, 12)),
                         "b": Tokens(torch.randn(4, 20), torch.randn(4, 16, 20))}}
    return student, batch


@pytest.mark.parametrize("ssl_weight", [0.0, 1.0])
def test_sefa_is_dino_at_lambda_1_and_pure_distillation_at_lambda_0(ssl_weight):
    student, batch = _fixed_batch()
    torch.manual_seed(1)
    sefa = create_method("sefa", {"ssl_weight": ssl_weight, "head_hidden_dim": 32, "dino": TINY_DINO}, _context())
    torch.manual_seed(1)
    dino = create_method("dino", TINY_DINO, _context())  # built first in sefa too: the same DINO head weights
    from distillery.train.ema import ModelEma

    ema = ModelEma(torch.nn.ModuleDict({"backbone": student, "head": sefa.objective.head})).module
    out = sefa(student, batch, 0, ema)
    if ssl_weight == 1.0:
        reference = dino(student, batch, 0, ema)["loss"]
        assert out["loss"].item() == pytest.approx(reference.item(), rel=1e-6)
    else:
        assert out["loss"].item() == pytest.approx(out["distill"].item(), rel=1e-6)
        assert out["loss"].item() == pytest.approx(sefa.distill_loss(student(batch["student"]), batch)[0].item(), rel=1e-6)


def test_sefa_shared_view_makes_the_cached_view_dinos_first_global_crop_with_one_student_forward_fewer():
    student, batch = _fixed_batch()
    student.eval()  # no drop-path: the two ways of computing the same tokens agree
    settings = {"head_hidden_dim": 32, "dino": TINY_DINO}
    torch.manual_seed(1)
    separate = create_method("sefa", settings, _context())
    torch.manual_seed(1)
    shared = create_method("sefa", {**settings, "shared_view": True}, _context())
    assert [c.count for c in separate.sample_spec().crops] == [2, 2]
    assert [c.count for c in shared.sample_spec().crops] == [1, 2]  # the data stream draws one global crop less
    from distillery.train.ema import ModelEma

    ema = ModelEma(torch.nn.ModuleDict({"backbone": student, "head": shared.objective.head})).module
    forwards = []
    hook = student.register_forward_hook(lambda module, args, output: forwards.append(args[0].shape[0]))
    shared_batch = {**batch, "crops/global": batch["crops/global"][:, 1:]}
    out = shared(student, shared_batch, 0, ema)
    hook.remove()
    assert forwards == [8, 8]  # the cached view with the second global crop, then the local crops (was 4, 8, 8)
    distill, _ = separate.distill_loss(student(batch["student"]), batch)
    assert out["distill"].item() == pytest.approx(distill.item(), rel=1e-5)
    first_global = {**batch, "crops/global": torch.cat([batch["student"][:, None], batch["crops/global"][:, 1:]], 1)}
    dino_loss_same_crops, _, _ = separate.objective(student, first_global, 0, ema)
    assert out["dino"].item() == pytest.approx(dino_loss_same_crops.item(), rel=1e-5)


def test_sefa_shared_view_needs_dino_as_its_ssl_objective():
    with pytest.raises(ConfigError, match="shared_view needs ssl: dino"):
        create_method("sefa", {"ssl": "ibot", "shared_view": True}, _context())


def test_sne_loss_vanishes_under_orthogonal_maps_only():
    torch.manual_seed(0)
    features = torch.randn(5, 17, 24)
    orthogonal, _ = torch.linalg.qr(torch.randn(24, 24))
    temperatures = tuple(0.01 * k for k in range(1, 11))
    assert sne_kl(features, features @ orthogonal, temperatures).item() < 1e-5
    assert sne_kl(features, 3.0 * features @ orthogonal, temperatures).item() < 1e-5  # scale-free: cosines
    low_rank = torch.randn(24, 3) @ torch.randn(3, 24)
    assert sne_kl(features, features @ low_rank, temperatures).item() > 1.0


def test_sne_loss_is_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    teacher, head = torch.randn(4, 17, 24), torch.randn(4, 17, 24)
    exact = sne_kl(teacher, head, PAPER_TEMPERATURES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sne_kl(teacher, head, PAPER_TEMPERATURES).item() == exact.item()
        assert sne_kl(teacher.bfloat16(), head, PAPER_TEMPERATURES).item() == pytest.approx(exact.item(), rel=1e-2)


def test_tintem_gradients_flow_to_the_head_through_sne_and_to_the_student_through_cosine():
    student, batch = _fixed_batch()
    tintem = create_method("tintem", {"token_weight": 0.0, "features_weight": 0.0}, _context())
    def no_gradient(parameters):
        return all(p.grad is None or not p.grad.any() for p in parameters)

    tintem(student, batch, 0, None)["loss"].backward()
    assert tintem.head.linear.weight.grad.abs().sum() > 0
    assert no_gradient(student.parameters())  # the SNE terms never reach the student

    student, batch = _fixed_batch()
    tintem = create_method("tintem", {"local_weight": 0.0, "global_weight": 0.0}, _context())
    tintem(student, batch, 0, None)["loss"].backward()
    assert no_gradient(tintem.head.parameters())  # the student's cosine terms see a detached head output
    assert student.model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_several_teachers_are_concatenated_at_unit_norm_per_token():
    a, b = torch.randn(2, 5, 3) * 10, torch.randn(2, 5, 4) * 0.1
    combined = combine_teachers([a, b])
    assert combined.shape == (2, 5, 7)
    assert torch.allclose(combined[..., :3].norm(dim=-1), torch.ones(2, 5))
    assert torch.equal(combine_teachers([a]), a)


def test_patch_grids_are_resized_bilinearly_to_the_students():
    grid = torch.arange(16, dtype=torch.float32).reshape(1, 16, 1)  # a 4x4 ramp, one channel
    resized = resize_patch_grid(grid, (4, 4), (2, 2))
    assert resized.shape == (1, 4, 1)
    expected = F.interpolate(grid.reshape(1, 1, 4, 4), size=(2, 2), mode="bilinear", align_corners=False).flatten()
    assert torch.allclose(resized.flatten(), expected)
    assert resize_patch_grid(grid, (4, 4), (4, 4)) is grid


# ------------------------------------------------------------------ training from a cache

def _config(tiny_synth, out, method, **overrides) -> TrainConfig:
    values = dict(method=method, data=str(tiny_synth / "train"), out=str(out), student_args=TINY_STUDENT, epochs=30,
                  max_steps=40, batch_size=32, lr=3e-3, warmup_epochs=0, workers=0, log_every=1, seed=0,
                  method_config=METHOD_SETTINGS.get(method, {}))
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize("method", method_names())
def test_every_registered_method_takes_a_training_step(tiny_synth, tiny_cache, tmp_path, method):
    """One forward, backward and optimizer step of each registered method on the tiny student, the way timm
    tests every model it lists: a method is tested the day it registers."""
    teachers = {"cache": str(tiny_cache)} if method_class(method).uses_teachers else {}
    if method_class(method).max_teachers == 1:
        teachers["cache_teachers"] = ["teacher_a"]
    trainer = Trainer(_config(tiny_synth, tmp_path / method, method, max_steps=1, **teachers), DistInfo())
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    losses = trainer.train_step(next(iter(trainer.loader)), 0)
    assert torch.isfinite(losses["loss"])  # and its gradients moved the student:
    changed = [k for k, v in trainer.student.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2, f"{method}: the step moved only {changed}"


@pytest.mark.parametrize("method", ["unic", "sefa", "tintem", "proteus"])
def test_each_method_learns_from_the_cache(tiny_synth, tiny_cache, tmp_path, method):
    teachers = ["teacher_a"] if method_class(method).max_teachers == 1 else None
    Trainer(_config(tiny_synth, tmp_path / method, method, cache=str(tiny_cache), cache_teachers=teachers), DistInfo()).fit()
    records = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    first, last = (sum(r["loss"] for r in part) / 8 for part in (records[:8], records[-8:]))
    assert last < 0.8 * first, (first, last)
    if method == "unic":
        assert {"kept/teacher_a", "kept/teacher_b"} <= set(records[0])
        kept = [r["kept/teacher_a"] + r["kept/teacher_b"] for r in records]
        assert all(1.0 <= k < 2.0 for k in kept)  # the worst teacher always kept, the other about half the time


@pytest.mark.parametrize("method", ["unic", "sefa", "tintem"])
@pytest.mark.parametrize("stores", ["one", "joined"])
def test_cached_and_online_teachers_give_the_same_first_step(tiny_synth, tiny_cache, teacher_specs, tmp_path, method,
                                                             stores, request):
    """From one two-teacher store, or from two single-teacher stores joined at train time."""
    cache = str(tiny_cache) if stores == "one" else request.getfixturevalue("single_teacher_stores")
    cached = Trainer(_config(tiny_synth, tmp_path / "cached", method, cache=cache), DistInfo())
    online = Trainer(_config(tiny_synth, tmp_path / "online", method, teachers=list(teacher_specs), views=2,
                             stats_from=str(tiny_cache)), DistInfo())
    batches = [next(iter(t.loader)) for t in (cached, online)]
    assert torch.equal(batches[0]["student"], batches[1]["student"])  # the same samples, views and pixels
    losses = [t.train_step(b, 0)["loss"].item() for t, b in zip((cached, online), batches)]
    assert losses[0] == pytest.approx(losses[1], rel=2e-3)


def test_online_teachers_without_a_store_compute_statistics_first(tiny_synth, teacher_specs, tmp_path):
    trainer = Trainer(_config(tiny_synth, tmp_path / "o", "unic", teachers=list(teacher_specs), views=2, stats_samples=24,
                              max_steps=2), DistInfo())
    stats = trainer.teachers.targets.stats["teacher_a"]
    assert stats.cls_std.shape == (48,) and torch.all(stats.cls_std > 0)
    assert trainer.fit()["steps"] == 2


def test_a_cache_of_other_data_or_a_method_without_teachers_is_refused(synth_dir, tiny_synth, tiny_cache, tmp_path):
    with pytest.raises(CacheError, match="built from other data"):
        Trainer(_config(synth_dir, tmp_path / "x", "unic", cache=str(tiny_cache)), DistInfo())
    with pytest.raises(DistilleryError, match="give --cache STORE or --teacher SPEC"):
        Trainer(_config(tiny_synth, tmp_path / "y", "tintem"), DistInfo())
    with pytest.raises(DistilleryError, match="trains without teachers"):
        config = _config(tiny_synth, tmp_path / "z", "unic", cache=str(tiny_cache))
        Trainer(dataclasses.replace(config, method="dino", method_config=TINY_DINO), DistInfo())


def test_rows_whose_key_does_not_match_the_image_are_refused(tiny_synth, tiny_cache, tmp_path):
    import shutil

    import zarr

    copy = tmp_path / "store.zarr"
    shutil.copytree(tiny_cache, copy)
    keys = zarr.open_group(str(copy), mode="r+")["keys"]
    swapped = keys[0:32]
    swapped[[3, 4]] = swapped[[4, 3]]
    keys[0:32] = swapped
    trainer = Trainer(_config(tiny_synth, tmp_path / "run", "unic", cache=str(copy), max_steps=4), DistInfo())
    with pytest.raises(CacheError, match=r"row 3 holds key"):
        trainer.fit()


def test_a_subset_of_the_cached_teachers_can_be_chosen(tiny_synth, tiny_cache, tmp_path):
    trainer = Trainer(_config(tiny_synth, tmp_path / "one", "tintem", cache=str(tiny_cache), cache_teachers=["teacher_b"],
                              max_steps=2), DistInfo())
    assert [info.name for info in trainer.teachers.infos] == ["teacher_b"]
    batch = next(iter(trainer.loader))
    assert set(trainer.teachers.targets(batch)) == {"teacher_b"}
    assert trainer.fit()["steps"] == 2
    with pytest.raises(CacheError, match="hold no teacher teacher_c; they hold teacher_a, teacher_b"):
        Trainer(_config(tiny_synth, tmp_path / "bad", "tintem", cache=str(tiny_cache), cache_teachers=["teacher_c"]),
                DistInfo())


@pytest.fixture(scope="module")
def tiny_int8_cache(tmp_path_factory, tiny_synth, teacher_specs):
    from distillery.cache.writer import CacheConfig, cache_teachers

    out = tmp_path_factory.mktemp("tiny_int8") / "store.zarr"
    cache_teachers(str(tiny_synth / "train"), str(out), CacheConfig(tuple(teacher_specs), views=2, workers=0, dtype="int8"),
                   show_progress=False)
    return out


@pytest.mark.parametrize("method", ["unic", "sefa", "tintem"])
def test_an_int8_store_gives_the_float16_targets_within_quantisation(tiny_synth, tiny_cache, tiny_int8_cache, tmp_path,
                                                                     method):
    """The per-sample int8 scales are one number per row: CLS targets must stay [B, D], not broadcast to [B, B, D]."""
    trainers = [Trainer(_config(tiny_synth, tmp_path / name, method, cache=str(store)), DistInfo())
                for name, store in (("f16", tiny_cache), ("i8", tiny_int8_cache))]
    batches = [next(iter(t.loader)) for t in trainers]
    targets = [t.teachers.targets(b) for t, b in zip(trainers, batches)]
    stats = trainers[0].teachers.targets.stats  # the same dataset statistics in both stores
    for name in ("teacher_a", "teacher_b"):
        (f16, i8) = (t[name] for t in targets)
        assert i8.cls.shape == f16.cls.shape == (32, f16.cls.shape[-1])
        # one int8 step of the row's scale (standardised like the targets), plus float16 rounding
        cls_step = batches[1][f"targets/{name}/cls_scale"].float()[:, None]
        patch_step = batches[1][f"targets/{name}/patch_scale"].float().amax(-1)[:, None, None]  # resizing mixes tokens
        cls_std, patch_std = (stats[name].cls_std, stats[name].patch_std) if stats else (1.0, 1.0)
        assert ((i8.cls - f16.cls).abs() <= cls_step / cls_std + 2e-3 * f16.cls.abs() + 1e-3).all()
        assert ((i8.patch - f16.patch).abs() <= patch_step / patch_std + 2e-3 * f16.patch.abs() + 1e-3).all()
    losses = [t.train_step(b, 0)["loss"].item() for t, b in zip(trainers, batches)]
    assert losses[0] == pytest.approx(losses[1], rel=2e-2)


def test_the_cache_budget_measures_how_far_a_storage_moves_the_targets(tiny_synth, tiny_cache, tiny_int8_cache,
                                                                       teacher_specs, tmp_path):
    """benchmarks/cache_budget.py's target difference: none from the same store, less than a hundredth of a
    standard deviation from int8, and far more from pooled patch tokens, whose detail is gone."""
    import sys
    from pathlib import Path

    from distillery.cache.writer import CacheConfig, cache_teachers

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from cache_budget import target_difference

    pooled = tmp_path / "pooled.zarr"
    cache_teachers(str(tiny_synth / "train"), str(pooled), CacheConfig(tuple(teacher_specs), views=2, workers=0,
                                                                       patch_pool=2), show_progress=False)
    reference = CacheStore.open(str(tiny_cache))
    grid = (4, 4)  # TINY_STUDENT's: teacher_a's 8 x 8 pooled to it loses nothing training sees, teacher_b's 4 x 4 does
    assert target_difference(reference, reference, grid) == 0.0
    int8 = target_difference(CacheStore.open(str(tiny_int8_cache)), reference, grid)
    assert 0 < int8 < 0.02
    assert target_difference(CacheStore.open(str(pooled)), reference, grid) > 10 * int8


@pytest.fixture(scope="module")
def single_teacher_stores(tmp_path_factory, tiny_synth, teacher_specs):
    """teacher_a and teacher_b each in a store of its own, cached as tiny_cache caches both."""
    from distillery.cache.writer import CacheConfig, cache_teachers

    root = tmp_path_factory.mktemp("single_stores")
    for name, spec in zip(("a", "b"), teacher_specs):
        cache_teachers(str(tiny_synth / "train"), str(root / f"{name}.zarr"), CacheConfig((spec,), views=2, workers=0),
                       show_progress=False)
    return [str(root / "a.zarr"), str(root / "b.zarr")]


@pytest.mark.parametrize("method", ["unic", "tintem"])
def test_two_single_teacher_stores_train_as_one_two_teacher_store(tiny_synth, tiny_cache, single_teacher_stores,
                                                                  tmp_path, method):
    joined, both = (Trainer(_config(tiny_synth, tmp_path / name, method, cache=cache), DistInfo())
                    for name, cache in (("joined", single_teacher_stores), ("both", str(tiny_cache))))
    assert [i.name for i in joined.teachers.infos] == [i.name for i in both.teachers.infos] == ["teacher_a", "teacher_b"]
    batches = [next(iter(t.loader)) for t in (joined, both)]
    assert batches[0].keys() == batches[1].keys()
    for key in batches[0]:
        if isinstance(batches[0][key], torch.Tensor):
            assert torch.equal(batches[0][key], batches[1][key]), key
    losses = [t.train_step(b, 0)["loss"].item() for t, b in zip((joined, both), batches)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_a_teacher_added_to_a_store_leaves_its_arrays_alone_and_trains_as_one_store(tiny_synth, tiny_cache,
                                                                                    single_teacher_stores, teacher_specs,
                                                                                    tmp_path):
    import hashlib
    import shutil

    from distillery.cache.writer import CacheConfig, addition_config, cache_teachers

    store_url = tmp_path / "a_then_b.zarr"
    shutil.copytree(single_teacher_stores[0], store_url)
    files = lambda: {p.relative_to(store_url).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
                     for p in store_url.rglob("*") if p.is_file()}
    before = files()
    with pytest.raises(CacheError, match=r"cannot take these teachers: .*views.count: store has 2, this run has 3"):
        cache_teachers(str(tiny_synth / "train"), str(store_url), CacheConfig((teacher_specs[1],), views=3, workers=0),
                       add=True, show_progress=False)
    assert files() == before  # refused before anything was created
    config = addition_config(str(store_url), (teacher_specs[1],), workers=0)
    assert (config.views, config.seed, config.dtype) == (2, 0, "float16")
    summary = cache_teachers(str(tiny_synth / "train"), str(store_url), config, add=True, show_progress=False)
    assert summary["complete"] and summary["shards_written"] == 2
    after = files()
    assert {name: after[name] for name in before if name != "manifest.json"} == \
        {name: digest for name, digest in before.items() if name != "manifest.json"}  # old arrays byte-identical
    store, both = CacheStore.open(str(store_url)), CacheStore.open(str(tiny_cache))
    assert [t.name for t in store.teachers] == ["teacher_a", "teacher_b"] and not store.adding
    for shard in range(both.num_shards):
        ours, theirs = store.read_block(shard, view=None), both.read_block(shard, view=None)
        for key in theirs:
            assert np.array_equal(np.asarray(ours[key]), np.asarray(theirs[key])), key
    again = cache_teachers(str(tiny_synth / "train"), str(store_url), config, add=True, show_progress=False)
    assert again["shards_written"] == 0 and files() == after  # a finished addition is resumed as done

    added, whole = (Trainer(_config(tiny_synth, tmp_path / name, "unic", cache=cache), DistInfo())
                    for name, cache in (("added", str(store_url)), ("whole", str(tiny_cache))))
    batches = [next(iter(t.loader)) for t in (added, whole)]
    losses = [t.train_step(b, 0)["loss"].item() for t, b in zip((added, whole), batches)]
    assert losses[0] == losses[1]


def test_a_store_being_added_to_is_read_with_its_own_teachers_only(tiny_synth, single_teacher_stores, teacher_specs,
                                                                  tmp_path):
    import shutil

    from distillery.cache.writer import addition_config, build_identity
    from distillery.data.shards import ShardSet
    from distillery.models.teachers import create_teacher

    store_url = tmp_path / "adding.zarr"
    shutil.copytree(single_teacher_stores[0], store_url)
    config = addition_config(str(store_url), (teacher_specs[1],), workers=0)
    identity = build_identity(ShardSet.open(tiny_synth / "train"), [create_teacher(teacher_specs[1])], config, "float32")
    CacheStore.open(str(store_url), writable=True).begin_addition(identity["teachers"])  # as a run that was stopped
    store = CacheStore.open(str(store_url))
    assert store.is_complete and [t.name for t in store.teachers] == ["teacher_a"]
    assert [t.name for t in store.adding] == ["teacher_b"]
    assert store.read_block(0).keys() == {"keys", "valid", "views", "teacher_a/cls", "teacher_a/patch"}
    with pytest.raises(CacheError, match=r"is taking other teachers already \(teacher_b\)"):
        other = {**identity["teachers"][0], "name": "teacher_c"}
        CacheStore.open(str(store_url), writable=True).begin_addition([other])


def test_stores_combine_only_under_the_same_views_and_distinct_teachers(tiny_synth, tiny_cache, single_teacher_stores,
                                                                        teacher_specs, tmp_path):
    from distillery.cache.writer import CacheConfig, cache_teachers

    other = tmp_path / "other_seed.zarr"
    cache_teachers(str(tiny_synth / "train"), str(other), CacheConfig((teacher_specs[1],), views=2, seed=5, workers=0),
                   show_progress=False)
    with pytest.raises(CacheError, match=r"other_seed.zarr and .*a.zarr cannot be combined: their views differ \(views.seed"):
        Trainer(_config(tiny_synth, tmp_path / "x", "unic", cache=[single_teacher_stores[0], str(other)]), DistInfo())
    with pytest.raises(CacheError, match="teacher teacher_a is in both"):
        Trainer(_config(tiny_synth, tmp_path / "y", "unic", cache=[str(tiny_cache), single_teacher_stores[0]]), DistInfo())


def test_training_from_a_brace_pattern_of_the_shards_is_training_from_their_directory(tiny_synth, tiny_cache, tmp_path):
    names = sorted(p.name for p in (tiny_synth / "train").glob("*.tar"))
    pattern = str(tiny_synth / "train" / names[0].replace("000000", "{000000..%06d}" % (len(names) - 1)))
    braced, plain = (Trainer(_config(tiny_synth, tmp_path / name, "unic", cache=str(tiny_cache), data=data), DistInfo())
                     for name, data in (("braced", pattern), ("plain", str(tiny_synth / "train"))))
    first = [next(iter(t.loader)) for t in (braced, plain)]
    assert torch.equal(first[0]["student"], first[1]["student"]) and torch.equal(first[0]["index"], first[1]["index"])


def test_teachers_rank_across_stores_reads_their_stored_cls(tiny_cache, single_teacher_stores, tmp_path):
    """CKA of teachers cached apart equals CKA of the same teachers cached together, from the stored CLS."""
    from distillery.evaluate.cka import linear_cka
    from distillery.evaluate.features import Extraction
    from distillery.evaluate.suite import run_cka
    from distillery.evaluate.tasks import CkaSettings

    apart, _, _ = run_cka([], [], None, CkaSettings(), Extraction(), out=tmp_path / "apart.json", stores=single_teacher_stores)
    together, _, _ = run_cka([], [], None, CkaSettings(), Extraction(), out=tmp_path / "together.json",
                             stores=[str(tiny_cache)])
    assert apart.metrics["names"] == together.metrics["names"] == ["teacher_a", "teacher_b"]
    assert apart.metrics["linear"][0][1] == pytest.approx(together.metrics["linear"][0][1], abs=1e-6)
    store = CacheStore.open(str(tiny_cache))
    blocks = [store.read_block(shard, view=0, parts=("cls",)) for shard in range(store.num_shards)]
    a, b = (torch.cat([blk[f"{name}/cls"] for blk in blocks]).numpy() for name in ("teacher_a", "teacher_b"))
    assert apart.metrics["linear"][0][1] == pytest.approx(linear_cka(a, b), abs=1e-6)


@pytest.fixture(scope="module")
def nan_teacher(tmp_path_factory):
    """A ViT teacher whose final norm makes every output NaN."""
    from distillery.models.students import create_student, export_local_dir

    model = create_student("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=48, num_heads=3)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    path = tmp_path_factory.mktemp("nan") / "nan_teacher"
    export_local_dir(model, path)
    return f"local-dir:{path}"


def test_a_teacher_that_outputs_nan_is_never_silent(tiny_synth, teacher_specs, nan_teacher, tmp_path):
    """Beside a good teacher: cache-teachers exits 2 naming it and leaves the store incomplete, cache verify
    fails; let through with --max-invalid 1, the store has no valid row and train refuses it at once, and a
    stream over rows that are all invalid raises instead of waiting for a batch forever."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from distillery.cache.verify import verify_store
    from distillery.cache.writer import CacheConfig, cache_teachers
    from distillery.data.shards import ShardSet
    from distillery.data.views import ViewConfig
    from distillery.train.data import SampleSpec, TeacherViews, TrainStream

    out = tmp_path / "nan.zarr"
    command = [sys.executable, "-m", "distillery.cli", "cache-teachers", "--data", str(tiny_synth / "train"),
               "--teacher", teacher_specs[0], "--teacher", nan_teacher, "--out", str(out), "--views", "1", "--workers", "0"]
    refused = subprocess.run(command, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    lines = [line for line in refused.stderr.strip().splitlines() if "caching (rank" not in line]  # progress aside
    assert refused.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), refused.stderr
    assert "teacher nan_teacher gave non-finite outputs for 64 of 64 images (100.0%)" in lines[0]
    store = CacheStore.open(str(out))
    assert not store.is_complete and len(store.completed_shards()) == store.num_shards
    report = dict((name, ok) for name, ok, _ in verify_store(store, str(tiny_synth / "train"))["checks"])
    assert not report["all shards complete"] and not report["teachers' invalid rows within --max-invalid"]

    summary = cache_teachers(str(tiny_synth / "train"), str(out), CacheConfig((teacher_specs[0], nan_teacher), views=1,
                                                                              workers=0, max_invalid=1.0),
                             show_progress=False)
    assert summary["complete"] and summary["invalid (teacher nan_teacher)"] == 64
    report = dict((name, ok) for name, ok, _ in verify_store(CacheStore.open(str(out)), str(tiny_synth / "train"))["checks"])
    assert not report["teacher statistics finite"] and not report["teachers' invalid rows within --max-invalid"]
    with pytest.raises(CacheError, match="has no valid row"):
        Trainer(_config(tiny_synth, tmp_path / "run", "unic", cache=str(out)), DistInfo())

    stream = TrainStream(ShardSet.open(tiny_synth / "train"), SampleSpec(teacher_view=True), (32, 32), 8, 0,
                         teacher_views=TeacherViews(1, 0, ViewConfig(), stores=((str(out), ("teacher_a",)),)))
    with pytest.raises(DistilleryError, match="a whole pass over shards .* gave no usable sample"):
        next(iter(stream))


def test_a_cache_of_shards_whose_images_changed_under_the_same_keys_is_refused(tiny_synth, tiny_cache, tmp_path):
    """Two images re-encoded, keys unchanged, the shards and their index rewritten: the member sizes in the
    fingerprint see it without reading an image, and train and cache verify name the shard."""
    import io

    from PIL import Image

    from distillery.cache.verify import verify_store
    from distillery.data.shards import ShardSet, ShardWriter

    source = ShardSet.open(tiny_synth / "train")
    writer = ShardWriter(tmp_path / "train", shard_size=32, prefix="train")
    for shard in range(len(source)):
        for position, record in enumerate(source.records(shard)):
            data = record.image_bytes
            if shard == 1 and position in (3, 17):
                buffer = io.BytesIO()
                with Image.open(io.BytesIO(data)) as image:
                    image.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(buffer, "JPEG", quality=70)
                data = buffer.getvalue()
            writer.write(record.key, data, "jpg", record.label, record.meta)
    writer.close(list(source.classes), {name: list(values) for name, values in source.factors.items()})
    changed = ShardSet.open(tmp_path / "train")
    assert changed.fingerprint()["keys_sha256"] == source.fingerprint()["keys_sha256"]  # the keys alone see nothing
    with pytest.raises(CacheError, match=r"built from other data than .*: shard train-000001.tar has other sample files"):
        Trainer(_config(tiny_synth, tmp_path / "run", "unic", cache=str(tiny_cache), data=str(tmp_path / "train")),
                DistInfo())
    checks = {name: (ok, detail) for name, ok, detail in verify_store(CacheStore.open(str(tiny_cache)),
                                                                        str(tmp_path / "train"))["checks"]}
    assert checks["data matches the manifest"] == (False, "shard train-000001.tar has other sample files (names or sizes)")
