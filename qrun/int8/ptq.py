"""Post-training quantization: observers see a few batches of the trained float network in eval mode."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from qrun import quant


@torch.no_grad()
def calibrate_model(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Run `batches` through every quantizer's observer in eval mode; returns how many batches were used.

    Eval mode matters (seed 004 calibrated in training mode): BatchNorm normalises with its running statistics,
    as at inference, and leaves them untouched. While calibrating, quantizers pass float values on, so each
    observer sees the distribution the float network produces.
    """
    all_quantizers = [q for _, _, q in quant.quantizers(model)]
    model.eval()
    for q in all_quantizers:
        q.calibrating = True
    used = 0
    try:
        for batch in batches:
            model(batch)
            used += 1
    finally:
        for q in all_quantizers:
            q.calibrating = False
    for q in all_quantizers:
        q.finish_calibration()
    return used
