"""Mixed precision: under bf16/fp16 autocast the conv/linear of a quantized layer sees exactly the levels of the
float32 quantizer, for every quantizer and bit width, and quantized models train (CPU autocast)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import pytest
import torch
from torch import nn

from conftest import compose_config, run_training
from qrun import engine, guard
from qrun.config import validate
from qrun.errors import QrunError
from qrun.models import get_model
from qrun.quant import QuantConv2d, QuantLinear, build_quantizer, initialize_from_data, kernels, quantize_model
from qrun.quant.base import IntegerGrid, Quantizer, quantizer_class

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
EXACT = {torch.bfloat16: 256, torch.float16: 2048}  # every integer up to this is representable
# Up to these bits every grid's levels (at most 2^b - 1) fit the dtype, so the layer must keep the fast path.
INTEGER_PATH_BITS = {torch.bfloat16: 8, torch.float16: 11}
QUANTIZERS = ["uniform", "lsq", "pact", "dorefa", "dsq", "xnor", "twn", "affine"]


def build(name: str, bits: int, kind: str, **options) -> Optional[Quantizer]:
    try:
        return build_quantizer(name, bits, kind, **options)
    except QrunError:  # e.g. uniform/lsq weights need 2 bits, twn has no activation form
        return None


def accepted_bits(name: str) -> list[int]:
    """Every width the quantizer's weight side accepts (uniform and lsq weights need 2 bits, their inputs 1)."""
    cls = quantizer_class(name)
    return [bits for bits in range(cls.min_bits, cls.max_bits + 1) if build(name, bits, "weight") is not None]


CASES = [(name, bits, "conv") for name in QUANTIZERS for bits in accepted_bits(name)]
# The linear layer takes the same code path: representative widths (binary, below, at and above the bf16 limit).
CASES += [(name, bits, "linear") for name in QUANTIZERS for bits in accepted_bits(name) if bits in (1, 2, 4, 8, 9, 16)]


def quantized_layer(layer_type: str, name: str, bits: int, **options) -> nn.Module:
    weight_q, act_q = build_quantizer(name, bits, "weight", **options), build(name, bits, "act", **options)
    if layer_type == "conv":
        return QuantConv2d(3, 4, 3, padding=1, weight_quantizer=weight_q, input_quantizer=act_q)
    return QuantLinear(48, 5, weight_quantizer=weight_q, input_quantizer=act_q)


def layer_input(layer_type: str, bits: int) -> torch.Tensor:
    # Wide real ranges (the 8-bit U(0, 100) case of issue 11); signed data at b >= 2 gives signed grids, DSQ a
    # lower bound below 0 and affine a zero point inside the grid. Binary grids get non-negative data.
    shape = (2, 3, 10, 10) if layer_type == "conv" else (12, 48)
    x = torch.rand(shape) * 100.0
    return x - 20.0 if bits > 1 else x


def clone_grid(grid: Optional[IntegerGrid]) -> Optional[IntegerGrid]:
    if grid is None:
        return None
    return grid._replace(scale=grid.scale.clone(), offset=None if grid.offset is None else grid.offset.clone())


