"""scripts/table_resnet20_fmnist.sh runs every command of the table, in one lane or two, and a diverged job in one
sweep does not stop the others (checked with stand-ins for qrun and qrun-report that record their arguments)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "table_resnet20_fmnist.sh"
STAND_IN = """#!/usr/bin/env bash
echo "$(basename "$0") OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset} $*" >> "$CALLS"
case "$*" in *"bits=$FAIL_BITS "*) exit 1 ;; esac
"""


def run_table(tmp_path: Path, *args: str, fail_bits: str = "none", qrun: str = STAND_IN) -> tuple[int, list[str]]:
    for name, body in (("qrun", qrun), ("qrun-report", STAND_IN)):
        (tmp_path / name).write_text(body)
        (tmp_path / name).chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "QRUN": str(tmp_path / "qrun"), "QRUN_REPORT": str(tmp_path / "qrun-report"),
           "CALLS": str(calls), "FAIL_BITS": fail_bits}
    done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, env=env)
    return done.returncode, calls.read_text().splitlines() if calls.exists() else []


@pytest.mark.parametrize("lanes", ["1", "2"])
def test_every_command_runs_and_a_failed_sweep_does_not_stop_the_rest(tmp_path: Path, lanes: str) -> None:
    code, calls = run_table(tmp_path, "--lanes", lanes, fail_bits="2")
    assert code == 1, "a sweep with a failed job: exit 1, after the report"
    joined = "\n".join(calls)
    for expected in ("hydra.run.dir=multirun/fmnist_resnet20/float ",
                     "model.options.block=binary hydra.run.dir=multirun/fmnist_resnet20_binary_float",
                     "quant=uniform,lsq,dsq,pact,dorefa bits=4", "quant=uniform,lsq,dsq,pact,dorefa bits=2",
                     "quant=twn bits=2 quantize_input=false", "init_from=multirun/fmnist_resnet20/float quant=affine bits=8",
                     "quant=xnor bits=1",
                     "sweep=fmnist_resnet20/kd", "mode=calibrate resume=multirun/fmnist_resnet20/float"):
        assert sum(expected in call for call in calls) == 1, (expected, joined)
    assert calls[-1].startswith("qrun-report ") and "multirun/fmnist_resnet20 --out docs/resnet20-fmnist" in calls[-1]
    threads = {call.split()[1] for call in calls[:-1]}
    assert threads == ({"OMP_NUM_THREADS=1"} if lanes == "2" else {"OMP_NUM_THREADS=unset"})


def test_a_failed_float_run_stops_the_table(tmp_path: Path) -> None:
    code, calls = run_table(tmp_path, "--lanes", "1", qrun='#!/usr/bin/env bash\necho "qrun $*" >> "$CALLS"\nexit 1\n')
    assert code != 0 and len(calls) == 1 and "fmnist_resnet20_float" in calls[0]


def test_bad_lanes_are_refused(tmp_path: Path) -> None:
    code, _ = run_table(tmp_path, "--lanes", "3")
    assert code == 2
