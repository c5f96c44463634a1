"""CPU threads per job: a sweep of parallel jobs must share the cores instead of each grabbing all of them.

Set at the start of every job, whatever the previous job in the same (reused) worker process chose, so a
joblib/loky worker never carries one job's thread count into the next.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional

import torch

log = logging.getLogger(__name__)

# What torch chose for this process before any job changed it: the fallback when nothing divides the cores.
_PROCESS_DEFAULT_THREADS = torch.get_num_threads()


def available_cores() -> int:
    """Cores this process may run on (the affinity mask honours taskset, cgroups cpusets and SLURM binding)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parallel_jobs(launcher: Optional[Mapping[str, Any]], cores: int) -> int:
    """Jobs that share this machine's cores under a joblib launcher config (its n_jobs, joblib's semantics)."""
    if not launcher or "n_jobs" not in launcher or launcher.get("n_jobs") is None:
        return 1
    n_jobs = int(launcher["n_jobs"])
    if n_jobs < 0:  # joblib: -1 is all cores, -2 all but one, ...
        return max(1, cores + 1 + n_jobs)
    return max(1, n_jobs)


def threads_for_job(requested: Optional[int], launcher: Optional[Mapping[str, Any]] = None,
                    environ: Optional[Mapping[str, str]] = None, cores: Optional[int] = None) -> int:
    """The thread count for one job: explicit `threads`, else a fair share of the cores, else torch's default."""
    if requested is not None:
        return int(requested)
    environ = os.environ if environ is None else environ
    cores = available_cores() if cores is None else cores
    if environ.get("SLURM_CPUS_PER_TASK"):
        return max(1, int(environ["SLURM_CPUS_PER_TASK"]))
    sharers = parallel_jobs(launcher, cores) * int(environ.get("LOCAL_WORLD_SIZE", "1"))
    if sharers > 1:
        return max(1, cores // sharers)
    return _PROCESS_DEFAULT_THREADS


def hydra_launcher_config() -> Optional[Mapping[str, Any]]:
    """This job's hydra.launcher node, when the job runs under Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().get("launcher")


def configure_threads(requested: Optional[int]) -> int:
    """Set torch's intra-op thread count for this job and return it."""
    threads = threads_for_job(requested, hydra_launcher_config())
    torch.set_num_threads(threads)
    log.debug("using %d CPU threads", threads)
    return threads
