"""The Triton kernels (qrun/quant/kernels/triton_backend.py) against the eager tensor reference they replace.

Each case runs once on the Triton backend and once on the reference (QRUN_BACKEND's "tensor"), from the same
seeds, and compares levels, outputs, codes (and their decode), the input gradient and the learned parameters'
gradients. Reduced-precision inputs are computed in float32 and rounded back to their dtype, which is tested
against the float32 result.

Two places run these tests: a CUDA machine (`pytest -m gpu`, through scripts/gpu_check.sh: the `cuda` cases), and
CPU tensors under Triton's interpreter (the `cpu` cases), which needs TRITON_INTERPRET=1 before triton is
imported: tests/test_triton_interpreter.py runs this module in a subprocess with that set, so the rest of the
suite never sees the interpreter. Run directly without it, the `cpu` cases skip.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qrun.errors import QrunError
from qrun.quant import build_quantizer, kernels
from qrun.quant.kernels import device
from qrun.quant.ste import CODES_ATTR, decode

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get(kernels.BACKEND_ENV) == "triton"
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 QRUN_BACKEND=triton "
                                                 "(tests/test_triton_interpreter.py sets them)")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
QUANTIZERS = ["uniform", "lsq", "pact", "dorefa", "dsq"]
# (name, kind, signed input): signed activations take the symmetric grids (DoReFa clips to [0, 1]: no such case)
CASES = [(name, kind, signed) for name in QUANTIZERS for kind, signed in
         (("weight", True), ("act", False), ("act", True)) if not (name == "dorefa" and kind == "act" and signed)]


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    previous = kernels.forced()
    kernels.set_backend(name)
    try:
        yield
    finally:
        kernels.set_backend(previous)


def triton_name(dev: str) -> str:
    return "triton" if dev == "cpu" else "auto"


def sample(kind: str, signed: bool, dev: str, channels_last: bool) -> torch.Tensor:
    """1,296 elements: more than one 1,024-element block, so masks and the partial-sum reduction are exercised."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, 8, 9, 9, generator=generator) * (0.4 if kind == "weight" else 1.5)
    if not signed:
        x = x.relu()
    x = x.to(dev)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def build(name: str, bits: int, kind: str, x: torch.Tensor, **options):
    q = build_quantizer(name, bits, kind, **options).to(x.device)
    if kind == "act":
        q.calibrating = True
        q(x.float())
        q.calibrating = False
        q.finish_calibration()
    return q.train()


def run_once(name: str, bits: int, kind: str, x: torch.Tensor, which: str, **options):
    """Forward + backward of a fresh quantizer on `which` backend: outputs, codes, gradients, parameter values."""
    with backend(which):
        q = build(name, bits, kind, x, **options)
        xg = x.detach().clone().requires_grad_()
        y = q(xg)
        codes = getattr(y, CODES_ATTR, None)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.device, y.dtype)
        g = g.contiguous(memory_format=torch.channels_last) if y.is_contiguous(memory_format=torch.channels_last) \
            and not y.is_contiguous() else g
        decoded = None if codes is None else decode(codes)
        y.backward(g)
        params = {n: p.grad.clone() for n, p in q.named_parameters()}
        state = {n: t.detach().clone() for n, t in q.state_dict().items()}
    return y.detach(), codes, decoded, xg.grad, params, state


def quantizer_or_skip(name: str, bits: int, kind: str) -> None:
    try:
        build_quantizer(name, bits, kind)
    except QrunError as error:
        pytest.skip(str(error))


def assert_same(triton_run, reference_run, name: str) -> None:
    (y_t, c_t, d_t, gx_t, p_t, s_t), (y_r, c_r, d_r, gx_r, p_r, s_r) = triton_run, reference_run
    assert y_t.dtype == y_r.dtype and y_t.stride() == y_r.stride()
    assert torch.equal(y_t, y_r), "identical levels and outputs"
    assert (c_t is None) == (c_r is None)
    if c_t is not None:
        assert torch.equal(c_t.codes, c_r.codes), "identical 1-byte codes"
        assert torch.equal(d_t, y_t) and torch.equal(d_r, y_r), "the codes rebuild the output exactly"
    if name == "dsq" or (name in ("dorefa", "pact") and gx_t.abs().max() > 0 and not torch.equal(gx_t, gx_r)):
        # phi's derivative (DSQ) and DoReFa's weight gradient divide and exponentiate: float tolerance.
        assert torch.allclose(gx_t.float(), gx_r.float(), rtol=2e-3 if gx_t.dtype != torch.float32 else 1e-5,
                              atol=1e-5)
    else:
        assert torch.equal(gx_t, gx_r), "the straight-through gradient is a mask: identical"
    assert p_t.keys() == p_r.keys()
    for key in p_t:
        scale = max(1.0, float(p_r[key].abs().max()))
        assert torch.allclose(p_t[key], p_r[key], rtol=1e-4, atol=1e-5 * scale), key
    for key in s_t:
        assert torch.equal(s_t[key], s_r[key]), f"{key}: observers and projections agree"


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("name, kind, signed", CASES)
def test_triton_equals_the_eager_reference(name: str, kind: str, signed: bool, bits: int, channels_last: bool,
                                           dev: str) -> None:
    quantizer_or_skip(name, bits, kind)
    if signed and kind == "act" and bits < 2 and name != "dsq":
        pytest.skip("a signed grid needs 2 bits")
    x = sample(kind, signed, dev, channels_last)
    assert_same(run_once(name, bits, kind, x, triton_name(dev)), run_once(name, bits, kind, x, "tensor"), name)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("name", QUANTIZERS)
