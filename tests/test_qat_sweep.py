"""The two-step recipe: a float run, then a QAT sweep whose every job starts from its weights (init_from=)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qrun import checkpoint, quant, trainer
from tests.conftest import run_training

pytestmark = pytest.mark.usefixtures("fashion_mnist_available")
TINY = ["model=cnn_bn", "dataset.train_samples=256", "dataset.val_samples=128", "epochs=1"]


@pytest.fixture(scope="module")
def float_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("float")
    run_training(["+experiment=fmnist_resnet20_float", *TINY], out)
    return out


def test_quantizer_ranges_initialise_from_the_loaded_float_weights(float_run: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    initialize = quant.initialize_from_data

    def spy(model, batches):
        seen["conv"] = model.features[4].weight.detach().clone()  # the quantized second conv, before calibration
        used = initialize(model, batches)
        seen["step"] = model.features[4].weight_quantizer.step.item()
        return used

    monkeypatch.setattr(trainer.quant, "initialize_from_data", spy)
    run_training(["+experiment=fmnist_resnet20_qat", *TINY, "quant=lsq", "bits=4", f"init_from={float_run}"],
                 tmp_path)
    stored = checkpoint.load(float_run / "checkpoints" / "best.pt")["model"]["features.4.weight"]
    assert torch.equal(seen["conv"], stored)  # the float weights were in place when calibration ran
    assert seen["step"] == pytest.approx(2 * stored.abs().mean().item() / math.sqrt(7), rel=1e-5)  # LSQ's init


def test_a_qat_sweep_starts_every_job_from_the_float_run(float_run: Path, tmp_path: Path) -> None:
    qrun = Path(sys.executable).with_name("qrun")
    out = subprocess.run([str(qrun), "-m", "+experiment=fmnist_resnet20_qat", *TINY, f"init_from={float_run}",
                          "quant=lsq,dsq", "bits=2", "progress=false", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert [j.name.rsplit("+", 1)[-1] for j in jobs] == ["quant-dsq", "quant-lsq"]  # no path in the names
    for job in jobs:
        results = json.loads((job / "results.json").read_text())
        assert results["status"] == "finished" and (results["quant"], results["w_bits"]) == (job.name[-3:], 2)
        log = (job / "cli.log").read_text()
        loaded = log.index(f"weights from {float_run / 'checkpoints' / 'best.pt'}")
        assert loaded < log.index("initialised quantizers from")
