"""What a run folder means: evaluate and resume take the run's config from its checkpoint, a folder holding
another run is refused, extended schedules follow the documented rule, init_from takes any quantizer, the
divergence guard stops a diverging run, and a folder lock keeps a second qrun out."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from qrun import guard, lock, runconfig, trainer
from qrun.data import epoch_seed
from qrun.errors import QrunError
from qrun.optim import lr_factor
from qrun.schedule import planned_factor
from tests.conftest import compose_config, run_training

pytestmark = pytest.mark.usefixtures("fashion_mnist_available")
TINY = ["model=cnn", "dataset.train_samples=256", "dataset.val_samples=128", "batch_size=64", "threads=1"]
# A quantized run with a per-layer policy, scored on the full test split.
LSQ = ["model=cnn", "quant=lsq", "bits=3", "quantize_input=true", "++quant.layer_overrides={features.3:{a_bits:8}}",
       "dataset.train_samples=256", "epochs=1", "threads=1"]


@pytest.fixture(scope="module")
def lsq_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lsq")
    run_training(LSQ, folder)
    return folder


def test_evaluate_of_a_quantized_run_needs_nothing_else(lsq_run: Path, tmp_path: Path) -> None:
    results = run_training(["mode=evaluate", f"resume={lsq_run}"], tmp_path)
    best = torch.load(lsq_run / "checkpoints/best.pt", weights_only=True)
    assert (results["quant"], results["w_bits"], results["a_bits"], results["quantize_input"]) == ("lsq", 3, 3, True)
    assert results["top1"] == best["metrics"]["top1"], "the recorded top-1 must be reproduced exactly"
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["evaluated"] == {"split": "test", "samples": 10_000, "checkpoint": str(lsq_run / "checkpoints/best.pt"),
                                   "epoch": 1}


@pytest.mark.parametrize("override, message", [
    ("bits=4", "bits: checkpoint has 3, config has 4"),
    ("quant=dsq", "quant: checkpoint has 'lsq', config has 'dsq'"),
    ("++quant.layer_overrides={}", "quant.layer_overrides: checkpoint has {'features.3': {'a_bits': 8}}, config has {}"),
])
def test_evaluate_refuses_an_override_that_contradicts_the_checkpoint(lsq_run: Path, tmp_path: Path, override: str,
                                                                      message: str) -> None:
    with pytest.raises(QrunError, match=message.replace("{", r"\{").replace("}", r"\}")):
        run_training(["mode=evaluate", f"resume={lsq_run}", override], tmp_path)
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("override, key", [
    ("optimizer.lr=0.5", "optimizer.lr: checkpoint has 0.002, config has 0.5"),
    ("dataset.train_samples=128", "dataset.train_samples: checkpoint has 256, config has 128"),
    ("optimizer=sgd", "optimizer: checkpoint has 'adam', config has 'sgd'"),
    ("seed=5", "seed: checkpoint has 0, config has 5"),
])
def test_resume_refuses_a_change_that_alters_the_result(lsq_run: Path, tmp_path: Path, override: str,
                                                        key: str) -> None:
    with pytest.raises(QrunError, match=f"{key}; a resumed run keeps the config it was started with"):
        run_training([f"resume={lsq_run}", "epochs=2", override], tmp_path)


@pytest.mark.parametrize("args, message", [
    (["mode=evaluate", "bits=4"], "(bits: checkpoint has 3, config has 4); the architecture comes from the checkpoint"),
    (["mode=evaluate", "quant=dsq"], "quant: checkpoint has 'lsq', config has 'dsq'"),
    (["epochs=2", "optimizer.lr=0.5"], "optimizer.lr: checkpoint has 0.002, config has 0.5; a resumed run keeps"),
    (["epochs=2", "seed=5"], "seed: checkpoint has 0, config has 5; a resumed run keeps"),
])
def test_the_command_line_check_refuses_the_same_contradictions_before_any_job(lsq_run: Path, tmp_path: Path,
                                                                               args: list[str], message: str) -> None:
    """qrun.preflight applies the resume rules to the checkpoint it opens anyway, before Hydra starts the job
    (no model, no data, no folder); the trainer keeps the same check for in-process callers."""
    from qrun.preflight import preflight

    with pytest.raises(QrunError, match=re.escape(message)):
        preflight([f"resume={lsq_run}", *args, f"hydra.run.dir={tmp_path / 'job'}"])
    assert not (tmp_path / "job").exists()
    preflight([f"resume={lsq_run}", "epochs=2", "device=cpu", f"hydra.run.dir={tmp_path / 'job'}"])  # allowed


def test_a_folder_holding_another_run_is_refused_not_returned(lsq_run: Path) -> None:
    other = [o.replace("quant=lsq", "quant=dsq") for o in LSQ]
    with pytest.raises(QrunError, match=r"already holds a run with other settings \(.*quant: 'lsq' there, 'dsq' "
                                        r"requested.*resume="):
        run_training(other, lsq_run)
    same = run_training(LSQ, lsq_run)  # the same command: skipped, its results returned
    assert same["quant"] == "lsq" and same["epoch"] == 1


def test_more_epochs_in_the_same_folder_keep_the_milestones_the_run_started_with(tmp_path: Path) -> None:
    # Multistep milestones default to 50%/75% of `epochs`: growing epochs must continue the run, not refuse it.
    first = run_training([*TINY, "scheduler=multistep", "epochs=2"], tmp_path)
    started = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["config"]["scheduler"]
    longer = run_training([*TINY, "scheduler=multistep", "epochs=4"], tmp_path)
    assert (first["epoch"], longer["epoch"]) == (2, 4)
    stored = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["config"]["scheduler"]
    assert stored["milestones"] == started["milestones"] == [1, 2]  # of the original 2 epochs; 4 would give [2, 3]
    with pytest.raises(QrunError, match=r"scheduler.milestones: \[1, 2\] there, \[3, 4\] requested"):
        run_training([*TINY, "scheduler=multistep", "scheduler.milestones=[3,4]", "epochs=5"], tmp_path)


def test_runtime_keys_include_every_key_left_out_of_sweep_folder_names() -> None:
    config = OmegaConf.load(Path(trainer.__file__).parent.parent / "configs/config.yaml")
    # init_from and distill.teacher are paths: left out of folder names (their '/' would nest folders), though
    # they change the result; a re-run with another value is refused by the resume rules, not mixed in.
    paths = {"init_from", "distill.teacher"}
    assert set(config.hydra.job.config.override_dirname.exclude_keys) - paths <= runconfig.FREE_KEYS


def test_extended_cosine_goes_on_from_the_current_lr_without_a_restart() -> None:
    cfg = OmegaConf.create({"name": "cosine", "warmup_epochs": 0.0, "milestones": [], "gamma": 0.1,
                            "min_lr_ratio": 0.1})
    old = lr_factor(cfg, 4, 10)
    extended = planned_factor(cfg, [[0, 4], [20, 6]], 10)  # resumed at step 20 of 40 asking for 60
    assert [extended(s) for s in range(20)] == [old(s) for s in range(20)]
    assert extended(20) == old(20), "no jump at the resume step"
    values = [extended(s) for s in range(20, 60)]
    assert all(a > b for a, b in zip(values, values[1:])) and values[-1] == pytest.approx(0.1, abs=2e-3)
    finished = planned_factor(cfg, [[0, 4], [40, 6]], 10)  # a finished run stays at its floor
    assert all(finished(s) == pytest.approx(0.1) for s in range(40, 60))


class SimulatedKill(Exception):
    pass


def killed_after_first_checkpoint(overrides: list[str], folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run until the first epoch's checkpoint is written, then die as a kill would (nothing else written)."""
    save = trainer.save_checkpoints

    def save_then_die(state, context, metrics, is_best):
        save(state, context, metrics, is_best)
        raise SimulatedKill

    monkeypatch.setattr(trainer, "save_checkpoints", save_then_die)
    with pytest.raises(SimulatedKill):
        run_training(overrides, folder)
    monkeypatch.setattr(trainer, "save_checkpoints", save)


