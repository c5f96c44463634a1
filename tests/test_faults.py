"""Real processes killed and preempted: SIGKILL at every checkpoint write point, SIGUSR1 mid-epoch, SIGTERM to a
2-process gloo torchrun. Each interrupted run, re-run with the same command, must end bit-identical (weights,
optimizer, history, best.pt) to one never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qrun import preempt
from tests.test_ddp import TORCHRUN, free_port

pytestmark = pytest.mark.usefixtures("fashion_mnist_available")
# 8 steps per epoch, augmentation on (the RNG state must resume too), deterministic kernels.
ARGS = ["model=cnn", "dataset.train_samples=256", "dataset.val_samples=128", "epochs=2", "batch_size=32",
        "deterministic=true", "seed=3", "dataset.augment=true", "threads=1", "progress=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def qrun(folder: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "qrun", *ARGS, *extra, f"hydra.run.dir={folder}"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**ENV, **(env or {})})


def without_timings(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in ("epoch_time_s", "data_share")} for h in history]


def assert_same_run(reference: Path, folder: Path) -> None:
    for name in ("last.pt", "best.pt"):
        a = torch.load(reference / "checkpoints" / name, weights_only=True)
        b = torch.load(folder / "checkpoints" / name, weights_only=True)
        assert (a["epoch"], a["best_epoch"]) == (b["epoch"], b["best_epoch"]), name
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), f"{name}: {key}"
        for index, state in a["optimizer"]["state"].items():
            for key, value in state.items():
                assert torch.equal(value, b["optimizer"]["state"][index][key]), f"{name}: optimizer {key}"
        assert without_timings(a["history"]) == without_timings(b["history"]), name
    ra, rb = (json.loads((f / "results.json").read_text()) for f in (reference, folder))
    assert (ra["top1"], ra["best_top1"], ra["train_loss"]) == (rb["top1"], rb["best_top1"], rb["train_loss"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("faults") / "reference"
    done = qrun(folder)
    assert done.returncode == 0, done.stderr[-3000:]
    best = torch.load(folder / "checkpoints/best.pt", weights_only=True)
    # The chain below kills between last.pt and best.pt at epoch 2: that only tests the repair if 2 is the best.
    assert best["epoch"] == 2
    return folder


def test_sigkill_at_every_checkpoint_write_point_resumes_bit_identical(reference: Path, tmp_path: Path) -> None:
    folder = tmp_path / "killed"
    chain = [
        "before_tmp:last.pt:1",  # epoch 1 trained, nothing written
        "before_rename:last.pt:1",  # epoch 1 again; a complete temporary file is left, no last.pt
        "after_rename:last.pt:1",  # epoch 1 committed, killed before best.pt (repaired at the next start)
        "before_rename:best.pt:1",  # epoch 2 committed, best.pt still epoch 1's
    ]
    for kill in chain:
        done = qrun(folder, env={"QRUN_TEST_KILL": kill})
        assert done.returncode == -signal.SIGKILL, (kill, done.stderr[-2000:])
    left = sorted(p.name for p in (folder / "checkpoints").iterdir())
    assert left[0].startswith(".best.pt.") and left[1:] == ["best.pt", "last.pt"], left
    assert torch.load(folder / "checkpoints/best.pt", weights_only=True)["epoch"] == 1, "stale best.pt expected"
    done = qrun(folder)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "restored from" in log and "left by an interrupted checkpoint write" in log
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert_same_run(reference, folder)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_preemption_signal_saves_mid_epoch_and_the_same_command_continues(reference: Path, tmp_path: Path) -> None:
    folder = tmp_path / "preempted"
    command = [sys.executable, "-m", "qrun", *ARGS, "checkpoint_every_steps=3", f"hydra.run.dir={folder}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**ENV, "QRUN_TEST_STEP_DELAY": "0.25"})
    wait_for(folder / "checkpoints/last.pt", process)  # the periodic checkpoint after step 3 of epoch 1
    process.send_signal(signal.SIGUSR1)
    stderr, _ = process.communicate(timeout=120)
    assert process.returncode == preempt.EXIT_CODE, stderr[-3000:]
    assert "preempted by SIGUSR1: checkpoint at epoch 1 batch" in stderr
    saved = torch.load(folder / "checkpoints/last.pt", weights_only=True)
    assert saved["epoch"] == 0 and saved["position"]["epoch"] == 1 and 3 <= saved["position"]["batch"] < 8
    done = qrun(folder)  # the very same command (checkpoint_every_steps does not change the result)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"at epoch 1 batch {saved['position']['batch']}/8" in done.stdout + done.stderr
    assert_same_run(reference, folder)


DDP_ARGS = ["model=cnn", "dataset.train_samples=256", "dataset.val_samples=128", "epochs=1", "batch_size=32",
            "deterministic=true", "seed=3", "progress=false", "threads=1"]


def torchrun(folder: Path, *extra: str, env: dict | None = None, wait: bool = True):
    command = [str(TORCHRUN), "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "qrun", *DDP_ARGS,
               *extra, f"output_dir={folder}", f"hydra.run.dir={folder.with_name(folder.name + '_hydra')}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**ENV, **(env or {})}, cwd=folder.parent)
    if wait:
        stderr, _ = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
    return process


def test_sigterm_to_a_two_process_ddp_run_saves_mid_epoch_and_resumes_bit_identical(tmp_path: Path) -> None:
    torchrun(tmp_path / "straight")
    folder = tmp_path / "preempted"
    process = torchrun(folder, "checkpoint_every_steps=2", env={"QRUN_TEST_STEP_DELAY": "0.3"}, wait=False)
    wait_for(folder / "checkpoints/last.pt", process)
    process.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    stderr, _ = process.communicate(timeout=120)
    saved = torch.load(folder / "checkpoints/last.pt", weights_only=True)
    assert saved["position"] is not None and len(saved["trackers"]) == 2, stderr[-3000:]
    assert "preempted by SIGTERM" in stderr
    torchrun(folder)
    a = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)
    b = torch.load(folder / "checkpoints/last.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert without_timings(a["history"]) == without_timings(b["history"])
