"""TensorBoard logging: training curves, every learned quantizer parameter per epoch, and the run's HParams.

Each run writes into <run folder>/tb, so TensorBoard's run name is the folder name (`..._cnn_bn_dsq_w4a4/tb`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from qrun.config import effective_bits

# Keys that tell runs of a sweep apart; quant.options.* and the per-layer overrides are added to them.
HPARAM_KEYS = ("model.name", "dataset.name", "dataset.train_samples", "quant.name", "quant.first_last",
               "quantize_input", "optimizer.name", "optimizer.lr", "optimizer.weight_decay", "scheduler.name",
               "epochs", "batch_size", "label_smoothing", "seed")
# Scalar tags the HParams dashboard shows per run: it reads their last value from the run's own scalars.
HPARAM_METRICS = ("val/top1", "val/top5", "val/loss", "train/loss", "train/top1")


def hparams_of(cfg: DictConfig) -> dict[str, Any]:
    """A flat {key: bool | number | str} of what distinguishes this run (effective bits: fp32 is 32/32)."""
    values: dict[str, Any] = {}
    for key in HPARAM_KEYS:
        values[key] = OmegaConf.select(cfg, key, default=None)
    values["w_bits"], values["a_bits"] = effective_bits(cfg)
    for key, value in (OmegaConf.to_container(cfg.quant.options, resolve=True) or {}).items():
        values[f"quant.options.{key}"] = value
    overrides = OmegaConf.to_container(cfg.quant.layer_overrides, resolve=True)
    values["quant.layer_overrides"] = json.dumps(overrides, sort_keys=True, separators=(",", ":")) if overrides \
        else "none"
    return {key: _scalar(value) for key, value in values.items()}


def _scalar(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)):
        return value
    if value is None:
        return "null"
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


class Logger:
    """A thin wrapper so that non-zero DDP ranks (writer=None) log nothing without `if` at every call site."""

    def __init__(self, log_dir: Optional[Path]) -> None:
        self.writer = SummaryWriter(str(log_dir)) if log_dir is not None else None

    def scalars(self, values: Mapping[str, float], step: int, prefix: str = "") -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            self.writer.add_scalar(f"{prefix}{key}", value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None and text:
            self.writer.add_text(tag, text, step)

    def hparams(self, values: Mapping[str, Any], metric_tags: Sequence[str] = HPARAM_METRICS) -> None:
        """Register this run in the HParams dashboard, in the run's own folder (not a timestamped sub-run, as
        SummaryWriter.add_hparams does), so the metrics are the curves this run logs anyway."""
        if self.writer is None:
            return
        for summary in hparams_summaries(dict(values), {tag: 0.0 for tag in metric_tags}):
            self.writer.file_writer.add_summary(summary)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
