"""The device path's eager references compute on CUDA what they compute on CPU, bit for bit.

CUDA's ATen divides by a Python number as a * float32(1 / b) (div_true_kernel_cuda's CPU-scalar shortcut, "may lose
one bit of precision"), while the CPU kernels and the Triton kernels (tl.math.div_rn) divide correctly rounded. A
reference that divides by a Python number therefore gives steps and levels one ulp off the Triton kernels on a GPU
only: the interpreter tests pass here and the `cuda` cases of tests/test_triton_kernels.py fail there. This test
replays CUDA's rule on CPU with a dispatch mode, so the references must be immune to it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qrun.quant.dorefa import dorefa_weight_reference
from qrun.quant.dsq import dsq_reference_backward, dsq_reference_forward
from qrun.quant.ste import grid_reference_forward

aten = torch.ops.aten
_DIVISIONS = {aten.div.Tensor: aten.mul.Tensor, aten.div_.Tensor: aten.mul_.Tensor,
              aten.div.Scalar: aten.mul.Tensor, aten.div_.Scalar: aten.mul_.Tensor}


class CudaScalarDivision(TorchDispatchMode):
    """Divides by a Python number the way ATen's CUDA kernel does: multiply by the reciprocal, taken in opmath."""

    def __init__(self) -> None:
        super().__init__()
        self.rewritten = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DIVISIONS and not kwargs and not isinstance(args[1], torch.Tensor) \
                and args[0].is_floating_point():
            self.rewritten += 1
            double = args[0].dtype == torch.float64
            inverse = 1.0 / args[1] if double else float(np.float32(1.0) / np.float32(args[1]))
            return _DIVISIONS[func](args[0], inverse)
        return func(*args, **kwargs)


def _both(fn):
    plain = fn()
    with CudaScalarDivision():
        on_cuda = fn()
    return plain, on_cuda


def _assert_equal(a, b) -> None:
    for left, right in zip(a, b):
        if isinstance(left, torch.Tensor):
            assert torch.equal(left, right), (left - right).abs().max()


def test_the_dispatch_mode_does_rewrite_scalar_division() -> None:
    """Guard: the mode really changes a division by 15 for some floats (else the tests below prove nothing)."""
    b = torch.linspace(0.1, 10.0, 1001)
    plain, on_cuda = _both(lambda: b / 15.0)
    assert not torch.equal(plain, on_cuda)


def test_grid_reference_divides_like_the_triton_kernel_on_cuda() -> None:
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 2.0
    for bound in torch.linspace(0.3, 7.0, 41):
        for divisor, qmin, qmax in ((15, 0, 15), (7, -7, 7), (255, 0, 255), (3, -3, 3)):
            _assert_equal(*_both(lambda: grid_reference_forward(x, bound, divisor, -np.inf, qmin, qmax, 0)))


def test_dsq_reference_divides_like_the_triton_kernel_on_cuda() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4096, generator=generator) * 2.0
    g = torch.randn(4096, generator=generator)
    alpha = torch.tensor(0.2)
    for lo, hi in zip(torch.linspace(-1.3, 0.2, 17), torch.linspace(0.7, 3.1, 17)):
        for levels in (3, 15, 255):
            _assert_equal(*_both(lambda: dsq_reference_forward(x, lo, hi, levels, 0)))
            plain, on_cuda = _both(lambda: dsq_reference_backward(g, x, lo, hi, alpha, levels))
            assert torch.equal(plain[0], on_cuda[0]), "dL/dx depends on the same Delta"


def test_dorefa_weight_reference_divides_like_the_triton_kernel_on_cuda() -> None:
    t = torch.tanh(torch.randn(64, 32, 3, 3, generator=torch.Generator().manual_seed(2)))
    for levels in (3, 7, 15, 255):
        _assert_equal(*_both(lambda: dorefa_weight_reference(t, levels)))