def test_reduced_precision_inputs_are_quantized_in_float32(name: str, channels_last: bool, dtype: torch.dtype,
                                                          dev: str) -> None:
    """A bf16/fp16 activation is widened to float32, quantized, and the output rounded back to its dtype."""
    x = sample("act", False, dev, channels_last).to(dtype)
    triton_run = run_once(name, 4, "act", x, triton_name(dev))
    assert_same(triton_run, run_once(name, 4, "act", x, "tensor"), name)
    y32 = run_once(name, 4, "act", x.float(), triton_name(dev))[0]
    assert torch.equal(triton_run[0], y32.to(dtype)), "the float32 result, rounded once to the input's dtype"


@pytest.mark.parametrize("dev", DEVICES)
def test_grid_rounds_half_to_even(dev: str) -> None:
    """x / step exactly at k + 1/2 goes to the even level, as torch.round does."""
    x = (torch.arange(-40, 41, dtype=torch.float32) * 0.125).to(dev)  # step 1/4: x / step = k/2
    src = torch.ones((), device=dev)
    with backend(triton_name(dev)):
        y = device.grid_quantize(x, src, 4.0, -7, 7)
    expected = torch.round(x * 4.0).clamp(-7, 7) / 4.0
    assert torch.equal(y, expected)
    halves = {0.125: 0.0, 0.375: 0.5, 0.625: 0.5, -0.375: -0.5}  # x / step = 0.5, 1.5, 2.5, -1.5
    assert all(float(y[x == k]) == v for k, v in halves.items()), "halves go to the even level"


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dorefa_half_takes_the_level_of_round_n_x_on_every_backend(bits: int, dev: str) -> None:
    """DoReFa's quantize_k(x) = round(n x) / n, n = 2^k - 1: at x = 1/2, n x = n/2 is an exact tie (to the even
    level), and a bf16 activation is exactly 1/2 often. x times a twice-rounded 1 / (1/n) (= n - 1 ulp) put it one
    level low on the device path only; every backend now multiplies by n itself."""
    n = 2**bits - 1
    values = [0.0, 0.125, 0.25, 1.0 / 3.0, 0.5, 0.625, 0.75, 1.0]
    expected = [float(np.round(np.float64(np.float32(v)) * n)) for v in values]
    runs = {"triton": torch.tensor(values, device=dev)}
    if dev == "cpu":  # beside the interpreted kernels, kernels.c and the eager reference the device path falls back to
        runs.update(kernels_c=torch.tensor(values), tensor=torch.tensor(values))
    for which, x in runs.items():
        q = build_quantizer("dorefa", bits, "act").to(x.device)
        with backend({"triton": triton_name(dev), "kernels_c": "auto", "tensor": "tensor"}[which]):
            levels = (q(x).double() * n).round().cpu().tolist()
        assert levels == expected, (which, levels, expected)
    assert abs(expected[4] - n / 2) == 0.5 and expected[4] % 2 == 0, "1/2 is a tie, broken to the even level"