def test_resume_with_more_epochs_logs_and_uses_the_continued_lr(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    killed_after_first_checkpoint([*TINY, "epochs=3"], tmp_path, monkeypatch)
    results = run_training([*TINY, "epochs=4"], tmp_path)  # auto_resume: only epochs changed
    lr = 0.002  # Adam's preset; 4 steps per epoch
    old = lr_factor(OmegaConf.create({"name": "cosine", "warmup_epochs": 0.0, "min_lr_ratio": 0.0}), 3, 4)
    assert [h["lr"] for h in results["history"][:2]] == [lr * old(0), lr * old(4)]
    # from step 4, a cosine from old(4) = 0.75 to 0 over the 12 steps left: 0.75 * 0.75 at step 8
    assert results["history"][2]["lr"] == pytest.approx(lr * 0.75 * 0.75)
    saved = torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)
    assert saved["schedule"] == [[0, 3], [4, 4]] and saved["config"]["epochs"] == 4


def test_init_from_takes_a_checkpoint_of_another_quantizer(lsq_run: Path, tmp_path: Path) -> None:
    cfg = compose_config(["model=cnn", "quant=dsq", "bits=2"], tmp_path)
    model = trainer.build_model(cfg)
    payload = torch.load(lsq_run / "checkpoints/best.pt", weights_only=True)
    trainer.load_initial_weights(model, payload, cfg, lsq_run)
    state = model.state_dict()
    for key, value in payload["model"].items():
        if "_quantizer." not in key:
            assert torch.equal(state[key], value), key
    with pytest.raises(QrunError, match="init_from=/nowhere/run does not exist; init_from= takes"):
        run_training([*TINY, "epochs=1", "init_from=/nowhere/run"], tmp_path / "missing")


