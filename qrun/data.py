"""Datasets and loaders: where each dataset is found, how it is transformed, and seeded subsets and order.

Fashion-MNIST and MNIST are read straight from their idx files (gzipped or not) into memory: the Debian
package `dataset-fashion-mnist` ships exactly those files, and a 60k x 28 x 28 tensor needs no loader workers.
CIFAR is held the same way. Their training augmentation runs on whole batches on the model's device
(qrun.augment); image-file datasets (ImageNet layout) decode and augment per sample in loader workers.
"""

from __future__ import annotations

import gzip
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, Subset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T

from qrun.augment import BatchAugment
from qrun.errors import QrunError, choice_error
from qrun.resources import available_cores

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset


# ----------------------------------------------------------------------------------------------- idx (MNIST family)
def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (the MNIST container format): magic, dims as big-endian int32, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    dtype_code, ndim = raw[2], raw[3]
    if raw[0] != 0 or raw[1] != 0 or dtype_code != 0x08:
        raise QrunError(f"{path} is not an unsigned-byte idx file")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(stem: str, folders: Sequence[Path]) -> Optional[Path]:
    for folder in folders:
        for candidate in (folder / f"{stem}.gz", folder / stem):
            if candidate.is_file():
                return candidate
    return None


def _idx_folders(root: Optional[str], torchvision_name: str, default: Optional[Path]) -> list[Path]:
    folders: list[Path] = []
    if root:
        base = Path(root).expanduser()
        folders += [base, base / "raw", base / torchvision_name / "raw"]
    elif default is not None:
        folders.append(default)
    return folders


