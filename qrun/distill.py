"""Knowledge distillation (Hinton et al. 2015) from a trained qrun run, usually the float one, as a criterion.

loss = (1 - w) CE(z_s, y) + w T^2 KL(p_t || p_s),   p = softmax(z / T)

KL direction: Hinton's, the teacher's softened distribution is the target: KL(p_t || p_s) = sum p_t (log p_t -
log p_s), whose student gradient is (p_s - p_t) / T per logit. The issue's "KL(student/T || teacher/T)" names the
arguments in the order of torch's `kl_div(log p_s, p_t)`, which computes exactly this. T^2 keeps the soft term's
gradient on the scale of the hard one as T changes (Hinton et al., section 2). LSQ's distillation runs (Esser et
al. 2020, section 3.6) use T = 1 and equal weights (w = 0.5).

The teacher is rebuilt from its checkpoint's stored config (so any qrun run, quantized or not, can teach), runs
in eval mode without gradients on the student's batch, inside the student's autocast region; every DDP rank
holds its own copy (it has no gradients to synchronise). Built by `fit`, it is reloaded on every resume.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn import functional as F

from qrun import checkpoint
from qrun.errors import QrunError
from qrun.tb import Logger


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(p_t || p_s) averaged over the batch, in float32 whatever autocast chose for the logits."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


class DistillationLoss(nn.Module):
    """A criterion taking (logits, targets, images): the engine passes the batch so the teacher can see it."""

    needs_images = True  # the engine's signal to pass the images

    def __init__(self, teacher: nn.Module, weight: float, temperature: float, hard: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.weight, self.temperature, self.hard = float(weight), float(temperature), hard
        self._kd_sum: Optional[torch.Tensor] = None  # on the device: no host sync per step
        self._samples = 0

    def train(self, mode: bool = True) -> "DistillationLoss":
        super().train(mode)
        self.teacher.eval()  # the teacher's BatchNorm statistics and quantizers never move
        return self

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        soft = kd_loss(logits, teacher_logits, self.temperature)
        detached = soft.detach() * targets.numel()
        self._kd_sum = detached if self._kd_sum is None else self._kd_sum + detached
        self._samples += targets.numel()
        return (1.0 - self.weight) * self.hard(logits, targets) + self.weight * soft

    def epoch_kd_loss(self) -> Optional[float]:
        """Mean distillation term since the last call (one host read per epoch), then reset."""
        if self._kd_sum is None:
            return None
        value = float(self._kd_sum) / max(1, self._samples)
        self._kd_sum, self._samples = None, 0
        return value


def load_teacher(cfg: DictConfig, device: torch.device, build_model: Callable[[DictConfig], nn.Module]) -> nn.Module:
    """The teacher network of `distill.teacher`, built from its own stored config and weights."""
    path = checkpoint.resolve(str(cfg.distill.teacher), prefer=checkpoint.BEST, key="distill.teacher")
    payload = checkpoint.load(path)
    teacher_cfg = OmegaConf.create(payload["config"])
    dataset, classes = payload["architecture"].get("dataset"), teacher_cfg.dataset.num_classes
    if dataset != cfg.dataset.name or classes != cfg.dataset.num_classes:
        raise QrunError(f"distill.teacher={cfg.distill.teacher} was trained on dataset={dataset} ({classes} "
                        f"classes), this run is dataset={cfg.dataset.name} ({cfg.dataset.num_classes} classes); "
                        "pass a teacher of the same dataset")
    with torch.random.fork_rng(devices=[]):  # building must not consume the run's RNG (exact resume)
        teacher = build_model(teacher_cfg)
    teacher.load_state_dict(payload["model"])
    teacher = teacher.to(device)
    return teacher.to(memory_format=torch.channels_last) if cfg.channels_last else teacher


def wrap_criterion(hard: nn.Module, cfg: DictConfig, device: torch.device,
                   build_model: Callable[[DictConfig], nn.Module]) -> nn.Module:
    """`hard` itself without a teacher; with `distill.teacher`, the distillation loss around it."""
    distill = cfg.get("distill")
    if distill is None or not distill.teacher:
        return hard
    return DistillationLoss(load_teacher(cfg, device, build_model), distill.weight, distill.temperature, hard)


def log_epoch(criterion: nn.Module, logger: Logger, epoch: int) -> None:
    """train/kd_loss for TensorBoard (this rank's mean; rank 0 writes)."""
    value = criterion.epoch_kd_loss() if isinstance(criterion, DistillationLoss) else None
    if value is not None:
        logger.scalars({"train/kd_loss": value}, epoch)
