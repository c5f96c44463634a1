"""Loader defaults: no workers for in-memory data, decoding workers (persistent, prefetching) for image files on a
GPU; the shuffle order does not depend on how workers are seeded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets as tv_datasets
from torchvision import transforms as T

from qrun.data import EpochLoader, InMemoryImages, default_workers
from qrun.resources import available_cores


def image_folder(root: Path) -> tv_datasets.ImageFolder:
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), color=(i * 40, 0, 0)).save(root / cls / f"{i}.png")
    return tv_datasets.ImageFolder(str(root), T.ToTensor())


def test_default_workers_by_data_kind_and_device(tmp_path: Path) -> None:
    files = image_folder(tmp_path)
    memory = InMemoryImages(np.zeros((4, 8, 8), np.uint8), np.zeros(4), [0.0], [1.0])
    assert default_workers(memory, pin_memory=True) == 0
    assert default_workers(files, pin_memory=False) == 0
    assert default_workers(files, pin_memory=True) == max(1, min(8, available_cores() - 1))
    loader = EpochLoader(files, 2, shuffle=True, workers=None, seed=0, pin_memory=True).loader
    assert loader.persistent_workers and loader.prefetch_factor == 4 and loader.num_workers >= 1
    explicit = EpochLoader(files, 2, shuffle=True, workers=0, seed=0, pin_memory=True).loader
    assert explicit.num_workers == 0 and not explicit.persistent_workers


@pytest.mark.parametrize("workers", [0, 2])
def test_shuffle_order_is_the_same_with_and_without_persistent_workers(workers: int) -> None:
    memory = InMemoryImages(np.zeros((12, 4, 4), np.uint8), np.arange(12), [0.0], [1.0])
    loader = EpochLoader(memory, 4, shuffle=True, workers=workers, seed=1)
    order = {epoch: [y.tolist() for _, y in loader.epoch(epoch)] for epoch in (3, 1, 3)}
    generator = torch.Generator().manual_seed(1 * 100_003 + 3)
    torch.empty((), dtype=torch.int64).random_(generator=generator)  # the draw a DataLoader makes for its workers
    expected = torch.randperm(12, generator=generator).tolist()
    assert sum(order[3], []) == expected  # the epoch's permutation, whatever ran before it in this process


def test_image_file_augmentation_replays_whatever_the_workers(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(4):
            pixels = np.random.default_rng(i).integers(0, 256, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.png")
    files = tv_datasets.ImageFolder(str(tmp_path), T.Compose([T.RandomResizedCrop(6), T.RandomHorizontalFlip(),
                                                              T.ToTensor()]))

    def epoch_images(loader: EpochLoader, epoch: int) -> torch.Tensor:
        return torch.cat([images for images, _ in loader.epoch(epoch)])

    straight = EpochLoader(files, 4, shuffle=True, workers=2, seed=5)  # persistent workers
    first, second = epoch_images(straight, 1), epoch_images(straight, 2)
    resumed = EpochLoader(files, 4, shuffle=True, workers=1, seed=5)  # a new process resuming at epoch 2
    assert torch.equal(epoch_images(resumed, 2), second)
    assert not torch.equal(first, second)  # other crops (and order) each epoch