@pytest.mark.parametrize("dev", DEVICES)
def test_dsq_projection_and_uniform_range_average_match_the_reference(dev: str) -> None:
    values = {}
    for which in (triton_name(dev), "tensor"):
        with backend(which):
            alpha, lower, upper = (torch.tensor(v, device=dev) for v in (0.9, 0.5, 0.4))
            device.dsq_project(alpha, lower, upper, 1e-4, 0.5, 1e-6)
            # Crossed bounds far from 0: the width relative to max(|l|, |u|) (1e-3 x 40) wins over 1e-6.
            far_alpha, far_lower, far_upper = (torch.tensor(v, device=dev) for v in (0.2, -40.0, -40.5))
            device.dsq_project(far_alpha, far_lower, far_upper, 1e-4, 0.5, 1e-6, 1e-3)
            rng = torch.tensor(2.0, device=dev)
            device.ema_update(rng, torch.tensor(3.0, device=dev), 0.1, 1e-8)
            device.ema_update(rng, torch.tensor(-1.0, device=dev), 0.1, 1e-8)
            values[which] = torch.stack([alpha, lower, upper, far_upper, rng])
    triton_values, reference = values.values()
    assert torch.equal(triton_values, reference)
    assert reference[0] == 0.5 and reference[2] > reference[1], "alpha clamped into (0, 0.5], u > l"
    assert reference[3] == torch.tensor(-40.0) + torch.tensor(40.5) * 1e-3, "u = l + 1e-3 max(|l|, |u|)"


# ------------------------------------------------------------------------------- xnor, twn, affine
# (name, bits, kind, signed input, options). Their Triton passes replace the eager maths in xnor.py, twn.py and
# affine.py, which stays the reference: levels, codes, masks and observer buffers identical; a scale that is a
# mean (XNOR-Net's alpha, TWN's Delta and alpha) is summed in another order, so values agree to float rounding.
OTHER_CASES = [("xnor", 1, "act", True, {}), ("xnor", 1, "weight", True, {}), ("twn", 2, "weight", True, {}),
               *(("affine", bits, "act", signed, {}) for bits in (2, 4, 8, 16) for signed in (False, True)),
               *(("affine", bits, "weight", True, {"per_channel": per_channel}) for bits in (2, 8)
                 for per_channel in (False, True))]
MEAN_SCALED = ("xnor-weight", "twn-weight")


def other_case_id(case) -> str:
    name, bits, kind, signed, options = case
    return f"{name}-{kind}-w{bits}{'-signed' if signed and kind == 'act' else ''}" + \
        ("-per_channel" if options.get("per_channel") else "")


def assert_same_other(triton_run, reference_run, key: str) -> None:
    (y_t, c_t, d_t, gx_t, p_t, s_t), (y_r, c_r, d_r, gx_r, p_r, s_r) = triton_run, reference_run
    assert y_t.dtype == y_r.dtype and y_t.stride() == y_r.stride() and not p_t and not p_r
    if key in MEAN_SCALED:
        channel_scale = lambda y: y.abs().flatten(1).amax(dim=1)  # noqa: E731  (+-alpha, or 0 and +-alpha)
        scale_t, scale_r = channel_scale(y_t), channel_scale(y_r)
        assert torch.allclose(scale_t, scale_r, rtol=1e-6, atol=0), "alpha to float rounding"
        assert torch.equal(torch.sign(y_t), torch.sign(y_r)), "identical levels"
        assert torch.allclose(gx_t, gx_r, rtol=1e-5, atol=1e-7)
    else:
        assert torch.equal(y_t, y_r), "identical levels and outputs"
        assert torch.equal(gx_t, gx_r), "the straight-through gradient is a mask: identical"
    assert (c_t is None) == (c_r is None)
    if c_t is not None:
        assert torch.equal(c_t.codes, c_r.codes) and torch.equal(d_t, y_t) and torch.equal(d_r, y_r)
    for name in s_t:
        assert torch.equal(s_t[name], s_r[name]), f"{name}: the observers agree bit for bit"


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", OTHER_CASES, ids=other_case_id)
def test_xnor_twn_affine_triton_equal_their_eager_maths(case, channels_last: bool, dev: str) -> None:
    name, bits, kind, signed, options = case
    x = sample(kind, signed, dev, channels_last)
    triton_run = run_once(name, bits, kind, x, triton_name(dev), **options)
    assert_same_other(triton_run, run_once(name, bits, kind, x, "tensor", **options), f"{name}-{kind}")
    if name == "affine" and kind == "act":
        assert triton_run[5]["min_val"] < 0 if signed else triton_run[5]["min_val"] == 0, "the EMA moved"


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [c for c in OTHER_CASES if c[1] <= 8], ids=other_case_id)
def test_xnor_twn_affine_take_reduced_precision_in_float32(case, dtype: torch.dtype, dev: str) -> None:
    """The float32 result rounded once to the input's dtype; the gradient likewise."""
    name, bits, kind, signed, options = case
    x = sample(kind, signed, dev, False)
    low = run_once(name, bits, kind, x.to(dtype), triton_name(dev), **options)
    wide = run_once(name, bits, kind, x.to(dtype).float(), triton_name(dev), **options)
    assert low[0].dtype == dtype and torch.equal(low[0], wide[0].to(dtype))
    assert low[3].dtype == dtype
    if f"{name}-{kind}" != "xnor-weight":  # its gradient sums g, which run_once draws in y's dtype: not comparable
        assert torch.equal(low[3], wide[3].to(dtype)), "the input gradient, rounded once"
    for key in low[5]:
        assert torch.equal(low[5][key], wide[5][key]), key
    if name == "xnor" and kind == "act":
        assert torch.equal(low[0], run_once(name, bits, kind, x.to(dtype), "tensor")[0]), "sign is exact anywhere"


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("kind", ["weight", "act"])
def test_affine_first_observation_frozen_observer_and_evaluation_match_the_reference(kind: str, per_channel: bool,
                                                                                      dev: str) -> None:
    """Without calibration the first batch sets the range (no average); a frozen observer and eval mode quantize
    with the stored range and leave it alone."""
    if per_channel and kind == "act":
        pytest.skip("per-channel ranges are for weights")
    xs = [sample(kind, kind == "weight", dev, False) * s for s in (1.0, 1.7, 0.6)]
    outputs = {}
    for which in (triton_name(dev), "tensor"):
        with backend(which):
            q = build_quantizer("affine", 8, kind, per_channel=per_channel).to(dev).train()
            ys = [q(xs[0])]
            q.observer_enabled = False
            ys.append(q(xs[1]))
            frozen = (q.min_val.clone(), q.max_val.clone())
            q.eval()
            ys.append(q(xs[2]))
            outputs[which] = (ys, frozen, (q.min_val.clone(), q.max_val.clone()))
    (ys_t, frozen_t, final_t), (ys_r, frozen_r, final_r) = outputs.values()
    assert all(torch.equal(a, b) for a, b in zip(ys_t, ys_r))
    assert all(torch.equal(a, b) for a, b in zip((*frozen_t, *final_t), (*frozen_r, *final_r)))
    assert torch.equal(frozen_t[0], final_t[0]), "neither a frozen observer nor evaluation moves the range"
    if per_channel:
        assert frozen_t[0].shape == (xs[0].shape[0],)


