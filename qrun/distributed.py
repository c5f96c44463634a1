"""DistributedDataParallel plumbing for `torchrun --nproc_per_node=N -m qrun ...`, kept out of the trainer.

Conventions:
- `batch_size` is the global batch; each of the N ranks trains on batch_size / N samples per step, so the same
  command with and without torchrun takes the same optimisation steps.
- Rank 0 writes everything (checkpoints, results.json, TensorBoard); other ranks only compute.
- Training data are sharded by a DistributedSampler whose permutation is exactly the single-process shuffle of
  the same epoch (seed = epoch_seed(seed, 0), set_epoch(epoch)); validation data are split without padding
  and the metric sums are all-reduced, so every sample is counted once.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from qrun.errors import QrunError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job. `enabled` whenever torchrun started it, even with one process: then
    the run takes exactly the DDP code path (sampler order included), the reference a multi-process run
    is compared with."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistInfo()


def launched_by_torchrun(environ: Optional[dict] = None) -> bool:
    environ = os.environ if environ is None else environ
    return all(key in environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _export_slurm_environment() -> None:
    """Several SLURM tasks started by submitit (tasks_per_node > 1): derive torchrun's variables from them."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1 or "SUBMITIT_FOLDER" not in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export()


def setup(device: torch.device, backend: Optional[str] = None) -> DistInfo:
    """Join the process group described by torchrun's environment variables; a no-op for a single process."""
    _export_slurm_environment()
    if not launched_by_torchrun():
        return SINGLE
    info = DistInfo(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")), enabled=True)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise QrunError(f"dist_backend=nccl needs device=cuda (device is {device.type}); accepted on CPU: gloo")
    if device.type == "cuda":
        # Before the group exists and before any collective: NCCL places its communicator and every object
        # collective (broadcast_object) on the *current* device, which would otherwise be GPU 0 on every rank.
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    if not info.is_main:
        # One log per job: the other ranks only speak up for warnings and errors.
        logging.getLogger().setLevel(logging.WARNING)
    log.info("DDP: %d processes, backend %s", info.world_size, backend)
    return info


def device_for(device: torch.device, info: DistInfo) -> torch.device:
    """Each rank on its own GPU; CPU ranks share the CPU."""
    if info.enabled and device.type == "cuda":
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return device


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def per_rank_batch(batch_size: int, info: DistInfo) -> int:
    """The global batch split evenly over ranks; an uneven split would change the effective batch."""
    if batch_size % info.world_size:
        raise QrunError(f"batch_size={batch_size} is not divisible by the {info.world_size} DDP processes; "
                        f"accepted: a multiple of {info.world_size}")
    return batch_size // info.world_size


def train_sampler_factory(info: DistInfo, base_seed: int) -> Optional[Callable[[Dataset], Sampler]]:
    """DistributedSampler whose epoch permutation equals RandomSampler's under EpochLoader's seeding."""
    if not info.enabled:
        return None
    return lambda dataset: DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                              seed=base_seed, drop_last=False)


class ShardSampler(Sampler[int]):
    """Every world_size-th index from `rank`, with no padding: evaluation counts each sample exactly once."""

    def __init__(self, dataset: Dataset, info: DistInfo) -> None:
        self.indices = list(range(info.rank, len(dataset), info.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def eval_sampler_factory(info: DistInfo) -> Optional[Callable[[Dataset], Sampler]]:
    if not info.enabled:
        return None
    return lambda dataset: ShardSampler(dataset, info)


def prepare_model(model: nn.Module, info: DistInfo, sync_bn: bool) -> nn.Module:
    """SyncBatchNorm if asked, then make every rank hold rank 0's parameters and buffers (quantizer init included)."""
    if not info.enabled:
        return model
    if sync_bn:
        if next(model.parameters()).device.type != "cuda":
            raise QrunError("sync_bn=true needs CUDA (torch's SyncBatchNorm has no CPU kernel); accepted on CPU: false")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    broadcast_state(model)
    return model


@torch.no_grad()
def broadcast_state(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to all ranks (data-dependent quantizer values differ otherwise)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)


def wrap(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """The module the training step calls: DDP on several ranks; the bare model (kept for checkpoints) otherwise."""
    if not info.enabled:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def collective_device() -> torch.device:
    """Where the tensors handed to a collective must live: NCCL takes only tensors on this rank's current CUDA
    device ("No backend type associated with device type cpu" otherwise); gloo takes CPU tensors."""
    if dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_metrics(metrics: dict[str, float], samples: int, info: DistInfo,
                   averaged: tuple[str, ...]) -> dict[str, float]:
    """Sample-weighted mean over ranks of the `averaged` keys; other keys keep this rank's value."""
    if not info.enabled:
        return metrics
    values = torch.tensor([metrics[k] * samples for k in averaged] + [float(samples)], dtype=torch.float64,
                          device=collective_device())
    dist.all_reduce(values)
    total = float(values[-1])
    reduced = dict(metrics)
    reduced.update({k: float(values[i]) / max(total, 1.0) for i, k in enumerate(averaged)})
    if "samples" in reduced:
        reduced["samples"] = int(total)
    return reduced


def broadcast_object(value: object, info: DistInfo) -> object:
    """Rank 0's value on every rank (e.g. its output folder, whose timestamp other ranks may resolve differently)."""
    if not info.enabled:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0, device=collective_device())
    return holder[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
