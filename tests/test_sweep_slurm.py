"""The SLURM preset cannot run here: check that it composes and that submitit renders the sbatch script it says.

The real hydra-submitit-launcher `launch()` runs against submitit's real SlurmExecutor; only the final `sbatch`
call is replaced by an `echo` of sbatch's reply, and job results are not awaited.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

submitit = pytest.importorskip("submitit")
from submitit.core import core as submitit_core  # noqa: E402
from submitit.slurm import slurm as submitit_slurm  # noqa: E402


def compose_slurm(tmp_path: Path, overrides: list[str]):
    with initialize_config_module(config_module="qrun.configs", version_base="1.3"):
        return compose("config", overrides=["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                                            *overrides], return_hydra_config=True)


def test_slurm_preset_composes_with_requeue_settings(tmp_path: Path) -> None:
    launcher = compose_slurm(tmp_path, []).hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.cpus_per_task, launcher.mem_gb, launcher.tasks_per_node) == (1, 8, 32, 1)
    assert launcher.timeout_min == 240 and launcher.array_parallelism == 16
    # Requeue on timeout is off in the plugin's own default (0); the preset turns it on.
    assert launcher.max_num_timeout > 0


def test_slurm_submission_parameters_match_the_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_slurm(tmp_path, ["hydra.launcher.partition=research", "hydra.launcher.timeout_min=90",
                                   "hydra.launcher.array_parallelism=2", "hydra.launcher.mem_gb=16"])
    # Neither srun nor sbatch is installed: claim srun, answer as sbatch would, and do not wait for the jobs.
    monkeypatch.setattr(submitit_slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    monkeypatch.setattr(submitit_slurm.SlurmExecutor, "_make_submission_command",
                        lambda self, path: ["echo", "Submitted batch job 4242"])
    monkeypatch.setattr(submitit_core.Job, "results", lambda self: ["submitted"])
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config, launcher.hydra_context, launcher.task_function = cfg, None, None
    jobs = [["quant=dsq", "bits=2"], ["quant=dsq", "bits=4"], ["quant=lsq", "bits=2"]]
    assert launcher.launch(jobs, initial_job_idx=0) == ["submitted"] * 3

    scripts = list((tmp_path / "sweep" / ".submitit").rglob("*_submission.sh"))
    assert len(scripts) == 1, scripts  # one array job for the whole sweep
    sbatch = {line.split()[1].split("=")[0]: line.split()[1].partition("=")[2]
              for line in scripts[0].read_text().splitlines() if line.startswith("#SBATCH")}
    assert sbatch["--partition"] == "research"
    assert sbatch["--gpus-per-node"] == "1"
    assert sbatch["--cpus-per-task"] == "8"
    assert sbatch["--ntasks-per-node"] == "1"
    assert sbatch["--mem"] == "16GB"
    assert sbatch["--time"] == "90"
    assert sbatch["--array"] == "0-2%2"  # 3 jobs, at most array_parallelism=2 at once
    assert sbatch["--signal"] == "USR2@120"  # the warning before the time limit that triggers the requeue

    # submitit's checkpointing protocol: each pickled job is the launcher itself, which on timeout or
    # preemption resubmits the very same call (same overrides, same job folder), with requeues allowed.
    pickles = sorted((tmp_path / "sweep" / ".submitit").rglob("*_submitted.pkl"))
    assert len(pickles) == 3
    delayed = pickle.loads(pickles[0].read_bytes())
    assert delayed._timeout_countdown == cfg.hydra.launcher.max_num_timeout  # requeues left after timeouts
    requeued = delayed.function.checkpoint(*delayed.args, **delayed.kwargs)
    assert isinstance(requeued, submitit.helpers.DelayedSubmission)
    assert requeued.args == delayed.args and requeued.args[0] in jobs
