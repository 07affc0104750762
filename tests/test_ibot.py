"""iBOT: the masked-patch loss against a hand computation, BEiT's block masks, the shared head, SeFA's ssl option."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distillery.config import ConfigError
from distillery.train.methods import MethodContext, TeacherInfo, create_method
from distillery.train.methods.ibot import IbotConfig, IbotHead, block_mask, crop_ratio, ibot_masks, ibot_patch_loss


def test_the_patch_loss_averages_masked_tokens_per_image_then_images_and_crops():
    student = torch.randn(2, 2, 3, 4, generator=torch.Generator().manual_seed(0))  # [crops, B, T, K]
    teacher = torch.randn(2, 2, 3, 4, generator=torch.Generator().manual_seed(1))
    center = torch.tensor([0.1, 0.0, -0.1, 0.2])
    masks = torch.tensor([[[1, 0, 1], [0, 0, 0]], [[0, 1, 0], [1, 1, 1]]], dtype=torch.bool)
    expected = 0.0
    for crop in range(2):
        per_image = []
        for image in range(2):
            terms = [-(F.softmax((teacher[crop, image, t] - center) / 0.07, -1)
                       * F.log_softmax(student[crop, image, t] / 0.1, -1)).sum() for t in range(3) if masks[crop, image, t]]
            per_image.append(sum(terms) / max(len(terms), 1))  # an unmasked image adds 0 / 1
        expected += sum(per_image) / 2
    expected /= 2
    assert ibot_patch_loss(student, teacher, masks, center, 0.1, 0.07).item() == pytest.approx(float(expected), rel=1e-5)


def test_block_masks_cover_about_the_ratio_and_repeat_under_a_seed():
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    sizes = [block_mask((14, 14), 0.3, log_aspect, np.random.default_rng(seed)).sum() for seed in range(50)]
    assert all(16 <= s <= 0.3 * 196 + 1 for s in sizes) and np.mean(sizes) > 0.2 * 196  # blocks of >= (14 // 3)^2 = 16
    first = block_mask((14, 14), 0.3, log_aspect, np.random.default_rng(3))
    assert np.array_equal(first, block_mask((14, 14), 0.3, log_aspect, np.random.default_rng(3)))
    assert block_mask((14, 14), 0.0, log_aspect, np.random.default_rng(0)).sum() == 0


def test_the_readme_ratios_mask_about_half_the_crops_at_01_to_05():
    config, rng = IbotConfig(), np.random.default_rng(0)
    ratios = np.array([crop_ratio(config, rng) for _ in range(2000)])
    assert 0.45 < (ratios == 0).mean() < 0.55 and ratios[ratios > 0].min() >= 0.1 and ratios.max() <= 0.5
    masks = ibot_masks(4, 2, (8, 8), config, np.random.default_rng(0), active=False)
    assert masks.shape == (2, 4, 64) and not masks.any()  # before pred_start_epoch
    with pytest.raises(ConfigError, match="pred_ratio_var <= ratio"):
        IbotConfig(pred_ratio=(0.1,), pred_ratio_var=(0.2,))


def test_the_shared_head_puts_patches_through_the_cls_layer():
    shared = IbotHead(8, IbotConfig(out_dim=16, hidden_dim=12, bottleneck_dim=6))
    cls, patch = shared(torch.randn(2, 8), torch.randn(2, 3, 8))
    assert cls.shape == (2, 16) and patch.shape == (2, 3, 16) and len(shared.last_layers) == 1
    own = IbotHead(8, IbotConfig(out_dim=16, patch_out_dim=10, shared_head=False, hidden_dim=12, bottleneck_dim=6))
    assert own(torch.randn(2, 8), torch.randn(2, 3, 8))[1].shape == (2, 3, 10) and len(own.last_layers) == 2


def test_sefa_takes_ibot_as_its_ssl_objective():
    context = MethodContext(student_dim=8, student_grid=(4, 4), student_size=(16, 16), student_depth=1,
                            teachers=(TeacherInfo("a", 8, (4, 4)),), label_classes={}, total_steps=4, steps_per_epoch=2,
                            seed=0)
    small = {"out_dim": 16, "hidden_dim": 12, "bottleneck_dim": 6}
    sefa = create_method("sefa", {"ssl": "ibot", "ibot": small, "head_hidden_dim": 8}, context)
    assert type(sefa.objective).__name__ == "IbotObjective" and "head" in sefa.ema_heads()
    with pytest.raises(ConfigError, match="a dino: section with ssl: ibot would be ignored"):
        create_method("sefa", {"ssl": "ibot", "dino": small}, context)
    with pytest.raises(ConfigError, match="sefa ssl must be one of dino, ibot"):
        create_method("sefa", {"ssl": "mae"}, context)


def test_sefa_with_ibot_takes_a_training_step_with_both_terms(tiny_synth, tiny_cache, tmp_path):
    from distillery.train.config import TrainConfig
    from distillery.train.distributed import DistInfo
    from distillery.train.loop import Trainer
    from tests.conftest import TINY_DINO, TINY_STUDENT

    ibot = {**TINY_DINO, "pred_ratio": [0.3], "pred_ratio_var": [0.1]}
    config = TrainConfig(method="sefa", data=str(tiny_synth / "train"), out=str(tmp_path / "run"), student_args=TINY_STUDENT,
                         epochs=1, max_steps=1, batch_size=16, lr=1e-3, warmup_epochs=0, workers=0, seed=0,
                         cache=str(tiny_cache), method_config={"ssl": "ibot", "ibot": ibot, "head_hidden_dim": 32})
    trainer = Trainer(config, DistInfo())
    losses = trainer.train_step(next(iter(trainer.loader)), 0)
    assert torch.isfinite(losses["loss"]) and losses["ibot_patch"] > 0 and losses["ibot_cls"] > 0
    assert trainer.method.objective.center2.abs().sum() > 0  # the patch centre moved after the step
