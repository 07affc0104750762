"""Collectives on the run's device (NCCL has no CPU tensors), and what `cuda` means under torchrun."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distillery.train import distributed


@pytest.fixture
def fake_group(monkeypatch):
    """A run on another device than the CPU: every tensor that reaches a collective is recorded."""
    seen: list[torch.device] = []
    monkeypatch.setattr(distributed, "_run_device", torch.device("meta"), raising=False)
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: seen.append(tensor.device))
    return seen


def test_any_rank_reduces_its_flag_on_the_run_device(fake_group):
    with pytest.raises(RuntimeError, match="meta tensors"):  # a meta tensor has no value to read back; where it went is the test
        distributed.any_rank(torch.tensor(True))
    assert fake_group == [torch.device("meta")]


def test_a_collective_on_another_device_is_refused(fake_group):
    with pytest.raises(RuntimeError, match="a collective on a cpu tensor in a run on meta"):
        distributed.all_reduce_mean(torch.ones(3))
    assert fake_group == []
    distributed.all_reduce_mean(torch.ones(3, device="meta"))
    assert fake_group == [torch.device("meta")]


def test_any_rank_in_one_process_reads_the_flag():
    assert distributed.any_rank(torch.tensor(True)) and not distributed.any_rank(torch.tensor(False))


def test_cuda_means_the_local_rank(monkeypatch):
    chosen: list[torch.device] = []
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(distributed, "_run_device", torch.device("cpu"))
    info = distributed.init_distributed("cuda")
    assert info.device == torch.device("cuda", 3) == chosen[0] and info.local_rank == 3
    assert distributed.init_distributed("cuda:1").device == torch.device("cuda", 1)
