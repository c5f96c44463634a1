"""Progress for logs: what a run trains and where it writes, then a line every N% of an epoch.

A progress bar only helps a person at a terminal; a job on a shared machine or under SLURM writes to a file,
where a bar is noise and silence until an epoch ends (18 minutes for one ImageNet epoch) looks like a hang. Off
a terminal, the loop logs one line each time another `log_every_percent` % of the epoch is done, at most one per
`log_every_s` seconds. Reading the running loss for a line is a host-device sync, so it happens only then.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import torch

log = logging.getLogger(__name__)


@dataclass
class Cadence:
    percent: float = 10.0
    seconds: float = 30.0


# Set at the start of every job (start_run), so a reused sweep worker never keeps the previous job's cadence.
CADENCE = Cadence()


def start_run(cfg: Any, device: torch.device, output_dir: Path) -> None:
    """Adopt the job's log cadence and log the run's first line: what trains, on what, and where it writes."""
    CADENCE.percent = float(cfg.get("log_every_percent", Cadence.percent))
    CADENCE.seconds = float(cfg.get("log_every_s", Cadence.seconds))
    log.info(banner(cfg, device, output_dir))


def banner(cfg: Any, device: torch.device, output_dir: Path) -> str:
    from qrun.config import effective_bits, mode_name

    w_bits, a_bits = effective_bits(cfg)
    if cfg.quant.name == "none":
        quant = "quant none (float)"
    else:
        inputs = "inputs quantized" if cfg.quantize_input else "inputs float"
        mixed = ", per-layer overrides" if cfg.quant.get("layer_overrides") else ""
        quant = f"quant {cfg.quant.name} W{w_bits}A{a_bits} ({inputs}{mixed})"
    return (f"qrun {mode_name(cfg)}: model {cfg.model.name} | dataset {cfg.dataset.name} | {quant} | "
            f"device {device} | output {output_dir}")


class ProgressLog:
    """Decides when a progress line is due and writes it; `read_loss` is only called for a line."""

    def __init__(self, desc: str, total: Optional[int], enabled: bool, cadence: Cadence = CADENCE) -> None:
        self.desc, self.total = desc, total
        self.enabled = enabled and bool(total) and cadence.percent > 0
        self.every = max(1, round(total * cadence.percent / 100)) if self.enabled else 0
        self.seconds = cadence.seconds
        self.start = self.last = time.perf_counter()
        self.next_step = self.every

    def step(self, step: int, samples: int, read_loss: Callable[[], float]) -> bool:
        """After `step` (1-based) steps and `samples` samples: log a line if one is due; True if it did."""
        if not self.enabled or step < self.next_step or step >= self.total:
            return False  # the last step is followed by the epoch's own summary line
        self.next_step = (step // self.every + 1) * self.every
        now = time.perf_counter()
        if now - self.last < self.seconds:
            return False
        self.last = now
        elapsed = now - self.start
        eta = timedelta(seconds=round(elapsed / step * (self.total - step)))
        log.info("%s step %d/%d (%.0f%%)  loss %.4f  %.0f samples/s  ETA %s", self.desc, step, self.total,
                 100 * step / self.total, read_loss(), samples / max(elapsed, 1e-9), eta)
        return True
