"""How far one SGD step moves DSQ's weight bounds, relative to their range (README, "DSQ defaults").

    .venv/bin/python scripts/dsq_bound_steps.py --model resnet18 --lr 0.01 --steps 17 [--grad-scale]

W4A4 DSQ on a Fashion-MNIST subset (4,096 images, batch 128), ranges initialised from 4 batches, SGD momentum 0.9
(weight decay 5e-4 on the weights, none on the quantizer parameters); prints the largest |step| / (u - l) over
the run and how many layers ended with crossed bounds.
"""

from __future__ import annotations

import argparse

import torch
from omegaconf import OmegaConf
from torch import nn

from qrun.data import build_datasets
from qrun.models import get_model
from qrun.quant import initialize_from_data, quantize_model, quantizer_parameters, quantizers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--grad-scale", action="store_true", help="DSQ's LSQ-style bound gradient scale")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = build_datasets(OmegaConf.create(dict(
        name="fashion_mnist", root=None, train_samples=4096, val_samples=64, subset_seed=0, augment=False,
        download=False, num_classes=10, in_channels=1, image_size=28, mean=[0.286], std=[0.353])))
    batches = list(torch.utils.data.DataLoader(data.train, batch_size=128, shuffle=True))
    model = quantize_model(get_model(args.model, num_classes=10, in_channels=1), "dsq", 4, 4, True,
                           grad_scale=args.grad_scale)
    initialize_from_data(model, [images for images, _ in batches[:4]])
    quant_ids = {id(p) for p in quantizer_parameters(model)}
    optimizer = torch.optim.SGD([
        {"params": [p for p in model.parameters() if id(p) not in quant_ids], "weight_decay": 5e-4},
        {"params": quantizer_parameters(model), "weight_decay": 0.0}], lr=args.lr, momentum=0.9)
    weight_side = [q for _, kind, q in quantizers(model) if kind == "weight"]
    worst = 0.0
    for step in range(args.steps):
        images, targets = batches[step % len(batches)]
        before = [(q.lower.item(), q.upper.item()) for q in weight_side]
        loss = nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for q, (lo, hi) in zip(weight_side, before):
            worst = max(worst, max(abs(q.lower.item() - lo), abs(q.upper.item() - hi)) / (hi - lo))
    crossed = sum(q.upper.item() <= q.lower.item() for _, _, q in quantizers(model))
    print(f"{args.model} lr {args.lr} grad_scale {args.grad_scale}: largest bound step / range {worst:.3g} over "
          f"{args.steps} steps, layers with crossed bounds {crossed}, last loss {loss.item():.3f}")


if __name__ == "__main__":
    main()
