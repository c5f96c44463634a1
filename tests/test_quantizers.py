"""Quantizer library: exact grids, paper gradients, closed forms, layer parity, state, and the seeds' faults."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qrun.errors import QrunError
from qrun.models import get_model
from qrun.quant import (
    QuantConv2d,
    QuantLinear,
    build_quantizer,
    initialize_from_data,
    learned_values,
    quantize_model,
    quantizer_parameters,
    quantizers,
)
from qrun.quant.dorefa import GradientQuantizer
from qrun.quant.dsq import dsq_hard, dsq_soft
from qrun.quant.ste import CODES_ATTR, sign
from qrun.quant.twn import ternary_parameters

LEARNED_ACT = ["dsq", "uniform", "lsq", "pact", "dorefa"]  # act quantizers with a multi-bit grid


def dense(lo: float, hi: float, n: int = 20001, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.linspace(lo, hi, n, dtype=dtype)


def calibrated(name: str, bits: int, kind: str, data: torch.Tensor, **options) -> nn.Module:
    q = build_quantizer(name, bits, kind, **options)
    q.calibrating = True
    q(data)
    q.calibrating = False
    q.finish_calibration()
    return q


# ------------------------------------------------------------------------------------------------ exact grids
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("kind", ["weight", "act"])
def test_dsq_gives_exactly_2_pow_b_levels_on_the_learned_grid(bits: int, kind: str) -> None:
    q = calibrated("dsq", bits, kind, torch.tensor([-0.7, 1.3]))
    lower, upper = q.lower.item(), q.upper.item()
    assert (lower, upper) == pytest.approx((-0.7, 1.3))
    out = q(dense(-3, 3))
    n = 2**bits - 1
    grid = torch.arange(n + 1, dtype=torch.float64).mul_((upper - lower) / n).add_(lower).float()
    levels = out.detach().unique()
    assert levels.numel() == 2**bits, "exactly 2^b levels"
    assert torch.allclose(levels, grid, rtol=0, atol=2e-7), "at l + Delta * {0..2^b-1} (to float32 rounding)"


@pytest.mark.parametrize("bits", range(2, 9))
def test_uniform_weights_use_the_symmetric_signed_grid(bits: int) -> None:
    w = dense(-0.3, 0.3)[torch.randperm(20001)]  # every level occurs
    out = build_quantizer("uniform", bits, "weight")(w)
    qmax = 2 ** (bits - 1) - 1
    step = w.abs().max().item() / qmax
    assert torch.equal(out.unique(), torch.arange(-qmax, qmax + 1, dtype=torch.float32).mul_(step))


@pytest.mark.parametrize("bits", range(1, 9))
def test_uniform_unsigned_activations_reach_all_levels(bits: int) -> None:
    q = calibrated("uniform", bits, "act", torch.tensor([0.0, 2.0]), momentum=0.0)
    q.eval()
    out = q(dense(-1, 3))
    qmax = 2**bits - 1
    assert torch.equal(out.unique(), torch.arange(qmax + 1, dtype=torch.float32).mul_(2.0 / qmax))


def test_uniform_signed_activations_when_calibration_sees_negatives() -> None:
    q = calibrated("uniform", 3, "act", torch.tensor([-1.0, 0.5]), momentum=0.0).eval()
    out = q(dense(-2, 2))
    assert torch.equal(out.unique(), torch.arange(-3, 4, dtype=torch.float32).mul_(1.0 / 3))


@pytest.mark.parametrize("bits", range(2, 9))
def test_lsq_grids(bits: int) -> None:
    qw = build_quantizer("lsq", bits, "weight")
    w = torch.randn(2000) * 0.05
    s = qw.ensure_initialized(w) or qw.step.item()
    assert s == pytest.approx(2 * w.abs().mean().item() / math.sqrt(2 ** (bits - 1) - 1), rel=1e-5)
    levels = qw(dense(-5, 5) * s * 2 ** (bits - 1)).detach().unique()
    assert torch.equal(levels, torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=torch.float32).mul_(s))
    qa = calibrated("lsq", bits, "act", torch.rand(1000) * 3)
    sa = qa.step.item()
    assert torch.equal(qa(dense(-1, 2**bits * sa)).detach().unique(),
                       torch.arange(2**bits, dtype=torch.float32).mul_(sa))


@pytest.mark.parametrize("bits", range(1, 9))
def test_pact_activation_grid(bits: int) -> None:
    q = calibrated("pact", bits, "act", torch.tensor([0.0, 1.5]))
    assert q.alpha.item() == pytest.approx(1.5)
    n = 2**bits - 1
    assert torch.equal(q(dense(-1, 3)).detach().unique(), torch.arange(n + 1, dtype=torch.float32).mul_(1.5 / n))


@pytest.mark.parametrize("bits", range(1, 9))
def test_dorefa_activations_reach_all_levels_from_post_relu_inputs(bits: int) -> None:
    # Seed fault: activations mapped like weights to [-1, 1] leave post-ReLU inputs only the upper half.
    x = torch.relu(dense(-0.5, 1.5))
    out = build_quantizer("dorefa", bits, "act")(x)
    n = 2**bits - 1
    assert torch.equal(out.unique(), torch.arange(n + 1, dtype=torch.float32).mul_(1.0 / n))


@pytest.mark.parametrize("bits", range(1, 9))
def test_dorefa_weight_grid(bits: int) -> None:
    w = torch.randn(8, 4, 3, 3)
    out = build_quantizer("dorefa", bits, "weight")(w)
    if bits == 1:
        assert torch.equal(out.unique(), torch.tensor([-1.0, 1.0]) * w.abs().mean())
        return
    n = 2**bits - 1
    expected = 2 * (torch.round(n * (torch.tanh(w) / (2 * torch.tanh(w).abs().max()) + 0.5)) / n) - 1
    assert torch.equal(out, expected)
    assert (out.min() == -1 or out.max() == 1) and out.unique().numel() <= 2**bits


def test_xnor_weights_are_per_channel_binary_and_inputs_two_valued() -> None:
    w = torch.randn(6, 3, 3, 3)
    out = build_quantizer("xnor", 1, "weight")(w)
    for c in range(6):
        alpha = w[c].abs().mean()
        assert torch.equal(out[c].unique(), torch.stack([-alpha, alpha]))
    x = torch.tensor([-2.0, -0.1, 0.0, 0.3, 4.0])
    assert torch.equal(build_quantizer("xnor", 1, "act")(x), torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0]))


def test_twn_alpha_is_divided_by_the_count_above_the_threshold() -> None:
    w = torch.tensor([0.05, -0.1, 0.9, -1.1, 0.02, 0.5, -0.01, 0.0])
    delta = 0.7 * w.abs().mean()
    big = w.abs() > delta
    alpha = w.abs()[big].sum() / big.sum()
    wrong_alpha = w.abs()[big].sum() / w.numel()  # the seed's fault: divided by the layer size
    out = build_quantizer("twn", 2, "weight")(w)
    assert torch.allclose(out, alpha * (w > delta).float() - alpha * (w < -delta).float())
    assert set(out.unique().tolist()) == {-alpha.item(), 0.0, alpha.item()}
    assert not math.isclose(alpha.item(), wrong_alpha.item())
    assert ternary_parameters(w)[0].item() == pytest.approx(delta.item())


# -------------------------------------------------------------------------------------------------- gradients
class _SgnSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g


def dsq_reference(x, lower, upper, alpha, bits):
    """Eq. 3 of the DSQ paper written out directly with autograd, sgn straight-through."""
    n = 2**bits - 1
    delta = (upper - lower) / n
    xc = torch.minimum(torch.maximum(x, lower), upper)
    i = torch.floor((xc - lower) / delta).clamp(0, n - 1).detach()
    m = lower + (i + 0.5) * delta
    s = 1 / (1 - alpha)
    k = torch.log(2 / alpha - 1) / delta
    phi = s * torch.tanh(k * (xc - m))
    return lower + delta * (i + (_SgnSTE.apply(phi) + 1) / 2)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("kind", ["weight", "act"])
def test_dsq_closed_form_gradients_match_the_equations(bits: int, kind: str) -> None:
    torch.manual_seed(bits)
    q = build_quantizer("dsq", bits, kind).double()
    with torch.no_grad():
        q.lower.fill_(-0.9)
        q.upper.fill_(1.2)
        q.alpha.fill_(0.27)
    q.initialized.fill_(True)
    x = (torch.randn(4000, dtype=torch.float64) * 1.1).requires_grad_()
    g = torch.randn(4000, dtype=torch.float64)
    params = (x, q.lower, q.upper, q.alpha)
    ours = torch.autograd.grad(q(x), params, g)
    ref_out = dsq_reference(x, q.lower, q.upper, q.alpha, bits)
    ref = torch.autograd.grad(ref_out, params, g)
    assert torch.allclose(q(x).detach(), ref_out.detach(), rtol=0, atol=1e-12)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)
    # dQ/dx inside is the phi derivative (Delta/2) s k (1 - tanh^2(k (x - m_i))) at one hand-checked point.
    x0, n = 0.1, 2**bits - 1
    delta = 2.1 / n
    i = min(math.floor((x0 + 0.9) / delta), n - 1)
    s, k = 1 / (1 - 0.27), math.log(2 / 0.27 - 1) / delta
    expected = delta / 2 * s * k * (1 - math.tanh(k * (x0 - (-0.9 + (i + 0.5) * delta))) ** 2)
    xt = torch.tensor([x0], dtype=torch.float64, requires_grad=True)
    (dx,) = torch.autograd.grad(q(xt).sum(), xt)
    assert dx.item() == pytest.approx(expected, rel=1e-9)


def test_dsq_bounds_really_clip() -> None:
    # Seed fault: l/u initialised to +-int32 max never bind. Here out-of-range elements are clipped and
    # drive l and u, and in-range elements give x a gradient while clipped ones give it none.
    q = calibrated("dsq", 4, "act", torch.tensor([0.0, 1.0]))
    x = torch.tensor([-3.0, -0.5, 0.3, 0.6, 2.0, 5.0], requires_grad=True)
    out = q(x)
    assert out[0] == 0 and out[1] == 0 and out[4] == 1 and out[5] == 1
    g = torch.tensor([1.0, 2.0, 0.0, 0.0, 3.0, 4.0])
    out.backward(g)
    assert q.lower.grad.item() == pytest.approx(3.0) and q.upper.grad.item() == pytest.approx(7.0)
    assert x.grad[[0, 1, 4, 5]].abs().sum() == 0 and (x.grad[[2, 3]] == 0).all()  # g was 0 there
    x.grad = None
    q(x).sum().backward()
    assert (x.grad[[2, 3]] > 0).all()


def test_dsq_alpha_to_zero_approaches_rounding() -> None:
    lower, upper = torch.tensor(-1.0), torch.tensor(1.0)
    x = dense(-1.2, 1.2, 5001)
    hard = dsq_hard(x, -1.0, 1.0, 15)
    delta = 2.0 / 15
    r = (x.clamp(-1, 1) + 1) / delta
    away = ((r - r.floor() - 0.5).abs() > 0.25)  # not near an interval midpoint, where phi switches sign
    errors = [(dsq_soft(x, lower, upper, torch.tensor(a), 15) - hard)[away].abs().max().item()
              for a in (0.4, 0.1, 1e-2, 1e-4, 1e-8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3 * delta
    assert (dsq_soft(x, lower, upper, torch.tensor(0.5), 15) - hard).abs().max() > 0.1 * delta


def test_dsq_alpha_is_kept_in_range_and_initialised_at_0_2() -> None:
    q = build_quantizer("dsq", 4, "act")
    assert q.alpha.item() == pytest.approx(0.2)
    with torch.no_grad():
        q.alpha.fill_(0.9)
    q(torch.rand(10))
    assert q.alpha.item() == 0.5
    with torch.no_grad():
        q.alpha.fill_(-0.3)
    q(torch.rand(10))
    assert 0 < q.alpha.item() < 0.01


@pytest.mark.parametrize("name", ["uniform", "dorefa"])
def test_clipped_straight_through_gradient(name: str) -> None:
    q = calibrated(name, 4, "act", torch.tensor([0.0, 1.0]), **({"momentum": 0.0} if name == "uniform" else {}))
    x = torch.tensor([-0.5, 0.0, 0.23, 0.77, 1.0, 1.4], requires_grad=True)
    q(x).backward(torch.full((6,), 2.0))
    assert x.grad.tolist() == [0.0, 2.0, 2.0, 2.0, 2.0, 0.0]


def test_lsq_step_gradient_matches_eq_3() -> None:
    q = build_quantizer("lsq", 3, "act").double()
    with torch.no_grad():
        q.step.fill_(0.25)
    q.initialized.fill_(True)
    x = torch.tensor([[-0.3, 0.1, 0.26, 0.9, 1.6, 2.5]], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([[1.0, -2.0, 0.5, 3.0, -1.0, 2.0]], dtype=torch.float64)
    q(x).backward(g)
    qp, s = 7, 0.25
    v = x.detach() / s
    inside = (v >= 0) & (v <= qp)
    per_element = torch.where(inside, torch.round(v) - v, torch.where(v < 0, 0.0, float(qp)))
    grad_scale = 1 / math.sqrt(6 * qp)  # N = features of one sample
    assert q.step.grad.item() == pytest.approx((g * per_element).sum().item() * grad_scale, rel=1e-12)
    assert torch.equal(x.grad, torch.where(inside, g, 0.0))


def test_pact_alpha_gradient_counts_clipped_elements() -> None:
    q = calibrated("pact", 4, "act", torch.tensor([0.0, 1.0]))
    x = torch.tensor([-1.0, 0.2, 0.99, 1.0, 3.0], requires_grad=True)
    g = torch.tensor([5.0, 1.0, 2.0, 3.0, 4.0])
    q(x).backward(g)
    assert q.alpha.grad.item() == pytest.approx(7.0)  # x >= alpha (eq. 3)
    assert x.grad.tolist() == [0.0, 1.0, 2.0, 0.0, 0.0]


@pytest.mark.parametrize("flip", [1.0, -1.0])  # both signs of <g, t>, which the max path's correction carries
def test_dorefa_weight_gradient_is_straight_through_the_rounding(flip: float) -> None:
    torch.manual_seed(3)
    w = (torch.randn(5, 3) * 0.7).requires_grad_()
    g = torch.randn(5, 3) * flip
    build_quantizer("dorefa", 3, "weight")(w).backward(g)
    w2 = w.detach().clone().requires_grad_()
    t = torch.tanh(w2)
    (t / t.abs().max()).backward(g)  # 2 (t / (2 max|t|) + 1/2) - 1 without the rounding
    assert torch.allclose(w.grad, w2.grad)


def test_xnor_gradients_follow_eq_7_and_the_saturated_sign() -> None:
    w = torch.tensor([[0.5, -1.5, 0.2, -0.1], [2.0, 0.3, -0.4, 0.05]], requires_grad=True)
    g = torch.tensor([[1.0, 2.0, -1.0, 0.5], [0.3, -0.7, 1.1, 2.0]])
    build_quantizer("xnor", 1, "weight")(w).backward(g)
    wd, n = w.detach(), 4
    alpha = wd.abs().mean(1, keepdim=True)
    expected = g * alpha * (wd.abs() <= 1) + sign(wd) / n * (g * sign(wd)).sum(1, keepdim=True)
    assert torch.allclose(w.grad, expected)
    x = torch.tensor([-2.0, -0.5, 0.5, 1.5], requires_grad=True)
    build_quantizer("xnor", 1, "act")(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_xnor_k_scaling_multiplies_by_the_box_filtered_input_magnitude() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2, bias=True)
    layer = QuantConv2d.from_float(conv, build_quantizer("xnor", 1, "weight"),
                                   build_quantizer("xnor", 1, "act", k_scaling=True))
    x = torch.randn(2, 3, 8, 8)
    wq = layer.weight_quantizer(conv.weight)
    k = F.avg_pool2d(x.abs().mean(1, keepdim=True), 3, stride=2, padding=1, count_include_pad=True)
    expected = F.conv2d(sign(x), wq, None, stride=2, padding=1) * k + conv.bias.view(1, -1, 1, 1)
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_twn_gradient_is_straight_through() -> None:
    w = torch.randn(20, requires_grad=True)
    g = torch.randn(20)
    build_quantizer("twn", 2, "weight")(w).backward(g)
    assert torch.equal(w.grad, g)


def test_dorefa_gradient_quantization_gives_k_bit_gradients() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 50, requires_grad=True)
    g = torch.randn(3, 50)
    GradientQuantizer(2)(x).backward(g)
    for row_g, row in zip(g, x.grad):
        scale = 2 * row_g.abs().max()
        assert row.unique().numel() <= 4
        assert torch.allclose(((row / scale + 0.5) * 3).round(), (row / scale + 0.5) * 3, atol=1e-5)
    model = quantize_model(get_model("cnn_bn", 10, 1), "dorefa", 4, 4, True, g_bits=4)
    assert isinstance(model.features[4].grad_quantizer, GradientQuantizer)
    plain = quantize_model(get_model("cnn_bn", 10, 1), "dorefa", 4, 4, True)
    assert plain.features[4].grad_quantizer is None


# ----------------------------------------------------------------------------------- layers, models, and state
def test_float_parity_with_quantizers_disabled() -> None:
    torch.manual_seed(0)
    conv, linear = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Linear(20, 5)
    qconv, qlinear = QuantConv2d(3, 8, 3, stride=2, padding=1), QuantLinear(20, 5)
    qconv.load_state_dict(conv.state_dict())
    qlinear.load_state_dict(linear.state_dict())
    x, v = torch.randn(4, 3, 16, 16), torch.randn(4, 20)
    assert torch.equal(qconv(x), conv(x)) and torch.equal(qlinear(v), linear(v))
    assert set(qconv.state_dict()) == set(conv.state_dict())


@pytest.mark.parametrize("name, bits", [("dsq", 4), ("dsq", 8), ("dsq", 10), ("lsq", 8), ("uniform", 8)])
def test_compact_saved_inputs_give_the_same_gradients_as_float_saving(name: str, bits: int) -> None:
    # The conv saves 1-byte level codes of its quantized input instead of the float tensor; backward must see
    # bit-identical values (8 bits unsigned are stored shifted in int8, 10 bits in int16).
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.relu(torch.randn(2, 4, 8, 8))
    grads = []
    for compact in (True, False):
        q = calibrated(name, bits, "act", x)
        layer = QuantConv2d.from_float(conv, None, q)
        with torch.no_grad():
            xq = q(x)
        if compact:
            assert hasattr(layer.input_quantizer(x), CODES_ATTR)
        else:
            layer.input_quantizer.forward = lambda t, q=q: q.quantize(t).clone()  # a plain tensor, no codes
        layer(x).square().sum().backward()
        grads.append([p.grad.clone() for p in (layer.weight, *q.parameters())])
        assert torch.equal(xq, q(x).detach())
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", LEARNED_ACT)
def test_eval_output_of_a_sample_does_not_depend_on_its_batch_mates(name: str) -> None:
    torch.manual_seed(0)
    model = quantize_model(get_model("cnn_bn", 10, 1), name, 4, 4, True)
    initialize_from_data(model, [torch.randn(16, 1, 28, 28)])
    model.eval()
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        alone = model(x[:1])
        with_mates = model(torch.cat([x[:1], 10 * torch.randn(7, 1, 28, 28)]))[:1]
    assert torch.allclose(alone, with_mates, atol=1e-5)


@pytest.mark.parametrize("name", ["dsq", "lsq", "pact", "uniform"])
def test_state_dict_round_trip_restores_learned_values_exactly(name: str) -> None:
    torch.manual_seed(0)
    model = quantize_model(get_model("cnn_bn", 10, 1), name, 3, 3, True, first_last="quantize")
    initialize_from_data(model, [torch.randn(16, 1, 28, 28)])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(16, 1, 28, 28)), torch.randint(0, 10, (16,))).backward()
        opt.step()
    restored = quantize_model(get_model("cnn_bn", 10, 1), name, 3, 3, True, first_last="quantize")
    restored.load_state_dict(model.state_dict())
    assert learned_values(restored) == learned_values(model) and learned_values(model)
    assert initialize_from_data(restored, [torch.randn(4, 1, 28, 28)]) == 0, "a resumed run must not re-calibrate"
    model.eval()
    restored.eval()
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(model(x), restored(x))


@pytest.mark.parametrize("bits", [2, 3, 5])
def test_requested_bit_width_reaches_every_layer(bits: int) -> None:
    # Seed fault: a bit width that silently stays at 8. Every quantizer gets the requested width and the
    # quantized inputs of a real layer take at most 2^b values (all of them but the odd empty tail level).
    model = quantize_model(get_model("resnet20", 10, 3), "dsq", bits, bits, True)
    found = list(quantizers(model))
    assert found and all(q.bits == bits for _, _, q in found)
    layer = model.layer2[0].conv1
    x = torch.randn(8, 3, 32, 32)
    initialize_from_data(model, [x])
    seen = []
    layer.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach()))
    model(x)
    q = layer.input_quantizer
    q.calibrating = True  # re-calibrate on the quantized network's own input to this layer
    q(seen[0])
    q.calibrating = False
    q.finish_calibration()
    levels = q(seen[0]).unique().numel()
    assert 2 ** (bits - 1) < levels <= 2**bits  # stuck at 8 bits would give far more (empty tail levels aside)


def test_first_last_policies_and_8bit_fallback_for_binary_quantizers() -> None:
    fp = quantize_model(get_model("resnet20", 10, 3), "dsq", 4, 4, True)
    assert type(fp.conv1) is nn.Conv2d and type(fp.fc) is nn.Linear
    edge8 = quantize_model(get_model("resnet20", 10, 3), "xnor", 1, 1, True, first_last="8bit", k_scaling=True)
    assert edge8.conv1.weight_quantizer.name == "uniform" and edge8.conv1.weight_quantizer.bits == 8
    assert edge8.layer1[0].conv1.weight_quantizer.name == "xnor"
    twn8 = quantize_model(get_model("resnet20", 10, 3), "twn", 2, 2, False, first_last="8bit")
    assert twn8.fc.weight_quantizer.name == "uniform" and twn8.layer3[2].conv2.weight_quantizer.name == "twn"


@pytest.mark.parametrize("name, bits, kind, message", [
    ("xnor", 2, "weight", "accepted: 1"),
    ("twn", 2, "act", "cannot quantize act"),
    ("twn", 4, "weight", "accepted: 2"),
    ("dsq", 0, "weight", "1..16"),
    ("dsq", 17, "act", "1..16"),
    ("lsq", 1, "weight", "bits >= 2"),
    ("uniform", 1, "weight", "bits >= 2"),
])
def test_impossible_combinations_are_config_errors(name: str, bits: int, kind: str, message: str) -> None:
    with pytest.raises(QrunError, match=message):
        build_quantizer(name, bits, kind)


@pytest.mark.parametrize("name", ["dsq", "uniform", "lsq", "pact", "dorefa", "xnor", "twn"])
def test_every_quantizer_rejects_out_of_range_bits_and_unknown_options(name: str) -> None:
    for bits in (0, 17):
        with pytest.raises(QrunError):
            build_quantizer(name, bits, "weight")
    with pytest.raises(QrunError, match="unknown option"):
        build_quantizer(name, 1 if name == "xnor" else 2, "weight", not_an_option=1)
    with pytest.raises(QrunError):
        quantize_model(get_model("cnn", 10, 1), "xnor", 4, 4, True)


def test_quantizer_parameters_are_the_learned_ones() -> None:
    model = quantize_model(get_model("resnet20", 10, 3), "dsq", 4, 4, True)
    params = quantizer_parameters(model)
    assert len(params) == 18 * 2 * 3  # 18 inner convs x (weight, act) x (alpha, lower, upper)
    names = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if any(p is q for q in params)}
    assert names == {"alpha", "lower", "upper"}
