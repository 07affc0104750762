import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from distillery.errors import DistilleryError
from distillery.models.students import Student
from distillery.train import checkpoint as ckpt
from distillery.train.config import TrainConfig
from distillery.train.data import TrainStream
from distillery.train.distributed import DistInfo
from distillery.train.export import export_run
from distillery.train.loop import Trainer, TrainingError, train
from distillery.train.schedules import warmup_constant, warmup_cosine
from tests.conftest import TINY_DINO, TINY_STUDENT, TINY_SUPERVISED


def _config(data, out, method, **overrides) -> TrainConfig:
    values = dict(method=method, data=str(data / "train"), out=str(out), student_args=TINY_STUDENT, epochs=30,
                  max_steps=40, batch_size=32, lr=3e-3, warmup_epochs=0, workers=0, log_every=1, seed=0,
                  method_config=TINY_DINO if method == "dino" else TINY_SUPERVISED)
    values.update(overrides)
    return TrainConfig(**values)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _cli_env():
    return {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}


@pytest.mark.parametrize("method", ["supervised", "dino"])
def test_training_brings_the_loss_down(tiny_synth, tmp_path, method):
    Trainer(_config(tiny_synth, tmp_path / method, method, lr=8e-3 if method == "supervised" else 3e-3), DistInfo()).fit()
    losses = _losses(tmp_path / method)
    assert len(losses) == 40
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.9 * first, (first, last)


def test_schedules():
    assert warmup_cosine(0, 100, 1.0, 0.0, warmup_steps=10) == 0.0
    assert warmup_cosine(5, 100, 1.0, 0.0, warmup_steps=10) == 0.5
    assert warmup_cosine(10, 100, 1.0, 0.0, warmup_steps=10) == 1.0
    assert abs(warmup_cosine(55, 100, 1.0, 0.0, warmup_steps=10) - 0.5) < 1e-12
    assert warmup_cosine(100, 100, 0.996, 1.0) == 1.0
    assert warmup_constant(3, 0.07, warmup_steps=6, warmup_start=0.04) == pytest.approx(0.055)
    assert warmup_constant(9, 0.07, warmup_steps=6, warmup_start=0.04) == 0.07


def test_resume_continues_exactly_as_an_uninterrupted_run(tiny_synth, tmp_path):
    """DINO (EMA teacher, centre, crops) with two data workers: the losses after a resume are the same numbers."""
    common = dict(method="dino", data=str(tiny_synth / "train"), student_args=TINY_STUDENT, epochs=30, batch_size=16,
                  lr=3e-3, warmup_epochs=1, workers=2, log_every=1, checkpoint_every=5, method_config=TINY_DINO)
    whole = tmp_path / "whole"
    Trainer(TrainConfig(out=str(whole), max_steps=12, **common), DistInfo()).fit()
    part = tmp_path / "part"
    train({k: v for k, v in dict(out=str(part), max_steps=7, **common).items() if k != "method_config"} | {"method": "dino"},
          config_file=_write_yaml(tmp_path / "c.yaml", {"dino": TINY_DINO}))
    # The run stopped at step 7 and saved there; step-5 is the newest periodic checkpoint, remove step 7 so the
    # resume has to replay steps 6-7 too.
    (part / "checkpoints" / "step-00000007.pt").unlink()
    summary = train({"out": str(part), "max_steps": 12}, resume=True)
    assert summary["steps"] == 12
    assert _losses(part) == _losses(whole)
    final_whole = ckpt.load_checkpoint(whole / "checkpoints" / "step-00000012.pt")
    final_part = ckpt.load_checkpoint(part / "checkpoints" / "step-00000012.pt")
    for key, value in final_whole["model"].items():
        assert torch.equal(value, final_part["model"][key]), key
    assert torch.equal(final_whole["model"]["method.objective.center"], final_part["model"]["method.objective.center"])


