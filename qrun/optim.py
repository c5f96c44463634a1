"""Optimizers and per-iteration learning-rate schedules (warm-up, then cosine / multi-step / constant)."""

from __future__ import annotations

import math
from typing import Callable

import torch
from omegaconf import DictConfig
from torch import nn

from qrun.quant import quantizer_parameters


def build_optimizer(model: nn.Module, opt_cfg: DictConfig, quant_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """Weights in one group; learned quantizer parameters (alpha, bounds, steps) in another, without weight decay,
    because decaying a clip bound or step towards zero is a bias no quantization paper intends."""
    quant_ids = {id(p) for p in quantizer_parameters(model)}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in quant_ids]
    quant = [p for p in model.parameters() if p.requires_grad and id(p) in quant_ids]
    groups = [{"params": weights, "weight_decay": opt_cfg.weight_decay, "name": "weights"}]
    if quant:
        groups.append({"params": quant, "weight_decay": 0.0, "lr": opt_cfg.lr * quant_lr_scale, "name": "quant"})
    if opt_cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=opt_cfg.lr, momentum=opt_cfg.momentum, nesterov=opt_cfg.nesterov)
    optimizer_class = torch.optim.Adam if opt_cfg.name == "adam" else torch.optim.AdamW
    return optimizer_class(groups, lr=opt_cfg.lr, betas=tuple(opt_cfg.betas))


def lr_factor(sched_cfg: DictConfig, epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimizer step `step` (0-based), for torch's LambdaLR."""
    total = max(1, epochs * steps_per_epoch)
    warmup = int(round(sched_cfg.warmup_epochs * steps_per_epoch))
    milestones = [m * steps_per_epoch for m in sched_cfg.get("milestones", [])]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if sched_cfg.name == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            floor = sched_cfg.min_lr_ratio
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if sched_cfg.name == "multistep":
            return sched_cfg.gamma ** sum(step >= m for m in milestones)
        return 1.0

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, sched_cfg: DictConfig, epochs: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(sched_cfg, epochs, steps_per_epoch))
