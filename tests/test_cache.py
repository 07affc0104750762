import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from distillery.cache.store import CacheError, CacheStore, decode, encode, storage_tolerance
from distillery.cache.verify import verify_store
from distillery.cache.writer import CacheConfig, cache_teachers, pool_patches, view_image
from distillery.data.shards import ShardSet, ShardWriter, decode_image
from distillery.data.views import ViewConfig, normalize, replay
from distillery.errors import DistilleryError
from distillery.models.teachers import create_teacher


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".partial")}


def _cli_env(**extra):
    return {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), **extra}


def test_replayed_view_is_bit_identical_to_the_view_the_teacher_saw(synth_dir, cache_dir, teacher_specs):
    store = CacheStore.open(str(cache_dir))
    shard_set = ShardSet.open(synth_dir / "train")
    teacher = create_teacher(teacher_specs[0])
    config = CacheConfig(tuple(teacher_specs), views=2)
    size = teacher.preprocessing.input_size
    for position, record in enumerate(list(shard_set.records(1))[:5]):
        seen = view_image(record, 1, position, config, [size])  # what the writer fed the teachers
        stored_params = store.read_rows([record.index], [0])["views"][0]
        replayed = replay(decode_image(record.image_bytes, record.key), stored_params, size)
        assert torch.equal(seen.pixels[size][0], replayed)


@pytest.mark.parametrize("spec_index", [0, 1])
def test_cached_tokens_equal_a_fresh_forward_on_the_replayed_view(synth_dir, cache_dir, teacher_specs, spec_index):
    store = CacheStore.open(str(cache_dir))
    teacher = create_teacher(teacher_specs[spec_index])
    shard_set = ShardSet.open(synth_dir / "train")
    records = list(shard_set.records(2))[:6]
    indices = [r.index for r in records]
    for view in range(2):
        stored = store.read_rows(indices, [view] * len(indices))
        p = teacher.preprocessing
        images = torch.stack([replay(decode_image(r.image_bytes, r.key), v, p.input_size)
                              for r, v in zip(records, stored["views"])])
        fresh = teacher(normalize(images, p.mean, p.std))
        for part, value in (("cls", fresh.cls), ("patch", fresh.patch)):
            cached = stored[f"{teacher.name}/{part}"]
            assert cached.shape == value.shape
            assert torch.allclose(cached, value, rtol=2**-10, atol=1e-4), part


def test_block_reads_and_exact_statistics(cache_dir):
    store = CacheStore.open(str(cache_dir))
    assert store.is_complete and store.num_samples == 400 and store.num_views == 2
    blocks = [store.read_block(j) for j in range(store.num_shards)]
    assert [len(b["keys"]) for b in blocks] == [100] * 4
    one_view = store.read_block(3, view=1)
    assert torch.equal(one_view["teacher_b/patch"], blocks[3]["teacher_b/patch"][:, 1])
    for t in store.teachers:
        stats = store.stats(t.name)
        cls = torch.cat([b[f"{t.name}/cls"] for b in blocks]).double().reshape(-1, t.dim)
        patch = torch.cat([b[f"{t.name}/patch"] for b in blocks]).double().reshape(-1, t.dim)
        assert torch.allclose(stats.cls_mean.double(), cls.mean(0), atol=1e-6)
        assert torch.allclose(stats.cls_std.double(), cls.std(0, unbiased=False), atol=1e-6)
        assert torch.allclose(stats.patch_std.double(), patch.std(0, unbiased=False), atol=1e-6)


def test_int8_encoding_error_stays_within_its_stated_bound():
    x = torch.randn(5, 3, 7, 16) * torch.linspace(0.01, 30, 16)
    stored, scale = encode(x, "int8")
    error = (decode(stored, scale, "int8") - x).abs() / x.abs().amax(-1, keepdim=True)
    assert stored.dtype == np.int8 and scale.dtype == np.float16
    assert error.max() <= storage_tolerance("int8")
    bf16, _ = encode(x, "bfloat16")
    assert ((decode(bf16, None, "bfloat16") - x).abs() / x.abs().amax(-1, keepdim=True)).max() <= storage_tolerance("bfloat16")