def strict_json(path: Path) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"{path} holds {name}: not valid JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_diverging_run_stops_with_one_line_and_writes_no_bad_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(guard.Diverged, match=r"training diverged at epoch 1 step \d+ of 4: loss is (nan|inf); last "
                                             r"good checkpoint: none"):
        run_training([*TINY, "epochs=2", "optimizer=sgd", "optimizer.lr=1e6"], tmp_path)
    results = strict_json(tmp_path / "results.json")
    assert results["status"] == "diverged" and "epoch 1" in results["error"] and results["best_top1"] is None
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


def test_dsq_at_a_huge_lr_is_reported_as_divergence_not_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(guard.Diverged, match="training diverged at epoch 1 step"):
        # DSQ's range no longer collapses at Adam lr 1000 (its minimum width is relative to |l|, |u| now):
        # plain SGD at lr 1e30 overflows the weights instead.
        run_training(["model=cnn_bn", "quant=dsq", "bits=2", "optimizer=sgd", "optimizer.lr=1e30",
                      "dataset.train_samples=2048", "dataset.val_samples=128", "epochs=2", "threads=1"], tmp_path)
    assert strict_json(tmp_path / "results.json")["status"] == "diverged"


def test_amp_skipped_steps_are_not_divergence_until_they_persist() -> None:
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    tracker = guard.StepTracker(torch.nn.CrossEntropyLoss(), amp=True)
    targets = torch.tensor([0, 1])

    def step(scale: float) -> None:
        loss = tracker(model(torch.ones(2, 4)) * scale, targets)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        tracker.after_step(scaler)

    step(1.0)
    step(math.inf)  # one overflow: the scaler skips it, training goes on
    for _ in range(3):
        step(1.0)
    tracker.check(1, 100, "none")
    for _ in range(guard.AMP_SKIP_LIMIT + 1):
        step(math.inf)
    with pytest.raises(guard.Diverged, match="GradScaler skipped .* steps in a row"):
        tracker.check(1, 100, "none")


def test_results_json_never_holds_nan() -> None:
    assert guard.json_safe({"a": [float("nan"), 1.0], "b": float("-inf"), "c": torch.tensor(2.5)}) == \
        {"a": [None, 1.0], "b": None, "c": 2.5}


