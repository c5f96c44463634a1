"""A pool worker dies with its parent: after kill -9 of a local sweep, no loky worker trains on unattended.

joblib's loky workers survive their parent's SIGKILL (they were seen finishing two more jobs). Linux's
PR_SET_PDEATHSIG fires when the *thread* that forked the worker ends, and loky may fork from a helper thread,
so a daemon thread instead watches the parent pid: when the worker is re-parented it sends itself SIGTERM (a
preemption handler, if installed, saves the running step), then SIGKILL if it is still alive a minute later.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from typing import Optional

log = logging.getLogger(__name__)
GRACE_S = 60.0
_started: Optional[threading.Thread] = None


def die_with_parent(poll_s: float = 1.0) -> bool:
    """Start the watchdog once per process when this process is a multiprocessing (loky) worker."""
    global _started
    parent = multiprocessing.parent_process()
    if parent is None or parent.pid is None:
        return False  # the main process: its parent is a shell, which may well exit (nohup)
    if _started is None:
        _started = threading.Thread(target=_watch, args=(parent.pid, poll_s), name="qrun-parent-watchdog",
                                    daemon=True)
        _started.start()
    return True


def _watch(parent_pid: int, poll_s: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    log.error("the sweep's parent process %d is gone; this worker stops", parent_pid)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    os.kill(os.getpid(), signal.SIGKILL)
