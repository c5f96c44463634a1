"""Every Triton kernel compiles for an H200 (sm_90) here, without a GPU: Triton lowers to PTX and runs the
bundled ptxas ahead of time. The interpreter (tests/test_triton_interpreter.py) checks what the kernels compute;
this checks that CUDA can build them, and that the forward kernels keep the floating-point contract that makes
their levels equal eager's: no fused multiply-add, no approximate division."""

from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("ahead-of-time compilation needs the real Triton compiler", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from qrun.quant.kernels import triton_backend as tb  # noqa: E402

F32, I32, C = "fp32", "i32", "constexpr"


def ptr(dtype: str = "fp32") -> str:
    return f"*{dtype}"


FORWARD = {"x_ptr": ptr("bf16"), "y_ptr": ptr("bf16"), "codes_ptr": ptr("i8"), "src_ptr": ptr(), "hi_ptr": ptr(),
           "aff_ptr": ptr(), "n": I32, "divisor": F32, "min_src": F32, "qmin": F32, "qmax": F32, "code_shift": F32,
           "lo_ratio": F32, "hi_ratio": F32, "DSQ": C, "CODES": C, "BLOCK": C}
KERNELS = [  # (kernel, signature, constexpr values, holds the exact-levels contract)
    *(("_forward_kernel", FORWARD, {"DSQ": dsq, "CODES": codes, "BLOCK": 1024}, True)
      for dsq in (False, True) for codes in (False, True)),
    ("_decode_kernel", {"codes_ptr": ptr("i8"), "y_ptr": ptr("fp16"), "aff_ptr": ptr(), "n": I32, "code_shift": F32,
                        "BLOCK": C}, {"BLOCK": 1024}, True),
    *(("_grid_backward_kernel", {"g_ptr": ptr(), "x_ptr": ptr(), "gx_ptr": ptr(), "aff_ptr": ptr(), "part_ptr": ptr(),
                                 "n": I32, "qmin": F32, "qmax": F32, "RULE": C, "SIGNED": C, "BLOCK": C},
       {"RULE": rule, "SIGNED": signed, "BLOCK": 1024}, True) for rule in (0, 1, 2) for signed in (False, True)),
    *(("_grid_finish_kernel", {"part_ptr": ptr(), "blocks": I32, "aff_ptr": ptr(), "out_ptr": ptr(), "grad_scale": F32,
                               "RULE": C, "RBLOCK": C}, {"RULE": rule, "RBLOCK": 1024}, False) for rule in (1, 2)),
    ("_dsq_backward_kernel", {"g_ptr": ptr("bf16"), "x_ptr": ptr("bf16"), "gx_ptr": ptr("bf16"), "lo_ptr": ptr(),
                              "hi_ptr": ptr(), "alpha_ptr": ptr(), "part_ptr": ptr(), "n": I32, "levels": F32,
                              "BLOCK": C}, {"BLOCK": 1024}, False),
    ("_dsq_finish_kernel", {"part_ptr": ptr(), "blocks": I32, "lo_ptr": ptr(), "hi_ptr": ptr(), "out_ptr": ptr(),
                            "levels": F32, "RBLOCK": C}, {"RBLOCK": 128}, False),
    ("_max_abs_kernel", {"t_ptr": ptr(), "part_ptr": ptr(), "n": I32, "BLOCK": C}, {"BLOCK": 1024}, True),
    ("_peak_kernel", {"part_ptr": ptr(), "blocks": I32, "peak_ptr": ptr(), "RBLOCK": C}, {"RBLOCK": 1024}, True),
    ("_dorefa_weight_kernel", {"t_ptr": ptr(), "y_ptr": ptr(), "peak_ptr": ptr(), "n": I32, "levels": F32,
                               "BLOCK": C}, {"BLOCK": 1024}, True),
    ("_dorefa_sums_kernel", {"g_ptr": ptr(), "t_ptr": ptr(), "peak_ptr": ptr(), "part_ptr": ptr(), "n": I32,
                             "BLOCK": C}, {"BLOCK": 1024}, False),
    ("_dorefa_grad_kernel", {"g_ptr": ptr(), "t_ptr": ptr(), "gw_ptr": ptr(), "peak_ptr": ptr(), "part_ptr": ptr(),
                             "blocks": I32, "n": I32, "BLOCK": C, "RBLOCK": C}, {"BLOCK": 1024, "RBLOCK": 256}, False),
    ("_ema_kernel", {"range_ptr": ptr(), "batch_ptr": ptr("bf16"), "momentum": F32, "floor": F32}, {}, True),
    ("_dsq_project_kernel", {"alpha_ptr": ptr(), "lo_ptr": ptr(), "hi_ptr": ptr(), "alpha_min": F32,
                             "alpha_max": F32, "min_width": F32, "rel_width": F32}, {}, True),
    *(("_sign_forward_kernel", {"x_ptr": ptr("bf16"), "y_ptr": ptr("bf16"), "codes_ptr": ptr("i8"), "aff_ptr": ptr(),
                                "n": I32, "CODES": C, "BLOCK": C}, {"CODES": codes, "BLOCK": 1024}, True)
      for codes in (False, True)),
    ("_sign_backward_kernel", {"g_ptr": ptr(), "x_ptr": ptr(), "gx_ptr": ptr(), "n": I32, "BLOCK": C},
     {"BLOCK": 1024}, True),
    ("_xnor_weight_forward_kernel", {"w_ptr": ptr(), "y_ptr": ptr(), "alpha_ptr": ptr(), "row": I32, "row_f": F32,
                                     "RBLOCK": C}, {"RBLOCK": 1024}, True),
    ("_xnor_weight_backward_kernel", {"g_ptr": ptr(), "w_ptr": ptr(), "gw_ptr": ptr(), "alpha_ptr": ptr(), "row": I32,
                                      "row_f": F32, "RBLOCK": C}, {"RBLOCK": 1024}, True),
    ("_abs_sum_kernel", {"w_ptr": ptr(), "part_ptr": ptr(), "n": I32, "BLOCK": C}, {"BLOCK": 1024}, True),
    ("_ternary_sums_kernel", {"w_ptr": ptr(), "abs_part_ptr": ptr(), "part_ptr": ptr(), "delta_ptr": ptr(), "n": I32,
                              "n_f": F32, "blocks": I32, "threshold_factor": F32, "BLOCK": C, "RBLOCK": C},
     {"BLOCK": 1024, "RBLOCK": 256}, True),
    ("_ternary_kernel", {"w_ptr": ptr(), "y_ptr": ptr(), "part_ptr": ptr(), "delta_ptr": ptr(), "alpha_ptr": ptr(),
                         "n": I32, "blocks": I32, "BLOCK": C, "RBLOCK": C}, {"BLOCK": 1024, "RBLOCK": 256}, True),
    ("_min_max_kernel", {"x_ptr": ptr("bf16"), "part_ptr": ptr(), "n": I32, "BLOCK": C}, {"BLOCK": 1024}, True),
    *(("_observer_kernel", {"part_ptr": ptr(), "blocks": I32, "min_ptr": ptr(), "max_ptr": ptr(), "qp_ptr": ptr(),
                            "averaging_constant": F32, "qmin": F32, "qmax": F32, "eps": F32, "AVERAGE": C,
                            "SYMMETRIC": C, "RBLOCK": C}, {"AVERAGE": average, "SYMMETRIC": symmetric, "RBLOCK": 1024},
       True) for average in (False, True) for symmetric in (False, True)),
    ("_channel_observer_kernel", {"w_ptr": ptr(), "min_ptr": ptr(), "max_ptr": ptr(), "qp_ptr": ptr(), "row": I32,
                                  "channels": I32, "qmin": F32, "qmax": F32, "eps": F32, "RBLOCK": C},
     {"RBLOCK": 1024}, True),
    *(("_qparams_kernel", {"min_ptr": ptr(), "max_ptr": ptr(), "qp_ptr": ptr(), "channels": I32, "qmin": F32,
                           "qmax": F32, "eps": F32, "SYMMETRIC": C, "RBLOCK": C},
       {"SYMMETRIC": symmetric, "RBLOCK": 1024}, True) for symmetric in (False, True)),
    *(("_affine_forward_kernel", {"x_ptr": ptr("bf16"), "y_ptr": ptr("bf16"), "qp_ptr": ptr(), "n": I32, "row": I32,
                                  "channels": I32, "qmin": F32, "qmax": F32, "PER_CHANNEL": C, "BLOCK": C},
       {"PER_CHANNEL": per_channel, "BLOCK": 1024}, True) for per_channel in (False, True)),
    *(("_affine_backward_kernel", {"g_ptr": ptr(), "x_ptr": ptr(), "gx_ptr": ptr(), "qp_ptr": ptr(), "n": I32,
                                   "row": I32, "channels": I32, "qmin": F32, "qmax": F32, "PER_CHANNEL": C,
                                   "BLOCK": C}, {"PER_CHANNEL": per_channel, "BLOCK": 1024}, True)
      for per_channel in (False, True)),
]


def test_every_kernel_builds_for_sm90_and_the_exact_ones_keep_the_contract() -> None:
    built = set()
    for name, signature, constants, exact in KERNELS:
        names = list(signature)
        source = ASTSource(getattr(tb, name), signature=signature,
                           constexprs={(names.index(k),): v for k, v in constants.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})
        ptx = compiled.asm["ptx"]
        assert ".target sm_90" in ptx and compiled.asm.get("cubin"), name
        if exact:
            assert "fma." not in ptx and "div.full" not in ptx and "div.approx" not in ptx, (name, constants)
        built.add(name)
    launched = {n for n in dir(tb) if n.startswith("_") and n.endswith("_kernel")}
    assert built == launched, f"kernels without a build check: {sorted(launched - built)}"
