"""Learning-rate schedules against their closed forms, and the optimizer's parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from qrun.optim import build_optimizer, build_scheduler, lr_factor


def sched(**values):
    base = {"name": "cosine", "warmup_epochs": 0.0, "milestones": [], "gamma": 0.1, "min_lr_ratio": 0.0}
    return OmegaConf.create({**base, **values})


def test_cosine_with_warmup_follows_its_closed_form() -> None:
    factor = lr_factor(sched(warmup_epochs=1), epochs=5, steps_per_epoch=10)
    assert [factor(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)  # cosine starts at its peak after warm-up
    assert factor(30) == pytest.approx(0.5 * (1 + math.cos(math.pi * 20 / 40)))
    assert factor(50) == pytest.approx(0.0, abs=1e-12)


def test_cosine_floor_and_multistep_decay() -> None:
    assert lr_factor(sched(min_lr_ratio=0.1), 2, 5)(10) == pytest.approx(0.1)
    step = lr_factor(sched(name="multistep", milestones=[2, 4], gamma=0.5), epochs=6, steps_per_epoch=3)
    assert [step(s) for s in (0, 5, 6, 11, 12, 17)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert lr_factor(sched(name="constant"), 3, 3)(8) == 1.0


def test_scheduler_drives_the_optimizer_per_step() -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, OmegaConf.create({"name": "sgd", "lr": 0.4, "momentum": 0.9,
                                                         "nesterov": True, "weight_decay": 1e-4}))
    scheduler = build_scheduler(optimizer, sched(warmup_epochs=1), epochs=2, steps_per_epoch=4)
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert optimizer.defaults["nesterov"] and optimizer.param_groups[0]["weight_decay"] == 1e-4
