"""Datasets and loaders: where each dataset is found, how it is transformed, and seeded subsets and order.

Three splits: `train` (what the model fits), `test` (the dataset's held-out split, which every reported score
comes from) and, with `dataset.val_split`, `val`: a fixed, seeded part of the training data that picks best.pt,
so the model is never selected on the data it is scored on.

Fashion-MNIST and MNIST are read straight from their idx files (gzipped or not) into memory: the Debian
package `dataset-fashion-mnist` ships exactly those files, and a 60k x 28 x 28 tensor needs no loader workers.
CIFAR is held the same way. Their training augmentation runs on whole batches on the model's device
(qrun.augment); image-file datasets (ImageNet layout) decode and augment per sample in loader workers.
"""

from __future__ import annotations

import copy
import gzip
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, Subset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T
from torchvision.datasets.folder import find_classes
from torchvision.datasets.vision import StandardTransform, VisionDataset

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
    test: Dataset
    val: Optional[Dataset] = None  # carved from the training data (dataset.val_split); None without a split


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
    return DataSplits(splits["train"], test=splits["val"])


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
    train = tv_datasets.ImageFolder(str(root / "train"), build_transform(cfg, train=True))
    test = tv_datasets.ImageFolder(str(root / "val"), build_transform(cfg, train=False))
    if test.classes != train.classes:  # labels are folder positions: different folders would shift them
        missing = sorted(set(train.classes) ^ set(test.classes))
        raise QrunError(f"{root / 'val'} and {root / 'train'} hold different class folders ({', '.join(missing[:5])}"
                        f"{', ...' if len(missing) > 5 else ''}); both must hold the same classes")
    check_num_classes(cfg, len(train.classes), root / "train")
    return DataSplits(train, test)


# ImageFolder layouts: the class count is the number of class folders under root/train.
FOLDER_DATASETS = ("imagenet",)


def resolve_num_classes(cfg, needs_root: bool = True) -> None:
    """Set `num_classes` (the dataset config node) from the class folders of an ImageFolder layout when it is
    null, refuse it when it differs: the classifier head must have one output per class found. Without
    `needs_root`, a config that has no root yet is left as it is."""
    if cfg.name not in FOLDER_DATASETS or (not needs_root and (OmegaConf.is_missing(cfg, "root") or not cfg.root)):
        return
    folder = Path(_require_root(cfg)) / "train"
    if not folder.is_dir():
        raise QrunError(f"ImageNet not found: {folder} is not a directory; dataset.root must hold "
                        "train/ and val/ in ImageFolder layout (one folder per class)")
    try:
        classes, _ = find_classes(str(folder))
    except FileNotFoundError as error:  # torchvision: "Couldn't find any class folder in ..."
        raise QrunError(f"{error}; dataset.root/train must hold one folder per class") from None
    check_num_classes(cfg, len(classes), folder)


def check_num_classes(cfg, found: int, folder: Path) -> None:
    if cfg.num_classes is None:
        cfg.num_classes = found
    elif int(cfg.num_classes) != found:
        raise QrunError(f"dataset.num_classes={cfg.num_classes} does not match the {found} class folders in "
                        f"{folder}; accepted: {found} or null (taken from the folders)")


def _fake(cfg) -> DataSplits:
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    transform = T.Compose([T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
    train = tv_datasets.FakeData(size=cfg.train_samples or 256, image_size=shape, num_classes=cfg.num_classes,
                                 transform=transform, random_offset=0)
    # A distinct offset so validation images differ from training images.
    val = tv_datasets.FakeData(size=cfg.val_samples or 128, image_size=shape, num_classes=cfg.num_classes,
                               transform=transform, random_offset=1_000_000)
    return DataSplits(train, test=val)


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
    """Train, test and (with val_split) validation sets for `cfg` (the `dataset` config node), cut to seeded
    subsets if asked."""
    if cfg.name not in DATASETS:
        raise choice_error("dataset", cfg.name, list(DATASETS))
    splits = DATASETS[cfg.name](cfg)
    train, val = split_validation(splits.train, cfg)
    return DataSplits(train=train, test=_subset(splits.test, cfg.val_samples, cfg.subset_seed + 1), val=val)


VAL_SEED_OFFSET = 2  # subset_seed draws train_samples, subset_seed + 1 val_samples (test), + 2 the validation set


def validation_size(val_split: Optional[float], total: int) -> int:
    """Samples held out for validation: a count as given, a fraction of `total` rounded; 0 without a split."""
    if val_split is None:
        return 0
    count = round(val_split * total) if val_split < 1 else int(val_split)
    if not 1 <= count < total:
        raise QrunError(f"dataset.val_split={val_split:g} holds out {count} of the {total} training samples; "
                        f"accepted: a fraction or count that leaves 1..{total - 1} samples for validation")
    return count


def split_validation(train: Dataset, cfg) -> tuple[Dataset, Optional[Dataset]]:
    """(training subset, validation set): disjoint, both fixed by subset_seed whatever the training seed.

    The validation set is carved from the whole training split first, so it stays the same when train_samples
    changes; train_samples is then drawn from the remaining samples. Validation images are seen without
    augmentation, like test images.
    """
    count = validation_size(cfg.get("val_split"), len(train))
    if count == 0:
        return _subset(train, cfg.train_samples, cfg.subset_seed), None
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.subset_seed + VAL_SEED_OFFSET))
    held_out, rest = order[:count], order[count:]
    if cfg.train_samples is not None and cfg.train_samples < len(rest):
        rest = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(cfg.subset_seed))
                    [:cfg.train_samples]]
    return (Subset(train, rest.sort().values.tolist()),
            Subset(without_augmentation(train, cfg), held_out.sort().values.tolist()))


def without_augmentation(dataset: Dataset, cfg) -> Dataset:
    """The same samples (storage shared, not copied) with the evaluation transform instead of the training one."""
    view = copy.copy(dataset)
    for name in ("augment", "batch_augment"):  # InMemoryImages' per-sample or per-batch augmentation
        if getattr(view, name, None) is not None:
            setattr(view, name, None)
    if isinstance(view, VisionDataset) and getattr(view, "transform", None) is not None:
        view.transform = build_transform(cfg, train=False)
        view.transforms = StandardTransform(view.transform, view.target_transform)
    return view


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
