"""BatchNorm folding for quantization-aware training (Jacob et al., CVPR 2018, section 3.2).

At inference a conv followed by BatchNorm is one conv with folded weights and bias:
    w_fold = gamma w / sigma,   b_fold = beta + gamma (b - mu) / sigma,   sigma = sqrt(var + eps)        (eq. 14)
so QAT must quantize w_fold, not w. During training BatchNorm normalises with batch statistics (mu_B, sigma_B).
Folding with sigma_B makes the quantized weights jitter from batch to batch, so, as in Krishnamoorthi (2018,
section 3.2.2, Fig. 10) and torch.ao's ConvBn modules, the weights are folded with the running sigma and the
conv output is corrected back to batch statistics:
    y = conv(x, Q(w gamma / sigma))                          quantized, folded with running statistics
    out = y sigma / sigma_B + beta - gamma mu_B / sigma_B    equals gamma (w x - mu_B) / sigma_B + beta
Once BN statistics are frozen (after `bn_stats_epochs` epochs, like torchvision's QAT reference) and in eval mode,
out = conv(x, Q(w_fold)) + b_fold: exactly the deployed integer layer.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from qrun.quant.layers import QuantConv2d


class FoldedConvBN(nn.Module):
    """A QuantConv2d and the BatchNorm2d after it, trained and evaluated as one folded conv."""

    def __init__(self, conv: QuantConv2d, bn: nn.BatchNorm2d, bn_stats_epochs: Optional[int] = None) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.bn_stats_epochs = bn_stats_epochs
        self.bn_frozen = False

    def on_epoch_start(self, epoch: int) -> None:
        self.bn_frozen = self.bn_stats_epochs is not None and epoch > self.bn_stats_epochs

    def _gamma_beta(self) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.bn
        if bn.affine:
            return bn.weight, bn.bias
        ones = torch.ones_like(bn.running_var)
        return ones, torch.zeros_like(ones)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_fold, b_fold) with the running statistics (eq. 14): the weights and bias the deployed conv uses."""
        gamma, beta = self._gamma_beta()
        factor = gamma / torch.sqrt(self.bn.running_var + self.bn.eps)
        bias = self.conv.bias if self.conv.bias is not None else torch.zeros_like(beta)
        return self.conv.weight * factor.reshape(-1, 1, 1, 1), beta + (bias - self.bn.running_mean) * factor

    def _quantized(self, weight: torch.Tensor) -> torch.Tensor:
        quantizer = self.conv.weight_quantizer
        return weight if quantizer is None else quantizer(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q = self.conv.quantized_input(x)
        if self.training and not self.bn_frozen:
            out = self._forward_batch_statistics(x_q)
        else:
            weight, bias = self.folded()
            weight = self._quantized(weight)
            if self.conv.weight_quantizer is not None:  # after the weight quantizer: S_w is current
                bias = self.conv.weight_quantizer.quantize_bias(bias, self.conv.input_quantizer)
            out = self.conv.compute_quantized(x_q, weight, bias)
        return self.conv.finish_output(out, x)

    def _forward_batch_statistics(self, x_q: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        gamma, beta = self._gamma_beta()
        sigma = torch.sqrt(bn.running_var + bn.eps)
        factor = gamma / sigma
        y = self.conv.compute_quantized(x_q, self._quantized(self.conv.weight * factor.reshape(-1, 1, 1, 1)), None)
        # y / factor approximates w x: its batch mean and variance are BatchNorm's mu_B and sigma_B^2. The conv
        # bias b shifts mu_B by b and cancels in the normalised output, so it only enters the running mean.
        raw = y / factor.reshape(1, -1, 1, 1)
        mean = raw.mean(dim=(0, 2, 3))
        var = raw.var(dim=(0, 2, 3), unbiased=False)
        self._update_running_statistics(mean, var, raw.numel() // raw.size(1))
        sigma_batch = torch.sqrt(var + bn.eps)
        correction = (sigma / sigma_batch).reshape(1, -1, 1, 1)
        return y * correction + (beta - gamma * mean / sigma_batch).reshape(1, -1, 1, 1)

    @torch.no_grad()
    def _update_running_statistics(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        bn = self.bn
        if not bn.track_running_stats:
            return
        bn.num_batches_tracked.add_(1)
        momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        bias = self.conv.bias.detach() if self.conv.bias is not None else 0.0
        # running <- (1 - m) running + m batch, with the unbiased variance, exactly as nn.BatchNorm2d does.
        bn.running_mean.lerp_(mean.detach() + bias, momentum)
        # A new tensor rather than lerp_: the forward read running_var (sigma), and under torch.compile AOTAutograd
        # lets the backward recompute sigma from the input buffer after an in-place update (wrong gradients).
        bn.running_var = torch.lerp(bn.running_var, var.detach() * count / max(count - 1, 1), momentum)


class _UnfoldedKeys:
    """Load-state-dict pre-hook: renames an unfolded network's keys (`features.0.weight`, `features.1.running_mean`)
    to the folded ones (`features.0.conv.weight`, `features.0.bn.running_mean`), so float checkpoints load."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs  # (conv path, bn path) in the unfolded network; the folded module sits at conv path

    def __call__(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for conv_path, bn_path in self.pairs:
            conv_old, bn_old = f"{prefix}{conv_path}.", f"{prefix}{bn_path}."
            new_forms = (f"{conv_old}conv.", f"{conv_old}bn.")
            for key in list(state_dict):
                if key.startswith(bn_old):
                    state_dict[f"{conv_old}bn.{key[len(bn_old):]}"] = state_dict.pop(key)
                elif key.startswith(conv_old) and not key.startswith(new_forms):
                    state_dict[f"{conv_old}conv.{key[len(conv_old):]}"] = state_dict.pop(key)


def fold_batchnorm(model: nn.Module, bn_stats_epochs: Optional[int] = None) -> list[str]:
    """Fold every QuantConv2d directly followed by a BatchNorm2d inside an nn.Sequential; returns the conv paths.

    The BatchNorm's slot becomes nn.Identity. Pairs outside a Sequential (ResNet blocks) stay unfolded and
    train with fake-quantized unfolded weights.
    """
    pairs: list[tuple[str, str]] = []
    for parent_name, parent in list(model.named_modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = parent._modules[first], parent._modules[second]
            if isinstance(conv, QuantConv2d) and type(bn) is nn.BatchNorm2d:
                folded = FoldedConvBN(conv, bn, bn_stats_epochs)
                folded.train(conv.training)
                parent._modules[first], parent._modules[second] = folded, nn.Identity()
                prefix = f"{parent_name}." if parent_name else ""
                pairs.append((f"{prefix}{first}", f"{prefix}{second}"))
    if pairs:
        model.register_load_state_dict_pre_hook(_UnfoldedKeys(pairs))
    return [conv for conv, _ in pairs]