@pytest.mark.parametrize("dev", DEVICES)
def test_xnor_twn_affine_reductions_that_loop_over_many_blocks_and_long_channels(dev: str, monkeypatch) -> None:
    """Small blocks, so every reduction loop (per-block partials, per-channel rows, the observer's and TWN's
    re-reductions) runs several times; the cases above fit in one pass of each."""
    from qrun.quant.kernels import triton_backend

    monkeypatch.setattr(triton_backend, "BLOCK", 64)
    monkeypatch.setattr(triton_backend, "REDUCE_BLOCK", 32)
    monkeypatch.setattr(triton_backend, "PARTIAL_BLOCK", 8)
    generator = torch.Generator().manual_seed(11)
    weight = (torch.randn(3, 40, 3, 3, generator=generator) * 0.4).to(dev)  # rows of 360, 17 blocks
    act = (torch.randn(4, 8, 9, 9, generator=generator) * 1.5).to(dev)  # 41 blocks
    for name, bits, kind, x, options in [("xnor", 1, "weight", weight, {}), ("twn", 2, "weight", weight, {}),
                                         ("affine", 8, "weight", weight, {"per_channel": True}),
                                         ("affine", 4, "act", act, {})]:
        assert_same_other(run_once(name, bits, kind, x, triton_name(dev), **options),
                          run_once(name, bits, kind, x, "tensor", **options), f"{name}-{kind}")