def _write_yaml(path: Path, values: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.slow
def test_two_process_ddp_agrees_with_one_process_on_the_global_batch(tiny_synth, tmp_path):
    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
               "-m", "distillery.cli", "train", "--method", "dino", "--data", str(tiny_synth / "train"),
               "--out", str(run), "--config", str(_write_yaml(tmp_path / "d.yaml", {
                   "student_args": TINY_STUDENT, "epochs": 10, "batch_size": 32, "lr": 3e-3, "warmup_epochs": 0,
                   "workers": 0, "log_every": 1, "dino": TINY_DINO})), "--max-steps", "1", "--device", "cpu"]
    result = subprocess.run(command, env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    ddp = ckpt.load_checkpoint(run / "checkpoints" / "step-00000001.pt")

    config = _config(tiny_synth, tmp_path / "single", "dino", epochs=10, max_steps=1, batch_size=32)
    single = Trainer(config, DistInfo())
    halves = [next(iter(TrainStream(single.loader.dataset.source.shard_set, single.method.sample_spec(), (32, 32), 16, 0,
                                    rank=rank, world_size=2, num_workers=1))) for rank in (0, 1)]
    global_batch = {k: torch.cat([halves[0][k], halves[1][k]]) for k in halves[0] if isinstance(halves[0][k], torch.Tensor)}
    single.train_step(global_batch, 0)
    for key, value in single.module.state_dict().items():
        assert torch.allclose(value, ddp["model"][key], rtol=1e-4, atol=1e-6), key
    assert len(ddp["rng"]) == 2 and len(ddp["data"]["positions"]) == 2


def test_export_rebuilds_the_trained_backbone_exactly(tiny_synth, tmp_path):
    run = tmp_path / "run"
    Trainer(_config(tiny_synth, run, "dino", max_steps=3), DistInfo()).fit()
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    for ema, prefix in ((False, "student.model."), (True, "module.backbone.model.")):
        out = export_run(run, tmp_path / f"export_{ema}", ema=ema)
        model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        reference = Student.from_config(state["student_config"])
        weights = state["ema"] if ema else state["model"]
        reference.model.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
        images = torch.randn(4, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(model.forward_features(images), reference.eval().model.forward_features(images))
        assert model.pretrained_cfg["mean"] == list(reference.preprocessing.mean)
    student_only = tmp_path / "sup"
    Trainer(_config(tiny_synth, student_only, "supervised", max_steps=1), DistInfo()).fit()
    with pytest.raises(ckpt.CheckpointError, match="no EMA"):
        export_run(student_only, tmp_path / "x", ema=True)


def test_a_non_finite_loss_stops_the_run_and_names_the_last_good_checkpoint(tiny_synth, tmp_path):
    trainer = Trainer(_config(tiny_synth, tmp_path / "nan", "supervised", checkpoint_every=2, max_steps=10), DistInfo())
    forward = trainer.module.method.forward

    def poisoned(student, batch, step, ema):
        losses = forward(student, batch, step, ema)
        return {**losses, "loss": losses["loss"] * float("nan")} if step == 4 else losses

    trainer.module.method.forward = poisoned
    with pytest.raises(TrainingError, match=r"step 5: the loss is not finite .*step-00000004\.pt"):
        trainer.fit()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "nan")] == ["step-00000002.pt", "step-00000004.pt"]


def test_cli_overrides_the_config_file_and_saves_the_resolved_config(tiny_synth, tmp_path):
    config = _write_yaml(tmp_path / "c.yaml", {"method": "supervised", "student_args": TINY_STUDENT, "epochs": 3,
                                              "batch_size": 16, "lr": 1e-3, "workers": 0})
    train({"data": str(tiny_synth / "train"), "out": str(tmp_path / "run"), "max_steps": 2, "batch_size": 32}, config)
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "batch_size: 32" in saved and "lr: 0.001" in saved and "max_steps: 2" in saved
    with pytest.raises(DistilleryError, match="already holds a run"):
        train({"data": str(tiny_synth / "train"), "out": str(tmp_path / "run")}, config)
    with pytest.raises(DistilleryError, match="options differ: lr"):
        train({"out": str(tmp_path / "run"), "lr": 0.5}, resume=True)


