"""The training loop reads no device scalar per step, and says how far it is when nobody watches a bar."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from qrun import progress
from qrun.engine import evaluate, train_one_epoch
from qrun.progress import Cadence, ProgressLog


class ScalarReads(TorchDispatchMode):
    """Counts `_local_scalar_dense`: every .item()/float()/int()/bool() of a tensor, a host sync on CUDA."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def scalar_reads_of_an_epoch(steps: int, train: bool) -> int:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(steps)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with ScalarReads() as reads:
        if train:
            metrics = train_one_epoch(model, nn.CrossEntropyLoss(), optimizer, scheduler, batches,
                                      torch.device("cpu"), 1, progress=False)
        else:
            metrics = evaluate(model, batches, torch.device("cpu"), progress=False)
    assert metrics["loss"] > 0
    return reads.count


@pytest.mark.parametrize("train", [True, False])
def test_steps_read_no_scalar_only_the_epoch_end_does(train: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "CADENCE", Cadence(percent=0))
    short, long = scalar_reads_of_an_epoch(2, train), scalar_reads_of_an_epoch(8, train)
    # loss and top-1 read once at the end (plus top-5 in evaluate); nothing per step
    assert short == long == (2 if train else 3)


class OpCounts(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_the_step_tracker_is_the_loops_meter_so_metrics_are_summed_once() -> None:
    """With qrun.guard.StepTracker as the criterion (as the trainer runs it), the loop keeps no second set of
    sums: no top-k per step, and the epoch's numbers are the tracker's."""
    from qrun.guard import StepTracker

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(3)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    tracker = StepTracker(nn.CrossEntropyLoss())
    with OpCounts() as counts:
        metrics = train_one_epoch(model, tracker, optimizer, scheduler, batches, torch.device("cpu"), 1,
                                  progress=False)
    assert "aten.topk" not in counts.ops and counts.ops["aten.argmax"] == 3
    own = tracker.metrics()
    assert own["samples"] == 24 and metrics["loss"] == own["loss"] > 0 and metrics["top1"] == own["top1"]


def test_progress_lines_every_n_percent_and_at_most_every_m_seconds(monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    lines = ProgressLog("train 1", 100, enabled=True, cadence=Cadence(percent=10, seconds=2.5))
    written = []
    with caplog.at_level("INFO", logger="qrun.progress"):
        for step in range(1, 101):
            now[0] = 0.1 * step  # 0.1 s per step
            if lines.step(step, 8 * step, lambda: 0.5):
                written.append(step)
    # a mark every 10 steps (1 s), but lines 2.5 s apart at least; none on the last step (the epoch line follows)
    assert written == [30, 60, 90]
    assert "train 1 step 30/100 (30%)  loss 0.5000" in caplog.text and "samples/s  ETA 0:00:" in caplog.text
    assert not ProgressLog("eval", 100, enabled=False).enabled
    assert not ProgressLog("eval", 100, enabled=True, cadence=Cadence(percent=0)).enabled


def test_off_a_terminal_the_run_names_itself_and_logs_progress(tmp_path: Path, fashion_mnist_available: None) -> None:
    command = [sys.executable, "-m", "qrun", "model=cnn", "quant=lsq", "bits=3", "quantize_input=true", "epochs=1",
               "batch_size=64", "dataset.train_samples=512", "dataset.val_samples=128", "log_every_percent=25",
               "log_every_s=0", f"output_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # pipes: neither stdout nor stderr a tty
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "] - " in line]
    assert lines[0].endswith(f"qrun train: model cnn | dataset fashion_mnist | quant lsq W3A3 (inputs quantized) | "
                             f"device cpu | output {tmp_path / 'run'}")
    steps = [line.split("] - ")[1].split("  loss")[0] for line in lines if "train 1 step" in line]
    assert steps == ["train 1 step 2/8 (25%)", "train 1 step 4/8 (50%)", "train 1 step 6/8 (75%)"]
    assert all("samples/s  ETA 0:00:" in line for line in lines if "train 1 step" in line)

