"""The runtime on CUDA: checkpoints move between GPU and CPU, the loop reads no scalar per step, batches augment
on the device. Marked `gpu`: skipped without CUDA, run by scripts/gpu_check.sh on a GPU machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qrun.augment import BatchAugment
from tests.conftest import SMALL_DATA, run_training
from tests.test_augment import reference
from tests.test_engine_progress import ScalarReads

pytestmark = pytest.mark.gpu
TINY = [*SMALL_DATA, "model=cnn", "quant=lsq", "quantize_input=true", "dataset.augment=true", "batch_size=64"]


@pytest.mark.parametrize("first, second", [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_checkpoint_resumes_on_the_other_device(first: str, second: str, tmp_path: Path,
                                                  fashion_mnist_available: None) -> None:
    run_training([*TINY, "epochs=1", f"device={first}"], tmp_path / "first")
    resumed = run_training([*TINY, "epochs=2", f"device={second}", f"resume={tmp_path / 'first'}"],
                           tmp_path / "second")
    assert resumed["device"].startswith(second) and [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert resumed["history"][1]["train_loss"] < resumed["history"][0]["train_loss"] + 0.5
    payload = torch.load(tmp_path / "second/checkpoints/last.pt", weights_only=True, map_location="cpu")
    assert ("cuda" in payload["rng"]) == torch.cuda.is_available()


def test_the_cuda_training_loop_reads_no_scalar_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    from qrun import progress
    from qrun.engine import train_one_epoch
    from qrun.progress import Cadence

    monkeypatch.setattr(progress, "CADENCE", Cadence(percent=0))
    counts = []
    for steps in (2, 8):
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 10)).cuda()
        batches = [(torch.randn(8, 1, 8, 8).pin_memory(), torch.randint(0, 10, (8,)).pin_memory())
                   for _ in range(steps)]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        with ScalarReads() as reads:
            train_one_epoch(model, torch.nn.CrossEntropyLoss(), optimizer, scheduler, batches,
                            torch.device("cuda"), 1, progress=False)
        counts.append(reads.count)
    assert counts == [2, 2]  # the epoch's loss and top-1, read once at its end


def test_batch_augmentation_on_cuda_is_torchvisions_per_sample_crop_and_flip() -> None:
    images = torch.randn(32, 3, 32, 32, device="cuda")
    augment = BatchAugment(padding=4, flip=True, fill=[-1.0, -1.5, -2.0])
    augment.reseed(5)
    out = augment(images)
    augment.reseed(5)
    offsets, flips = augment.draws(32, images.device)
    assert out.device.type == "cuda"
    for i in range(32):
        expected = reference(images[i].cpu(), [-1.0, -1.5, -2.0], 4, int(offsets[0, i]), int(offsets[1, i]),
                             bool(flips[i]))
        assert torch.equal(out[i].cpu(), expected)
    augment.reseed(5)
    assert torch.equal(augment(images), out)
