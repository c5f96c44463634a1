"""The installed `qrun` console script: a real run, and bad input ending in one clear line without a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

QRUN = shutil.which("qrun", path=str(Path(sys.executable).parent)) or "qrun"
TINY = ["dataset.train_samples=256", "dataset.val_samples=128", "epochs=1", "progress=false"]


def qrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([QRUN, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli_run")
    done = qrun(*TINY, f"hydra.run.dir={folder}", cwd=folder)
    assert done.returncode == 0, done.stderr
    return folder


def test_console_script_runs_and_writes_into_the_hydra_run_dir(finished_run: Path) -> None:
    results = json.loads((finished_run / "results.json").read_text())
    assert results["status"] == "finished" and results["output_dir"] == str(finished_run)
    assert (finished_run / ".hydra" / "config.yaml").is_file()
    assert (finished_run / "checkpoints" / "last.pt").is_file()


def test_python_dash_m_qrun_is_the_same_program(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "qrun", "--cfg", "job"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0 and "name: cnn_bn" in done.stdout


@pytest.mark.parametrize("args, expected", [
    (["model=resnet21"], "unknown model option 'resnet21' (no configs/model/resnet21.yaml); accepted: cnn, cnn_bn"),
    (["model.name=resnet21"], "unknown model 'resnet21'; accepted: cnn, cnn_bn, nin"),
    (["bits=0"], "bits=0 is out of range; accepted: an integer, 1 <= value <= 16"),
    (["mode=bogus"], "mode=bogus: Invalid value 'bogus', expected one of [train, evaluate"),
    (["dataset.root=/missing/fmnist"], "Fashion-MNIST not found"),
])
def test_bad_input_is_one_clear_error_without_traceback(tmp_path: Path, args: list[str], expected: str) -> None:
    done = qrun(*args, *TINY, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert expected in done.stderr
    error_lines = [line for line in done.stderr.splitlines() if expected in line]
    assert len(error_lines) == 1


def test_mismatched_checkpoint_is_refused_on_the_command_line(finished_run: Path, tmp_path: Path) -> None:
    done = qrun("mode=evaluate", f"resume={finished_run}", "model=cnn", *TINY, f"hydra.run.dir={tmp_path}",
                cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "does not match the config (model: checkpoint has 'cnn_bn', config has 'cnn')" in done.stderr