class Recorder:
    """Wraps a quantized layer: records the fp32 quantizer outputs and the tensors that enter its conv/linear."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer, self.records = layer, []
        self._compute_quantized, self._compute = layer.compute_quantized, layer.compute
        layer.compute_quantized, layer.compute = self.compute_quantized, self.compute

    def compute_quantized(self, xq, wq, bias):
        # Cloned: a grid may view a learned parameter, which the optimizer step then changes in place.
        grids = tuple(None if q is None else clone_grid(q.integer_grid(t))
                      for q, t in ((self.layer.input_quantizer, xq), (self.layer.weight_quantizer, wq)))
        self.records.append({"reference": (xq.detach(), wq.detach()), "grids": grids})
        return self._compute_quantized(xq, wq, bias)

    def compute(self, x, w, bias):
        self.records[-1]["fed"] = (x.detach(), w.detach())
        return self._compute(x, w, bias)


def assert_exact_levels(fed: torch.Tensor, reference: torch.Tensor, grid, dtype: torch.dtype) -> None:
    """`fed` holds the fp32 quantizer output's levels exactly: as is (float32 path) or as its integers k
    (bf16), or k times one power of two (fp16)."""
    channels = zip(fed, reference) if grid is not None and grid.scale.numel() > 1 else [(fed, reference)]
    for fed_part, reference_part in channels:  # per-channel grids (xnor, affine) have levels per channel
        assert fed_part.unique().numel() == reference_part.unique().numel(), "levels merged on the way into the conv"
    if fed.dtype == torch.float32:
        assert torch.equal(fed, reference)
        return
    assert fed.dtype == dtype and grid.max_level <= EXACT[dtype]
    offset = 0.0 if grid.offset is None else grid.offset
    levels = (reference - offset) / grid.scale
    assert (levels - levels.round()).abs().max() < 1e-3, "integer_grid does not describe the quantizer output"
    levels = levels.round()
    assert levels.abs().max() <= grid.max_level
    if grid.scale.numel() > 1:  # per channel: levels and feed are compared channel by channel
        unit = fed.float().flatten(1).abs().amax(1) / levels.flatten(1).abs().amax(1).clamp_min(1)
        unit = unit.reshape(-1, *([1] * (fed.dim() - 1)))
    else:
        unit = fed.float().abs().max() / levels.abs().max().clamp_min(1)
    if dtype == torch.bfloat16:
        assert torch.all(unit == 1.0)
    else:
        assert torch.all(torch.frexp(unit).mantissa == 0.5), "fp16 levels are scaled by a power of two only"
    assert torch.equal(fed.float(), levels * unit)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def check_layer(name: str, bits: int, layer_type: str, dtype: torch.dtype, device: str = "cpu") -> None:
    """One layer, float32 then under autocast: exact levels into the conv, output and gradients within rounding."""
    torch.manual_seed(bits)
    layer = quantized_layer(layer_type, name, bits).to(device)
    x = layer_input(layer_type, bits).to(device)
    initialize_from_data(layer, [x])
    layer.eval()  # frozen ranges: the float32 and the autocast pass quantize with the same values
    recorder = Recorder(layer)

    x32 = x.clone().requires_grad_()
    reference = layer(x32)
    reference.square().mean().backward()
    grads32 = [x32.grad, layer.weight.grad.clone()]
    layer.zero_grad()
    x16 = x.clone().requires_grad_()
    with torch.autocast(device, dtype=dtype):
        out = layer(x16)
    out.float().square().mean().backward()
    grads16 = [x16.grad, layer.weight.grad]

    record = recorder.records[-1]
    for fed, ref, grid in zip(record["fed"], record["reference"], record["grids"]):
        if grid is not None:  # a quantized tensor (twn has no activation quantizer: its input is just cast)
            assert_exact_levels(fed, ref, grid, dtype)
    if bits <= INTEGER_PATH_BITS[dtype]:
        assert record["fed"][1].dtype == dtype, "a grid the dtype holds must keep the low-precision conv"
    # The output and the input and weight gradients are the float layer's up to the dtype's rounding. (A learned
    # scalar's gradient sums many terms of both signs, so its relative error under AMP can be large; finite here.)
    tolerance = 3e-2 if dtype == torch.bfloat16 else 5e-3
    assert relative_error(out, reference) < tolerance
    for g16, g32 in zip(grads16, grads32):
        if g32.abs().max() > 0:
            assert relative_error(g16, g32) < 5 * tolerance
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("name, bits, layer_type", CASES)
def test_the_conv_under_autocast_sees_exactly_the_fp32_levels(name: str, bits: int, layer_type: str,
                                                              dtype_name: str) -> None:
    check_layer(name, bits, layer_type, DTYPES[dtype_name])


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("name, bits", [(name, bits) for name in QUANTIZERS for bits in accepted_bits(name)
                                        if bits in (1, 2, 4, 8, 9)])
def test_on_the_device_path_the_conv_sees_exactly_the_fp32_levels(name: str, bits: int, dtype_name: str) -> None:
    """The path CUDA takes (forced here with its eager reference): its codes carry the device affine, and the bf16
    levels are decoded from them by the device decode, not from kernels.c's codes."""
    previous = kernels.forced()
    kernels.set_backend("tensor")
    try:
        check_layer(name, bits, "conv", DTYPES[dtype_name])
    finally:
        kernels.set_backend(previous)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("name, bits", [(name, bits) for name in QUANTIZERS for bits in accepted_bits(name)
                                        if bits in (1, 2, 4, 8, 9, 16)])
