"""The error contract: bad user input is one line naming the file or option and the problem, exit status 2,
and a train config is checked whole before any model, teacher or statistics pass is built."""

from __future__ import annotations

import sys

import pytest
import yaml

from distillery import cli


def run_cli(argv, monkeypatch, capsys) -> tuple[int, list[str]]:
    monkeypatch.setattr(sys, "argv", ["distillery", *argv])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def _write(path, values):
    path.write_text(yaml.safe_dump(values))
    return str(path)


def _text(path, text):
    path.write_text(text)
    return str(path)


def test_bad_input_is_one_line_with_exit_status_2(tmp_path, tiny_synth, monkeypatch, capsys):
    import shutil

    # method errors must come before anything is built: teachers that do not exist are never reached
    never_built = ["--teacher", "local-dir:/nowhere", "--data", str(tiny_synth / "train"), "--out", str(tmp_path / "r")]
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("someone else's")
    emptied = tmp_path / "emptied"
    shutil.copytree(tiny_synth / "train", emptied)
    (emptied / "train-000001.tar").write_bytes(b"")  # an empty shard behind its index
    cases = {
        "--size must be at least 16 px, got 8": ["data", "synth", "--out", str(tmp_path / "s"), "--size", "8"],
        "v.yaml: unknown key 'bogus'": ["cache-teachers", "--data", str(tiny_synth / "train"), "--teacher", "x",
                                        "--out", str(tmp_path / "c.zarr"),
                                        "--view-config", _write(tmp_path / "v.yaml", {"bogus": 1})],
        "`unic:` section: unic head must be 'mlp' or 'ladder', got 'foo'":
            ["train", "--config", _write(tmp_path / "u.yaml", {"method": "unic", "unic": {"head": "foo"}}), *never_built],
        "`sefa:` section: dino: unknown key 'out_dimm'":
            ["train", "--config", _write(tmp_path / "s.yaml", {"method": "sefa", "sefa": {"dino": {"out_dimm": 3}}}),
             *never_built],
        "`tintem:` section: unknown key 'temperaturez'":
            ["train", "--method", "tintem", "--set", "tintem.temperaturez=[0.1]", *never_built],
        "--set 'epochs': expected KEY=VALUE": ["train", "--method", "unic", "--set", "epochs", *never_built],
        "full: not empty; give --overwrite": ["export-init", "configs/unic_synth.yaml", "--out", str(full)],
        "proteus distils 1 teacher(s); got 2": ["train", "--method", "proteus", "--teacher", "local-dir:/a",
                                                "--teacher", "local-dir:/b", "--data", str(tiny_synth / "train"),
                                                "--out", str(tmp_path / "p")],
        "flip_p must be a probability, got 2": ["cache-teachers", "--data", str(tiny_synth / "train"), "--teacher", "x",
                                                "--out", str(tmp_path / "c.zarr"),
                                                "--view-config", _write(tmp_path / "p.yaml", {"flip_p": 2})],
        "epochs must be int, got 'ten'": ["train", "--config", _write(tmp_path / "e.yaml", {"method": "unic", "epochs": "ten"}),
                                          *never_built],
        "lr must be float, got '1e-3'": ["train", "--config", _text(tmp_path / "l.yaml", 'method: unic\nlr: "1e-3"\n'),
                                         *never_built],
        "full: no .tar shards here": ["train", "--config", _write(tmp_path / "n.yaml", {"method": "unic"}), "--data",
                                      str(full), "--cache", str(tmp_path), "--out", str(tmp_path / "n")],
        "train-000001.tar: not a readable tar file (empty file)": [
            "train", "--config", _write(tmp_path / "t.yaml", {"method": "supervised"}), "--data", str(emptied),
            "--out", str(tmp_path / "t"), "--workers", "2"],
        "not a distillery cache (no manifest.json)": ["train", "--config", _write(tmp_path / "m.yaml", {"method": "unic"}),
                                                      "--data", str(tiny_synth / "train"), "--cache", str(full),
                                                      "--out", str(tmp_path / "m")],
    }
    for message, argv in cases.items():
        code, lines = run_cli(argv, monkeypatch, capsys)
        assert code == 2 and len(lines) == 1 and message in lines[0], (argv, lines)
        assert lines[0].startswith("error: ")


def test_set_reaches_nested_keys_and_the_method_section():
    from distillery.train.config import resolve

    config = resolve({"method": "unic", "student_args": {"depth": 4}}, {"data": "d", "out": "o"}, "test",
                     ("student_args.depth=6", "unic.drop_prob=0.3", "betas=[0.9, 0.95]", "lr=1e-3"))
    assert config.student_args == {"depth": 6} and config.method_config == {"drop_prob": 0.3}
    assert config.betas == (0.9, 0.95) and config.lr == 1e-3


