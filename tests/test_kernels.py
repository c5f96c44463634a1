"""The fused CPU kernels (qrun/quant/kernels.c) against the eager ops they replace, and their fallbacks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from qrun.quant import QuantConv2d, build_quantizer, kernels
from qrun.quant.ste import CODES_ATTR, decode, grid_codes

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="no C compiler: the kernels cannot be built here")
GRID_ACT = ["uniform", "lsq", "pact", "dorefa"]


@pytest.fixture
def eager(monkeypatch: pytest.MonkeyPatch):
    """A context in which every quantizer takes its eager path."""
    def switch_off():
        monkeypatch.setattr(kernels, "usable", lambda *tensors: None)
    return switch_off


def act_quantizer(name: str, bits: int, data: torch.Tensor) -> nn.Module:
    q = build_quantizer(name, bits, "act")
    q.calibrating = True
    q(data)
    q.calibrating = False
    q.finish_calibration()
    return q


@needs_compiler
def test_kernels_build_and_share_torchs_openmp_runtime() -> None:
    assert kernels.library() is not None
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(runtimes) == 1, f"one OpenMP runtime (one thread pool), found {runtimes}"


@needs_compiler
@pytest.mark.parametrize("qmin, qmax", [(-7, 7), (0, 15), (0, 255), (-127, 127)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_grid_forward_and_decode_are_bit_identical_to_eager(qmin, qmax, channels_last, eager) -> None:
    torch.manual_seed(qmax)
    x = torch.randn(8, 5, 12, 12) * 3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    step = 4.0 / qmax
    fused = grid_codes(x, step, qmin, qmax, compact=True)
    codes = getattr(fused, CODES_ATTR)
    assert codes.fused and fused.stride() == x.stride()
    eager()
    reference = grid_codes(x, step, qmin, qmax, compact=True)
    assert torch.equal(fused, reference)
    assert torch.equal(fused.signbit(), reference.signbit()), "-0.0 where eager gives -0.0"
    assert torch.equal(codes.codes, getattr(reference, CODES_ATTR).codes)
    assert torch.equal(decode(codes), fused), "the saved codes rebuild the forward output exactly"


@needs_compiler
@pytest.mark.parametrize("name, signed", [(name, signed) for name in [*GRID_ACT, "dsq"] for signed in (False, True)
                                          if not (signed and name == "dorefa")])  # DoReFa clips to [0, 1]
def test_fused_quantizers_match_their_eager_path(name: str, signed: bool, eager) -> None:
    torch.manual_seed(1)
    x = torch.randn(16, 8, 20, 20)
    if not signed:
        x = x.relu()
    g = torch.randn_like(x)
    results = []
    for path in ("fused", "eager"):
        if path == "eager":
            eager()
        q = act_quantizer(name, 4, x)
        q.train()
        xg = x.clone().requires_grad_()
        y = q(xg)
        y.backward(g)
        results.append((y.detach(), xg.grad, [p.grad for p in q.parameters()]))
    (y_f, gx_f, p_f), (y_e, gx_e, p_e) = results
    assert torch.equal(y_f, y_e)
    if name == "dsq":  # phi's derivative: kernels.c's own exp and operation order, not eager's
        assert torch.allclose(gx_f, gx_e, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(gx_f, gx_e)
    assert len(p_f) == len(p_e)
    for a, b in zip(p_f, p_e):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-3 * max(1.0, b.abs().item()))


@needs_compiler
def test_fused_dsq_levels_round_like_eager_at_level_boundaries(eager) -> None:
    """Eager computes (x - l)/Delta + 1/2 as one add-with-alpha, a fused multiply-add on FMA CPUs: a kernel that
    rounded twice would put ~100 of these x, each right at a level boundary, one whole level away."""
    from qrun.quant.dsq import _DSQFunction
    lower, upper, levels = float(np.float32(-1.7)), float(np.float32(2.3)), 255  # as the quantizer reads them
    delta = (upper - lower) / levels
    inv, shift = np.float32(1.0 / delta), np.float32(0.5 - lower / delta)
    boundaries = np.float32([lower + (k + 0.5) * delta for k in range(levels)])
    x = (boundaries.view(np.int32)[:, None] + np.arange(-50, 50, dtype=np.int32)).view(np.float32)  # 100 ulps each
    twice = np.floor(x * inv + shift)  # float32 product, then float32 sum
    once = np.floor((x.astype(np.float64) * np.float64(inv) + np.float64(shift)).astype(np.float32))
    assert (twice != once).sum() > 50, "the sample holds points where one and two roundings disagree"
    x = torch.from_numpy(x.reshape(levels * 4, 25))
    g = torch.randn_like(x)
    results = []
    for path in ("fused", "eager"):
        if path == "eager":
            eager()
        xg = x.clone().requires_grad_()
        lo, hi = torch.tensor(lower, requires_grad=True), torch.tensor(upper, requires_grad=True)
        y, _ = _DSQFunction.apply(xg, lo, hi, torch.tensor(0.2), levels, False, False)
        y.backward(g)
        results.append((y.detach(), xg.grad, lo.grad, hi.grad))
    (y_f, gx_f, gl_f, gu_f), (y_e, gx_e, gl_e, gu_e) = results
    assert torch.equal(y_f, y_e)
    assert torch.allclose(gx_f, gx_e, rtol=1e-5, atol=1e-6)
    assert torch.allclose(gl_f, gl_e, rtol=1e-4) and torch.allclose(gu_f, gu_e, rtol=1e-4)


@needs_compiler
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fused_dorefa_weight_matches_its_eager_path(bits: int, eager) -> None:
    torch.manual_seed(bits)
    w = torch.randn(24, 16, 3, 3) * 0.3
    w[3, 2, 1, 1] = w.abs().max()  # ties at the peak, both signs: the max path splits its gradient three ways
    w[7, 0, 0, 2] = -w[3, 2, 1, 1]
    g = torch.randn_like(w)
    wg = w.clone().requires_grad_()  # kernel forward, then a gradient the kernel cannot take: eager backward
    build_quantizer("dorefa", bits, "weight")(wg).backward(g.transpose(0, 1).contiguous().transpose(0, 1))
    gw_mixed = wg.grad
    results = []
    for path in ("fused", "eager"):
        if path == "eager":
            eager()
        wg = w.clone().requires_grad_()
        y = build_quantizer("dorefa", bits, "weight")(wg)
        y.backward(g)
        results.append((y.detach(), wg.grad))
    (y_f, gw_f), (y_e, gw_e) = results
    assert torch.equal(y_f, y_e)
    assert y_f.min() == -1.0 and y_f.max() == 1.0, "both signs of the tied peak reach the outer levels"
    at_peak = torch.tanh(w).abs() == torch.tanh(w).abs().max()
    assert int(at_peak.sum()) == 3  # the original maximum and its two copies
    assert torch.equal(gw_f[~at_peak], gw_e[~at_peak]), "away from the peak the gradient rounds like eager"
    assert torch.allclose(gw_f[at_peak], gw_e[at_peak], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(gw_f[at_peak], (g / torch.tanh(w).abs().max() * (1 - torch.tanh(w) ** 2))[at_peak]), \
        "the peak elements carry the max path's correction"
    assert torch.allclose(gw_mixed, gw_e, rtol=1e-6, atol=1e-7)


@needs_compiler
@pytest.mark.parametrize("name", [*GRID_ACT, "dsq"])
def test_gradient_is_overwritten_only_where_nobody_else_holds_it(name: str) -> None:
    torch.manual_seed(2)
    x = torch.relu(torch.randn(4, 6, 10, 10))
    g = torch.randn_like(x)
    kept = g.clone()
    q = act_quantizer(name, 3, x)
    q(x.clone().requires_grad_()).backward(g)
    assert torch.equal(g, kept), "a standalone quantizer leaves the caller's gradient alone"

    conv = nn.Conv2d(6, 5, 3, padding=1)
    grads = []
    for in_place in (True, False):
        layer = QuantConv2d.from_float(conv, None, act_quantizer(name, 3, x))
        assert layer.input_quantizer.grad_in_place
        layer.input_quantizer.grad_in_place = in_place
        xg = x.clone().requires_grad_()
        layer(xg).square().sum().backward()
        grads.append([xg.grad, layer.weight.grad, *(p.grad for p in layer.input_quantizer.parameters())])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_quantizers_work_without_the_kernels() -> None:
    code = ("import torch; from qrun.quant import build_quantizer, kernels; assert kernels.library() is None; "
            "x = torch.rand(2, 3, 8, 8, requires_grad=True); q = build_quantizer('dsq', 2, 'act'); "
            "q(x).sum().backward(); assert x.grad is not None and q.alpha.grad is not None")
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, kernels.ENV_SWITCH: "0"},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_failed_build_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("QRUN_CACHE_DIR", str(tmp_path))
    kernels.library.cache_clear()
    try:
        assert kernels.library() is None
    finally:
        kernels.library.cache_clear()


@needs_compiler
def test_dispatch_picks_a_backend_per_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.rand(2, 3, 4, 4)
    assert kernels.backend(x) == "cpu" and not kernels.device_path(x)
    assert kernels.backend(x.contiguous(memory_format=torch.channels_last)) == "cpu"
    assert kernels.backend(x.double()) == "eager" and kernels.backend(x.transpose(1, 2)) == "eager"
    monkeypatch.setattr(kernels, "_forced", "tensor")  # the path CUDA takes, on the eager tensor reference
    assert kernels.device_path(x) and kernels.backend(x) == "eager"


def test_an_unknown_backend_is_refused_with_the_accepted_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    from qrun.errors import QrunError

    monkeypatch.setattr(kernels, "_forced", "gpu")
    with pytest.raises(QrunError, match=r"QRUN_BACKEND='gpu' .*auto, triton, tensor"):
        build_quantizer("lsq", 4, "act")(torch.rand(2, 3))