class InMemoryImages(Dataset):
    """uint8 images held as one tensor and served a batch at a time.

    DataLoader calls `__getitems__` with a whole batch of indices, so conversion and normalisation are one
    tensor operation per batch instead of a Python transform per sample (per-sample transforms took half of
    each epoch on 2 CPU cores). `batch_augment` is not applied here: a training EpochLoader hands it to the
    loop, which applies it to each batch on the device.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: Sequence[float], std: Sequence[float],
                 batch_augment: Optional[BatchAugment] = None) -> None:
        tensor = torch.from_numpy(np.require(images, requirements=["C", "W"]))  # idx data are read-only views
        # (N, H, W) grey (idx files) or (N, H, W, C) colour (CIFAR's arrays) -> (N, C, H, W) uint8
        self.images = tensor.unsqueeze(1) if tensor.dim() == 3 else tensor.permute(0, 3, 1, 2).contiguous()
        self.labels = torch.from_numpy(np.asarray(labels).astype(np.int64))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.batch_augment = batch_augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        index = torch.as_tensor(indices, dtype=torch.long)
        images = self.images[index].float().div_(255.0).sub_(self.mean).div_(self.std)
        return list(zip(images.unbind(0), self.labels[index].unbind(0)))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([index])[0]


def _load_idx_dataset(cfg, title: str, torchvision_name: str, default: Optional[Path], hint: str) -> DataSplits:
    folders = _idx_folders(cfg.root, torchvision_name, default)
    splits = {}
    for split, (image_stem, label_stem) in IDX_FILES.items():
        image_path, label_path = _find_idx(image_stem, folders), _find_idx(label_stem, folders)
        if image_path is None or label_path is None:
            looked = ", ".join(str(f) for f in folders) or "(no dataset.root given)"
            raise QrunError(f"{title} not found: no {image_stem}[.gz] in {looked}; {hint}")
        augment = batch_augmentation(cfg) if split == "train" else None
        splits[split] = InMemoryImages(read_idx(image_path), read_idx(label_path), cfg.mean, cfg.std, augment)
    return DataSplits(splits["train"], splits["val"])


def _fashion_mnist(cfg) -> DataSplits:
    hint = ("install it with `apt-get install dataset-fashion-mnist` (files land in "
            f"{DEBIAN_FASHION_MNIST}) or set dataset.root to a folder holding the four idx files")
    return _load_idx_dataset(cfg, "Fashion-MNIST", "FashionMNIST", DEBIAN_FASHION_MNIST, hint)


def _mnist(cfg) -> DataSplits:
    hint = "set dataset.root to a folder holding the four MNIST idx files (torchvision's MNIST/raw layout works)"
    return _load_idx_dataset(cfg, "MNIST", "MNIST", None, hint)


# -------------------------------------------------------------------------------------------- torchvision layouts
def _cifar(cfg, cls) -> DataSplits:
    root = _require_root(cfg)
    try:
        train = cls(root, train=True, download=cfg.download)
        val = cls(root, train=False, download=cfg.download)
    except RuntimeError as error:  # torchvision: "Dataset not found or corrupted"
        raise QrunError(f"{cls.__name__} not found or corrupted under {root}: {error} "
                        "(set dataset.download=true where a network is reachable)") from None
    except OSError as error:  # download=true without a network: urllib's URLError is an OSError
        raise QrunError(f"dataset.download=true could not fetch {cls.__name__} into {root}: "
                        f"{getattr(error, 'reason', None) or error}; download it where a network is reachable, "
                        "then point dataset.root at it") from None
    # torchvision reads the whole split into one (N, 32, 32, 3) uint8 array: serve it in batches instead of PIL.
    return DataSplits(InMemoryImages(train.data, train.targets, cfg.mean, cfg.std, batch_augmentation(cfg)),
                      InMemoryImages(val.data, val.targets, cfg.mean, cfg.std))


def _imagenet(cfg) -> DataSplits:
    root = Path(_require_root(cfg))
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise QrunError(f"ImageNet not found: {root / split} is not a directory; dataset.root must hold "
                            "train/ and val/ in ImageFolder layout (one folder per class)")
    return DataSplits(tv_datasets.ImageFolder(str(root / "train"), build_transform(cfg, train=True)),
                      tv_datasets.ImageFolder(str(root / "val"), build_transform(cfg, train=False)))


def _fake(cfg) -> DataSplits:
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    transform = T.Compose([T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
    train = tv_datasets.FakeData(size=cfg.train_samples or 256, image_size=shape, num_classes=cfg.num_classes,
                                 transform=transform, random_offset=0)
    # A distinct offset so validation images differ from training images.
    val = tv_datasets.FakeData(size=cfg.val_samples or 128, image_size=shape, num_classes=cfg.num_classes,
                               transform=transform, random_offset=1_000_000)
    return DataSplits(train, val)


def _require_root(cfg) -> str:
    if not cfg.root:
        raise QrunError(f"dataset {cfg.name!r} needs dataset.root=<folder>; none was given")
    return os.path.expanduser(str(cfg.root))


DATASETS: dict[str, Callable] = {
    "fashion_mnist": _fashion_mnist,
    "mnist": _mnist,
    "cifar10": lambda cfg: _cifar(cfg, tv_datasets.CIFAR10),
    "cifar100": lambda cfg: _cifar(cfg, tv_datasets.CIFAR100),
    "imagenet": _imagenet,
    "fake": _fake,
}


# ------------------------------------------------------------------------------------------------------ transforms
def batch_augmentation(cfg) -> Optional[BatchAugment]:
    """Random crop with padding (and a flip where mirror images are still the same class), if `dataset.augment`.

    The border is black, as torchvision's RandomCrop pads [0, 1] images with 0: after normalisation that is
    -mean/std per channel."""
    if not cfg.augment:
        return None
    fill = [-m / s for m, s in zip(cfg.mean, cfg.std)]
    # digits are not mirror-symmetric; clothes and CIFAR objects are
    return BatchAugment(padding=cfg.image_size // 8, flip=cfg.name != "mnist", fill=fill)


def build_transform(cfg, train: bool) -> Callable:
    """ImageNet's standard per-sample transforms for image files (PIL); augmentation only for training."""
    normalize = T.Normalize(cfg.mean, cfg.std)
    size = cfg.image_size
    if train:
        return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    return T.Compose([T.Resize(round(size / 0.875)), T.CenterCrop(size), T.ToTensor(), normalize])


# --------------------------------------------------------------------------------------------------------- public
def build_datasets(cfg) -> DataSplits:
    """Train and validation sets for `cfg` (the `dataset` config node), cut to seeded subsets if asked."""
    if cfg.name not in DATASETS:
        raise choice_error("dataset", cfg.name, list(DATASETS))
    splits = DATASETS[cfg.name](cfg)
    return DataSplits(_subset(splits.train, cfg.train_samples, cfg.subset_seed),
                      _subset(splits.val, cfg.val_samples, cfg.subset_seed + 1))


def _subset(dataset: Dataset, count: Optional[int], seed: int) -> Dataset:
    """A fixed random subset: the same `count` samples whatever the training seed, so runs compare fairly."""
    if count is not None and count > len(dataset):  # refused, not clamped: results would say a size never used
        raise QrunError(f"dataset subset of {count} samples exceeds the {len(dataset)} available; accepted: null "
                        f"(all) or 1..{len(dataset)}")
    if count is None or count == len(dataset):
        return dataset
    indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    return Subset(dataset, indices.sort().values.tolist())


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed that fixes the data order and augmentation of one epoch, so a resumed run replays it exactly."""
    return seed * 100_003 + epoch


def in_memory(dataset: Dataset) -> Optional[InMemoryImages]:
    """The InMemoryImages under any Subset wrappers, or None for image files."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset if isinstance(dataset, InMemoryImages) else None


