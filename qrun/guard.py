"""Divergence guard and the epoch's running sums, kept on the device so that a training step adds no host sync.

`StepTracker` wraps the training criterion: each call adds the batch's loss and top-1 hits to device sums and
notes the first step whose loss is not finite. Nothing is read on the host until `check()`, which the trainer
calls every CHECK_EVERY steps, at checkpoints and at the end of an epoch. Its sums are part of a mid-epoch
checkpoint, so an epoch resumed at batch k reports exactly the numbers of an epoch never interrupted.

Under AMP a non-finite loss is not divergence by itself (the GradScaler skips that step and lowers its scale);
AMP_SKIP_LIMIT consecutive skipped steps are.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from qrun.errors import QrunError

CHECK_EVERY = 50
AMP_SKIP_LIMIT = 50


class Diverged(QrunError):
    """Training stopped on a non-finite loss or weights; the message names where and the last good checkpoint."""

    status = "diverged"


class StepTracker(nn.Module):
    """The criterion, plus per-epoch device sums: loss, top-1 hits, samples, first non-finite step, AMP skips.

    It is also the training loop's meter (`keeps_metrics`): the bar and progress lines read these sums."""

    keeps_metrics = True

    def __init__(self, criterion: nn.Module, amp: bool = False) -> None:
        super().__init__()
        self.criterion = criterion
        self.amp = amp
        self.reset(torch.device("cpu"), start_step=0)

    def reset(self, device: torch.device, start_step: int = 0) -> None:
        """A new epoch on `device`; `start_step` is the batch an epoch resumed mid-way starts at."""
        self.device = device
        self.step = start_step
        self.samples = 0
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss * samples, top-1 hits
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.skip_run = torch.zeros((), dtype=torch.int64, device=device)
        self.worst_skip_run = torch.zeros((), dtype=torch.int64, device=device)
        self._scale: Optional[torch.Tensor] = None

    @property
    def needs_images(self) -> bool:
        """True when the wrapped criterion also takes the batch's images (distillation, qrun.distill)."""
        return bool(getattr(self.criterion, "needs_images", False))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, *images: torch.Tensor) -> torch.Tensor:
        loss = self.criterion(logits, targets, *images)
        with torch.no_grad():
            count = targets.numel()
            value = loss.detach().double()
            hits = (logits.detach().argmax(dim=1) == targets).sum().double()
            self.sums += torch.stack((value * count, hits))
            bad = ~torch.isfinite(value)
            new = bad & (self.first_bad < 0)
            self.first_bad = torch.where(new, self.step + 1, self.first_bad)
            self.bad_loss = torch.where(new, value, self.bad_loss)
            self.samples += count
            self.step += 1
        return loss

    def after_step(self, scaler: Optional[torch.amp.GradScaler]) -> None:
        """Count consecutive steps the GradScaler skipped (its scale went down), on the device."""
        scale = getattr(scaler, "_scale", None) if scaler is not None else None  # get_scale() would sync
        if scale is None:
            return
        if self._scale is not None:
            skipped = (scale < self._scale).to(torch.int64)
            self.skip_run = (self.skip_run + 1) * skipped
            self.worst_skip_run = torch.maximum(self.worst_skip_run, self.skip_run)
        self._scale = scale.detach().clone()

    def check(self, epoch: int, steps_in_epoch: int, last_good: str) -> None:
        """Read the divergence flags (one host sync; all ranks agree under DDP); raise Diverged if set."""
        flags = torch.stack((self.first_bad, self.worst_skip_run)).to(torch.float64)
        flags = torch.cat((flags, self.bad_loss.reshape(1)))
        if dist.is_available() and dist.is_initialized():
            flags = flags.to("cuda" if dist.get_backend() == "nccl" else "cpu")
            gathered = [torch.zeros_like(flags) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, flags)
            flagged = [g for g in gathered if g[0] >= 0 or g[1] >= AMP_SKIP_LIMIT]
            flags = flagged[0] if flagged else flags
        first_bad, skip_run, bad_loss = (float(v) for v in flags.cpu())
        if skip_run >= AMP_SKIP_LIMIT:
            raise Diverged(f"training diverged at epoch {epoch} step {self.step} of {steps_in_epoch}: the AMP "
                           f"GradScaler skipped {int(skip_run)} steps in a row (non-finite gradients); "
                           f"last good checkpoint: {last_good}")
        if first_bad >= 0 and not self.amp:
            raise Diverged(f"training diverged at epoch {epoch} step {int(first_bad)} of {steps_in_epoch}: loss "
                           f"is {bad_loss}; last good checkpoint: {last_good}; lower optimizer.lr or check the data")

    def metrics(self) -> dict[str, float]:
        """Mean loss and top-1 of the epoch so far (reads the device sums)."""
        loss_sum, hits = (float(v) for v in self.sums.cpu())
        samples = max(1, self.samples)
        return {"loss": loss_sum / samples, "top1": 100.0 * hits / samples, "samples": self.samples}

    def loss(self) -> float:
        """The epoch's mean loss so far, as engine.Meter gives it (a host read: for bars and progress lines)."""
        return self.metrics()["loss"]

    def accuracy(self, k: int) -> float:
        if k != 1:
            raise ValueError(f"StepTracker sums top-1 hits only, not top-{k}")
        return self.metrics()["top1"]

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "samples": self.samples, "sums": self.sums.cpu()}

    def load_state(self, state: dict[str, Any], device: torch.device) -> None:
        self.reset(device, start_step=int(state["step"]))
        self.samples = int(state["samples"])
        self.sums = state["sums"].to(device=device, dtype=torch.float64).clone()


def all_finite(model: nn.Module) -> bool:
    """Every floating parameter and buffer finite: one host sync, paid once per checkpoint."""
    tensors = [t for t in model.state_dict().values() if torch.is_tensor(t) and t.is_floating_point()]
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def json_safe(value: Any) -> Any:
    """Non-finite floats (and 0-d tensors) as None, recursively, so that results.json is strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if torch.is_tensor(value) and value.numel() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