def test_project_configs_resolve_from_any_working_directory(tmp_path, monkeypatch):
    from distillery.config import read_yaml
    from distillery.apps.experiments import load_experiment

    monkeypatch.chdir(tmp_path)
    assert read_yaml("configs/demo.yaml")["teachers"]
    experiment = load_experiment("tintem-vitt14-dinov2s")
    assert experiment.cache["view_config"] == "configs/views/tintem.yaml" and experiment.dataset.name == "ImageNet-1k"


class _RunsCode:
    """A pickle that would run code when loaded with full unpickling: it creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_pytorch_model_bin_local_dir_loads_and_a_code_running_pickle_is_refused(tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    from distillery.errors import DistilleryError
    from distillery.models.students import create_student, export_local_dir
    from distillery.models.teachers import create_teacher

    torch.manual_seed(0)
    export_local_dir(create_student("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2),
                     tmp_path / "safe")
    shutil.copytree(tmp_path / "safe", tmp_path / "bin")
    state = load_file(tmp_path / "bin" / "model.safetensors")
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")  # what save_for_hf writes without safetensors
    images = torch.randn(2, 3, 32, 32)
    safe, binary = (create_teacher(f"local-dir:{tmp_path / d}", "cpu") for d in ("safe", "bin"))
    assert torch.equal(safe(images).cls, binary(images).cls)
    torch.save({**state, "extra": _RunsCode(tmp_path / "code-ran")}, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(DistilleryError, match="holds more than tensors .loading it would run code."):
        create_teacher(f"local-dir:{tmp_path / 'bin'}", "cpu")
    assert not (tmp_path / "code-ran").exists()


def test_errors_inside_dataloader_workers_are_the_original_one_line(tmp_path, tiny_synth, teacher_specs, monkeypatch,
                                                                    capsys):
    """A shard corrupt part-way (a member header overwritten, the size its index records kept, so that only
    reading it finds out) reads under --workers 2 as it does with --workers 0: the shard and the problem."""
    import shutil
    import tarfile

    broken = tmp_path / "train"
    shutil.copytree(tiny_synth / "train", broken)
    shard = sorted(broken.glob("*.tar"))[-1]
    with tarfile.open(shard) as tar:
        offset = tar.getmembers()[30].offset
    data = bytearray(shard.read_bytes())
    data[offset:offset + 512] = b"\xff" * 512
    shard.write_bytes(bytes(data))
    for workers in ("0", "2"):
        status, lines = run_cli(["train", "--method", "supervised", "--recipe", "none", "--data", str(broken),
                                 "--out", str(tmp_path / f"run{workers}"), "--workers", workers, "--batch-size", "16",
                                 "--max-steps", "8", "--set", "student_args.img_size=32"], monkeypatch, capsys)
        errors = [line for line in lines if line.startswith("error:")]
        assert status == 2 and len(errors) == 1 and lines[-1] == errors[0], lines
        assert f"{shard}: holds 10 samples but the index says 32" in errors[0]


def test_eval_skips_and_counts_an_image_that_does_not_decode(tmp_path, teacher_specs, capsys):
    """As `data shards` does: a truncated JPEG in an ImageFolder tree is left out and said so, with workers."""
    from PIL import Image

    from distillery.evaluate.features import Extraction, extract_features, load_model, open_images

    for label in ("a", "b"):
        (tmp_path / "tree" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), (40 * i, 100, 200 if label == "a" else 0)).save(tmp_path / "tree" / label / f"{i}.jpg")
    (tmp_path / "tree" / "b" / "1.jpg").write_bytes((tmp_path / "tree" / "b" / "0.jpg").read_bytes()[:40])
    features = extract_features(load_model(teacher_specs[0], "cpu"), open_images(tmp_path / "tree"),
                                Extraction(batch_size=2, workers=2, show_progress=False))
    assert features.keys == ["a/0.jpg", "a/1.jpg", "a/2.jpg", "b/0.jpg", "b/2.jpg"]
    assert features.labels.tolist() == [0, 0, 0, 1, 1] and len(features.features) == 5
    assert "skipped 1 of 6 images that do not decode (first: " in " ".join(capsys.readouterr().err.split())


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path, monkeypatch, capsys):
    import torch

    marker = tmp_path / "code-ran"
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"format": "distillery-checkpoint/1", "model": _RunsCode(marker)},
               tmp_path / "run" / "checkpoints" / "step-00000001.pt")
    code, lines = run_cli(["export", str(tmp_path / "run"), "--out", str(tmp_path / "student")], monkeypatch, capsys)
    assert code == 2 and len(lines) == 1 and "not a readable checkpoint" in lines[0], lines
    assert not marker.exists() and not (tmp_path / "student").exists()