def test_a_live_process_lock_is_refused_and_a_dead_one_taken_over(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / lock.LOCK_FILE).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(),
                                                           "since": "now"}))
        with pytest.raises(QrunError, match=f"is in use by qrun pid {sleeper.pid} on {socket.gethostname()}"):
            run_training([*TINY, "epochs=1"], tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    path = lock.acquire(tmp_path)  # its owner is gone: taken over
    assert json.loads(path.read_text())["pid"] != sleeper.pid
    lock.release(path)
    assert not path.exists()


def test_a_sweep_records_a_diverged_job_as_diverged(tmp_path: Path) -> None:
    from qrun.cli import _record_failure

    _record_failure(tmp_path / "results.json", guard.Diverged("training diverged at epoch 1 step 3 of 8: loss is nan"))
    stored = strict_json(tmp_path / "results.json")
    assert stored["status"] == "diverged" and "epoch 1 step 3" in stored["error"]


def test_a_handler_installed_before_qrun_runs_after_the_mid_epoch_checkpoint(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """submitit installs its SIGUSR2 handler (requeue, then exit -1) before the job starts: it must still run,
    but only once the mid-epoch checkpoint is on disk."""
    calls = []

    def submitit_like(signum, frame):
        calls.append((signum, torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)["position"]))
        raise SystemExit(-1)

    original = trainer.save_position

    def save_then_signal(*args):
        path = original(*args)
        if not calls and not getattr(save_then_signal, "sent", False):
            save_then_signal.sent = True
            os.kill(os.getpid(), signal.SIGUSR2)  # a real signal, delivered while the epoch runs
        return path

    previous = signal.signal(signal.SIGUSR2, submitit_like)
    monkeypatch.setattr(trainer, "save_position", save_then_signal)
    try:
        with pytest.raises(SystemExit) as exited:
            run_training([*TINY, "epochs=1", "checkpoint_every_steps=2"], tmp_path)
        assert signal.getsignal(signal.SIGUSR2) is submitit_like, "qrun must put the previous handler back"
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert exited.value.code == -1
    assert calls == [(signal.SIGUSR2, {"epoch": 1, "batch": 3, "sampler_seed": epoch_seed(0, 1)})]


def test_a_run_resumed_into_a_new_folder_keeps_its_best_checkpoint(lsq_run: Path, tmp_path: Path) -> None:
    results = run_training([f"resume={lsq_run}"], tmp_path)  # epochs=1 from the checkpoint: nothing left to train
    assert results["epoch"] == 1 and results["quant"] == "lsq"
    a = torch.load(lsq_run / "checkpoints/best.pt", weights_only=True)
    b = torch.load(tmp_path / "checkpoints/best.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_partial_checkpoint_is_refused_in_one_line(tmp_path: Path) -> None:
    from qrun import checkpoint

    torch.save({"format_version": checkpoint.FORMAT_VERSION, "model": {}, "epoch": 1}, tmp_path / "partial.pt")
    with pytest.raises(QrunError, match=r"partial.pt is a partial qrun checkpoint \(no optimizer, scheduler, "
                                        r"best_top1, metrics, architecture, config, rng\)"):
        checkpoint.load(tmp_path / "partial.pt")


@pytest.mark.parametrize("value", ["[SIGKILL]", "[9]", "[SIGBOGUS]"])
def test_preempt_signals_that_cannot_be_caught_are_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(QrunError, match="preempt.signals: .* is not a signal that can be caught"):
        run_training([*TINY, f"preempt.signals={value}"], tmp_path)


def test_a_sweep_job_refused_by_the_lock_writes_nothing_into_the_live_folder(tmp_path: Path) -> None:
    from qrun.cli import _record_failure

    _record_failure(tmp_path / "results.json", lock.FolderLocked("in use"))
    assert not (tmp_path / "results.json").exists()


def test_rerunning_a_resume_command_continues_its_own_folder_not_the_source(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    run_training([*TINY, "epochs=1"], tmp_path / "source")
    command = [f"resume={tmp_path / 'source'}", "epochs=3"]
    killed_after_first_checkpoint(command, tmp_path / "continued", monkeypatch)  # epoch 2 saved, then killed
    killed = torch.load(tmp_path / "continued/checkpoints/last.pt", weights_only=True)
    with caplog.at_level("INFO", logger="qrun.trainer"):
        results = run_training(command, tmp_path / "continued")  # the same command again (a requeue)
    assert f"resumed from {tmp_path / 'continued/checkpoints/last.pt'} at epoch 3" in caplog.text
    assert [h["epoch"] for h in results["history"]] == [1, 2, 3] and killed["epoch"] == 2
    assert results["history"][1] == killed["history"][1]
    assert torch.load(tmp_path / "source/checkpoints/last.pt", weights_only=True)["epoch"] == 1
