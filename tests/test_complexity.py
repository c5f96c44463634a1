"""Complexity numbers against closed forms: MACs of a conv and a linear, BOPs at mixed widths, size in bytes."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from qrun import complexity
from qrun.quant import QuantConv2d, QuantLinear, Quantizer, quantize_model
from qrun.models import get_model


class PassThrough(Quantizer):
    """A quantizer that only carries its bit width (not registered: these tests build layers by hand)."""

    name = "test-pass-through"

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)  # stays float
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


SHAPE = SimpleNamespace(in_channels=1, image_size=8)
CONV1_MACS = 4 * 1 * 9 * 8 * 8  # out channels x in channels x kernel x output pixels
CONV2_MACS = 8 * 4 * 9 * 4 * 4
FC_MACS = 128 * 10


def quantized_net() -> nn.Module:
    net = Net()
    net.conv2 = QuantConv2d.from_float(net.conv2, weight_quantizer=PassThrough(2, "weight"),
                                       input_quantizer=PassThrough(4, "act"))
    net.fc = QuantLinear.from_float(net.fc, weight_quantizer=PassThrough(8, "weight"), input_quantizer=None)
    return net


def test_macs_come_from_torch_flop_counter_per_layer() -> None:
    total, per_layer = complexity.layer_macs(quantized_net(), complexity.example_input(SHAPE))
    assert (per_layer["conv1"], per_layer["conv2"], per_layer["fc"]) == (CONV1_MACS, CONV2_MACS, FC_MACS)
    assert total == CONV1_MACS + CONV2_MACS + FC_MACS


def test_bops_weight_each_layer_by_its_weight_and_input_bits() -> None:
    measured = complexity.measure(quantized_net(), SHAPE)
    # conv1 float 32x32; conv2 2-bit weights, 4-bit inputs; fc 8-bit weights on float inputs (32).
    assert measured["bops"] == CONV1_MACS * 32 * 32 + CONV2_MACS * 2 * 4 + FC_MACS * 8 * 32
    assert measured["macs"] == CONV1_MACS + CONV2_MACS + FC_MACS


def test_full_precision_model_counts_32_by_32_and_float32_size() -> None:
    net = Net()
    measured = complexity.measure(net, SHAPE)
    assert measured["bops"] == measured["macs"] * 32 * 32
    params = sum(p.numel() for p in net.parameters())
    assert measured["size_bytes"] == measured["size_fp32_bytes"] == 4 * params


def test_size_counts_quantized_weights_at_their_bit_width() -> None:
    net = quantized_net()
    conv1, conv2, fc_w, fc_b = 4 * 9, 8 * 4 * 9, 128 * 10, 10
    assert complexity.size_bytes(net) == 4 * conv1 + conv2 * 2 // 8 + fc_w * 8 // 8 + 4 * fc_b


def test_measuring_leaves_the_model_untouched() -> None:
    model = get_model("cnn_bn", num_classes=10, in_channels=1)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    complexity.measure(model, SimpleNamespace(in_channels=1, image_size=28))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_quantized_cnn_bops_follow_the_layer_policy() -> None:
    """cnn_bn under DSQ with the paper's policy: first conv and classifier float, the middle conv at 4/4 bits."""
    model = quantize_model(get_model("cnn_bn", num_classes=10, in_channels=1), "dsq", w_bits=4, a_bits=4,
                           quantize_input=True, first_last="fp")
    total, per_layer = complexity.layer_macs(model, complexity.example_input(SimpleNamespace(in_channels=1,
                                                                                             image_size=28)))
    measured = complexity.measure(model, SimpleNamespace(in_channels=1, image_size=28))
    middle = per_layer["features.4"]
    assert measured["bops"] == (total - middle) * 32 * 32 + middle * 4 * 4


def test_affine_w8a8_cnn_bn_counts_its_folded_layers_at_8_bits() -> None:
    """quant=affine folds conv+BN; the folded convs run at W8A8 like every other layer (a hand count from the
    layer shapes: conv MACs = weight elements x output pixels, 28x28 then 14x14 after the first max-pool)."""
    float_model = get_model("cnn_bn", num_classes=10, in_channels=1)
    conv1, conv2, fc = float_model.features[0], float_model.features[4], float_model.classifier
    macs = conv1.weight.numel() * 28 * 28 + conv2.weight.numel() * 14 * 14 + fc.weight.numel()
    model = quantize_model(get_model("cnn_bn", num_classes=10, in_channels=1), "affine", w_bits=8, a_bits=8,
                           quantize_input=True, first_last="quantize")
    assert type(model.features[0]).__name__ == "FoldedConvBN"
    model.train()
    model(torch.rand(8, 1, 28, 28))  # observers see a batch: evaluation needs their ranges
    measured = complexity.measure(model, SimpleNamespace(in_channels=1, image_size=28))
    assert measured["macs"] == macs and measured["bops"] == macs * 8 * 8
    assert 240e6 < measured["bops"] < 250e6  # not 3.93G: folded convs were once counted at 32 x 32 bits
    # Deployed: 8-bit weights, one int32 bias per output channel of each folded conv and of the classifier.
    weights = conv1.weight.numel() + conv2.weight.numel() + fc.weight.numel()
    biases = conv1.out_channels + conv2.out_channels + fc.out_features
    assert measured["size_bytes"] == weights * 8 // 8 + 4 * biases
    assert measured["layer_bits"] == ["W8A8"]


def test_layer_bits_list_every_width_a_mixed_policy_uses() -> None:
    model = quantize_model(get_model("cnn_bn", num_classes=10, in_channels=1), "uniform", w_bits=4, a_bits=4,
                           quantize_input=True, first_last="8bit")
    assert complexity.bit_widths(model) == ["W8A8", "W4A4"]
    total, per_layer = complexity.layer_macs(model, complexity.example_input(SimpleNamespace(in_channels=1,
                                                                                             image_size=28)))
    edge = per_layer["features.0"] + per_layer["classifier"]
    assert complexity.bit_operations(model, total, per_layer) == edge * 8 * 8 + (total - edge) * 4 * 4
