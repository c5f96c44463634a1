"""Knowledge distillation from a qrun run: the loss against its closed form, end to end, exact resume, refusals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from qrun import checkpoint
from qrun.distill import DistillationLoss, load_teacher
from qrun.errors import QrunError
from qrun.trainer import build_model
from tests.conftest import SMALL_DATA, compose_config, run_training

STUDENT_DATA = ["dataset.train_samples=256", "dataset.val_samples=128", "batch_size=64"]


def test_loss_is_hinton_kd_with_t_squared_and_the_teacher_gets_no_gradient() -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    images, targets = torch.randn(5, 6), torch.tensor([0, 1, 2, 3, 0])
    logits = torch.randn(5, 4, requires_grad=True)
    criterion = DistillationLoss(teacher, weight=0.3, temperature=4.0, hard=nn.CrossEntropyLoss()).train()
    assert not teacher.training  # still eval after .train(): its BN statistics never move
    running_mean = teacher[1].running_mean.clone()
    loss = criterion(logits, targets, images)
    with torch.no_grad():
        p_t = torch.softmax(teacher(images) / 4.0, dim=1)
    p_s = torch.softmax(logits.detach() / 4.0, dim=1)
    kl = sum(p_t[i, j] * math.log(p_t[i, j] / p_s[i, j]) for i in range(5) for j in range(4)) / 5  # KL(p_t || p_s)
    ce = nn.functional.cross_entropy(logits.detach(), targets)
    assert loss.item() == pytest.approx(0.7 * ce.item() + 0.3 * 16.0 * float(kl), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters()) and torch.equal(teacher[1].running_mean, running_mean)
    # d(T^2 KL)/dz_s = T (p_s - p_t): the soft part of the student's gradient.
    hard_grad = torch.autograd.functional.jacobian(lambda z: nn.functional.cross_entropy(z, targets), logits.detach())
    assert torch.allclose(logits.grad, 0.7 * hard_grad + 0.3 * 4.0 * (p_s - p_t) / 5, atol=1e-6)
    assert criterion.epoch_kd_loss() == pytest.approx(16.0 * float(kl), rel=1e-5)
    assert criterion.epoch_kd_loss() is None  # reset after each epoch


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    run_training([*SMALL_DATA, "epochs=1"], out)  # float cnn_bn on the Fashion-MNIST subset
    return out


def student(teacher: Path, epochs: int) -> list[str]:
    # A constant lr: with cosine, an epochs=1 run would follow another schedule than the first epoch of epochs=2.
    return [*STUDENT_DATA, "quant=lsq", "bits=2", "quantize_input=true", f"distill.teacher={teacher}", "scheduler=constant",
            "distill.weight=0.7", "distill.temperature=2", f"epochs={epochs}", "deterministic=true", "seed=3"]


@pytest.mark.usefixtures("fashion_mnist_available")
def test_distillation_runs_end_to_end_and_resumes_exactly(teacher_run: Path, tmp_path: Path) -> None:
    straight = run_training(student(teacher_run, 2), tmp_path / "straight")
    run_training(student(teacher_run, 1), tmp_path / "split")
    resumed = run_training(student(teacher_run, 2), tmp_path / "split")  # auto-resume from epoch 1's checkpoint
    assert resumed["epoch"] == 2
    keys = ("train_loss", "train_top1", "test_loss", "top1")
    assert [[h[k] for k in keys] for h in resumed["history"]] == [[h[k] for k in keys] for h in straight["history"]]
    a = checkpoint.load(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    b = checkpoint.load(tmp_path / "split" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    events = EventAccumulator(str(tmp_path / "straight" / "tb"))
    events.Reload()
    kd = [e.value for e in events.Scalars("train/kd_loss")]
    assert len(kd) == 2 and all(0 < v < 10 for v in kd)
    assert straight["top1"] > 30  # chance is 10%


def test_a_teacher_of_another_dataset_is_refused(teacher_run: Path, tmp_path: Path) -> None:
    payload = checkpoint.load(teacher_run / "checkpoints" / "best.pt")
    payload["architecture"]["dataset"] = "cifar100"
    payload["config"]["dataset"].update(name="cifar100", num_classes=100)
    checkpoint.atomic_save(payload, tmp_path / "cifar100.pt")
    with pytest.raises(QrunError, match=r"was trained on dataset=cifar100 \(100 classes\), this run is "
                                        r"dataset=fashion_mnist \(10 classes\)"):
        load_teacher(compose_config(student(tmp_path / "cifar100.pt", 1), tmp_path), torch.device("cpu"), build_model)
    with pytest.raises(QrunError, match="distill.teacher=.*does not exist"):
        load_teacher(compose_config(student(tmp_path / "nowhere", 1), tmp_path), torch.device("cpu"), build_model)
    teacher = load_teacher(compose_config(student(teacher_run, 1), tmp_path), torch.device("cpu"), build_model)
    stored = payload["model"]
    assert all(torch.equal(teacher.state_dict()[k], stored[k]) for k in stored)


def test_under_autocast_the_teacher_runs_in_low_precision_and_the_kd_term_in_float32() -> None:
    torch.manual_seed(0)
    teacher, student = nn.Linear(8, 5), nn.Linear(8, 5)
    criterion = DistillationLoss(teacher, weight=0.5, temperature=2.0, hard=nn.CrossEntropyLoss())
    images, targets = torch.randn(16, 8), torch.randint(0, 5, (16,))
    seen = []
    teacher.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = criterion(student(images), targets, images)
    assert seen == [torch.bfloat16] and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert student.weight.grad is not None and teacher.weight.grad is None