def test_cuda_autocast_sees_exactly_the_fp32_levels(name: str, bits: int, dtype_name: str) -> None:
    """The same on CUDA, where autocast's convolutions run on tensor cores."""
    check_layer(name, bits, "conv", DTYPES[dtype_name], device="cuda")


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("name, bits, options", [("affine", 4, {"per_channel": True}),
                                                 ("affine", 8, {"per_channel": True}),
                                                 ("xnor", 1, {"k_scaling": True}),
                                                 ("dorefa", 4, {"g_bits": 8})])
def test_exact_levels_with_options(name: str, bits: int, options: dict, dtype_name: str) -> None:
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    layer = quantized_layer("conv", name, bits, **options)
    x = layer_input("conv", bits)
    initialize_from_data(layer, [x])
    recorder = Recorder(layer)
    reference = layer(x)
    with torch.autocast("cpu", dtype=dtype):
        out = layer(x.clone().requires_grad_())
    out.float().sum().backward()
    record = recorder.records[-1]
    for fed, ref, grid in zip(record["fed"], record["reference"], record["grids"]):
        assert_exact_levels(fed, ref, grid, dtype)
    assert relative_error(out, reference) < 3e-2


def test_an_8_bit_grid_keeps_all_256_levels_under_bf16() -> None:
    """Cast to bf16, an 8-bit activation grid over U(0, 100) kept 236 of its 256 levels; fed as integers, all."""
    torch.manual_seed(0)
    layer = QuantConv2d(4, 4, 3, weight_quantizer=build_quantizer("uniform", 8, "weight"),
                        input_quantizer=build_quantizer("uniform", 8, "act"))
    x = torch.rand(2, 4, 32, 32) * 100.0
    initialize_from_data(layer, [x])
    recorder = Recorder(layer)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    fed = recorder.records[-1]["fed"][0]
    reference = recorder.records[-1]["reference"][0]
    assert reference.unique().numel() == 256 and reference.to(torch.bfloat16).unique().numel() == 236
    assert fed.dtype == torch.bfloat16 and torch.equal(fed.unique().float(), torch.arange(256.0))


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("geometry", [{"stride": 2, "padding": 1}, {"groups": 2, "padding": 2, "dilation": 2},
                                      {"groups": 4, "padding": 1}, {"padding": 0, "bias": True}])
def test_offsets_follow_the_conv_geometry(geometry: dict, dtype_name: str) -> None:
    """DSQ's offsets (both sides) through strided, grouped, dilated and unpadded convs: the window sums and counts
    match the float conv, zero padding included."""
    torch.manual_seed(0)
    layer = QuantConv2d(4, 8, 3, weight_quantizer=build_quantizer("dsq", 4, "weight"),
                        input_quantizer=build_quantizer("dsq", 4, "act"), **{"bias": False, **geometry})
    x = torch.rand(2, 4, 9, 9) * 10.0 + 5.0  # a lower bound far from 0: the input offset matters
    initialize_from_data(layer, [x])
    reference = layer(x)
    with torch.autocast("cpu", dtype=DTYPES[dtype_name]):
        out = layer(x)
    assert out.dtype == DTYPES[dtype_name]  # the integer path, not the float32 fallback
    assert relative_error(out, reference) < (3e-2 if dtype_name == "bf16" else 5e-3)


@pytest.mark.parametrize("name", ["uniform", "lsq", "pact", "dorefa", "dsq", "affine"])
def test_a_quantizer_under_autocast_computes_in_float32(name: str) -> None:
    """A bf16 input used to be quantized in bf16 arithmetic: ~0.5% of 4-bit outputs landed one level off."""
    torch.manual_seed(0)
    quantizer = build_quantizer(name, 4, "act")
    x = torch.randn(64, 16, 8, 8).relu().to(torch.bfloat16)
    quantizer.ensure_initialized(x.float())
    quantizer.eval()
    expected = quantizer(x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = quantizer(x)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)


# A seeded Fashion-MNIST subset and a narrow cnn_bn: four steps an epoch.
TINY = ["dataset.train_samples=256", "dataset.val_samples=64", "batch_size=64", "model=cnn_bn",
        "+model.options.widths=[8,16]"]


