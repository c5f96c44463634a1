"""Uniform quantization: a fixed integer grid, round to nearest, clipped straight-through gradient.

Weights use a symmetric signed grid {-(2^(b-1)-1) .. 2^(b-1)-1} * max|W| / (2^(b-1)-1) (zero is a level, the
grid is symmetric, so b >= 2). Activations use an unsigned grid {0 .. 2^b-1} * u / (2^b-1) when calibration saw no
negative value (post-ReLU inputs), else the symmetric signed grid. The activation range u starts from calibration
statistics and then follows an exponential moving average of the batch maximum in training (an observer, as in
PyTorch's FakeQuantize); in eval it is frozen, so a sample's output never depends on its batch mates.
"""

from __future__ import annotations

import torch

from qrun.errors import QrunError
from qrun.quant.base import IntegerGrid, Quantizer, register_quantizer
from qrun.quant.kernels import device, device_path
from qrun.quant.ste import grid_fake_quant, scalar

MIN_RANGE = 1e-8


def signed_qmax(bits: int) -> int:
    """Largest level of the symmetric (narrow-range) signed grid; 0 for b = 1, which has no symmetric grid."""
    return 2 ** (bits - 1) - 1


def unsigned_qmax(bits: int) -> int:
    return 2**bits - 1


def activation_grid(bound: torch.Tensor, bits: int, signed: bool) -> IntegerGrid:
    """The integer grid of an activation clipped at `bound` (uniform's range, PACT's alpha): step bound / qmax.

    `signed` is the quantizer's cached host flag: under AMP this runs per layer per step, where torch.where on
    the buffer cost three kernel launches. The step is within ulps of the kernels', enough for the levels
    (qrun/quant/amp.py)."""
    qmax = signed_qmax(bits) if signed else unsigned_qmax(bits)
    return IntegerGrid(bound.detach() / float(qmax), None, unsigned_qmax(bits))


def require_signed_bits(name: str, bits: int, what: str) -> None:
    """A signed grid with zero and a positive level needs 2 bits; binary signed grids are xnor/dorefa's job."""
    if bits < 2:
        hint = "; use xnor or dorefa for binary weights" if what == "weights" else ""
        raise QrunError(f"quantizer {name!r} needs bits >= 2 for {what} (a signed grid with zero); "
                        f"got bits={bits}{hint}")


class RangeObserver:
    """Mean of per-batch min/max over the calibration batches (kept as tensors: no host sync per batch)."""

    def __init__(self) -> None:
        self.mins: list[torch.Tensor] = []
        self.maxs: list[torch.Tensor] = []
        self.abs_means: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x)
        self.mins.append(lo.float())
        self.maxs.append(hi.float())
        self.abs_means.append(x.abs().mean().float())

    def __bool__(self) -> bool:
        return bool(self.mins)

    def min(self) -> float:
        return float(torch.stack(self.mins).mean())

    def max(self) -> float:
        return float(torch.stack(self.maxs).mean())

    def abs_mean(self) -> float:
        return float(torch.stack(self.abs_means).mean())


@register_quantizer
class UniformQuantizer(Quantizer):
    name = "uniform"
    takes_low_precision = True  # the Triton passes read bf16/fp16 and compute in float32
    host_flags = ("signed",)

    def __init__(self, bits: int, kind: str, momentum: float = 0.1) -> None:
        """momentum: weight of the batch maximum in the training-time moving average of the activation range
        (0 freezes the calibrated range)."""
        super().__init__(bits, kind)
        if kind == "weight":
            require_signed_bits(self.name, bits, "weights")
        if not 0.0 <= momentum <= 1.0:
            raise QrunError(f"quantizer 'uniform' momentum={momentum} is out of range; accepted: 0 <= momentum <= 1")
        self.momentum = float(momentum)
        # Activation range and signedness; buffers so that eval and a resumed run use exactly these.
        self.register_buffer("range", torch.ones(()))
        self.register_buffer("signed", torch.zeros((), dtype=torch.bool))
        self._observer = RangeObserver()

    def observe(self, x: torch.Tensor) -> None:
        if self.kind == "act":
            self._observer.update(x)

    def finish_calibration(self) -> None:
        if self.kind == "act":
            if not self._observer:
                return
            signed = self._observer.min() < 0
            if signed:
                require_signed_bits(self.name, self.bits, "activations with negative values")
            bound = max(-self._observer.min(), self._observer.max()) if signed else self._observer.max()
            self.range.fill_(max(bound, MIN_RANGE))
            self.set_flag("signed", signed)
            self._observer = RangeObserver()
        super().finish_calibration()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if device_path(x):
            return self._quantize_on_device(x)
        if self.kind == "weight":
            qmax = signed_qmax(self.bits)
            return grid_fake_quant(x, max(scalar(x.detach().abs().max()), 1e-12) / qmax, -qmax, qmax)
        self.ensure_initialized(x)
        if self.training and self.momentum > 0:
            with torch.no_grad():
                batch = x.detach().abs().max() if self.host_flag("signed") else x.detach().max()
                self.range.lerp_(batch.to(self.range.dtype).clamp_(min=MIN_RANGE), self.momentum)
        bound, compact = scalar(self.range), torch.is_grad_enabled()
        if self.host_flag("signed"):
            qmax = signed_qmax(self.bits)
            return grid_fake_quant(x, bound / qmax, -qmax, qmax, compact, self.grad_in_place)
        qmax = unsigned_qmax(self.bits)
        return grid_fake_quant(x, bound / qmax, 0, qmax, compact, self.grad_in_place)

    def _quantize_on_device(self, x: torch.Tensor) -> torch.Tensor:
        """The same grids with the range and max|W| kept on the device (no host sync)."""
        if self.kind == "weight":
            qmax = signed_qmax(self.bits)
            bound = torch.linalg.vector_norm(x.detach(), float("inf"))
            return device.grid_quantize(x, bound, qmax, -qmax, qmax, min_src=1e-12)
        self.ensure_initialized(x)
        signed = self.host_flag("signed")
        if self.training and self.momentum > 0:
            batch = torch.linalg.vector_norm(x.detach(), float("inf")) if signed else x.detach().amax()
            device.ema_update(self.range, batch, self.momentum, MIN_RANGE)
        qmax = signed_qmax(self.bits) if signed else unsigned_qmax(self.bits)
        return device.grid_quantize(x, self.range, qmax, -qmax if signed else 0, qmax,
                                    compact=torch.is_grad_enabled(), grad_in_place=self.grad_in_place)

    def learned_values(self) -> dict[str, float]:
        return {"range": scalar(self.range)} if self.kind == "act" else {}

    def integer_grid(self, y: torch.Tensor) -> IntegerGrid:
        if self.kind == "weight":  # max|W| sits on the top level
            qmax = signed_qmax(self.bits)
            return IntegerGrid(y.detach().abs().amax() / qmax, None, qmax)
        return activation_grid(self.range, self.bits, self.host_flag("signed"))