class SkipBatches:
    """A batch sampler without its first `count` batches (the sampler's permutation is drawn all the same)."""

    def __init__(self, batch_sampler, count: int) -> None:
        self.batch_sampler, self.count = batch_sampler, count

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.batch_sampler), self.count, None)

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.count)


def default_workers(dataset: Dataset, pin_memory: bool) -> int:
    """workers=null: none for in-memory data (a batch is one indexing op); for image files feeding a GPU
    (pin_memory), enough decoding processes that the GPU does not wait, capped at 8."""
    if in_memory(dataset) is not None or not pin_memory:
        return 0
    return max(1, min(8, available_cores() - 1))


class EpochTagged(Sampler):
    """Yields (epoch, index) pairs of a base sampler, so a worker knows which epoch a sample belongs to."""

    def __init__(self, base: Sampler) -> None:
        self.base, self.epoch = base, 0
        self.rank = getattr(base, "rank", 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, int(index)) for index in self.base)

    def __len__(self) -> int:
        return len(self.base)


class EpochSeeded(Dataset):
    """Image files under random transforms, served by loader workers: each sample seeds the worker's RNG from
    (seed, epoch, index) first, so its crop and flip are the same whichever worker, how many workers, and
    whether they persisted across epochs; a resumed run replays them. (Workers' own seeds are drawn once per
    process when they persist.)"""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        torch.manual_seed((epoch_seed(self.seed, epoch) * 2_147_483_647 + index) % 2 ** 63)
        return self.dataset[index]


class EpochLoader:
    """A DataLoader whose shuffle order and augmentation are a pure function of (seed, epoch).

    The shuffle has its own generator: DataLoader draws its worker base seed from `generator` only when it
    starts workers, which persistent workers do once per process, so a shared generator would shift the order
    of a resumed run. A training loader (shuffle=True) of in-memory data carries the dataset's BatchAugment as
    `loader.batch_augment`, reseeded per epoch, for the training loop to apply on the device; one of image
    files with workers seeds each sample's transforms from (seed, epoch, index) (EpochSeeded).
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool, workers: Optional[int], seed: int,
                 pin_memory: bool = False, sampler_factory: Optional[Callable] = None) -> None:
        self.generator, self.order = torch.Generator(), torch.Generator()
        self.seed = seed
        self.sampler = sampler_factory(dataset) if sampler_factory else None
        if self.sampler is None and shuffle:
            self.sampler = RandomSampler(dataset, generator=self.order)
        workers = default_workers(dataset, pin_memory) if workers is None else workers
        if shuffle and workers > 0 and in_memory(dataset) is None:
            dataset, self.sampler = EpochSeeded(dataset, seed), EpochTagged(self.sampler)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                 pin_memory=pin_memory, generator=self.generator, persistent_workers=workers > 0,
                                 prefetch_factor=4 if workers > 0 else None)
        memory = in_memory(dataset)
        self.augment = memory.batch_augment if shuffle and memory is not None else None
        self.loader.batch_augment = self.augment
        self.rank = getattr(self.sampler, "rank", 0)

    def epoch(self, epoch: int, start_batch: int = 0) -> DataLoader:
        """The epoch's loader; `start_batch` > 0 skips its first batches by index (no data loaded), so a run
        resumed mid-epoch sees exactly the batches an uninterrupted one would (same draws, same order)."""
        self.generator.manual_seed(epoch_seed(self.seed, epoch))
        self.order.manual_seed(epoch_seed(self.seed, epoch))
        # Discard one draw: before the shuffle had its own generator, the DataLoader drew its worker seed from the
        # shared one first; this keeps every epoch's permutation (and so earlier recorded results) as it was.
        torch.empty((), dtype=torch.int64).random_(generator=self.order)
        if self.sampler is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        if self.augment is not None:
            self.augment.reseed(epoch_seed(self.seed, epoch) * 4099 + self.rank, batch=max(0, start_batch))
        if start_batch <= 0:
            return self.loader
        loader = self.loader
        resumed = DataLoader(loader.dataset, batch_sampler=SkipBatches(loader.batch_sampler, start_batch),
                             num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                             collate_fn=loader.collate_fn, generator=self.generator)
        resumed.batch_augment = self.augment
        return resumed

    def __len__(self) -> int:
        return len(self.loader)


def first_batches(dataset: Dataset, count: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Inputs of `count` seeded random batches, for data-dependent quantizer initialisation."""
    if count <= 0:
        return
    generator = torch.Generator().manual_seed(epoch_seed(seed, -1))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
    for index, (images, _) in enumerate(loader):
        if index >= count:
            return
        yield images
