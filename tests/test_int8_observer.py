"""The affine quantizer's maths against PyTorch's reference observers and fake-quantization kernels."""

from __future__ import annotations

import pytest
import torch
from torch.ao.quantization.observer import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    PerChannelMinMaxObserver,
)

from qrun.errors import QrunError
from qrun.int8.integer import multiply_by_quantized_multiplier, quantize_multiplier, tflite_requantize
from qrun.quant import build_quantizer
from qrun.quant.affine import activation_range, asymmetric_qparams, weight_range

RANGES = [(-1.3, 2.7), (0.4, 5.0), (-3.0, -0.2), (0.0, 1.0), (-1e-3, 1e-3)]


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("lo, hi", RANGES)
def test_asymmetric_qparams_match_torch_ao(bits: int, lo: float, hi: float) -> None:
    qmin, qmax = activation_range(bits)
    reference = MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=qmin, quant_max=qmax)
    reference(torch.tensor([lo, hi]))
    ref_scale, ref_zp = reference.calculate_qparams()
    scale, zero_point = asymmetric_qparams(torch.tensor(lo), torch.tensor(hi), qmin, qmax)
    assert torch.allclose(scale, ref_scale.reshape(()), rtol=1e-6)
    assert int(zero_point) == int(ref_zp)
    # Nudging: real 0 is a grid point, whatever the range.
    assert float((torch.round(torch.tensor(0.0) / scale) + zero_point - zero_point) * scale) == 0.0


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_weights_match_torch_ao_per_tensor_and_per_channel(bits: int) -> None:
    torch.manual_seed(0)
    weight = torch.randn(8, 3, 3, 3) * torch.linspace(0.1, 2.0, 8).reshape(-1, 1, 1, 1)
    qmin, qmax = weight_range(bits)
    for per_channel, observer in ((False, MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric,
                                                          quant_min=qmin, quant_max=qmax)),
                                  (True, PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8,
                                                                  qscheme=torch.per_channel_symmetric,
                                                                  quant_min=qmin, quant_max=qmax))):
        observer(weight)
        ref_scale, ref_zp = observer.calculate_qparams()
        quantizer = build_quantizer("affine", bits, "weight", per_channel=per_channel).train()
        out = quantizer(weight)
        scale, zero_point = quantizer.qparams()
        assert torch.allclose(scale.reshape(-1), ref_scale.reshape(-1), rtol=1e-6)
        assert torch.equal(zero_point.reshape(-1).long(), ref_zp.reshape(-1).long())
        if per_channel:
            expected = torch.fake_quantize_per_channel_affine(weight, ref_scale, ref_zp.int(), 0, qmin, qmax)
        else:
            expected = torch.fake_quantize_per_tensor_affine(weight, float(ref_scale), int(ref_zp), qmin, qmax)
        assert torch.equal(out, expected)
        codes = out / (scale.reshape(-1, 1, 1, 1) if per_channel else scale)
        assert torch.allclose(codes, codes.round(), atol=1e-3) and int(codes.abs().max().round()) == qmax


def test_activation_ema_matches_moving_average_observer() -> None:
    torch.manual_seed(1)
    reference = MovingAverageMinMaxObserver(averaging_constant=0.05, dtype=torch.quint8, quant_min=0, quant_max=255)
    quantizer = build_quantizer("affine", 8, "act", averaging_constant=0.05).train()
    for step in range(6):
        x = torch.randn(16, 4, 5, 5) * (1 + step) + 0.3 * step
        reference(x)
        out = quantizer(x)
    assert torch.allclose(quantizer.min_val, reference.min_val, rtol=1e-6)
    assert torch.allclose(quantizer.max_val, reference.max_val, rtol=1e-6)
    ref_scale, ref_zp = reference.calculate_qparams()
    expected = torch.fake_quantize_per_tensor_affine(x, float(ref_scale), int(ref_zp), 0, 255)
    assert torch.equal(out, expected)
    # Eval mode uses the stored range: a new batch changes neither the range nor the grid.
    quantizer.eval()
    before = quantizer.max_val.clone()
    quantizer(x * 10)
    assert torch.equal(quantizer.max_val, before)


def test_observer_freezes_after_configured_epochs() -> None:
    quantizer = build_quantizer("affine", 8, "act", observer_epochs=2).train()
    quantizer.on_epoch_start(2)
    quantizer(torch.rand(10))
    frozen_max = quantizer.max_val.clone()
    quantizer.on_epoch_start(3)
    quantizer(torch.rand(10) * 100)
    assert torch.equal(quantizer.max_val, frozen_max)