def test_compiled_autocast_layer_equals_eager() -> None:
    """torch.compile (aot_eager) of a quantized layer under bf16 autocast: same output and gradients as eager
    (xnor: its codes would be saved through hooks in eager mode, which the compiled path leaves out)."""
    torch.manual_seed(0)
    layer = quantized_layer("conv", "xnor", 1)
    x = layer_input("conv", 1)
    initialize_from_data(layer, [x])

    def step(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return module(inputs)

    results = []
    for fn in (step, torch.compile(step, backend="aot_eager")):
        inputs = x.clone().requires_grad_()
        out = fn(layer, inputs)
        out.float().square().mean().backward()
        results.append((out.detach(), inputs.grad, layer.weight.grad.clone()))
        layer.zero_grad()
    for eager, compiled in zip(*results):
        assert torch.equal(eager, compiled)


def tiny_batches(count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 14, 14, generator=generator), torch.randint(0, 10, (8,), generator=generator))
            for _ in range(count)]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("name, bits", [("uniform", 4), ("lsq", 4), ("pact", 4), ("dorefa", 4), ("dsq", 4),
                                        ("xnor", 1), ("twn", 2), ("affine", 4), ("dsq", 8), ("uniform", 16)])
def test_training_steps_under_autocast(name: str, bits: int, dtype_name: str) -> None:
    """Three training steps through engine.train_one_epoch (fp16 with an enabled GradScaler, bf16 with a disabled
    one): finite loss, and every quantized layer's conv saw the exact fp32 levels in every step."""
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    net = get_model("cnn_bn", num_classes=10, in_channels=1, widths=(4, 8))
    model = quantize_model(net, name, bits, bits, quantize_input=name != "twn", first_last="quantize")
    batches = tiny_batches(3, seed=1)
    initialize_from_data(model, [batches[0][0]])
    recorders = [Recorder(layer) for layer in model.modules() if isinstance(layer, (QuantConv2d, QuantLinear))]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    metrics = engine.train_one_epoch(model, nn.CrossEntropyLoss(), optimizer, scheduler, batches,
                                     torch.device("cpu"), 0, progress=False, scaler=scaler)
    assert math.isfinite(metrics["loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for recorder in recorders:
        assert len(recorder.records) == len(batches)
        for record in recorder.records:
            for fed, ref, grid in zip(record["fed"], record["reference"], record["grids"]):
                if grid is not None:
                    assert_exact_levels(fed, ref, grid, dtype)
            if bits <= INTEGER_PATH_BITS[dtype]:
                assert record["fed"][1].dtype == dtype  # the autocast dtype the engine picked from the scaler


@pytest.mark.usefixtures("fashion_mnist_available")
def test_xnor_trains_under_bf16(tmp_path: Path) -> None:
    """Loss falls epoch over epoch with binary weights and activations under bf16 (it diverged before)."""
    results = run_training([*TINY, "amp=true", "quant=xnor", "bits=1", "quantize_input=true", "epochs=3",
                            "quant.first_last=quantize"], tmp_path)
    losses = [epoch["train_loss"] for epoch in results["history"]]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[2] < losses[1] < losses[0]
    payload = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert not payload["scaler"]  # bf16: no loss scaling, so no scaler state


@pytest.mark.usefixtures("fashion_mnist_available")
def test_fp16_training_uses_a_grad_scaler(tmp_path: Path) -> None:
    results = run_training([*TINY, "amp=true", "amp_dtype=float16", "quant=dsq", "bits=4", "quantize_input=true",
                            "epochs=1"], tmp_path)
    assert math.isfinite(results["train_loss"])
    payload = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert payload["scaler"]["scale"] > 0  # the loss scale is checkpointed and resumes


def test_a_diverging_bf16_run_is_stopped(tmp_path: Path) -> None:
    """bf16 has no GradScaler to skip non-finite steps, so a non-finite loss is divergence as in float32."""
    with pytest.raises(guard.Diverged, match=r"training diverged at epoch 1 step \d+ of 4: loss is (nan|inf)"):
        run_training(["model=cnn", "dataset.train_samples=256", "dataset.val_samples=128", "batch_size=64",
                      "epochs=2", "optimizer=sgd", "optimizer.lr=1e6", "amp=true"], tmp_path)


def test_amp_dtype_is_validated(tmp_path: Path) -> None:
    assert compose_config([], tmp_path).amp_dtype == "bfloat16"  # the default
    with pytest.raises(QrunError, match=r"^unknown amp_dtype 'float32'; accepted: bfloat16, float16$"):
        validate(compose_config(["amp_dtype=float32"], tmp_path))
