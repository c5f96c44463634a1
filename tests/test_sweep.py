"""Sweeps through the installed `qrun` console script: parallel local launcher, readable job folders that pass
back to resume= unquoted, failures recorded, and a re-run that skips finished jobs and resumes interrupted ones."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import compose_config, run_training
from qrun.resources import available_cores, parallel_jobs, threads_for_job

QRUN = Path(sys.executable).with_name("qrun")
QRUN_REPORT = Path(sys.executable).with_name("qrun-report")
TINY = ["dataset.train_samples=256", "dataset.val_samples=128", "epochs=1", "batch_size=64"]


def qrun(args: list[str], cwd: Path, returncode: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([str(QRUN), *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert result.returncode == returncode, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def results_of(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/results.json")}


def test_installed_qrun_sweep_local_launcher_and_rerun(tmp_path: Path, fashion_mnist_available: None) -> None:
    """6 jobs on 2 loky workers (so workers are reused): one quantizer that cannot run at 4 bits fails alone."""
    command = ["-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2", "sweep=tiny", *TINY, "progress=false",
               "quant=none,uniform,xnor", "threads=1,null"]
    first = qrun(command, tmp_path, returncode=1)  # failed jobs: exit 1 after the summary
    sweep = tmp_path / "multirun" / "tiny"
    results = results_of(sweep)
    names = {f"batch_size-64+dataset.train_samples-256+dataset.val_samples-128+epochs-1"
             f"+quant-{q}+threads-{t}" for q in ("none", "uniform", "xnor") for t in ("1", "null")}
    assert set(results) == names
    for name, result in results.items():
        if "quant-xnor" in name:  # XNOR needs bits=1: recorded as failed, the other jobs went on
            assert result["status"] == "failed" and "bits=4" in result["error"], result
            continue
        assert result["status"] == "finished" and result["epoch"] == 1
        # Each job sets its own thread count, whatever the previous job in the same worker process set.
        expected = 1 if name.endswith("threads-1") else max(1, available_cores() // 2)
        assert result["threads"] == expected, (name, result["threads"])
        assert result["macs"] > 0 and result["bops"] > 0 and result["size_bytes"] > 0
    assert "2 failed, 4 finished" in first.stdout + first.stderr  # the end-of-sweep summary callback
    assert "qrun: 2 job(s) of the sweep did not finish" in first.stderr

    # Interrupt one job by hand: drop its results.json, keep its checkpoint.
    interrupted = sweep / sorted(n for n in names if "quant-uniform" in n)[0]
    (interrupted / "results.json").unlink()
    finished = {n: (sweep / n / "results.json").stat().st_mtime_ns for n in names
                if "xnor" not in n and sweep / n != interrupted}
    second = qrun(command, tmp_path, returncode=1)
    for name, mtime in finished.items():
        assert (sweep / name / "results.json").stat().st_mtime_ns == mtime, f"{name} was recomputed"
    log = (interrupted / "qrun.log").read_text() if (interrupted / "qrun.log").exists() else second.stdout + second.stderr
    assert "resumed from" in second.stdout + second.stderr + log
    assert results_of(sweep)[interrupted.name]["status"] == "finished"
    assert (second.stdout + second.stderr).count("already finished") == len(finished)

    report = subprocess.run([str(QRUN_REPORT), str(sweep)], capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    table = (sweep / "report.md").read_text()
    assert table.count("| finished |") == 4 and table.count("| failed: ") == 2


def test_job_folder_passes_back_to_resume_unquoted(tmp_path: Path, fashion_mnist_available: None) -> None:
    job = tmp_path / "multirun" / "s" / "bits-4+quant-uniform"  # the shape of a sweep job folder
    trained = run_training([*TINY, "quant=uniform", "bits=4"], job)
    # Exactly as typed on a command line: no quotes around the '+' and '-' of the folder name.
    cfg = compose_config([*TINY, "quant=uniform", "bits=4", "mode=evaluate", f"resume={job}"], tmp_path / "eval")
    assert cfg.resume == str(job)
    from qrun.trainer import run

    evaluated = run(cfg)
    assert evaluated["top1"] == pytest.approx(trained["top1"])
    assert evaluated["checkpoint"].startswith(str(job))


def test_threads_share_the_cores_between_parallel_jobs() -> None:
    assert threads_for_job(3, {"n_jobs": 2}, environ={}, cores=8) == 3  # explicit wins
    assert threads_for_job(None, {"n_jobs": 2}, environ={}, cores=8) == 4
    assert threads_for_job(None, {"n_jobs": -1}, environ={}, cores=8) == 1  # joblib: one job per core
    assert threads_for_job(None, {"n_jobs": 16}, environ={}, cores=8) == 1
    assert threads_for_job(None, None, environ={"SLURM_CPUS_PER_TASK": "6"}, cores=64) == 6
    assert threads_for_job(None, None, environ={"LOCAL_WORLD_SIZE": "2"}, cores=8) == 4  # torchrun ranks
    assert parallel_jobs({"n_jobs": -2}, cores=8) == 7
    assert parallel_jobs({"_target_": "BasicLauncher"}, cores=8) == 1


def test_bad_threads_value_is_refused(tmp_path: Path) -> None:
    from qrun.config import validate
    from qrun.errors import QrunError

    with pytest.raises(QrunError, match=r"threads=0 .*accepted: null \(automatic\) or a positive integer"):
        validate(compose_config(["threads=0"], tmp_path))


def test_sweep_folder_is_stable_and_named(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="qrun.configs", version_base="1.3"):
        cfg = compose("config", overrides=["sweep=dsq_grid"], return_hydra_config=True)
        default = compose("config", overrides=[], return_hydra_config=True)
    assert cfg.hydra.sweep.dir == "multirun/dsq_grid"
    assert default.hydra.sweep.dir == "multirun/default"  # no timestamp: the same command finds the same folders
    assert "sweep" in cfg.hydra.job.config.override_dirname.exclude_keys
