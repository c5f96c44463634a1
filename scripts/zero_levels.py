"""How much of each quantized tensor sits on level 0 when a float checkpoint is first quantized.

At 2 bits a max-scaled grid (uniform) puts most weights and activations on level 0, so each conv sees a handful
of non-zero products and the BatchNorm after it divides by a near-zero spread (README, the ResNet-20 table).
Initialises every quantizer from training batches as qrun does, runs one batch, and prints the mean and the
largest share of zeros over the weight and the activation quantizers.

    python scripts/zero_levels.py --checkpoint multirun/fmnist_resnet20/float/checkpoints/best.pt \\
        --quant uniform lsq --bits 2/2 4/4 2/4 4/2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from qrun.data import read_idx
from qrun.models import get_model
from qrun.quant import initialize_from_data, quantize_model, quantizers

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
MEAN, STD = 0.2860, 0.3530  # configs/dataset/fashion_mnist.yaml


def zero_shares(checkpoint: dict, quant: str, w_bits: int, a_bits: int,
                images: torch.Tensor) -> dict[str, list[float]]:
    model = get_model("resnet20", num_classes=10, in_channels=1)
    model.load_state_dict(checkpoint["model"])
    quantize_model(model, quant, w_bits, a_bits, True)
    model.train()
    initialize_from_data(model, list(images.split(128)))
    shares: dict[str, list[float]] = {"weight": [], "act": []}
    hooks = [q.register_forward_hook(lambda q, _, out: shares[q.kind].append(float((out == 0).float().mean())))
             for _, _, q in quantizers(model)]
    with torch.no_grad():
        model(images[:128])
    for hook in hooks:
        hook.remove()
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a float resnet20 Fashion-MNIST checkpoint")
    parser.add_argument("--quant", nargs="+", default=["uniform", "lsq"])
    parser.add_argument("--bits", nargs="+", default=["2/2", "4/4"], help="W/A pairs")
    parser.add_argument("--images", type=int, default=512, help="calibration images (the first of the train set)")
    args = parser.parse_args()
    torch.manual_seed(0)
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    raw = torch.from_numpy(read_idx(FASHION_MNIST)[:args.images].copy()).float().div(255)
    images = ((raw - MEAN) / STD).unsqueeze(1)
    for quant in args.quant:
        for pair in args.bits:
            w_bits, a_bits = (int(b) for b in pair.split("/"))
            shares = zero_shares(checkpoint, quant, w_bits, a_bits, images)
            weights, acts = shares["weight"], shares["act"]
            print(f"{quant} W{w_bits}A{a_bits}: share on level 0: weights mean {sum(weights) / len(weights):.3f} "
                  f"(max {max(weights):.3f}), activations mean {sum(acts) / len(acts):.3f} (max {max(acts):.3f})")


if __name__ == "__main__":
    main()
