"""TensorBoard logging: training curves and every learned quantizer parameter, per epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

from torch.utils.tensorboard import SummaryWriter


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

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