@pytest.mark.slow
def test_bad_inputs_give_one_line_errors(tiny_synth, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "distillery.cli", *args], env=_cli_env(), capture_output=True, text=True)

    unknown = _write_yaml(tmp_path / "u.yaml", {"method": "supervised", "epochz": 3})
    result = run("train", "--config", str(unknown), "--data", str(tiny_synth / "train"), "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and "unknown config key 'epochz'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    section = _write_yaml(tmp_path / "s.yaml", {"method": "dino", "dino": {"out_dimm": 3}})
    result = run("train", "--config", str(section), "--data", str(tiny_synth / "train"), "--out", str(tmp_path / "r2"))
    assert result.returncode == 2 and "`dino:` section: unknown key 'out_dimm'" in result.stderr
    broken = tmp_path / "broken" / "checkpoints"
    broken.mkdir(parents=True)
    (broken / "step-00000003.pt").write_bytes(b"not a checkpoint" * 10)
    result = run("export", str(tmp_path / "broken"), "--out", str(tmp_path / "e"))
    assert result.returncode == 2 and "step-00000003.pt: not a readable checkpoint" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = run("train", "--method", "nope", "--data", str(tiny_synth / "train"), "--out", str(tmp_path / "r3"))
    assert result.returncode == 2 and "unknown method 'nope'" in result.stderr


def test_a_convolutional_model_trains_on_a_factor_and_exports_as_a_teacher(tiny_synth, tmp_path):
    """The demo's teachers: a timm ResNet supervised on the pattern factor (shape as an auxiliary label),
    exported as a local-dir model whose feature-map positions are its patch tokens."""
    from distillery.models.teachers import create_teacher

    cnn = {"channels": [8, 16, 16, 16], "layers": [1, 1, 1, 1], "output_stride": 8,
           "pretrained_cfg_overlay": {"input_size": [3, 32, 32]}}
    config = _config(tiny_synth, tmp_path / "run", "supervised", student="resnet18", student_args=cnn, max_steps=4,
                     method_config={**TINY_SUPERVISED, "label": "pattern", "aux_labels": {"shape": 0.5}})
    Trainer(config, DistInfo()).fit()
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"ce", "ce_shape", "train_top1"} <= set(logged)
    export_run(tmp_path / "run", tmp_path / "cnn")
    teacher = create_teacher(f"local-dir:{tmp_path / 'cnn'}")
    tokens = teacher(torch.zeros(2, 3, 32, 32))
    assert teacher.grid == (4, 4) and tokens.cls.shape == (2, 16) and tokens.patch.shape == (2, 16, 16)
    with pytest.raises(DistilleryError, match="label 'texture' needs shards"):
        Trainer(_config(tiny_synth, tmp_path / "bad", "supervised",
                        method_config={**TINY_SUPERVISED, "label": "texture"}), DistInfo())


def test_the_convolutional_stem_vit_is_a_timm_model_that_round_trips_through_local_dir(tmp_path):
    from distillery.models.students import export_local_dir, initial_student
    from distillery.models.teachers import create_teacher

    from distillery.models.convstem import ResidualBlock

    student = initial_student("vit_convstem_tiny_patch4_32", {"stem_blocks": 1}, seed=0)
    assert student.grid == (8, 8) and student.is_vit and student.model.dynamic_img_size
    stem = student.model.patch_embed.proj
    assert isinstance(stem, torch.nn.Sequential)  # stride-2 convs, not one patchify conv
    assert [type(m) for m in stem if isinstance(m, (torch.nn.Conv2d, ResidualBlock))] == [
        torch.nn.Conv2d, ResidualBlock, torch.nn.Conv2d, ResidualBlock, torch.nn.Conv2d]  # a block after each stride
    export_local_dir(student, tmp_path / "model")
    teacher = create_teacher(f"local-dir:{tmp_path / 'model'}")
    images = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(teacher(images).cls, student.eval()(images).cls)
    with pytest.raises(ValueError, match="power-of-two patch size"):
        timm.create_model("vit_convstem_tiny_patch4_32", patch_size=6)