def test_int8_pooled_and_cls_only_stores(synth_dir, teacher_specs, tmp_path):
    data = str(synth_dir / "val")
    cache_teachers(data, str(tmp_path / "q.zarr"), CacheConfig(tuple(teacher_specs), views=1, dtype="int8", patch_pool=2,
                                                               workers=0), show_progress=False)
    store = CacheStore.open(str(tmp_path / "q.zarr"))
    assert [t.stored_grid for t in store.teachers] == [(4, 4), (2, 2)]
    assert verify_store(store, data, recompute=4)["ok"]
    teacher = create_teacher(teacher_specs[0])
    record = next(ShardSet.open(data).records(0))
    p = teacher.preprocessing
    view = store.read_rows([record.index], [0])
    fresh = teacher(normalize(replay(decode_image(record.image_bytes, "x"), view["views"][0], p.input_size)[None], p.mean, p.std))
    pooled = pool_patches(fresh.patch, teacher.grid, 2)
    bound = storage_tolerance("int8") * pooled.abs().amax(-1, keepdim=True)
    assert ((view["teacher_a/patch"] - pooled).abs() <= bound).all()
    cache_teachers(data, str(tmp_path / "c.zarr"), CacheConfig(tuple(teacher_specs), views=1, cls_only=True, workers=0),
                   show_progress=False)
    cls_only = CacheStore.open(str(tmp_path / "c.zarr"))
    assert "teacher_a/cls" in cls_only.read_block(0, view=0, parts=("cls",))
    with pytest.raises(CacheError, match="cls-only"):
        cls_only.read_block(0, view=0)


