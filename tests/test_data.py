"""Datasets: real Fashion-MNIST, the torchvision layouts on data written on the fly, clear errors when missing."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qrun.data import EpochLoader, build_datasets, read_idx
from qrun.errors import QrunError
from tests.conftest import compose_config


def dataset_cfg(tmp_path: Path, *overrides: str):
    return compose_config(list(overrides), tmp_path).dataset


def test_real_fashion_mnist_is_found_and_complete(tmp_path: Path, fashion_mnist_available: None) -> None:
    splits = build_datasets(dataset_cfg(tmp_path))
    assert (len(splits.train), len(splits.test)) == (60_000, 10_000)
    image, label = splits.test[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert int(label) == 9  # the first Fashion-MNIST test image is an ankle boot
    assert torch.bincount(splits.test.labels).tolist() == [1000] * 10


def test_subsets_are_fixed_whatever_the_training_seed(tmp_path: Path, fashion_mnist_available: None) -> None:
    first = build_datasets(dataset_cfg(tmp_path, "dataset.train_samples=100", "seed=1"))
    second = build_datasets(dataset_cfg(tmp_path, "dataset.train_samples=100", "seed=2"))
    assert len(first.train) == 100 and first.train.indices == second.train.indices


def test_batched_fetch_equals_per_sample_fetch(tmp_path: Path, fashion_mnist_available: None) -> None:
    val = build_datasets(dataset_cfg(tmp_path, "dataset.val_samples=64")).test
    batch = val.__getitems__(list(range(8)))
    for index, (image, label) in enumerate(batch):
        single_image, single_label = val[index]
        assert torch.equal(image, single_image) and int(label) == int(single_label)


def test_epoch_order_is_a_function_of_seed_and_epoch(tmp_path: Path, fashion_mnist_available: None) -> None:
    train = build_datasets(dataset_cfg(tmp_path, "dataset.train_samples=256")).train
    loader = EpochLoader(train, batch_size=64, shuffle=True, workers=0, seed=3)
    epoch2 = [labels.tolist() for _, labels in loader.epoch(2)]
    epoch1 = [labels.tolist() for _, labels in loader.epoch(1)]
    assert epoch2 != epoch1
    assert [labels.tolist() for _, labels in loader.epoch(2)] == epoch2


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader_and_mnist_root_layout(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 20), ("t10k", 10)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    assert read_idx(raw / "t10k-labels-idx1-ubyte.gz").tolist() == [i % 10 for i in range(10)]
    splits = build_datasets(dataset_cfg(tmp_path, "dataset=mnist", f"dataset.root={tmp_path}"))
    assert (len(splits.train), len(splits.test)) == (20, 10)


def write_cifar10(root: Path) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": list(range(4))}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))


def test_cifar10_torchvision_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar10(tmp_path)
    # The files are made here, so their checksums cannot be CIFAR's; everything else is torchvision's real path.
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    splits = build_datasets(dataset_cfg(tmp_path, "dataset=cifar10", f"dataset.root={tmp_path}"))
    assert (len(splits.train), len(splits.test)) == (20, 4)
    image, label = splits.train[0]
    assert image.shape == (3, 32, 32) and label == 0


def test_imagenet_image_folder_layout_and_eval_crop(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (80, 60), color=(10, 200, 30)).save(tmp_path / split / cls / "0.jpg")
    splits = build_datasets(dataset_cfg(tmp_path, "dataset=imagenet", f"dataset.root={tmp_path}",
                                        "dataset.image_size=56"))
    assert (len(splits.train), len(splits.test)) == (2, 2)
    assert splits.test[1][0].shape == (3, 56, 56) and splits.test[1][1] == 1


def test_fake_data_has_the_configured_shape(tmp_path: Path) -> None:
    splits = build_datasets(dataset_cfg(tmp_path, "dataset=fake", "dataset.image_size=16"))
    assert splits.train[0][0].shape == (3, 16, 16) and len(splits.test) == 128


@pytest.mark.parametrize("overrides, message", [
    (["dataset.root=/nonexistent/fmnist"], r"Fashion-MNIST not found: .* /nonexistent/fmnist.*dataset-fashion-mnist"),
    (["dataset=mnist"], r"MNIST not found: .*set dataset.root"),
    (["dataset=cifar10", "dataset.root=/nonexistent/cifar"], r"CIFAR10 not found or corrupted under /nonexistent/cifar"),
    (["dataset=imagenet", "dataset.root=/nonexistent/in"], r"ImageNet not found: /nonexistent/in/train"),
])
def test_missing_data_names_the_path_and_the_remedy(overrides: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(QrunError, match=message):
        build_datasets(dataset_cfg(tmp_path, *overrides))
