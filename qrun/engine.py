"""One training epoch and one evaluation pass; nothing here knows about quantization.

Metrics accumulate on the device (no host sync per step); a tqdm bar shows them at a terminal, progress lines
(qrun.progress) elsewhere.
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from tqdm import tqdm

from qrun.progress import ProgressLog

# A bar's numbers are host reads of device sums (a sync): refreshed at most this often.
BAR_REFRESH_S = 1.0


class Meter:
    """Sample-weighted running sums of loss and top-k hits, kept on the device.

    Reading a CUDA scalar (`float(loss)`, `int(hits)`) is a host-device sync that drains the launch queue; the
    sums stay tensors and are read once per epoch, or when a bar or progress line asks for them.
    """

    def __init__(self) -> None:
        self.samples = 0
        self.loss_sum: Optional[torch.Tensor] = None
        self.hits: dict[int, torch.Tensor] = {}

    def update(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, topk: tuple[int, ...]) -> None:
        count = targets.numel()
        self.samples += count
        weighted = loss.detach().float() * count
        self.loss_sum = weighted if self.loss_sum is None else self.loss_sum.add_(weighted)
        for k, hit in zip(topk, topk_hits(logits.detach(), targets, topk)):
            self.hits[k] = hit if k not in self.hits else self.hits[k].add_(hit)

    def loss(self) -> float:
        return 0.0 if self.loss_sum is None else float(self.loss_sum) / max(1, self.samples)

    def accuracy(self, k: int) -> float:
        return 100.0 * (int(self.hits[k]) if k in self.hits else 0) / max(1, self.samples)


def topk_hits(logits: torch.Tensor, targets: torch.Tensor, topk: tuple[int, ...]) -> list[torch.Tensor]:
    """Number of samples whose target is among the k highest logits, for each k, as device tensors."""
    k_max = min(max(topk), logits.size(1))
    predictions = logits.topk(k_max, dim=1).indices
    correct = predictions.eq(targets.unsqueeze(1))
    return [correct[:, :min(k, k_max)].any(dim=1).sum() for k in topk]


def to_device(images: torch.Tensor, targets: torch.Tensor, device: torch.device, channels_last: bool,
              augment: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy a batch (asynchronously from pinned memory), augment it where it now lives, then lay it out."""
    images = images.to(device, non_blocking=True)
    if augment is not None:
        images = augment(images)
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
    # A criterion that sums loss and top-1 itself (qrun.guard.StepTracker) is the meter: no second set of sums.
    keeps_metrics = getattr(criterion, "keeps_metrics", False)
    meter, data_time, start = criterion if keeps_metrics else Meter(), 0.0, time.perf_counter()
    # amp: the scaler is enabled for float16 autocast, a no-op for bfloat16 (which needs no loss scaling).
    amp_dtype = torch.float16 if scaler is not None and scaler.is_enabled() else torch.bfloat16
    autocast = torch.autocast(device.type, amp_dtype) if scaler is not None else nullcontext()
    bar = tqdm(loader, desc=f"train {epoch}", leave=False, disable=not show_progress(progress), dynamic_ncols=True)
    lines = ProgressLog(f"train {epoch}", _length(loader), enabled=bar.disable)
    augment = getattr(loader, "batch_augment", None)
    fetched = refreshed = time.perf_counter()
    for step, (images, targets) in enumerate(bar, start=1):
        images, targets = to_device(images, targets, device, channels_last, augment)
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
        if not keeps_metrics:
            meter.update(loss, logits, targets, (1,))
        fetched = time.perf_counter()
        if not bar.disable and fetched - refreshed >= BAR_REFRESH_S:
            bar.set_postfix(loss=f"{meter.loss():.3f}", top1=f"{meter.accuracy(1):.2f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                            data=f"{100 * data_time / (fetched - start):.0f}%")
            refreshed = fetched = time.perf_counter()
        elif lines.step(step, meter.samples, meter.loss):
            fetched = time.perf_counter()
    elapsed = time.perf_counter() - start
    return {"loss": meter.loss(), "top1": meter.accuracy(1), "data_share": data_time / max(elapsed, 1e-9),
            "time_s": elapsed}


def _length(loader: Iterable) -> Optional[int]:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, criterion: Optional[nn.Module] = None,
             progress: bool = True, desc: str = "eval", channels_last: bool = False) -> dict[str, float]:
    """Loss, top-1 and top-5 over the whole loader; the model is put in eval mode."""
    model.eval()
    criterion = criterion or nn.CrossEntropyLoss()
    meter = Meter()
    bar = tqdm(loader, desc=desc, leave=False, disable=not show_progress(progress), dynamic_ncols=True)
    lines = ProgressLog(desc, _length(loader), enabled=bar.disable)
    refreshed = time.perf_counter()
    for step, (images, targets) in enumerate(bar, start=1):
        images, targets = to_device(images, targets, device, channels_last)
        logits = model(images)
        meter.update(criterion(logits, targets), logits, targets, (1, 5))
        if not bar.disable and time.perf_counter() - refreshed >= BAR_REFRESH_S:
            bar.set_postfix(top1=f"{meter.accuracy(1):.2f}")
            refreshed = time.perf_counter()
        else:
            lines.step(step, meter.samples, meter.loss)
    return {"loss": meter.loss(), "top1": meter.accuracy(1), "top5": meter.accuracy(5), "samples": meter.samples}
