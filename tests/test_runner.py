"""The trainer end to end on real Fashion-MNIST subsets: outputs, exact resume, evaluate-only, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qrun import trainer
from qrun.errors import QrunError
from tests.conftest import SMALL_DATA, run_training

pytestmark = pytest.mark.usefixtures("fashion_mnist_available")
RESULT_KEYS = {"top1", "top5", "best_top1", "epoch", "mode", "model", "dataset", "quant", "w_bits", "a_bits",
               "quantize_input", "params", "wall_time_s"}


def test_one_epoch_writes_every_output_and_learns(tmp_path: Path) -> None:
    results = run_training([*SMALL_DATA, "dataset.train_samples=1024", "epochs=1"], tmp_path)
    stored = json.loads((tmp_path / "results.json").read_text())
    assert RESULT_KEYS <= set(stored) and stored["top1"] == results["top1"]
    assert stored["mode"] == "train" and stored["epoch"] == 1 and stored["params"] == 50_282
    assert (stored["w_bits"], stored["a_bits"], stored["quantize_input"]) == (32, 32, False)
    assert results["top1"] > 40.0, "one epoch on 1024 real images must beat chance (10%) by far"
    for name in ("last.pt", "best.pt"):
        assert (tmp_path / "checkpoints" / name).is_file()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/top1", "val/loss", "val/top1", "val/top5", "lr"} <= tags
    assert [e.value for e in events.Scalars("val/top1")] == pytest.approx([results["top1"]])


def without_timings(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in ("epoch_time_s", "data_share")} for h in history]


class SimulatedKill(Exception):
    pass


def test_killed_run_resumes_bit_identical_to_an_uninterrupted_one(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = [*SMALL_DATA, "epochs=2", "deterministic=true", "seed=7", "dataset.augment=true"]
    straight = run_training(overrides, tmp_path / "straight")

    save = trainer.save_checkpoints

    def save_then_die(state, context, metrics, is_best):
        save(state, context, metrics, is_best)
        raise SimulatedKill  # the process dies right after epoch 1's checkpoint landed

    monkeypatch.setattr(trainer, "save_checkpoints", save_then_die)
    with pytest.raises(SimulatedKill):
        run_training(overrides, tmp_path / "killed")
    monkeypatch.setattr(trainer, "save_checkpoints", save)
    resumed = run_training([*overrides, f"resume={tmp_path / 'killed'}"], tmp_path / "resumed")

    assert without_timings(resumed["history"]) == without_timings(straight["history"])
    assert resumed["top1"] == straight["top1"] and resumed["best_top1"] == straight["best_top1"]
    a = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed/checkpoints/last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def test_auto_resume_continues_in_its_own_directory_and_skips_when_done(tmp_path: Path) -> None:
    run_training([*SMALL_DATA, "epochs=1"], tmp_path)
    continued = run_training([*SMALL_DATA, "epochs=2"], tmp_path)
    assert [h["epoch"] for h in continued["history"]] == [1, 2]
    mtime = (tmp_path / "checkpoints/last.pt").stat().st_mtime_ns
    again = run_training([*SMALL_DATA, "epochs=2"], tmp_path)
    assert again["top1"] == continued["top1"]
    assert (tmp_path / "checkpoints/last.pt").stat().st_mtime_ns == mtime, "a finished run must not retrain"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("trained")
    run_training([*SMALL_DATA, "epochs=1"], folder)
    return folder


def test_evaluate_reproduces_the_recorded_top1_exactly(trained_run: Path, tmp_path: Path) -> None:
    results = run_training([*SMALL_DATA, "mode=evaluate", f"resume={trained_run}"], tmp_path)
    recorded = torch.load(trained_run / "checkpoints/best.pt", weights_only=True)["metrics"]["top1"]
    assert results["mode"] == "evaluate" and results["top1"] == recorded
    assert not (tmp_path / "checkpoints").exists(), "evaluate must not train or save"


@pytest.mark.parametrize("override, difference", [
    ("model=cnn", "model: checkpoint has 'cnn_bn', config has 'cnn'"),
    ("dataset=mnist", "dataset: checkpoint has 'fashion_mnist', config has 'mnist'"),
])
def test_mismatched_checkpoint_is_refused(trained_run: Path, tmp_path: Path, override: str, difference: str) -> None:
    with pytest.raises(QrunError, match=difference):
        run_training([*SMALL_DATA, "mode=evaluate", f"resume={trained_run}", override], tmp_path)


def test_resume_of_a_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(QrunError, match="resume=/nowhere/run does not exist"):
        run_training([*SMALL_DATA, "mode=evaluate", "resume=/nowhere/run"], tmp_path)


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qrun import checkpoint

    target = tmp_path / "ckpt.pt"
    checkpoint.atomic_save({"format_version": checkpoint.FORMAT_VERSION, "value": 1}, target)

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(QrunError, match=f"cannot write {target}: disk full; the previous checkpoint"):
        checkpoint.atomic_save({"format_version": checkpoint.FORMAT_VERSION, "value": 2}, target)
    monkeypatch.undo()
    stored = torch.load(target, weights_only=True)
    assert stored["value"] == 1, "a failed write must leave the previous checkpoint intact"
    assert list(tmp_path.iterdir()) == [target], "no temporary file may be left behind"
