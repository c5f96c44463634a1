"""Affine integer quantization as in TensorFlow Lite (Jacob et al., CVPR 2018).

A real value r is represented by an integer q through r = S (q - Z)                                       (eq. 1)
with a float scale S and an integer zero point Z. Activations use the asymmetric unsigned grid {0 .. 2^b - 1};
the range [min, max] comes from an observer (an exponential moving average of batch min/max, section 3.1) and is
first widened to contain 0, then Z is rounded to an integer ("nudged") so that real 0 is exactly representable
(section 2.1: zero padding and ReLU must be exact). Weights use the symmetric narrow grid {-(2^(b-1)-1) ..
2^(b-1)-1} with Z = 0 (TFLite's int8 weight spec), per tensor or per output channel. The float weights stay the
trained ("shadow") weights; only the forward pass sees quantized values. Biases are rounded to the int32 grid of
scale S_input x S_weight (eq. 10-11), as the integer model and the ONNX export store them.

Observers update in training mode (and during calibration) until frozen; evaluation always uses the stored range,
so a sample's output never depends on its batch mates.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from qrun.errors import QrunError
from qrun.quant import kernels
from qrun.quant.base import IntegerGrid, Quantizer, register_quantizer

# torch.ao's observers clamp the scale to float32 epsilon; the same floor keeps the maths comparable.
SCALE_EPS = torch.finfo(torch.float32).eps


def weight_range(bits: int) -> tuple[int, int]:
    """Symmetric narrow range: -127..127 at 8 bits, so that -q is always representable."""
    return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1


def activation_range(bits: int) -> tuple[int, int]:
    return 0, 2**bits - 1


def asymmetric_qparams(min_val: torch.Tensor, max_val: torch.Tensor, qmin: int,
                       qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and nudged zero point for the range [min_val, max_val] widened to contain 0 (Jacob et al. 2.1)."""
    min_neg = torch.clamp(min_val, max=0.0)
    max_pos = torch.clamp(max_val, min=0.0)
    # Divided by a tensor: CUDA divides by a Python number as a * (1/b), one ulp off a correctly rounded division
    # (and off the Triton observer, which divides exactly).
    scale = torch.clamp((max_pos - min_neg) / torch.full_like(max_pos, float(qmax - qmin)), min=SCALE_EPS)
    # Z = qmin - round(min / S), clamped: the integer that real 0 maps to, so 0 is exactly representable.
    zero_point = torch.clamp(qmin - torch.round(min_neg / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


def symmetric_qparams(min_val: torch.Tensor, max_val: torch.Tensor, qmin: int,
                      qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale max|r| / ((qmax - qmin) / 2) and Z = 0: the int8 weight convention."""
    amax = torch.maximum(-torch.clamp(min_val, max=0.0), torch.clamp(max_val, min=0.0))
    scale = torch.clamp(amax / torch.full_like(amax, (qmax - qmin) / 2.0), min=SCALE_EPS)
    return scale, torch.zeros_like(scale, dtype=torch.int32)


def ema_update(current: torch.Tensor, batch: torch.Tensor, averaging_constant: float) -> torch.Tensor:
    """current + c (batch - current): the moving average of Jacob et al. 3.1 (torch.ao's MovingAverage observers)."""
    return current + averaging_constant * (batch - current)


@register_quantizer
class AffineQuantizer(Quantizer):
    name = "affine"
    takes_low_precision = True  # the Triton passes read bf16/fp16 and compute in float32
    min_bits = 2
    max_bits = 16

    def __init__(self, bits: int, kind: str, per_channel: bool = False, averaging_constant: float = 0.01,
                 observer_epochs: Optional[int] = None, fold_bn: bool = True,
                 bn_stats_epochs: Optional[int] = None) -> None:
        """per_channel: one weight scale per output channel. averaging_constant: EMA weight of each new batch
        range for activations (weights use the current tensor's range). observer_epochs: observers update in
        the first N epochs of training, then freeze (null: never). fold_bn / bn_stats_epochs: see
        `prepare_model` (model-level options, accepted here so one options dict configures the scheme)."""
        super().__init__(bits, kind)
        if not 0.0 < averaging_constant <= 1.0:
            raise QrunError(f"affine averaging_constant={averaging_constant} is out of range; accepted: 0 < c <= 1")
        for key, value in (("observer_epochs", observer_epochs), ("bn_stats_epochs", bn_stats_epochs)):
            if value is not None and value < 0:
                raise QrunError(f"affine {key}={value} is invalid; accepted: null (never freeze) or an integer >= 0")
        self.per_channel = bool(per_channel) and kind == "weight"
        self.averaging_constant = float(averaging_constant)
        self.observer_epochs = observer_epochs
        self.observer_enabled = True
        self.qmin, self.qmax = weight_range(self.bits) if kind == "weight" else activation_range(self.bits)
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    # ---------------------------------------------------------------------------------------------- observers
    def observe(self, x: torch.Tensor) -> None:
        """Weights: the current tensor's range (per channel if asked). Activations: EMA of batch min/max."""
        with torch.no_grad():
            if self.per_channel:
                flat = x.detach().flatten(1)  # axis 0: output channels of Conv2d and Linear weights
                lo, hi = flat.amin(dim=1), flat.amax(dim=1)
            else:
                lo, hi = torch.aminmax(x.detach())
            lo, hi = lo.float(), hi.float()
            if self.kind == "weight" or not self._observed():
                self.min_val, self.max_val = lo.clone(), hi.clone()
            else:
                self.min_val = ema_update(self.min_val, lo, self.averaging_constant)
                self.max_val = ema_update(self.max_val, hi, self.averaging_constant)
            self.initialized.fill_(True)
            self._ready = True

    def _observed(self) -> bool:
        if not getattr(self, "_ready", False):
            self._ready = bool(self.initialized)
        return self._ready

    def on_epoch_start(self, epoch: int) -> None:
        """Freeze the observer once `observer_epochs` epochs have run (torchvision's QAT reference schedule)."""
        self.observer_enabled = self.observer_epochs is None or epoch <= self.observer_epochs

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) from the observed range: per channel when per_channel, else 0-d tensors."""
        if not self._observed():
            raise QrunError(f"affine {self.kind} quantizer has no observed range: calibrate (mode=calibrate) or "
                            "train before evaluating")
        fn = symmetric_qparams if self.kind == "weight" else asymmetric_qparams
        return fn(self.min_val, self.max_val, self.qmin, self.qmax)

    # ------------------------------------------------------------------------------------------------ forward
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.triton_eager(x) and self.min_val.dtype == torch.float32:  # (a .bfloat16() model: eager)
            return self._quantize_on_device(x)
        if self.training and self.observer_enabled:
            self.observe(x)
        scale, zero_point = self.qparams()
        # The fused kernels round half to even (as ONNX QuantizeLinear does) and pass the gradient straight
        # through inside [qmin, qmax], zero outside (the clipped STE of Jacob et al. 3.1).
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(x, scale.to(x.dtype), zero_point, 0, self.qmin, self.qmax)
        return torch.fake_quantize_per_tensor_affine(x, scale.to(x.dtype), zero_point, self.qmin, self.qmax)

    def _quantize_on_device(self, x: torch.Tensor) -> torch.Tensor:
        """The same observer and fake quantization as Triton passes: the range update, (S, Z) and the output read
        the buffers on the device (2 to 3 launches forward, 1 backward, no host sync)."""
        from qrun.quant.kernels import device

        observe = self.training and self.observer_enabled
        average = False
        if observe:
            if self.per_channel and self.min_val.shape != (x.shape[0],):
                # The per-channel shape, set once.
                self.min_val = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
                self.max_val = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
            average = self.kind == "act" and self._observed()
        elif not self._observed():
            self.qparams()  # the one-line error: nothing observed yet
        y = device.affine_quantize(x, self.min_val, self.max_val, observe, average, self.averaging_constant,
                                   self.qmin, self.qmax, SCALE_EPS, self.kind == "weight", self.per_channel,
                                   self.grad_in_place)
        if observe and not self._ready:
            self.initialized.fill_(True)
            self._ready = True
        return y

    def quantize_bias(self, bias: torch.Tensor, input_quantizer: Optional[Quantizer]) -> torch.Tensor:
        """The bias on the int32 grid of scale S_x S_w (Jacob et al. eq. 10-11), gradient straight through.

        Modelled here so that fake quantization, the integer reference and the ONNX export add the same bias.
        """
        if self.calibrating or not isinstance(input_quantizer, AffineQuantizer) or input_quantizer.calibrating:
            return bias
        scale = (input_quantizer.qparams()[0] * self.qparams()[0]).to(bias.dtype)
        return bias + (torch.round(bias / scale) * scale - bias).detach()

    def integer_grid(self, y: torch.Tensor) -> IntegerGrid:
        """S (q - Z): weights have Z = 0; for activations |q - Z| <= qmax - qmin."""
        scale = self.qparams()[0].detach()
        if scale.dim() > 0:
            scale = scale.reshape(-1, *([1] * (y.dim() - 1)))
        return IntegerGrid(scale, None, self.qmax if self.kind == "weight" else self.qmax - self.qmin)

    def learned_values(self) -> dict[str, float]:
        if not self._observed():
            return {}
        scale, zero_point = self.qparams()
        values = {"scale": float(scale.mean())}
        if self.kind == "act":
            values.update(zero_point=float(zero_point.float().mean()), min=float(self.min_val),
                          max=float(self.max_val))
        return values

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, range=[{self.qmin}, {self.qmax}], per_channel={self.per_channel}"

    # ----------------------------------------------------------------------------------------------- plumbing
    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Per-channel ranges have one entry per output channel, known only once a tensor was seen: take the
        # stored shape so a checkpoint loads into a freshly built quantizer.
        for key in ("min_val", "max_val"):
            stored = state_dict.get(prefix + key)
            if stored is not None and stored.shape != getattr(self, key).shape:
                setattr(self, key, torch.empty_like(stored, device=getattr(self, key).device))
        self._ready = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def prepare_model(cls, model: nn.Module, fold_bn: bool = True, bn_stats_epochs: Optional[int] = None,
                      **_: Any) -> None:
        """Fold each conv -> BatchNorm pair for QAT (Jacob et al. 3.2), so weights are quantized after folding."""
        if fold_bn:
            from qrun.int8.fold import fold_batchnorm

            fold_batchnorm(model, bn_stats_epochs)