def test_straight_through_gradient_inside_range_only() -> None:
    quantizer = build_quantizer("affine", 8, "act").train()
    quantizer(torch.tensor([0.0, 1.0]))  # range [0, 1]
    quantizer.eval()
    x = torch.tensor([-0.5, 0.3, 0.7, 1.5], requires_grad=True)
    quantizer(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_per_channel_ranges_survive_a_checkpoint() -> None:
    trained = build_quantizer("affine", 8, "weight", per_channel=True).train()
    trained(torch.randn(6, 4))
    fresh = build_quantizer("affine", 8, "weight", per_channel=True)
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh.qparams()[0], trained.qparams()[0])


def test_bad_options_and_uncalibrated_use_are_refused() -> None:
    with pytest.raises(QrunError, match="averaging_constant"):
        build_quantizer("affine", 8, "act", averaging_constant=0.0)
    with pytest.raises(QrunError, match="observer_epochs"):
        build_quantizer("affine", 8, "act", observer_epochs=-1)
    with pytest.raises(QrunError, match="bits=1"):
        build_quantizer("affine", 1, "weight")
    with pytest.raises(QrunError, match="no observed range"):
        build_quantizer("affine", 8, "act").eval()(torch.ones(3))


def test_fixed_point_requantization_rounds_the_exact_product_once() -> None:
    """M0 x 2^-n requantization (Jacob et al. eq. 5-6): integers only, equal to round(acc M0 2^-n) exactly."""
    torch.manual_seed(2)
    acc = torch.randint(-2**24, 2**24, (4000,), dtype=torch.int64)
    for m in (0.7311, 0.0123, 3.5e-4, 1.75, 1.0):
        fixed, shift = quantize_multiplier(torch.tensor(m, dtype=torch.float64))
        assert 2**30 <= int(fixed) < 2**31
        assert abs(int(fixed) * 2.0 ** (int(shift) - 31) - m) <= m * 2**-30
        got = multiply_by_quantized_multiplier(acc, fixed, shift)
        expected = [_round_half_away(int(a) * int(fixed), 31 - int(shift)) for a in acc[:500]]
        assert got[:500].tolist() == expected
        # TFLite's two-rounding kernel, checked against its scalar reference, is within one step of it.
        tflite = tflite_requantize(acc, fixed, shift)
        assert tflite[:300].tolist() == [_tflite_multiply(int(a), int(fixed), int(shift)) for a in acc[:300]]
        assert int((tflite - got).abs().max()) <= 1


def _round_half_away(numerator: int, bits: int) -> int:
    """numerator / 2^bits rounded to nearest, ties away from zero, with Python's exact integers."""
    magnitude = (abs(numerator) + (1 << (bits - 1))) >> bits
    return magnitude if numerator >= 0 else -magnitude


def test_bias_is_rounded_to_the_int32_grid_of_input_times_weight_scale() -> None:
    from qrun.quant import QuantLinear

    torch.manual_seed(3)
    layer = QuantLinear(6, 4, weight_quantizer=build_quantizer("affine", 4, "weight"),
                        input_quantizer=build_quantizer("affine", 4, "act"))
    layer.bias.data = torch.tensor([0.3, -0.2, 0.05, 0.9])
    x = torch.rand(5, 6)
    layer.train()(x)
    layer.eval()
    s_x, s_w = layer.input_quantizer.qparams()[0], layer.weight_quantizer.qparams()[0]
    bias = torch.round(layer.bias / (s_x * s_w)) * (s_x * s_w)
    expected = torch.nn.functional.linear(layer.input_quantizer(x), layer.weight_quantizer(layer.weight), bias)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert not torch.allclose(bias, layer.bias)  # 4-bit scales are coarse: the rounding is visible


def _tflite_multiply(x: int, multiplier: int, shift: int) -> int:
    """TFLite's scalar MultiplyByQuantizedMultiplier, written with Python integers as an independent reference."""
    x = x * (1 << max(shift, 0))
    product = x * multiplier
    nudge = (1 << 30) if product >= 0 else 1 - (1 << 30)
    total = product + nudge
    high = abs(total) // (1 << 31) * (1 if total >= 0 else -1)  # C++ division truncates toward zero
    exponent = max(-shift, 0)
    mask = (1 << exponent) - 1
    remainder = high & mask
    threshold = (mask >> 1) + (1 if high < 0 else 0)
    return (high >> exponent) + (1 if remainder > threshold else 0)