@pytest.mark.parametrize("dev", DEVICES)
def test_boundary_values_sign_saturation_zeros_and_affine_ties(dev: str) -> None:
    """|x| = 1 still passes the saturated gradient, sign(+-0) = +1 (and sgn(0) = 0 in XNOR-Net's alpha term),
    and an affine x / S exactly at k + 1/2 rounds to the even level, as torch's fake quantization does."""
    edges = torch.tensor([-1.0, 1.0, 0.0, -0.0, -1.0000001, 1.0000001, 0.5, -0.5], device=dev)
    weight = torch.stack([edges, edges.flip(0), torch.zeros(8, device=dev)]).reshape(3, 2, 2, 2)
    ties = ((torch.arange(-20, 260, dtype=torch.float32) + 0.5) / 16).to(dev)  # S = 1/16: every x / S is k + 1/2
    results = {}
    for which in (triton_name(dev), "tensor"):
        with backend(which):
            binary = build_quantizer("xnor", 1, "act").to(dev).train()
            binary.finish_calibration()
            xg = edges.clone().requires_grad_()
            signs = binary(xg)
            signs.backward(torch.arange(1.0, 9.0, device=dev))
            binary_w = build_quantizer("xnor", 1, "weight").to(dev).train()
            wg = weight.clone().requires_grad_()
            w_out = binary_w(wg)
            w_out.backward(torch.linspace(-1, 1, 24, device=dev).reshape(weight.shape))
            affine = build_quantizer("affine", 8, "act").to(dev)
            affine.min_val.fill_(0.0)
            affine.max_val.fill_(255 / 16)
            affine.finish_calibration()
            tg = ties.clone().requires_grad_()
            affine.train().observer_enabled = False
            tied = affine(tg)
            tied.backward(torch.ones_like(tied))
            results[which] = (signs.detach(), xg.grad, w_out.detach(), wg.grad, tied.detach(), tg.grad)
    for index, (got, expected) in enumerate(zip(*results.values())):
        # XNOR-Net's weight side sums per channel (alpha, the gradient through it): float rounding apart.
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-7) if index in (2, 3) else torch.equal(got, expected)
    assert torch.equal(torch.sign(results["tensor"][2]), torch.sign(results[triton_name(dev)][2]))
    signs, sign_grad, _, _, tied, tie_grad = results["tensor"]
    assert signs.tolist() == [-1.0, 1.0, 1.0, 1.0, -1.0, 1.0, 1.0, -1.0]
    assert sign_grad.tolist() == [1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 7.0, 8.0]
    levels = torch.round(ties * 16)  # half to even
    assert torch.equal(tied, levels.clamp(0, 255) / 16) and tie_grad.sum() == 256