def test_per_parameter_clipping_is_dinos_clip_gradients():
    """DINO (utils.clip_gradients) clips each parameter's gradient to the norm on its own, not the global norm."""
    from distillery.train.loop import clip_per_parameter

    def dino_clip_gradients(model, clip):  # facebookresearch/dino utils.py, as published
        for p in model.parameters():
            if p.grad is not None:
                param_norm = p.grad.data.norm(2)
                clip_coef = clip / (param_norm + 1e-6)
                if clip_coef < 1:
                    p.grad.data.mul_(clip_coef)

    def model_with_grads():
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
        for p, scale in zip(model.parameters(), (50.0, 0.01, 0.5, 2.0)):
            p.grad = torch.full_like(p, scale)
        return model

    reference, ours, global_ = model_with_grads(), model_with_grads(), model_with_grads()
    dino_clip_gradients(reference, 3.0)
    clip_per_parameter(ours.parameters(), 3.0)
    torch.nn.utils.clip_grad_norm_(global_.parameters(), 3.0)
    for a, b in zip(reference.parameters(), ours.parameters()):
        assert torch.equal(a.grad, b.grad)
    grads = [p.grad for p in ours.parameters()]
    assert grads[0].norm() == pytest.approx(3.0, rel=1e-5) and torch.equal(grads[1], torch.full((4,), 0.01))
    assert not torch.equal(list(global_.parameters())[1].grad, grads[1])  # the global rule shrinks the small one too
    with pytest.raises(DistilleryError, match="clip_mode must be"):
        TrainConfig(method="dino", data="d", out="o", clip_mode="norm")


def test_a_warmup_as_long_as_the_run_is_clamped_to_a_tenth_of_it(capsys):
    from distillery.train.loop import warmup_steps

    assert warmup_steps(2, 50, 500, 10) == 100  # shorter than the run: as given
    assert warmup_steps(10, 50, 50, 1) == 5  # the default 10 epochs on a 1-epoch run: a tenth of it
    assert "clamped to 5 steps" in capsys.readouterr().err


def test_a_finished_run_resumed_says_so_and_a_run_leaves_its_loss_curves(tiny_synth, tmp_path, capsys):
    config = _write_yaml(tmp_path / "c.yaml", {"method": "supervised", "student_args": TINY_STUDENT, "epochs": 1,
                                              "batch_size": 32, "workers": 0, "supervised": TINY_SUPERVISED})
    run = tmp_path / "run"
    first = train({"data": str(tiny_synth / "train"), "out": str(run), "max_steps": 2}, config)
    assert (run / "losses.png").stat().st_size > 0  # total loss, its terms and the LR, drawn when a run ends
    logged = _losses(run)
    capsys.readouterr()
    again = train({"out": str(run)}, resume=True)
    assert "is already at step 2 of 2: nothing to train" in " ".join(capsys.readouterr().err.split())
    assert again["loss"] == first["loss"] is not None and again["steps"] == 2
    assert _losses(run) == logged  # the log is left as it was


