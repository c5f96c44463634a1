"""One training epoch and one evaluation pass, with tqdm bars; nothing here knows about quantization."""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import nn
from tqdm import tqdm


@dataclass
class Meter:
    """Sample-weighted running sums of loss and top-k hits."""

    samples: int = 0
    loss_sum: float = 0.0
    hits: dict[int, int] = field(default_factory=dict)

    def update(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, topk: tuple[int, ...]) -> None:
        count = targets.numel()
        self.samples += count
        self.loss_sum += float(loss) * count
        for k, hit in zip(topk, topk_hits(logits, targets, topk)):
            self.hits[k] = self.hits.get(k, 0) + hit

    def loss(self) -> float:
        return self.loss_sum / max(1, self.samples)

    def accuracy(self, k: int) -> float:
        return 100.0 * self.hits.get(k, 0) / max(1, self.samples)


def topk_hits(logits: torch.Tensor, targets: torch.Tensor, topk: tuple[int, ...]) -> list[int]:
    """Number of samples whose target is among the k highest logits, for each k."""
    k_max = min(max(topk), logits.size(1))
    predictions = logits.topk(k_max, dim=1).indices
    correct = predictions.eq(targets.unsqueeze(1))
    return [int(correct[:, :min(k, k_max)].any(dim=1).sum()) for k in topk]


def to_device(images: torch.Tensor, targets: torch.Tensor, device: torch.device,
              channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images = images.to(device, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=True)


def show_progress(enabled: bool) -> bool:
    """Bars only for a person watching: never in logs, CI or when switched off."""
    return enabled and sys.stderr.isatty()


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, loader: Iterable, device: torch.device,
                    epoch: int, progress: bool = True, scaler: Optional[torch.amp.GradScaler] = None,
                    channels_last: bool = False) -> dict[str, float]:
    model.train()
    meter, data_time, start = Meter(), 0.0, time.perf_counter()
    autocast = torch.autocast(device.type) if scaler is not None else nullcontext()
    bar = tqdm(loader, desc=f"train {epoch}", leave=False, disable=not show_progress(progress), dynamic_ncols=True)
    fetched = time.perf_counter()
    for images, targets in bar:
        images, targets = to_device(images, targets, device, channels_last)
        data_time += time.perf_counter() - fetched
        with autocast:
            logits = model(images)
            # A distillation criterion (qrun.distill) also needs the batch, for its teacher.
            loss = criterion(logits, targets, images) if getattr(criterion, "needs_images", False) \
                else criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        meter.update(loss.detach(), logits.detach(), targets, (1,))
        if not bar.disable:
            bar.set_postfix(loss=f"{meter.loss():.3f}", top1=f"{meter.accuracy(1):.2f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                            data=f"{100 * data_time / (time.perf_counter() - start):.0f}%")
        fetched = time.perf_counter()
    elapsed = time.perf_counter() - start
    return {"loss": meter.loss(), "top1": meter.accuracy(1), "data_share": data_time / max(elapsed, 1e-9),
            "time_s": elapsed}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, criterion: Optional[nn.Module] = None,
             progress: bool = True, desc: str = "eval", channels_last: bool = False) -> dict[str, float]:
    """Loss, top-1 and top-5 over the whole loader; the model is put in eval mode."""
    model.eval()
    criterion = criterion or nn.CrossEntropyLoss()
    meter = Meter()
    bar = tqdm(loader, desc=desc, leave=False, disable=not show_progress(progress), dynamic_ncols=True)
    for images, targets in bar:
        images, targets = to_device(images, targets, device, channels_last)
        logits = model(images)
        meter.update(criterion(logits, targets), logits, targets, (1, 5))
        if not bar.disable:
            bar.set_postfix(top1=f"{meter.accuracy(1):.2f}")
    return {"loss": meter.loss(), "top1": meter.accuracy(1), "top5": meter.accuracy(5), "samples": meter.samples}