@pytest.mark.slow
def test_two_ranks_give_the_same_store_as_one(synth_dir, teacher_specs, cache_dir, tmp_path):
    cli = [sys.executable, "-m", "distillery.cli", "cache-teachers", "--data", str(synth_dir / "train"),
           "--views", "2", "--workers", "1", "--out", str(tmp_path / "two.zarr")]
    for spec in teacher_specs:
        cli += ["--teacher", spec]
    ranks = [subprocess.Popen(cli, env=_cli_env(RANK=str(r), WORLD_SIZE="2"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for r in (1, 0)]  # rank 1 first: it must wait for rank 0
    for process in ranks:
        output = process.communicate(timeout=300)[0].decode()
        assert process.returncode == 0, output
    assert _tree(tmp_path / "two.zarr") == _tree(cache_dir)


@pytest.mark.slow
def test_resume_after_a_killed_writer_gives_the_same_store(synth_dir, teacher_specs, cache_dir, tmp_path):
    out = tmp_path / "killed.zarr"
    cli = [sys.executable, "-m", "distillery.cli", "cache-teachers", "--data", str(synth_dir / "train"),
           "--views", "2", "--workers", "0", "--batch-size", "8", "--out", str(out)]
    for spec in teacher_specs:
        cli += ["--teacher", spec]
    process = subprocess.Popen(cli, env=_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "shards" / "000000.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, "writer ended before its first shard"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    store = CacheStore.open(str(out))
    assert 1 <= len(store.completed_shards()) < 4 and not store.is_complete
    finished = subprocess.run(cli, env=_cli_env(), capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert _tree(out) == _tree(cache_dir)


def test_a_store_with_other_settings_is_refused(synth_dir, teacher_specs, cache_dir):
    with pytest.raises(CacheError, match=r"views.count: store has 2, this run has 3"):
        cache_teachers(str(synth_dir / "train"), str(cache_dir), CacheConfig(tuple(teacher_specs), views=3, workers=0),
                       show_progress=False)
    with pytest.raises(CacheError, match=r"teachers: store has 2 \(teacher_a, teacher_b\), this run has 1"):
        cache_teachers(str(synth_dir / "train"), str(cache_dir), CacheConfig(tuple(teacher_specs[:1]), views=2, workers=0),
                       show_progress=False)
    from typer.testing import CliRunner

    from distillery.cli import app

    added = CliRunner().invoke(app, ["cache-teachers", "--data", str(synth_dir / "train"), "--out", str(cache_dir),
                                     "--teacher", teacher_specs[0], "--add", "--views", "3"])
    assert "--add takes the views and storage of" in str(added.exception) and "views is 2, not 3" in str(added.exception)
    with pytest.raises(CacheError, match="jitter_p"):
        cache_teachers(str(synth_dir / "train"), str(cache_dir),
                       CacheConfig(tuple(teacher_specs), views=2, view_config=ViewConfig(jitter_p=0), workers=0),
                       show_progress=False)


def test_a_corrupt_jpeg_ends_as_an_invalid_row_and_the_run_finishes(synth_dir, teacher_specs, tmp_path):
    source = ShardSet.open(synth_dir / "val")
    writer = ShardWriter(tmp_path / "data", shard_size=50)
    for record in list(source.records(0))[:60]:
        data = record.image_bytes
        if record.key.endswith("0007"):
            data = data[: len(data) // 3]  # truncated JPEG
        writer.write(record.key, data, "jpg", record.label)
    writer.close()
    out = tmp_path / "store.zarr"
    summary = cache_teachers(str(tmp_path / "data"), str(out), CacheConfig(tuple(teacher_specs), views=1, workers=0),
                             show_progress=False)
    assert summary["complete"] and summary["invalid"] == 1
    store = CacheStore.open(str(out))
    invalid = store.manifest["completion"]["invalid"]
    assert [e["key"] for e in invalid] == ["val_0000007"] and "cannot decode" in invalid[0]["reason"]
    block = store.read_block(0, view=0)
    assert block["valid"].tolist() == [1] * 7 + [0] + [1] * 42
    assert torch.count_nonzero(block["teacher_a/cls"][7]) == 0
    report = verify_store(store, str(tmp_path / "data"), recompute=3)
    assert report["ok"], report


@pytest.mark.slow
def test_cache_cli_info_and_verify(cache_dir, synth_dir):
    run = lambda *args: subprocess.run([sys.executable, "-m", "distillery.cli", *args], env=_cli_env(),  # noqa: E731
                                       capture_output=True, text=True)
    info = run("cache", "info", str(cache_dir))
    assert info.returncode == 0 and "teacher_a (dim 48, grid 8x8" in info.stdout and "4/4" in info.stdout
    good = run("cache", "verify", str(cache_dir), "--data", str(synth_dir / "train"), "--recompute", "4")
    assert good.returncode == 0, good.stdout + good.stderr
    text = " ".join(good.stdout.replace("│", " ").split())  # the table's wrapped cells, read on
    assert "4 rows over 4 of 4 shards" in text  # spread over every shard
    assert "one image is found with probability 1.0%" in text  # 4 of 400 rows
    wrong_data = run("cache", "verify", str(cache_dir), "--data", str(synth_dir / "val"))
    assert wrong_data.returncode == 1 and "NO" in wrong_data.stdout
    missing = run("cache", "info", str(cache_dir.parent / "nothing.zarr"))
    assert missing.returncode == 2 and "not a distillery cache" in missing.stderr


def test_a_teacher_can_run_at_another_input_size(teacher_specs):
    teacher = create_teacher(teacher_specs[0] + "@48")
    assert teacher.preprocessing.input_size == (48, 48) and teacher.grid == (12, 12)
    assert teacher.name == "teacher_a@48"
    assert teacher(torch.zeros(2, 3, 48, 48)).patch.shape == (2, 144, 48)
    assert teacher.fingerprint() != create_teacher(teacher_specs[0]).fingerprint()
    with pytest.raises(DistilleryError, match="must be an input size"):
        create_teacher(teacher_specs[0] + "@big")


def test_rows_that_are_not_finite_as_stored_are_invalid_and_zero(tmp_path):
    """A teacher output finite in float32 but beyond float16 (1e5) is as invalid as a NaN: the check is on
    the stored values, and the statistics leave both images out."""
    from distillery.cache.writer import ShardBuffer, ViewedImage
    from distillery.data.views import NUM_PARAMS
    from distillery.models.teachers import Preprocessing, Tokens

    class Fixed(torch.nn.Module):
        def __init__(self, name, cls, patch):
            super().__init__()
            self.name, self.grid, self.tokens = name, (2, 2), Tokens(cls, patch)
            self.preprocessing = Preprocessing((1, 1), (0.5,) * 3, (0.5,) * 3, "bicubic", 1.0)

        def forward(self, images):
            return self.tokens

    generator = torch.Generator().manual_seed(0)
    a = Fixed("a", torch.randn(4, 3, generator=generator), torch.randn(4, 4, 3, generator=generator))
    b = Fixed("b", torch.randn(4, 5, generator=generator), torch.randn(4, 4, 5, generator=generator))
    a.tokens.cls[1, 2] = 1e5
    b.tokens.patch[2, 3, 0] = float("nan")
    layouts = [{"name": t.name, "spec": t.name, "dim": d, "grid": [2, 2], "stored_grid": [2, 2], "fingerprint": {}}
               for t, d in ((a, 3), (b, 5))]
    store = CacheStore.create(str(tmp_path / "s.zarr"), {
        "dataset": {"shards": ["s.tar"], "counts": [4], "num_samples": 4, "keys_sha256": ""},
        "views": {"count": 1, "seed": 0, "config": {}}, "teachers": layouts,
        "storage": {"dtype": "float16", "patch_pool": 1, "cls_only": False, "slots": 4, "forward_precision": "float32"}})
    buffer = ShardBuffer(store, 0, CacheConfig(("a", "b"), views=1, workers=0))
    for k in range(4):
        buffer.add(ViewedImage(0, k, k, f"k{k}", None, np.zeros((1, NUM_PARAMS), np.float32),
                               {(1, 1): torch.zeros(1, 3, 1, 1, dtype=torch.uint8)}, 0.0))
    buffer.run_batch([a, b], torch.device("cpu"))
    assert buffer.valid.tolist() == [1, 0, 0, 1]
    assert [e["reason"] for e in buffer.invalid] == ["non-finite cls output of teacher a",
                                                      "non-finite patch output of teacher b"]
    for name in ("teachers/a/cls", "teachers/a/patch", "teachers/b/cls", "teachers/b/patch"):
        assert not buffer.features[name][[1, 2]].any() and buffer.features[name][[0, 3]].any(), name
    kept = a.tokens.cls[[0, 3]].half().double()
    assert buffer.moments[("a", "cls")].count == 2
    assert np.allclose(buffer.moments[("a", "cls")].mean, kept.mean(0).numpy())


def test_a_disk_that_fills_during_caching_is_one_line_and_resumes_cleanly(tiny_synth, teacher_specs, tiny_cache, tmp_path,
                                                                          monkeypatch):
    """No loop mount or tmpfs here: the Zarr write of the second image shard raises ENOSPC part-way through."""
    import errno

    import zarr

    out = tmp_path / "full.zarr"
    write, calls = zarr.Array.__setitem__, []

    def filling(self, selection, value):
        calls.append(1)
        if len(calls) == 15:  # part-way through the second shard's 11 arrays
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, selection, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", filling)
    config = CacheConfig(tuple(teacher_specs), views=2, workers=0)
    with pytest.raises(CacheError, match=r"writing image shard train-000001.tar failed \(No space left on device\); "
                                         "it is not marked complete"):
        cache_teachers(str(tiny_synth / "train"), str(out), config, show_progress=False)
    store = CacheStore.open(str(out))
    assert store.completed_shards() == {0} and not store.is_complete
    monkeypatch.setattr(zarr.Array, "__setitem__", write)  # space freed
    assert cache_teachers(str(tiny_synth / "train"), str(out), config, show_progress=False)["complete"]
    assert _tree(out) == _tree(tiny_cache)


def test_a_second_writer_of_a_store_is_refused_and_the_lock_dies_with_a_killed_holder(tiny_synth, teacher_specs, tmp_path):
    """Another process holds the store's lock: this run refuses in one line naming it; once that process is
    killed with SIGKILL, the lock is gone with it and the run goes ahead."""
    out = tmp_path / "locked.zarr"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom distillery.cache.writer import WriterLock\n"
                               f"with WriterLock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(120)"],
                              env=_cli_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        config = CacheConfig(tuple(teacher_specs), views=1, workers=0)
        with pytest.raises(CacheError, match=rf"is being written by another cache-teachers run \(pid {holder.pid} on "):
            cache_teachers(str(tiny_synth / "train"), str(out), config, show_progress=False)
        assert not out.exists()  # refused before anything was created
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert cache_teachers(str(tiny_synth / "train"), str(out), config, show_progress=False)["complete"]


@pytest.mark.slow
def test_the_kill_soak_resumes_a_killed_cache_and_a_killed_run_to_identical_results(tmp_path):
    """benchmarks/kill_soak.py with N = 2 (BENCHMARKS.md records a run with N = 50): one cache-teachers and one
    train, each killed with SIGKILL part-way and resumed, equal to the same job run once."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from kill_soak import soak

    results = soak(2, seed=0, work=tmp_path)
    assert [(r["job"], r["mode"]) for r in results] == [("cache", "single"), ("train", "single")]
    assert all(r["identical"] for r in results), results
