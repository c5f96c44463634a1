"""The learning-rate schedule of a run whose epoch count changed on resume (`resume=<run> epochs=12`).

Rule: the steps already taken keep the schedule they were taken with. From the resume step on, the schedule is
rebuilt for the new total without a jump: a cosine decays from the lr in effect at the resume step to its floor
(min_lr_ratio x lr) at the new last step; warm-up, multistep and constant do not depend on the epoch count and
go on unchanged. So a finished cosine run, whose lr already reached the floor, trains its extra epochs at the
floor (0 by default: extending it changes nothing; start a new schedule with init_from=<run> instead).

The plan is a list of segments [first_step, epochs], stored in the checkpoint, so a run extended twice, or
killed during an extension and resumed, follows exactly the same lr at every step.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from omegaconf import DictConfig

from qrun.optim import lr_factor

Segments = list[list[int]]


def planned_factor(sched_cfg: DictConfig, segments: Sequence[Sequence[int]],
                   steps_per_epoch: int) -> Callable[[int], float]:
    """lr multiplier at step `step` under the segment plan; one segment is exactly optim.lr_factor."""
    base = lr_factor(sched_cfg, int(segments[0][1]), steps_per_epoch)
    if sched_cfg.name != "cosine" or len(segments) == 1:
        return base
    floor = sched_cfg.min_lr_ratio
    previous = base
    for first, epochs in segments[1:]:
        start_factor = previous(int(first))
        end = max(int(first) + 1, int(epochs) * steps_per_epoch)
        previous = _segment(previous, int(first), end, start_factor, floor)
    return previous


def _segment(before: Callable[[int], float], first: int, end: int, start_factor: float,
             floor: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < first:
            return before(step)
        progress = min(1.0, (step - first) / max(1, end - first))
        return floor + (start_factor - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def extend(segments: Segments, steps_taken: int, epochs: int) -> Segments:
    """The plan after a resume at `steps_taken` asking for `epochs` in total (unchanged if it already does)."""
    if int(segments[-1][1]) == epochs:
        return [list(s) for s in segments]
    kept = [list(s) for s in segments if int(s[0]) < steps_taken or s is segments[0]]
    return [*kept, [steps_taken, epochs]]


def build(optimizer: torch.optim.Optimizer, sched_cfg: DictConfig, segments: Segments,
          steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, planned_factor(sched_cfg, segments, steps_per_epoch))


def apply_current(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set each group's lr to the plan's value for the next step (a restored optimizer holds the old plan's)."""
    step = scheduler.last_epoch
    for group, base_lr, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
