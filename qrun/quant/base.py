"""The interface every quantizer implements, and the registry that builds them by name.

A quantizer is an nn.Module that fake-quantizes a tensor (same shape and dtype out). Learned quantities are
nn.Parameters so they train, checkpoint and log like any other parameter; data-dependent initial values are
set during a calibration pass driven by `qrun.quant.initialize_from_data`, never inside the training loop.
"""

from __future__ import annotations

import inspect
from typing import Callable, ClassVar, NamedTuple, Optional

import torch
from torch import nn

from qrun.errors import QrunError, choice_error
from qrun.quant import kernels

KINDS = ("weight", "act")


class IntegerGrid(NamedTuple):
    """A quantizer output y = offset + scale * k with integer levels k, |k| <= max_level (see qrun/quant/amp.py).

    scale and offset are detached float32 tensors, 0-d or broadcastable to y (per output channel); offset None
    means 0. Under autocast the layer feeds its conv the levels k, exact in bf16 up to 256, and rescales the output.
    """

    scale: torch.Tensor
    offset: Optional[torch.Tensor]
    max_level: int


class Quantizer(nn.Module):
    """Base class: subclasses set `name`, the kinds and bit range they support, and implement `quantize`."""

    name: ClassVar[str] = ""
    supported_kinds: ClassVar[tuple[str, ...]] = KINDS
    min_bits: ClassVar[int] = 1
    max_bits: ClassVar[int] = 16
    # True when the quantizer also rescales the layer output (XNOR-Net's K): the layer then calls scale_output.
    scales_output: ClassVar[bool] = False
    # True when, on the Triton path, `quantize` reads bf16/fp16 inputs itself (computing in float32) and, under
    # kernels.float32_results(), returns exactly quantize(x.float()) in float32: under autocast the input is then
    # not copied, and backward keeps the low-precision tensor the previous layer already saved, not a float32 copy.
    takes_low_precision: ClassVar[bool] = False
    # Boolean buffers the forward branches on: read once on the host and cached (see `host_flag`).
    host_flags: ClassVar[tuple[str, ...]] = ()

    def __init__(self, bits: int, kind: str) -> None:
        super().__init__()
        self.bits = int(bits)
        self.kind = kind
        self.calibrating = False
        # A buffer, so a checkpoint remembers that data-dependent values were already set.
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._ready = False  # host-side cache of `initialized`, so the hot path does not read the buffer
        self._flags: dict[str, bool] = {}  # host-side cache of the `host_flags` buffers
        # True when this quantizer's output feeds only its layer's conv/linear (set by QuantizedLayer): the output
        # gradient is then a fresh tensor nobody else holds, and backward may overwrite it instead of allocating.
        self.grad_in_place = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            # AMP never changes the levels: quantize in float32 (the result the fp32 run gives this input).
            with torch.autocast(x.device.type, enabled=False):
                if self.takes_low_precision and self.kind == "act" and x.dtype != torch.float32 \
                        and not self.calibrating and kernels.triton_eager(x):
                    with kernels.float32_results():
                        return self._forward(x)
                return self._forward(x.float())
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            # During calibration the float tensor flows on untouched, so downstream layers see the
            # statistics they would see without quantization, and this quantizer records what it needs.
            self.observe(x.detach())
            return x
        return self.quantize(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement quantize()")

    def observe(self, x: torch.Tensor) -> None:
        """Record statistics of a calibration batch; quantizers without data-dependent init ignore it."""

    def finish_calibration(self) -> None:
        """Turn recorded statistics into initial parameter values; called once after the calibration batches."""
        self.initialized.fill_(True)
        self._ready = True

    def host_flag(self, name: str) -> bool:
        """The boolean buffer `name` as a Python bool, read from the device once (a read per call would be a host
        sync per step on CUDA, and a graph break under torch.compile)."""
        if name not in self._flags:
            self._flags[name] = bool(getattr(self, name))
        return self._flags[name]

    def set_flag(self, name: str, value: bool) -> None:
        getattr(self, name).fill_(value)
        self._flags[name] = bool(value)

    def refresh_host_state(self) -> None:
        """Read `initialized` and the host flags now (before torch.compile traces the forward, after a load)."""
        self._ready = bool(self.initialized)
        self._flags = {name: bool(getattr(self, name)) for name in self.host_flags if hasattr(self, name)}

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        # Read the loaded flags now, at load time: a resumed run's (compiled) training step then reads none.
        self.refresh_host_state()

    def ensure_initialized(self, x: torch.Tensor) -> None:
        """Used without a calibration pass (a unit test, init_batches=0): initialise once from this tensor.

        For a weight quantizer that is exactly the intended initialisation; for an activation quantizer it is a
        one-batch calibration. Either way it happens once, never per batch.
        """
        if self._ready:
            return
        if not bool(self.initialized):
            with torch.no_grad():
                self.observe(x.detach())
                self.finish_calibration()
        self._ready = True

    def scale_output(self, out: torch.Tensor, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """Rescale the layer output computed from quantized inputs (only called when `scales_output`)."""
        return out

    def gradient_quantizer(self) -> Optional[nn.Module]:
        """A module applied to the layer output that quantizes the gradient flowing back (DoReFa's g_bits)."""
        return None

    def quantize_bias(self, bias: torch.Tensor, input_quantizer: Optional["Quantizer"]) -> torch.Tensor:
        """The layer bias as this weight quantizer deploys it; called after the input and weight quantizers ran."""
        return bias

    def on_epoch_start(self, epoch: int) -> None:
        """Called by the trainer before each training epoch (1-based); schedules such as freezing observers."""

    @classmethod
    def prepare_model(cls, model: nn.Module, **options: object) -> None:
        """Model-level changes a scheme needs once its layers are swapped in (affine folds BatchNorm); none here."""

    def integer_grid(self, y: torch.Tensor) -> Optional[IntegerGrid]:
        """How this quantizer's output `y` (just computed) factors into integer levels; None: it does not, and a
        layer under autocast then runs this quantizer and its conv in float32."""
        return None

    def learned_values(self) -> dict[str, float]:
        """Scalar summaries of learned (or data-derived) values, for TensorBoard and the learned-parameter table."""
        return {}

    def extra_repr(self) -> str:
        return f"kind={self.kind}, bits={self.bits}"


_REGISTRY: dict[str, type[Quantizer]] = {}


def register_quantizer(cls: type[Quantizer]) -> type[Quantizer]:
    """Class decorator: register under `cls.name`; a duplicate name is a programming error."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY:
        raise ValueError(f"quantizer {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def available_quantizers() -> list[str]:
    return sorted(_REGISTRY)


def quantizer_class(name: str) -> type[Quantizer]:
    if name not in _REGISTRY:
        raise choice_error("quantizer", name, ["none", *_REGISTRY])
    return _REGISTRY[name]


def check_options(factory: Callable[..., object], options: dict[str, object], what: str) -> None:
    """Refuse option names the factory does not take, listing those it does."""
    accepted = [p for p in inspect.signature(factory).parameters if p not in ("self", "bits", "kind")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise QrunError(f"unknown option(s) {', '.join(unknown)} for {what}; accepted: {', '.join(accepted) or 'none'}")


def build_quantizer(name: str, bits: int, kind: str, **options: object) -> Quantizer:
    """Build one quantizer instance; every layer and side (weight/act) gets its own."""
    cls = quantizer_class(name)
    if kind not in KINDS:
        raise choice_error("quantizer kind", kind, KINDS)
    if kind not in cls.supported_kinds:
        raise QrunError(f"quantizer {name!r} cannot quantize {kind} tensors; it supports: {', '.join(cls.supported_kinds)}")
    if not cls.min_bits <= int(bits) <= cls.max_bits:
        accepted = str(cls.min_bits) if cls.min_bits == cls.max_bits else f"{cls.min_bits}..{cls.max_bits}"
        raise QrunError(f"quantizer {name!r} does not support {kind} bits={bits}; accepted: {accepted}")
    check_options(cls.__init__, options, f"quantizer {name!r}")
    return cls(bits=int(bits), kind=kind, **options)
