"""Shards and a store on S3: a local S3 server (moto, bound to 127.0.0.1, started and stopped here) holds the
shards, the store is cached from them bit-identical to the same store on disk, and training from both takes
the same steps."""

from __future__ import annotations

import json
import logging
import socket

import numpy as np
import pytest

from tests.conftest import TINY_STUDENT


@pytest.fixture(scope="module")
def s3_server():
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    import fsspec

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    patch = pytest.MonkeyPatch()
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                       "FSSPEC_S3_ENDPOINT_URL": endpoint}.items():
        patch.setenv(key, value)  # for processes started from here
    patch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})  # for this one, whose fsspec read its env
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir("distillery-test")
    yield "s3://distillery-test"
    patch.undo()
    server.stop()


def test_shards_and_a_store_on_s3_round_trip_bit_identically_and_train_the_same(s3_server, tiny_synth, tiny_cache,
                                                                                teacher_specs, tmp_path):
    import fsspec

    from distillery.cache.store import CacheStore
    from distillery.cache.writer import CacheConfig, cache_teachers
    from distillery.data.shards import ShardSet
    from distillery.train.loop import train

    data = f"{s3_server}/shards/train"
    fsspec.filesystem("s3").put(f"{tiny_synth / 'train'}/", data, recursive=True)
    remote_data, local_data = ShardSet.open(data), ShardSet.open(tiny_synth / "train")
    assert remote_data.fingerprint() == local_data.fingerprint() and remote_data.classes == local_data.classes
    assert [r.image_bytes for r in remote_data.records(1)] == [r.image_bytes for r in local_data.records(1)]

    url = f"{s3_server}/store.zarr"
    cache_teachers(data, url, CacheConfig(tuple(teacher_specs), views=2, workers=0),
                   show_progress=False)  # as tiny_cache was written, from the shards on disk
    remote, local = CacheStore.open(url), CacheStore.open(str(tiny_cache))
    assert remote.is_complete and remote.identity == local.identity
    for shard in range(local.num_shards):
        for name, values in local.read_block(shard, view=None, decoded=False).items():
            assert np.array_equal(np.asarray(remote.read_block(shard, view=None, decoded=False)[name]), np.asarray(values)), name

    losses = {}
    for name, shards, store in (("s3", data, url), ("disk", str(tiny_synth / "train"), str(tiny_cache))):
        run = tmp_path / name
        train({"method": "unic", "data": shards, "out": str(run), "cache": store, "max_steps": 3,
               "epochs": 1, "batch_size": 16, "workers": 0, "log_every": 1, "warmup_epochs": 0, "student_args": TINY_STUDENT,
               "unic": {"mlp_hidden_dim": 64}})
        losses[name] = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses["s3"] == losses["disk"] and len(losses["s3"]) == 3


def test_a_file_url_store_is_written_and_read_like_a_path(tiny_synth, tiny_cache, teacher_specs, tmp_path):
    from distillery.cache.store import CacheStore
    from distillery.cache.writer import CacheConfig, cache_teachers

    url = f"file://{tmp_path}/nested/store.zarr"  # its directories do not exist yet
    cache_teachers(str(tiny_synth / "train"), url, CacheConfig(tuple(teacher_specs), views=2, workers=0), show_progress=False)
    store = CacheStore.open(url)
    assert store.is_complete and store.identity == CacheStore.open(str(tiny_cache)).identity
    assert np.array_equal(store.read_block(0)["teacher_a/cls"], CacheStore.open(str(tiny_cache)).read_block(0)["teacher_a/cls"])
