"""Batched augmentation on the device: the per-sample crop-with-padding and flip, seeded per epoch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.transforms import functional as TF

from qrun.augment import BatchAugment
from qrun.data import EpochLoader, build_datasets
from qrun.engine import to_device
from tests.conftest import compose_config


def reference(image: torch.Tensor, fill: list[float], pad: int, top: int, left: int, flip: bool) -> torch.Tensor:
    """One sample the torchvision way: pad with the fill colour, crop, mirror."""
    c, h, w = image.shape
    padded = torch.tensor(fill).view(c, 1, 1).repeat(1, h + 2 * pad, w + 2 * pad)
    padded[:, pad:pad + h, pad:pad + w] = image
    crop = TF.crop(padded, top, left, h, w)
    return TF.hflip(crop) if flip else crop


def test_each_sample_is_torchvisions_crop_and_flip_of_its_own_draws() -> None:
    images = torch.randn(16, 3, 8, 6)
    fill = [-1.0, -2.0, -3.0]
    augment = BatchAugment(padding=2, flip=True, fill=fill)
    augment.reseed(11)
    out = augment(images)
    augment.reseed(11)
    offsets, flips = augment.draws(16, images.device)
    assert out.shape == images.shape
    for i in range(16):
        expected = reference(images[i], fill, 2, int(offsets[0, i]), int(offsets[1, i]), bool(flips[i]))
        assert torch.equal(out[i], expected), f"sample {i}"


def test_draws_are_per_sample_and_seeded() -> None:
    augment = BatchAugment(padding=3, flip=True, fill=[0.0])
    augment.reseed(1)
    offsets, flips = augment.draws(4000, torch.device("cpu"))
    assert sorted(offsets.unique().tolist()) == list(range(7))  # every offset 0..2*padding occurs
    assert 0.45 < flips.float().mean().item() < 0.55
    images = torch.randn(8, 1, 10, 10)
    augment.reseed(2)
    first = augment(images)
    augment.reseed(2)
    assert torch.equal(augment(images), first)  # a resumed epoch replays its crops
    augment.reseed(3)
    assert not torch.equal(augment(images), first)
    no_flip = BatchAugment(padding=1, flip=False, fill=[0.0])
    assert no_flip.draws(5, torch.device("cpu"))[1] is None


def test_training_loader_carries_the_augmentation_and_validation_does_not(tmp_path: Path,
                                                                          fashion_mnist_available: None) -> None:
    cfg = compose_config(["dataset.augment=true", "dataset.train_samples=64", "dataset.val_samples=64"], tmp_path)
    data = build_datasets(cfg.dataset)
    train = EpochLoader(data.train, 32, shuffle=True, workers=None, seed=0)
    val = EpochLoader(data.val, 32, shuffle=False, workers=None, seed=0)
    assert val.loader.batch_augment is None and train.loader.num_workers == 0
    images, targets = next(iter(train.epoch(1)))
    augmented, _ = to_device(images, targets, torch.device("cpu"), True, train.loader.batch_augment)
    assert augmented.is_contiguous(memory_format=torch.channels_last) and augmented.shape == images.shape
    black = (0 - cfg.dataset.mean[0]) / cfg.dataset.std[0]
    # 3-pixel border (28 // 8): shifted images show black rows/columns; the pixels are the originals' or black
    assert not torch.equal(augmented, images)
    assert torch.isin(augmented, torch.cat([images.flatten(), torch.tensor([black])])).all()


def test_a_batch_draws_the_same_crops_when_an_epoch_resumes_mid_way() -> None:
    images = torch.randn(4, 1, 6, 6)
    augment = BatchAugment(padding=2, flip=True, fill=[0.0])
    augment.reseed(9)
    straight = [augment(images) for _ in range(3)]
    augment.reseed(9, batch=2)  # resumed after two batches of the epoch
    assert torch.equal(augment(images), straight[2])
    assert not torch.equal(straight[0], straight[1])