def test_init_starts_the_student_from_an_export_and_a_misfit_is_one_line(tiny_synth, tmp_path):
    from distillery.models.students import export_local_dir, initial_student

    donor = initial_student("vit_tiny_patch16_224", TINY_STUDENT, seed=7)
    export_local_dir(donor, tmp_path / "donor")
    trainer = Trainer(_config(tiny_synth, tmp_path / "run", "supervised", init=f"local-dir:{tmp_path / 'donor'}"), DistInfo())
    for name, value in donor.model.state_dict().items():
        assert torch.equal(trainer.student.model.state_dict()[name], value), name
    with pytest.raises(DistilleryError, match=r"--init local-dir:.*donor: its weights do not fit the student"):
        Trainer(_config(tiny_synth, tmp_path / "run2", "supervised", init=f"local-dir:{tmp_path / 'donor'}",
                        student_args={**TINY_STUDENT, "embed_dim": 64, "num_heads": 4}), DistInfo())


def test_a_method_starts_from_its_recipe_by_name(tmp_path):
    from distillery.train.config import read_yaml, recipe_path

    tintem = read_yaml(recipe_path("tintem", None))  # the paper recipe, not the generic defaults
    assert (tintem["lr_scaling"], tintem["weight_decay"], tintem["clip_grad"], tintem["warmup_epochs"]) == ("none", 0.05, 0, 5)
    assert recipe_path("tintem", "synth").name == "tintem_synth.yaml"
    assert recipe_path("unic", "none") is None and recipe_path("dino", None) is None  # no paper recipe: defaults
    with pytest.raises(DistilleryError, match=r"--recipe paper: dino has no paper recipe; its recipes: none, synth"):
        recipe_path("dino", "paper")


def test_gradient_accumulation_takes_the_step_of_the_whole_batch_and_resumes_exactly(tiny_synth, tmp_path):
    """Supervised cross-entropy is a mean over samples, so two micro-batches of 16 give the gradient one batch of
    32 gives (the same samples, in the same order, with one data stream)."""
    whole, accumulated = (Trainer(_config(tiny_synth, tmp_path / f"k{k}", "supervised", grad_accum_steps=k), DistInfo())
                          for k in (1, 2))
    batch = next(iter(whole.loader))
    stream = iter(accumulated.loader)
    micro_batches = [next(stream), next(stream)]
    assert torch.equal(torch.cat([m["student"] for m in micro_batches]), batch["student"])
    losses = whole.train_step(batch, 0), accumulated.train_step(micro_batches, 0)
    assert losses[1]["loss"].item() == pytest.approx(losses[0]["loss"].item(), rel=1e-6)
    for (name, p), q in zip(whole.module.named_parameters(), accumulated.module.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), name

    # with two data streams a step's micro-batches come from both; a resume takes them up where they were
    common = dict(grad_accum_steps=2, workers=2, checkpoint_every=3, batch_size=16)
    Trainer(_config(tiny_synth, tmp_path / "whole", "supervised", max_steps=6, **common), DistInfo()).fit()
    Trainer(_config(tiny_synth, tmp_path / "part", "supervised", max_steps=3, **common), DistInfo()).fit()
    Trainer(_config(tiny_synth, tmp_path / "part", "supervised", max_steps=6, **common), DistInfo(), resume=True).fit()
    assert _losses(tmp_path / "part") == _losses(tmp_path / "whole")
    with pytest.raises(DistilleryError, match="grad_accum_steps must be at least 1 and divide batch_size 32, got 3"):
        _config(tiny_synth, tmp_path / "x", "supervised", grad_accum_steps=3)


def test_tensorboard_holds_the_logged_records_also_when_turned_on_at_a_resume(tiny_synth, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = _write_yaml(tmp_path / "c.yaml", {"method": "supervised", "student_args": TINY_STUDENT, "epochs": 1,
                                              "batch_size": 8, "workers": 0, "log_every": 1, "warmup_epochs": 0,
                                              "supervised": TINY_SUPERVISED})
    run = tmp_path / "run"
    train({"data": str(tiny_synth / "train"), "out": str(run), "max_steps": 2}, config)
    assert not (run / "tensorboard").exists()
    train({"out": str(run), "max_steps": 4, "tensorboard": True}, resume=True)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == \
        [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in logged]
    assert len(logged) == 4 and "train/lr" in events.Tags()["scalars"]
