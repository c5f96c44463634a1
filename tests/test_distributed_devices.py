"""Where collective tensors live, and RNG restore across machines with other GPU counts.

NCCL only takes tensors on the rank's current CUDA device; gloo takes CPU tensors. CI has no GPU, so these tests
run qrun's DDP code path in a real one-process gloo group with every Python-level collective wrapped by a check
that its tensors sit on the device the backend serves, and check the CUDA ordering (set_device before the group
and before any collective) with recorded calls. The `gpu` tests repeat the collectives on a real NCCL group.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from qrun import checkpoint, distributed
from qrun.distributed import DistInfo
from tests.conftest import run_training

TORCHRUN_ENV = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


def test_setup_selects_the_local_gpu_before_the_group_and_any_collective(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []
    for key, value in {**TORCHRUN_ENV, "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend)))
    root = logging.getLogger()
    level = root.level
    try:
        info = distributed.setup(torch.device("cuda"))
    finally:
        root.setLevel(level)  # a non-main rank silences the root logger
    assert (info.rank, info.local_rank, info.world_size) == (3, 1, 4)
    assert calls == [("set_device", 1), ("init", "nccl")]


def test_collective_device_is_the_current_gpu_under_nccl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert distributed.collective_device() == torch.device("cpu")


@pytest.fixture
def device_checked_collectives(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Wrap torch.distributed's collectives: each tensor handed over must be on the backend's device."""
    seen: list[str] = []

    def checked(name: str, function):
        def wrapper(*args, **kwargs):
            expected = distributed.collective_device()
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            for tensor in tensors:
                assert tensor.device == expected, f"{name} got a tensor on {tensor.device}, backend serves {expected}"
            if name == "broadcast_object_list":
                assert kwargs.get("device") == expected, "object collectives must name the backend's device"
            seen.append(name)
            return function(*args, **kwargs)
        return wrapper

    for name in ("all_reduce", "broadcast", "broadcast_object_list", "all_gather", "reduce", "barrier"):
        monkeypatch.setattr(dist, name, checked(name, getattr(dist, name)))
    return seen


@pytest.fixture
def gloo_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A one-process gloo group that qrun's setup finds as if torchrun had started it."""
    for key, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(key, value)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_metric_reduction_and_object_broadcast_hand_collectives_backend_tensors(
        gloo_group: None, device_checked_collectives: list[str]) -> None:
    info = DistInfo(rank=0, world_size=1, enabled=True)
    reduced = distributed.reduce_metrics({"loss": 0.5, "top1": 80.0, "samples": 10}, 10, info, ("loss", "top1"))
    assert reduced == {"loss": pytest.approx(0.5), "top1": pytest.approx(80.0), "samples": 10}
    assert distributed.broadcast_object("/runs/x", info) == "/runs/x"
    assert device_checked_collectives == ["all_reduce", "broadcast_object_list"]


def test_a_ddp_training_run_hands_every_collective_backend_tensors(
        tmp_path: Path, gloo_group: None, device_checked_collectives: list[str],
        fashion_mnist_available: None) -> None:
    results = run_training(["model=cnn", "quant=lsq", "quantize_input=true", "epochs=1", "batch_size=64",
                            "dataset.train_samples=128", "dataset.val_samples=64"], tmp_path / "run")
    assert results["world_size"] == 1 and results["epoch"] == 1
    # broadcast_object for the output folder, a broadcast per parameter/buffer, the metric reductions (two per
    # epoch) and the divergence guard's flag reductions: every one of them checked for its device
    assert device_checked_collectives.count("broadcast_object_list") == 1
    assert device_checked_collectives.count("all_reduce") >= 2
    assert device_checked_collectives.count("broadcast") > 10


def _record_cuda_rng(monkeypatch: pytest.MonkeyPatch, devices: int) -> list[int]:
    restored: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, index: restored.append(index))
    return restored


@pytest.mark.parametrize("visible, expected", [(1, [0]), (2, [0, 1]), (4, [0, 1]), (0, [])])
def test_cuda_rng_states_restore_on_as_many_gpus_as_both_runs_have(visible: int, expected: list[int],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    state = {"torch": torch.get_rng_state(), "python": checkpoint._plain_python_state(__import__("random").getstate()),
             "numpy": checkpoint._plain_numpy_state(__import__("numpy").random.get_state()),
             "cuda": [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]}  # saved on 2 GPUs
    restored = _record_cuda_rng(monkeypatch, visible)
    checkpoint.restore_rng_state(state)
    assert restored == expected


@pytest.mark.gpu
def test_nccl_collectives_run_on_the_current_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(key, value)
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        info = DistInfo(rank=0, world_size=1, enabled=True)
        assert distributed.collective_device() == torch.device("cuda", 0)
        reduced = distributed.reduce_metrics({"loss": 0.25, "top1": 50.0}, 4, info, ("loss", "top1"))
        assert reduced == {"loss": pytest.approx(0.25), "top1": pytest.approx(50.0)}
        assert distributed.broadcast_object({"dir": "/runs/x"}, info) == {"dir": "/runs/x"}
    finally:
        dist.destroy_process_group()
