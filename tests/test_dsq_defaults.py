"""DSQ defaults that keep training stable: LSQ-style scaled bound gradients and a width relative to the bounds."""

from __future__ import annotations

import math

import pytest
import torch

from qrun.quant import build_quantizer


def bound_gradients(grad_scale: bool, kind: str) -> tuple[float, float]:
    torch.manual_seed(0)
    q = build_quantizer("dsq", 4, kind, grad_scale=grad_scale).double()
    x = torch.randn(8, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        q.lower.fill_(-1.0)
        q.upper.fill_(1.0)
    q.initialized.fill_(True)
    q(x).mul(torch.randn_like(x)).sum().backward()
    return q.lower.grad.item(), q.upper.grad.item()


@pytest.mark.parametrize("kind, elements", [("weight", 8 * 3 * 5 * 5), ("act", 3 * 5 * 5)])
def test_bound_gradients_are_scaled_like_lsq_steps(kind: str, elements: int) -> None:
    raw, scaled = bound_gradients(False, kind), bound_gradients(True, kind)
    g = 1 / math.sqrt(elements * 15)  # N elements (per sample for activations), 2^4 - 1 intervals
    assert scaled == pytest.approx((raw[0] * g, raw[1] * g), rel=1e-12)
    assert abs(raw[0]) > 1e-3 and abs(raw[1]) > 1e-3


def test_forward_values_do_not_depend_on_the_gradient_scale() -> None:
    x = torch.randn(4, 8)
    a, b = (build_quantizer("dsq", 3, "act", grad_scale=s) for s in (False, True))
    assert torch.equal(a(x), b(x))


def test_crossed_bounds_far_from_zero_keep_a_representable_width() -> None:
    q = build_quantizer("dsq", 4, "act", grad_scale=True)
    q.initialized.fill_(True)
    with torch.no_grad():  # what one oversized step did: the bounds crossed, far from 0
        q.lower.fill_(40.0)
        q.upper.fill_(39.0)
    out = q(torch.linspace(39.99, 40.05, 101))
    width = q.upper.item() - q.lower.item()
    assert width >= 1e-3 * 40 * 0.999 and torch.isfinite(out).all()  # 1e-6 was below float32's 3.8e-6 here
    assert out.unique().numel() == 16  # all 2^4 levels still distinct


def test_the_device_path_scales_and_widens_the_same_way() -> None:
    from qrun.quant import kernels

    eager = bound_gradients(True, "weight")
    kernels.set_backend("tensor")  # CPU tensors down the device path (the CUDA code path, in tensor ops)
    try:
        raw, scaled = bound_gradients(False, "weight"), bound_gradients(True, "weight")
        g = 1 / math.sqrt(8 * 3 * 5 * 5 * 15)
        assert scaled == pytest.approx((raw[0] * g, raw[1] * g), rel=1e-9)
        assert scaled == pytest.approx(eager, rel=1e-4)  # the device path computes in float32
        q = build_quantizer("dsq", 4, "act", grad_scale=True)
        q.initialized.fill_(True)
        with torch.no_grad():
            q.lower.fill_(40.0)
            q.upper.fill_(39.0)
        q(torch.linspace(39.99, 40.05, 101))
        assert q.upper.item() - q.lower.item() >= 1e-3 * 40 * 0.999
    finally:
        kernels.set_backend("auto")
