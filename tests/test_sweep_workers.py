"""kill -9 of a local sweep's parent takes its loky workers with it (they used to finish jobs unattended)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

QRUN = str(Path(sys.executable).parent / "qrun")


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_loky_workers_die_with_the_killed_parent(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun" / "long"
    workers: list[int] = []
    parent = subprocess.Popen(
        [QRUN, "-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2", "sweep=long", "dataset=fake",
         "dataset.train_samples=2048", "dataset.val_samples=32", "batch_size=8", "epochs=500", "progress=false",
         "threads=1", "quant=none,uniform"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        # Both jobs running: each wrote its Hydra config (the watchdog starts first thing in the job).
        assert wait_for(lambda: len(list(sweep.glob("*/.hydra/config.yaml"))) == 2, 180), "jobs never started"
        workers += [pid for pid in children(parent.pid) if "loky" in Path(f"/proc/{pid}/cmdline").read_bytes()
                   .decode(errors="replace")]
        assert workers, "no loky worker found"
        time.sleep(1.0)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        assert wait_for(lambda: not any(alive(pid) for pid in workers), 30), "loky workers outlived their parent"
        assert not list(sweep.glob("*/results.json"))  # nobody finished a job unattended
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in workers + children(parent.pid):  # a failed run must not leave its workers behind
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
