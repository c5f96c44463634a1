"""BatchNorm folding (Jacob et al. 3.2): the folded conv computes what conv + BatchNorm computes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qrun import quant
from qrun.int8.fold import FoldedConvBN
from qrun.models import get_model


def _float_cnn_bn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = get_model("cnn_bn", num_classes=10, in_channels=1)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        bn.weight.data.uniform_(-1.5, 1.5)
        bn.bias.data.uniform_(-1, 1)
    return model


def _folded_without_quantizers(float_model: nn.Module) -> nn.Module:
    folded = quant.quantize_model(get_model("cnn_bn", num_classes=10, in_channels=1), "affine", 8, 8, True,
                                  "quantize", fold_bn=True, bn_stats_epochs=1)
    # A float checkpoint of the unfolded net loads into the folded one (keys renamed on load).
    quant.load_float_state(folded, float_model.state_dict())
    for layer in folded.modules():
        if isinstance(layer, quant.QuantizedLayer):
            layer.weight_quantizer = layer.input_quantizer = None
    return folded


def test_model_is_folded_and_float_checkpoints_load() -> None:
    folded = _folded_without_quantizers(_float_cnn_bn())
    assert [type(m) for m in folded.features][:2] == [FoldedConvBN, nn.Identity]
    assert sum(isinstance(m, FoldedConvBN) for m in folded.modules()) == 2


def test_folded_equals_conv_bn_in_eval_mode() -> None:
    reference = _float_cnn_bn().eval()
    folded = _folded_without_quantizers(reference).eval()
    x = torch.randn(8, 1, 28, 28)
    assert torch.allclose(folded(x), reference(x), atol=1e-5, rtol=1e-5)


def test_training_uses_batch_statistics_and_updates_running_ones_like_batchnorm() -> None:
    reference = _float_cnn_bn().train()
    folded = _folded_without_quantizers(copy.deepcopy(reference)).train()
    x = torch.randn(16, 1, 28, 28)
    assert torch.allclose(folded(x), reference(x), atol=1e-4, rtol=1e-4)
    bn_ref, bn_folded = reference.features[1], folded.features[0].bn
    assert torch.allclose(bn_folded.running_mean, bn_ref.running_mean, atol=1e-6)
    assert torch.allclose(bn_folded.running_var, bn_ref.running_var, atol=1e-5)
    assert int(bn_folded.num_batches_tracked) == 1


def test_bn_statistics_freeze_after_configured_epochs() -> None:
    folded = _folded_without_quantizers(_float_cnn_bn()).train()
    quant.on_epoch_start(folded, 2)  # bn_stats_epochs=1: frozen from epoch 2 on
    before = folded.features[0].bn.running_mean.clone()
    x = torch.randn(16, 1, 28, 28)
    out = folded(x)
    assert torch.equal(folded.features[0].bn.running_mean, before)
    # Frozen statistics in training mode is the deployed (eval) computation, still differentiable.
    assert torch.allclose(out, folded.eval()(x), atol=1e-6)


@pytest.mark.parametrize("per_channel", [False, True])
def test_weights_are_quantized_after_folding(per_channel: bool) -> None:
    model = quant.quantize_model(_float_cnn_bn(), "affine", 4, 8, False, "quantize", per_channel=per_channel)
    model.eval()
    layer = model.features[0]
    quantizer = layer.conv.weight_quantizer
    quantizer.train()
    weight, _ = layer.folded()
    codes = quantizer(weight) / (quantizer.qparams()[0].reshape(-1, 1, 1, 1) if per_channel else quantizer.qparams()[0])
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert int(codes.abs().max().round()) == 7  # the folded weights fill the 4-bit grid -7..7
