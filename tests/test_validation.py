"""Honest validation: a seeded validation split picks best.pt, the test split is only scored; ImageFolder classes."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qrun import checkpoint
from qrun.config import validate
from qrun.data import build_datasets, build_transform
from qrun.errors import QrunError
from tests.conftest import compose_config, run_training

TRAIN, TEST = 300, 100


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture()
def digits(tmp_path: Path) -> Path:
    return write_digits(tmp_path / "digits")


def write_digits(root: Path) -> Path:
    """An MNIST-layout folder whose classes a small CNN learns in an epoch: class c is a bright bar at row 2c.

    The test split's labels are mirrored (9 - c), so the better a model gets on training-like data the worse
    it scores on the test split: the epoch with the best validation top-1 is never the best test epoch.
    """
    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, count, mirror in (("train", TRAIN, False), ("t10k", TEST, True)):
        labels = np.arange(count) % 10
        images = rng.integers(0, 40, (count, 28, 28))
        for index, label in enumerate(labels):
            images[index, 2 * label + 4: 2 * label + 6, 4:24] = 255
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 9 - labels if mirror else labels)
    return root


def data_cfg(tmp_path: Path, root: Path, *overrides: str):
    return compose_config(["dataset=mnist", f"dataset.root={root}", *overrides], tmp_path).dataset


def test_validation_split_is_seeded_disjoint_and_independent_of_train_samples(tmp_path: Path, digits: Path) -> None:
    first = build_datasets(data_cfg(tmp_path, digits, "dataset.val_split=50", "dataset.train_samples=100", "seed=1"))
    again = build_datasets(data_cfg(tmp_path, digits, "dataset.val_split=50", "dataset.train_samples=100", "seed=2"))
    whole = build_datasets(data_cfg(tmp_path, digits, "dataset.val_split=50"))
    other = build_datasets(data_cfg(tmp_path, digits, "dataset.val_split=50", "dataset.subset_seed=7"))
    assert (len(first.train), len(first.val), len(first.test)) == (100, 50, TEST)
    assert first.val.indices == again.val.indices == whole.val.indices  # the same held-out set for every run
    assert first.train.indices == again.train.indices
    assert other.val.indices != first.val.indices  # subset_seed picks it
    assert not set(first.val.indices) & set(whole.train.indices)
    assert sorted(whole.val.indices + whole.train.indices) == list(range(TRAIN))
    fraction = build_datasets(data_cfg(tmp_path, digits, "dataset.val_split=0.2"))
    assert (len(fraction.train), len(fraction.val)) == (240, 60)
    assert build_datasets(data_cfg(tmp_path, digits)).val is None


def test_validation_images_are_not_augmented(tmp_path: Path, digits: Path) -> None:
    splits = build_datasets(data_cfg(tmp_path, digits, "dataset.val_split=20", "dataset.augment=true"))
    index = splits.val.indices[0]
    plain = splits.train.dataset.images[index].float().div(255.0)
    expected = (plain - 0.1307) / 0.3081
    torch.testing.assert_close(splits.val[0][0], expected, rtol=0, atol=1e-5)
    assert splits.val.dataset.images is splits.train.dataset.images  # a view, not a copy


@pytest.mark.parametrize("value, message", [
    ("1.5", r"dataset.val_split=1.5 is invalid; accepted: null \(none\), a fraction"),
    ("0", r"dataset.val_split=0 is invalid"),
    ("300", r"dataset.val_split=300 holds out 300 of the 300 training samples; accepted: .* 1..299"),
    ("60000", r"dataset.val_split=60000 holds out all 60000 training images of mnist; accepted: .* 1..59999"),
])
def test_bad_validation_split_is_refused(tmp_path: Path, digits: Path, value: str, message: str) -> None:
    cfg = compose_config(["dataset=mnist", f"dataset.root={digits}", f"dataset.val_split={value}"], tmp_path)
    with pytest.raises(QrunError, match=message):
        validate(cfg)
        build_datasets(cfg.dataset)


def test_best_checkpoint_is_chosen_on_the_validation_split(tmp_path: Path, digits: Path) -> None:
    out = tmp_path / "run"
    results = run_training(["dataset=mnist", f"dataset.root={digits}", "dataset.val_split=100", "epochs=3",
                            "batch_size=50", "optimizer.lr=0.0001"], out)
    history = results["history"]
    val, test = [h["val_top1"] for h in history], [h["top1"] for h in history]
    best_val_epoch = max(range(3), key=lambda i: (val[i], i)) + 1
    assert max(range(3), key=lambda i: (test[i], i)) + 1 != best_val_epoch, "the data must tell the two apart"
    assert val[-1] > 60.0 and test[-1] < 10.0  # learned; the mirrored test labels then score badly
    assert (results["best_selected_on"], results["top1_split"]) == ("val", "test")
    assert results["best_top1"] == max(val) and results["best_epoch"] == best_val_epoch
    assert results["best_test_top1"] == test[best_val_epoch - 1]
    assert (results["top1"], results["val_top1"]) == (test[-1], val[-1])
    best = checkpoint.load(out / "checkpoints" / checkpoint.BEST)
    assert best["epoch"] == best_val_epoch and best["best_top1"] == max(val)
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("val/top1")] == pytest.approx(val)
    assert [e.value for e in events.Scalars("test/top1")] == pytest.approx(test)
    assert json.loads((out / "results.json").read_text())["best_selected_on"] == "val"


def test_without_a_split_best_says_it_was_selected_on_test(tmp_path: Path, digits: Path) -> None:
    results = run_training(["dataset=mnist", f"dataset.root={digits}", "epochs=1", "batch_size=100"], tmp_path)
    assert (results["best_selected_on"], results["top1_split"], results["val_top1"]) == ("test", "test", None)
    assert results["best_top1"] == results["history"][0]["top1"] and "val_top1" not in results["history"][0]


# ------------------------------------------------------------------------------------------- ImageFolder classes
def image_folder(root: Path, classes: tuple[str, ...]) -> Path:
    for split in ("train", "val"):
        for index, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for copy in range(2):
                Image.new("RGB", (40, 40), color=(60 * index, 10 * copy, 90)).save(root / split / name / f"{copy}.png")
    return root


def test_image_folder_sets_num_classes_from_its_class_folders(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "tiny", ("ant", "bee", "cat"))
    out = tmp_path / "run"
    results = run_training(["dataset=imagenet", f"dataset.root={root}", "dataset.image_size=32", "epochs=1",
                            "batch_size=4", "eval_batch_size=4"], out)
    saved = checkpoint.load(out / "checkpoints" / checkpoint.LAST)
    assert saved["model"]["classifier.weight"].shape[0] == 3 and saved["config"]["dataset"]["num_classes"] == 3
    assert results["status"] == "finished"
    # The same command again (a re-run sweep job): null reads as the 3 the stored config holds, nothing to do.
    again = run_training(["dataset=imagenet", f"dataset.root={root}", "dataset.image_size=32", "epochs=1",
                          "batch_size=4", "eval_batch_size=4"], out)
    assert again["top1"] == results["top1"] and again["wall_time_s"] == results["wall_time_s"]


def test_a_different_explicit_num_classes_is_refused(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "tiny", ("ant", "bee", "cat"))
    with pytest.raises(QrunError, match=rf"^dataset.num_classes=1000 does not match the 3 class folders in "
                                        rf"{root / 'train'}; accepted: 3 or null \(taken from the folders\)$"):
        run_training(["dataset=imagenet", f"dataset.root={root}", "dataset.num_classes=1000"], tmp_path / "run")


def test_image_folder_validation_images_get_the_evaluation_transform(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "tiny", ("ant", "bee", "cat"))
    cfg = compose_config(["dataset=imagenet", f"dataset.root={root}", "dataset.image_size=32",
                          "dataset.val_split=2"], tmp_path).dataset
    splits = build_datasets(cfg)
    assert (len(splits.train), len(splits.val), len(splits.test), cfg.num_classes) == (4, 2, 6, 3)
    path, label = splits.val.dataset.samples[splits.val.indices[0]]
    image, target = splits.val[0]
    # Resize + CenterCrop, never RandomResizedCrop or a flip: the same tensor every time it is read.
    expected = build_transform(cfg, train=False)(Image.open(path).convert("RGB"))
    assert target == label and torch.equal(image, expected) and torch.equal(splits.val[0][0], expected)
