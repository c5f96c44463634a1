"""torch.compile on quantized models: no graph break in qrun's code, and compiled training equals eager training.

Under compile the quantizers take the device path (qrun/quant/kernels/device.py): torch.library custom ops with
fake implementations for the grid quantizers, DSQ and DoReFa's weights, scalars as 0-d tensors, no compact save.
Data-dependent initialisation happens before compiling (initialize_from_data, as the trainer does), which also
caches the host flags the forward branches on. `aot_eager` traces forward and backward like inductor does,
without code generation (inductor adds minutes of compilation on this machine).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qrun.models import get_model
from qrun.quant import initialize_from_data, learned_values, quantize_model

ALL = ["uniform", "lsq", "pact", "dorefa", "dsq", "xnor", "twn", "affine"]
STEPS = 2


def small_model(name: str) -> nn.Module:
    """cnn_bn with 8/16 channels, every layer quantized (the first one sees signed inputs), W4A4."""
    torch.manual_seed(0)
    bits = {"xnor": 1, "twn": 2}.get(name, 4)
    model = get_model("cnn_bn", num_classes=10, in_channels=3, widths=(8, 16))
    quantize_model(model, name, bits, bits, name != "twn", first_last="quantize")
    return model.train()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 12, 12, generator=generator), torch.randint(0, 10, (4,), generator=generator))
            for _ in range(STEPS)]


def train(model: nn.Module, forward, data) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses, first_grads = [], {}
    for step, (x, y) in enumerate(data):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        if step == 0:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        losses.append(loss.detach())
    return losses, first_grads


@pytest.mark.parametrize("name", ALL)
def test_compiled_training_equals_eager_with_no_graph_break(name: str) -> None:
    check_compiled_equals_eager(name, "cpu", "aot_eager")


@pytest.mark.gpu
@pytest.mark.parametrize("name, backend, autocast", [*((name, "aot_eager", False) for name in ALL),
                                                     ("lsq", "inductor", False), ("dsq", "inductor", False),
                                                     ("lsq", "aot_eager", True), ("xnor", "aot_eager", True)])
def test_compiled_training_equals_eager_on_cuda(name: str, backend: str, autocast: bool) -> None:
    """On CUDA both sides run the Triton kernels; inductor also fuses everything around them."""
    check_compiled_equals_eager(name, "cuda", backend, autocast)


@pytest.mark.parametrize("name", ALL)
def test_compiled_autocast_training_equals_eager(name: str) -> None:
    """The same under bf16 autocast (amp=true), where the layers feed their convs integer levels
    (qrun/quant/amp.py). torch 2.11's dynamo gave an autograd.Function whose forward returned the result of an
    in-place or out= op a zero gradient; this caught that for every quantizer (xnor's sign, amp's levels)."""
    check_compiled_equals_eager(name, "cpu", "aot_eager", autocast=True)


def check_compiled_equals_eager(name: str, dev: str, backend: str, autocast: bool = False) -> None:
    data = [(x.to(dev), y.to(dev)) for x, y in batches()]
    model = small_model(name).to(dev)
    initialize_from_data(model, [data[0][0]])
    explained, compiled_model = copy.deepcopy(model), copy.deepcopy(model)
    for copied in (explained, compiled_model):
        initialize_from_data(copied, [])  # nothing left to calibrate: refreshes the host caches, as the trainer does

    def under_autocast(module: nn.Module):
        def forward(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
                return module(x)
        return forward

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda x: under_autocast(explained)(x).sum())(data[0][0])
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    assert explanation.graph_count == 1

    torch._dynamo.reset()
    compiled = torch.compile(under_autocast(compiled_model), backend=backend, fullgraph=True)  # a break raises
    eager_losses, eager_grads = train(model, under_autocast(model), data)
    compiled_losses, compiled_grads = train(compiled_model, compiled, data)

    tolerance = 1e-5 if backend == "aot_eager" else 1e-4  # inductor reorders float sums
    if autocast:  # an ulp of difference in a float32 quantizer output (kernels.c vs the device path) grows in bf16
        tolerance = 1e-3
    for eager_loss, compiled_loss in zip(eager_losses, compiled_losses):
        assert torch.allclose(eager_loss, compiled_loss, rtol=tolerance, atol=tolerance / 10), (eager_losses,
                                                                                               compiled_losses)
    assert eager_grads.keys() == compiled_grads.keys()
    for key, grad in eager_grads.items():  # scale-free: a zero or missing gradient fails at any tolerance
        error = (grad.float() - compiled_grads[key].float()).norm()
        assert error <= 1e-3 * grad.float().norm(), (key, float(error), float(grad.float().norm()))
    for key, grad in eager_grads.items():
        atol = tolerance * max(1.0, float(grad.abs().max()))
        assert torch.allclose(grad, compiled_grads[key], rtol=10 * tolerance, atol=atol), key
    eager_values, compiled_values = learned_values(model), learned_values(compiled_model)
    assert eager_values.keys() == compiled_values.keys()
    for key, value in eager_values.items():
        assert compiled_values[key] == pytest.approx(value, rel=tolerance, abs=tolerance / 10), key
    for (key, a), b in zip(model.state_dict().items(), compiled_model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=tolerance, atol=tolerance / 10), key
