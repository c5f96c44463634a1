"""Runs tests/test_triton_kernels.py's CPU cases under Triton's interpreter, in a subprocess.

TRITON_INTERPRET must be set before triton is first imported, and QRUN_BACKEND=triton routes CPU tensors to the
Triton kernels: both would change what every other test in this process runs, so they are set only in the child.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qrun.quant.kernels import BACKEND_ENV

pytest.importorskip("triton")
KERNEL_TESTS = Path(__file__).with_name("test_triton_kernels.py")


def test_triton_kernels_equal_the_reference_and_never_sync_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", BACKEND_ENV: "triton"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-m", "not gpu",
                             str(KERNEL_TESTS)], env=env, capture_output=True, text=True, timeout=900,
                            cwd=KERNEL_TESTS.parent.parent)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) >= 150, result.stdout[-2000:]
    print(result.stdout[-3000:])  # the step counts, for the record
