"""scripts/gpu_prepare.sh and scripts/gpu_check.sh parse, refuse bad arguments, and plan the right commands.

(Their real run was rehearsed on CPU with `gpu_check.sh --cpu-rehearsal`; the GPU run is the device tool's.)
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.mark.parametrize("name", ["gpu_prepare.sh", "gpu_check.sh"])
def test_scripts_parse_and_refuse_unknown_arguments(name: str) -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPTS / name)]).returncode == 0
    result = subprocess.run(["bash", str(SCRIPTS / name), "--bogus"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and f"{name}: error: unknown argument '--bogus'" in result.stderr


def test_gpu_check_dry_run_plans_tests_bench_and_training_without_running_them(tmp_path: Path) -> None:
    result = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                            timeout=30, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "pip install --no-index --no-deps --target /tmp/qrun-site .gpu/wheels/*.whl" in out
    assert "python3 -m pytest -q -m gpu" in out
    assert f"scripts/bench_gpu.py --models resnet18 resnet20 --precisions bf16 fp32 --rounds 30 --json {tmp_path}" in out
    assert "-m qrun model=resnet20 dataset=fashion_mnist" in out and "amp=true epochs=2" in out
    assert ".gpu/fashion-mnist" in out and "device=cuda" in out
    limits = [int(line.split("(limit ")[1].split("s)")[0]) for line in out.splitlines() if "(limit " in line]
    assert len(limits) == 3 and sum(limits) <= 8 * 60 - 30  # under 8 minutes with the set-up
    assert list(tmp_path.iterdir()) == []  # nothing ran


def test_gpu_check_compiled_plans_only_the_compiled_resnet20_bench(tmp_path: Path) -> None:
    """--compiled: the launch-bound target's compile=true measurement, for a second device call."""
    result = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "--compiled", "--dry-run"], capture_output=True,
                            text=True, timeout=30, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    steps = [line for line in result.stdout.splitlines() if line.startswith("=== ")]
    assert len(steps) == 1 and "scripts/bench_gpu.py --models resnet20 --precisions bf16 --compile" in steps[0]
    assert "(limit 240s)" in steps[0] and "-m pytest" not in result.stdout and "-m qrun" not in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_gpu_prepare_dry_run_fetches_the_pinned_wheels_and_the_data() -> None:
    result = subprocess.run(["bash", str(SCRIPTS / "gpu_prepare.sh"), "--dry-run"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    from importlib.metadata import version

    assert f"hydra-core=={version('hydra-core')}" in result.stdout
    assert f"omegaconf=={version('omegaconf')}" in result.stdout
    assert f"antlr4-python3-runtime=={version('antlr4-python3-runtime')}" in result.stdout
    assert result.stdout.count(".gpu/fashion-mnist/") == 4
