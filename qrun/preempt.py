"""Preemption: a signal asks the run to stop after the running step, with a mid-epoch checkpoint, and to exit.

The handler only sets a flag (nothing unsafe happens inside a signal handler); the training loop looks at it
between steps. Where another handler was installed before (submitit installs its own: SIGUSR2 requeues the job,
SIGTERM is logged and bypassed), it is called once the checkpoint is written, so submitit still requeues;
otherwise the process exits with EXIT_CODE. Under DDP the ranks agree on the step to stop at (an all-reduce
between steps), because each rank may see the signal at a different moment.
"""

from __future__ import annotations

import logging
import signal
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

from qrun.errors import QrunError

log = logging.getLogger(__name__)
# EX_TEMPFAIL from sysexits.h: "a temporary failure, the user is invited to retry" - rerunning the command resumes.
EXIT_CODE = 75
# Under DDP on GPUs (nccl) reading the agreed flag is a host sync; agree every this many steps instead of each.
NCCL_AGREE_EVERY = 16


class Preempted(SystemExit):
    """Raised after the mid-epoch checkpoint is written; SystemExit so that Hydra and the CLI let it through."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(EXIT_CODE)
        self.signal_name = signal_name


def parse_signals(names: Sequence[str]) -> list[signal.Signals]:
    """`SIGTERM`, `TERM` or `15` -> signal.SIGTERM; unknown names are refused with the accepted ones."""
    by_name = {s.name: s for s in signal.Signals}
    by_number = {s.value: s for s in signal.Signals}
    parsed = []
    for name in names:
        text = str(name).upper()
        found = by_number.get(int(text)) if text.isdigit() else by_name.get(text if text.startswith("SIG") else
                                                                              f"SIG{text}")
        if found is None or found in (signal.SIGKILL, signal.SIGSTOP):
            raise QrunError(f"preempt.signals: {name!r} is not a signal that can be caught; accepted: e.g. "
                            "SIGTERM, SIGUSR1, SIGUSR2, SIGINT")
        parsed.append(found)
    return parsed


class StopRequest:
    """The flag the signal handlers set, and the ranks' agreement on it."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.previous: dict[int, Any] = {}

    def handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "none"

    def should_stop(self, step: int) -> bool:
        """Whether to stop before the next step; under DDP every rank gets the same answer at the same step."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self.signum is not None
        if dist.get_backend() == "nccl" and step % NCCL_AGREE_EVERY:
            return False
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([0 if self.signum is None else self.signum], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        agreed = int(flag.item())
        if agreed and self.signum is None:
            self.signum = agreed  # another rank got it first
        return bool(agreed)

    def hand_over(self) -> None:
        """After the checkpoint: let a previously installed handler act (submitit requeues), else exit."""
        previous = self.previous.get(self.signum) if self.signum is not None else None
        if callable(previous):
            previous(self.signum, None)
        raise Preempted(self.signal_name)


@contextmanager
def installed(names: Sequence[str], enabled: bool = True) -> Iterator[StopRequest]:
    """Handlers for the configured signals for the duration of the run; the previous ones are put back after."""
    request = StopRequest()
    if not enabled:
        yield request
        return
    for sig in parse_signals(names):
        try:
            request.previous[sig] = signal.signal(sig, request.handle)
        except ValueError:  # not the main thread (e.g. a thread-based launcher): signals stay as they were
            log.warning("preemption signals not installed: not running in the main thread")
            break
    try:
        yield request
    finally:
        for sig, previous in request.previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