@pytest.mark.parametrize("dev", DEVICES)
def test_non_finite_weights_and_gradients_stay_visible_as_in_the_reference(dev: str) -> None:
    """A NaN or inf weight makes TWN's layer NaN, as eq. 5's product does (not silently zero); a NaN weight
    reaches XNOR-Net's output; an inf gradient on an element affine clipped becomes NaN there, as torch's
    mask product."""
    results = {}
    for which in (triton_name(dev), "tensor"):
        with backend(which):
            outs = []
            for bad in (float("nan"), float("inf")):
                w = sample("weight", True, dev, False).clone()
                w.view(-1)[5] = bad
                outs.append(build_quantizer("twn", 2, "weight").to(dev)(w).detach())
                outs.append(build_quantizer("xnor", 1, "weight").to(dev)(w).detach())
            affine = build_quantizer("affine", 4, "act").to(dev).train()
            affine(torch.tensor([0.0, 1.0], device=dev))  # the range [0, 1], then frozen: 20 and -3 are clipped
            affine.observer_enabled = False
            x = torch.tensor([0.5, 20.0, 1.0, -3.0], device=dev).requires_grad_()
            y = affine(x)
            y.backward(torch.tensor([1.0, float("inf"), -1.0, float("inf")], device=dev))
            outs.append(x.grad)
            results[which] = outs
    for got, expected in zip(*results.values()):  # (XNOR-Net's alpha sums in another order: float rounding)
        assert torch.equal(got.isnan(), expected.isnan())
        assert torch.allclose(got.nan_to_num(), expected.nan_to_num(), rtol=1e-6, atol=0)
    assert results["tensor"][0].isnan().all() and results["tensor"][2].isnan().all(), "TWN: the whole layer"
    assert results["tensor"][1].isnan().any() and not results["tensor"][1].isnan().all(), "xnor: that channel"
    assert results["tensor"][4].isnan().tolist() == [False, True, False, True]


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("name", [*QUANTIZERS, "xnor", "affine"])
def test_under_autocast_a_bf16_activation_is_read_as_is_and_never_copied_to_float32(name: str, dev: str) -> None:
    """Same output (float32) and gradients as quantizing x.float(); backward keeps x itself (the tensor the
    previous layer already saved), not a float32 copy: half the activation memory a copy would add per layer."""
    import copy

    bits = 1 if name == "xnor" else 4
    x = sample("act", name == "xnor", dev, True).to(torch.bfloat16)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(dev)
    with backend(triton_name(dev)):
        reference_quantizer = build(name, bits, "act", x.float())
        quantizer = copy.deepcopy(reference_quantizer)
        wide = x.float().requires_grad_()
        expected = reference_quantizer(wide)
        expected.backward(g)
        low = x.clone().requires_grad_()
        saved = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t)
            return t

        with torch.autocast(dev, dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            got = quantizer(low)
        got.backward(g)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert low.grad.dtype == torch.bfloat16 and torch.equal(low.grad, wide.grad.to(torch.bfloat16))
    for (key, p), (_, p_ref) in zip(quantizer.named_parameters(), reference_quantizer.named_parameters()):
        assert torch.allclose(p.grad, p_ref.grad, rtol=1e-6, atol=1e-9), key
    for key, value in quantizer.state_dict().items():
        assert torch.equal(value, reference_quantizer.state_dict()[key]), key
    assert not [t for t in saved if t.dtype == torch.float32 and t.shape == x.shape], "no float32 copy saved"
    assert any(t.untyped_storage().data_ptr() == low.untyped_storage().data_ptr() for t in saved)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("name", [*QUANTIZERS, "xnor", "twn", "affine"])
def test_an_autocast_training_step_on_triton_equals_the_reference(name: str, dev: str, monkeypatch) -> None:
    """A whole training step under bf16 autocast (cnn_bn with every layer quantized, 28x28 inputs): the Triton
    path (activations read in bf16) gives the loss and gradients of the eager reference, which quantizes float32
    copies."""
    from qrun.models import get_model
    from qrun.quant import initialize_from_data, quantize_model

    if dev == "cpu":  # one interpreted program per launch
        from qrun.quant.kernels import triton_backend

        monkeypatch.setattr(triton_backend, "BLOCK", 1 << 16)

    outcomes = []
    for which in (triton_name(dev), "tensor"):
        with backend(which):
            torch.manual_seed(0)
            bits = {"xnor": 1, "twn": 2}.get(name, 4)
            model = get_model("cnn_bn", num_classes=10, in_channels=1)
            quantize_model(model, name, bits, bits, name != "twn", first_last="quantize")
            model.to(dev).train()
            x, target = torch.randn(4, 1, 28, 28).to(dev), torch.tensor([1, 7, 3, 2], device=dev)
            initialize_from_data(model, [x])
            with torch.autocast(dev, dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
            outcomes.append((loss.detach(), [p.grad.float() for p in model.parameters() if p.grad is not None]))
    (loss_t, grads_t), (loss_r, grads_r) = outcomes
    assert torch.isfinite(loss_t) and torch.allclose(loss_t, loss_r, rtol=1e-6, atol=0)
    assert len(grads_t) == len(grads_r)
    # The straight-through passes agree bit for bit; DSQ's phi derivative to float rounding, which the bf16
    # convolutions' backward can turn into one bf16 ulp (2^-8 relative) in the first layer's gradient.
    tolerance = 2 ** -8 if name == "dsq" else 1e-5
    for g_t, g_r in zip(grads_t, grads_r):
        assert torch.allclose(g_t, g_r, rtol=10 * tolerance, atol=tolerance * max(1.0, float(g_r.abs().max())))


# ------------------------------------------------------------------------------------------- step counts
class OpCounter(TorchDispatchMode):
    """Counts aten calls: all of them, the ones that launch work (allocations and views launch nothing), and
    `_local_scalar_dense`, the op behind every `.item()`/`float(t)`/`bool(t)`: a host sync on CUDA."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = self.launching = self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        packet = func.overloadpacket
        if packet is torch.ops.aten._local_scalar_dense:
            self.syncs += 1
        if not (func.is_view or packet in NON_LAUNCHING):
            self.launching += 1
        return func(*args, **(kwargs or {}))


NON_LAUNCHING = {torch.ops.aten.empty, torch.ops.aten.empty_like, torch.ops.aten.empty_strided,
                 torch.ops.aten.new_empty, torch.ops.aten.new_empty_strided, torch.ops.aten.detach,
                 torch.ops.aten.alias}
STEP_QUANTIZERS = ["none", *QUANTIZERS, "xnor", "twn", "affine"]


def triton_launches() -> int:
    import sys

    module = sys.modules.get("qrun.quant.kernels.triton_backend")
    return 0 if module is None else module.launches


def count_training_step(name: str, dev: str, autocast: bool = False) -> dict[str, object]:
    """One resnet20 step (forward, backward, SGD step) after initialisation and a warm-up step, W4A4 (xnor W1A1,
    twn W2 with float inputs), quantize_input=true, batch 2 of 8x8 images, on the path CUDA takes; with
    `autocast`, the forward under bf16 autocast (amp=true)."""
    from torch import nn

    from qrun.models import get_model
    from qrun.quant import initialize_from_data, quantize_model, quantizer_parameters, quantizers

    torch.manual_seed(0)
    bits = {"xnor": 1, "twn": 2}.get(name, 4)
    model = get_model("resnet20", num_classes=10, in_channels=3)
    quantize_model(model, name, bits, bits, name != "twn")
    model.to(dev).train()
    x = torch.randn(2, 3, 8, 8, device=dev)
    target = torch.tensor([1, 7], device=dev)
    initialize_from_data(model, [x])
    quant_ids = {id(p) for p in quantizer_parameters(model)}
    groups = [{"params": [p for p in model.parameters() if id(p) not in quant_ids], "weight_decay": 5e-4},
              {"params": [p for p in model.parameters() if id(p) in quant_ids], "weight_decay": 0.0}]
    optimizer = torch.optim.SGD([g for g in groups if g["params"]], lr=0.01, momentum=0.9, foreach=True)

    def phases() -> dict[str, tuple[int, int, int, int]]:
        counts = {}
        for phase in ("forward", "backward", "step"):
            counter, launched = OpCounter(), triton_launches()
            with counter:
                if phase == "forward":
                    with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16, enabled=autocast):
                        loss = nn.functional.cross_entropy(model(x), target)
                elif phase == "backward":
                    loss.backward()
                else:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            counts[phase] = (counter.calls, counter.launching, counter.syncs, triton_launches() - launched)
        return counts

    with backend("tensor"):
        phases()  # warm-up (momentum buffers, lazy state), on the fast reference: the interpreter is slow
    return {"phases": phases(), "quantizers": sum(1 for _ in quantizers(model))}


def step_counts_on_the_device_path(dev: str, monkeypatch, autocast: bool = False) -> dict[str, dict]:
    """count_training_step for float and every quantizer, on the Triton backend CUDA takes."""
    if dev == "cpu":  # one interpreted program per launch (its cost is per program, not per element)
        from qrun.quant.kernels import triton_backend

        monkeypatch.setattr(triton_backend, "BLOCK", 1 << 16)
    with backend(triton_name(dev)):
        return {name: count_training_step(name, dev, autocast) for name in STEP_QUANTIZERS}


@pytest.mark.parametrize("dev", DEVICES)
def test_a_training_step_on_the_device_path_never_syncs_and_adds_few_launches(dev: str, monkeypatch) -> None:
    counts = step_counts_on_the_device_path(dev, monkeypatch)
    float_phases = counts["none"]["phases"]
    lines = []
    for name in STEP_QUANTIZERS:
        phases, q = counts[name]["phases"], counts[name]["quantizers"]
        assert all(p[2] == 0 for p in phases.values()), f"{name}: host syncs in a step: {phases}"
        if name == "none":
            continue
        extra = {phase: phases[phase][1] - float_phases[phase][1] for phase in phases}
        lines.append(f"{name}: {q} quantizers; launching aten ops fwd/bwd/step {phases['forward'][1]}/"
                     f"{phases['backward'][1]}/{phases['step'][1]} (float {float_phases['forward'][1]}/"
                     f"{float_phases['backward'][1]}/{float_phases['step'][1]}), extra per quantizer fwd "
                     f"{extra['forward'] / q:.2f} bwd {extra['backward'] / q:.2f}; all aten calls fwd/bwd "
                     f"{phases['forward'][0]}/{phases['backward'][0]}; Triton launches fwd/bwd "
                     f"{phases['forward'][3]}/{phases['backward'][3]}")
        assert extra["forward"] <= 2 * q and extra["backward"] <= 2 * q, lines[-1]
        assert phases["forward"][3] > 0, "the Triton kernels ran"
    print("\n" + "\n".join(lines))


# Extra aten launches per quantizer call under bf16 AMP (over the float model's autocast step), forward/backward,
# measured: uniform 5/2, lsq 3/2, pact 4/2, dorefa 3.5/2, dsq 14/8, xnor 3.5/2.5, twn 4/1, affine 12/1 (the
# activations' levels are one Triton decode of their codes, beside these). The exact-levels path
# (qrun/quant/amp.py) costs the grid's scalars, the weight's levels, the output rescale, and for grids with
# offsets (dsq, affine activations) window-sum convolutions and one addcmul each.
AUTOCAST_EXTRA = {"forward": 16, "backward": 8}


@pytest.mark.parametrize("dev", DEVICES)
def test_an_autocast_training_step_on_the_device_path_never_syncs(dev: str, monkeypatch) -> None:
    """amp=true keeps the step sync-free: the integer levels, the grid scalars and the rescale stay on the device."""
    counts = step_counts_on_the_device_path(dev, monkeypatch, autocast=True)
    float_phases = counts["none"]["phases"]
    lines = []
    for name in STEP_QUANTIZERS:
        phases, q = counts[name]["phases"], counts[name]["quantizers"]
        assert all(p[2] == 0 for p in phases.values()), f"{name} under autocast: host syncs in a step: {phases}"
        if name == "none":
            continue
        extra = {phase: (phases[phase][1] - float_phases[phase][1]) / q for phase in ("forward", "backward")}
        lines.append(f"{name} (bf16 autocast): extra aten launches per quantizer fwd {extra['forward']:.2f} "
                     f"bwd {extra['backward']:.2f}; Triton launches fwd/bwd {phases['forward'][3]}/"
                     f"{phases['backward'][3]}")
        assert all(extra[phase] <= AUTOCAST_EXTRA[phase] for phase in extra), lines[-1]
    print("\n" + "\n".join(lines))


# ------------------------------------------------------------------------------------------------ NaN
# Triton's tl.maximum/tl.minimum drop a NaN operand by default (PTX max.f32; the interpreter's np.fmax), torch's
# clamp keeps it: a diverging activation or parameter would silently become a valid level on the Triton path.
@pytest.mark.parametrize("dev", DEVICES)
def test_nan_propagates_through_levels_range_average_and_projection_as_in_the_reference(dev: str) -> None:
    x = torch.tensor([0.3, float("nan"), -0.7, 2.0], device=dev)
    results = {}
    for which in (triton_name(dev), "tensor"):
        with backend(which):
            y = device.grid_quantize(x, torch.ones((), device=dev), 7.0, -7, 7)
            d = device.dsq_quantize(x, torch.tensor(-1.0, device=dev), torch.tensor(1.0, device=dev),
                                    torch.tensor(0.2, device=dev), 15)
            nan_range = torch.ones((), device=dev)
            y_nan_step = device.grid_quantize(x, torch.tensor(float("nan"), device=dev), 7.0, -7, 7)
            device.ema_update(nan_range, torch.tensor(float("nan"), device=dev), 0.1, 1e-8)
            alpha, lower, upper = (torch.tensor(v, device=dev) for v in (float("nan"), 0.0, float("nan")))
            device.dsq_project(alpha, lower, upper, 1e-4, 0.5, 1e-6)
            results[which] = [t.isnan().cpu() for t in (y, d, y_nan_step, nan_range, alpha, upper)]
    for got, expected in zip(*results.values()):
        assert torch.equal(got, expected)
    assert results["tensor"][0].tolist() == [False, True, False, False]


@pytest.mark.parametrize("dev", DEVICES)
def test_nan_through_sign_and_the_affine_observer_as_in_the_reference(dev: str) -> None:
    x = torch.tensor([0.3, float("nan"), -0.7, 2.0, 0.0], device=dev)
    results = {}
    for which in (triton_name(dev), "tensor"):
        with backend(which):
            binary = build_quantizer("xnor", 1, "act").to(dev).train()
            binary.finish_calibration()
            xg = x.clone().requires_grad_()
            signs = binary(xg)
            signs.backward(torch.ones_like(signs))
            observer = build_quantizer("affine", 8, "act").to(dev).train()
            observer(x)
            results[which] = (signs.detach(), xg.grad, observer.min_val, observer.max_val)
    for got, expected in zip(*results.values()):
        assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.nan_to_num(), expected.nan_to_num())
    assert results["tensor"][0].tolist() == [1.0, -1.0, -1.0, 1.0, 1.0] and results["tensor"][2].isnan()


@pytest.mark.parametrize("dev", DEVICES)
def test_a_nan_stays_nan_when_stored_as_bfloat16(dev: str) -> None:
    """CUDA's arithmetic NaN is 0x7FFFFFFF; the kernels' round-to-nearest-even on the bits must not carry it into
    the sign bit (it would become -0.0)."""
    nan = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32)[0]
    aff = torch.stack([nan, torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0)]).to(dev)
    codes = torch.arange(-3, 4, dtype=torch.int8, device=dev)
    with backend(triton_name(dev)):
        y = device.decode(codes, aff, 0, torch.bfloat16)
    assert y.isnan().all(), y


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_custom_ops_fake_implementations_match_the_triton_outputs(dtype: torch.dtype, dev: str) -> None:
    """torch.compile plans buffers from the fake outputs: dtype and strides must be what the kernels return."""
    x = torch.randn(2, 4, 5, 5, dtype=dtype).to(dev).contiguous(memory_format=torch.channels_last)
    scalar = lambda v: torch.tensor(v, device=dev)  # noqa: E731
    cases = [(torch.ops.qrun.grid_quantize, (x, scalar(1.5), 7.0, -float("inf"), 0, 7, 1, 0.1)),
             (torch.ops.qrun.dsq_quantize, (x, scalar(-1.0), scalar(1.0), scalar(0.2), 15)),
             (torch.ops.qrun.dorefa_weight, (torch.randn(4, 3, 3, 3, dtype=dtype).to(dev), 15))]
    with backend(triton_name(dev)):
        for op, args in cases:
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
