import functools
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from distillery.data.imagefolder import convert_image_folder
from distillery.data.pipeline import ShardStream, decode, shard_records
from distillery.data.shards import ShardError, ShardSet, ShardWriter, describe


def _jpeg(colour, size=(40, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "folder"
    for c, name in enumerate(["cat", "dog", "eel"]):
        (root / name).mkdir(parents=True)
        for i in range(5):
            (root / name / f"img{i}.jpg").write_bytes(_jpeg((40 * c, 10 * i, 0)))
    Image.new("RGB", (20, 20), "red").save(root / "dog" / "drawing.bmp")  # not kept as is: re-encoded to PNG
    good = _jpeg((1, 2, 3), (64, 64))
    (root / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "eel" / "notes.txt").write_text("not an image")
    (root / "README").write_text("stray file outside the class folders")
    return root


def test_image_folder_conversion_skips_and_lists_bad_files(image_folder, tmp_path):
    out = tmp_path / "shards"
    report = convert_image_folder(image_folder, out, shard_size=4, seed=0, workers=1)
    assert report.written == 16 and report.shards == 4
    assert sorted(path for path, _ in report.skipped) == ["README", "cat/truncated.jpg", "eel/notes.txt"]
    listed = json.loads((out / "conversion.json").read_text())
    assert len(listed["skipped"]) == 3
    shard_set = ShardSet.open(out)
    assert shard_set.classes == ("cat", "dog", "eel")
    records = [r for s in range(len(shard_set)) for r in shard_set.records(s)]
    assert [r.index for r in records] == list(range(16))
    assert sorted(r.meta["path"] for r in records if r.label == 1)[0] == "dog/drawing.bmp"
    assert {r.meta["class"] for r in records if r.label == 2} == {"eel"}
    assert len({r.label for r in records[:8]}) > 1, "shards should mix classes"
    info = describe(shard_set)
    assert (info["shards"], info["samples"], info["classes"]) == (4, 16, 3)
    assert info["min_size"] == (20, 20) and info["max_size"] == (40, 30)
    assert not (tmp_path / "shards.partial").exists()


def test_image_folder_conversion_uses_the_given_class_index(image_folder, tmp_path):
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(["ant", "cat", "dog", "eel"]))
    convert_image_folder(image_folder, tmp_path / "val", shard_size=100, classes_file=classes, workers=1)
    shard_set = ShardSet.open(tmp_path / "val")
    assert {r.label for r in shard_set.records(0) if r.meta["class"] == "cat"} == {1}
    classes.write_text(json.dumps(["cat"]))
    with pytest.raises(ShardError, match="not in"):
        convert_image_folder(image_folder, tmp_path / "val2", classes_file=classes, workers=1)


def test_failed_conversion_leaves_nothing_that_looks_complete(tmp_path):
    root = tmp_path / "folder"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "bad.jpg").write_bytes(b"\xff\xd8 garbage")
    with pytest.raises(ShardError, match="no decodable image"):
        convert_image_folder(root, tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists()


def _decoded_keys(shard_set, rank, world_size, worker, num_workers):
    shards = shard_set.assigned_shards(rank, world_size, worker, num_workers)
    for decoded in decode(shard_records(shard_set, shards)):
        assert decoded.error is None and decoded.image.size == (32, 32)
        yield decoded.item.record.index, decoded.item.record.key


def test_reader_split_over_ranks_and_workers_covers_every_sample_once(synth_dir):
    shard_set = ShardSet.open(synth_dir / "train")
    seen = []
    for rank in range(2):
        loader = torch.utils.data.DataLoader(ShardStream(functools.partial(_decoded_keys, shard_set, rank, 2)),
                                             batch_size=None, num_workers=2)
        seen += list(loader)
    indices = sorted(i for i, _ in seen)
    assert indices == list(range(shard_set.num_samples))
    assert len({k for _, k in seen}) == shard_set.num_samples


def test_more_slots_than_shards_still_covers_everything_once(synth_dir):
    shard_set = ShardSet.open(synth_dir / "val")  # 2 shards, 3 ranks x 2 workers
    assigned = [s for rank in range(3) for w in range(2) for s in shard_set.assigned_shards(rank, 3, w, 2)]
    assert sorted(assigned) == [0, 1]


def test_index_mismatch_and_bad_tar_are_named(synth_dir, tmp_path):
    copy = tmp_path / "train"
    copy.mkdir()
    for p in (synth_dir / "train").iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    (copy / "train-000003.tar").unlink()
    with pytest.raises(ShardError, match=r"missing: \['train-000003.tar'\]"):
        ShardSet.open(copy)
    (copy / "shards.json").unlink()
    (copy / "train-000002.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ShardError, match="train-000002.tar: not a readable tar"):
        ShardSet.open(copy)


def test_writer_refuses_dotted_keys_and_non_empty_directories(tmp_path):
    writer = ShardWriter(tmp_path / "s", shard_size=2)
    with pytest.raises(ValueError, match="may not contain"):
        writer.write("a.b", b"x", "jpg")
    writer.write("a", _jpeg((0, 0, 0)), "jpg", label=3)
    writer.close()
    with pytest.raises(ShardError, match="already holds shards"):
        ShardWriter(tmp_path / "s", shard_size=2)
    assert [r.label for r in ShardSet.open(tmp_path / "s").records(0)] == [3]


@pytest.mark.slow
def test_cli_lists_commands_and_reports_counts(synth_dir):
    cli = [sys.executable, "-m", "distillery.cli"]
    help_text = subprocess.run(cli + ["--help"], capture_output=True, text=True, check=True).stdout
    assert "data" in help_text
    info = subprocess.run(cli + ["data", "info", str(synth_dir / "train")], capture_output=True, text=True, check=True)
    assert "400" in info.stdout and "disc, square" in info.stdout
    missing = subprocess.run(cli + ["data", "info", str(synth_dir / "nope")], capture_output=True, text=True)
    assert missing.returncode == 2 and "no such shard directory" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_the_command_reference_is_generated_from_the_current_app(tmp_path):
    """docs/cli.md is what `make cli-docs` writes; a changed option without regenerating it fails here."""
    typer_cli = Path(sys.executable).with_name("typer")
    subprocess.run([str(typer_cli), "distillery.cli", "utils", "docs", "--name", "distillery", "--output",
                    str(tmp_path / "cli.md")], capture_output=True, check=True)
    committed = Path(__file__).parents[1] / "docs" / "cli.md"
    assert committed.read_text() == (tmp_path / "cli.md").read_text(), "docs/cli.md is stale: run make cli-docs"


def test_a_brace_pattern_and_a_single_tar_load_the_same_samples_as_the_directory(synth_dir, tmp_path):
    import shutil

    from distillery.data.shards import INDEX_FILE

    whole = ShardSet.open(synth_dir / "train")
    names = [s.name for s in whole.shards]
    pattern = str(synth_dir / "train" / names[0].replace("000000", "{000000..%06d}" % (len(names) - 1)))
    braced = ShardSet.open(pattern)
    assert braced.fingerprint() == whole.fingerprint() and braced.classes == whole.classes
    assert [r.key for r in braced.records(2)] == [r.key for r in whole.records(2)]
    single = ShardSet.open(synth_dir / "train" / names[1])
    assert single.num_samples == whole.shards[1].count
    assert [r.key for r in single.records(0)] == [r.key for r in whole.records(1)]
    assert [r.index for r in single.records(0)][0] == 0  # a set of its own: indices start again
    unindexed = tmp_path / "unindexed"
    shutil.copytree(synth_dir / "train", unindexed)
    (unindexed / INDEX_FILE).unlink()  # no shards.json: one pass over the named tars
    assert ShardSet.open(str(unindexed / pattern.rsplit("/", 1)[1])).fingerprint() == whole.fingerprint()
    with pytest.raises(ShardError, match=r"train-000099.tar: no such shard \(1 of the 2"):
        ShardSet.open(str(synth_dir / "train" / "train-{000000,000099}.tar"))


def test_pipe_commands_load_the_same_samples_as_the_directory(synth_dir):
    from distillery.data.shards import fingerprint_differences

    whole = ShardSet.open(synth_dir / "train")
    last = len(whole) - 1
    piped = ShardSet.open(f"pipe:cat {synth_dir / 'train'}/train-{{000000..{last:06d}}}.tar")
    assert fingerprint_differences(whole.fingerprint(), piped.fingerprint()) is None  # one pass through the pipes
    assert "bytes" not in piped.fingerprint()  # a pipe's byte size is unknown; its members' sizes are not
    assert [r.key for r in piped.records(1)] == [r.key for r in whole.records(1)]
    assert [r.image_bytes for r in piped.records(2)] == [r.image_bytes for r in whole.records(2)]
    with pytest.raises(ShardError, match="must name the .tar it reads"):
        ShardSet.open("pipe:cat /dev/null")
    one = ShardSet.open(f"pipe:cat {synth_dir / 'train'}/train-000000.tar")
    broken = ShardSet("", one.shards, (f"pipe:cat {synth_dir}/no-such/train-000000.tar",))  # a command that fails
    with pytest.raises(ShardError, match="no-such/train-000000.tar"):
        list(broken.records(0))


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_stray_members_are_skipped_and_counted(synth_dir, tmp_path, where):
    """README.txt, notes.txt and macOS's __MACOSX/._ files in a shard are not samples: reading skips them, with
    the index or without it, and a pass over the tars counts them."""
    import io
    import shutil
    import tarfile

    from distillery.data.shards import INDEX_FILE, describe, fingerprint_differences

    copy = tmp_path / "train"
    shutil.copytree(synth_dir / "train", copy)
    path = copy / "train-000001.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    strays = [("README.txt", b"about these shards"), ("notes.txt", b"x"), ("__MACOSX/._train_0000150.jpg", b"\0" * 64)]
    at = {"start": 0, "middle": len(members) // 2 - (len(members) // 2) % 3, "end": len(members)}[where]
    with tarfile.open(path, "w") as tar:
        for name, data in [(m.name, d) for m, d in members[:at]] + strays + [(m.name, d) for m, d in members[at:]]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    whole = ShardSet.open(synth_dir / "train")
    expected = [r.key for r in whole.records(1)]
    assert [r.key for r in ShardSet.open(copy).records(1)] == expected  # with the index
    (copy / INDEX_FILE).unlink()
    scanned = ShardSet.open(copy)
    assert fingerprint_differences(whole.fingerprint(), scanned.fingerprint()) is None and scanned.shards[1].strays == 3
    assert [r.key for r in scanned.records(1)] == expected
    assert describe(scanned)["stray members skipped"] == 3
