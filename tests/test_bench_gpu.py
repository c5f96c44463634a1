"""scripts/bench_gpu.py keeps working: its --cpu-smoke mode on tiny sizes, both models, fp32 and bf16 autocast."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.py"
# One qrun quantizer of each label form, and both torch.ao peers (each built in qrun's quantizer slots).
ONLY = ["lsq", "xnor", "ao-fq", "ao-lsq"]


def test_cpu_smoke_measures_every_config_against_float(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--only", *ONLY, "--json", str(out)],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = json.loads(out.read_text())
    labels = ["float", "lsq", "xnor W1A1", "ao-fq", "ao-lsq"]
    for model in ("resnet20", "resnet18"):
        for precision in ("fp32", "bf16"):
            got = {r["config"]: r for r in rows if (r["model"], r["precision"]) == (model, precision)}
            assert list(got) == labels
            assert got["float"]["time_ratio"] == 1.0 and got["float"]["syncs"] == 0
            for label, row in got.items():
                assert row["error"] is None, (model, precision, label, row["error"])
                assert math.isfinite(row["time_ratio"]) and row["time_ratio"] > 0 and row["median_ms"] > 0
                assert isinstance(row["syncs"], int) and row["h2d"] == 0  # CPU: no host-to-device copies
    assert result.stdout.count("## resnet") == 4 and "data path (in-memory" in result.stdout


def test_a_config_that_fails_during_the_timed_rounds_is_reported_and_the_others_still_measured(monkeypatch) -> None:
    """torch.ao's _LearnableFakeQuantize raised once SGD moved its zero point out of range, mid-benchmark: such a
    config gets its error (with the round) and leaves the rotation; float and the rest keep their ratios."""
    import argparse
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("bench_gpu_under_test", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    calls = {"lsq": 0}

    def build_step(config, *args):
        def step() -> None:
            if config.label == "lsq":
                calls["lsq"] += 1
                if calls["lsq"] > 4:  # warm-up and the sync count pass; round 2 fails
                    raise RuntimeError("`zero_point` must be between `quant_min` and `quant_max`.")
        return step

    monkeypatch.setattr(bench, "build_step", build_step)
    args = argparse.Namespace(only=["lsq", "dsq"], warmup=1, rounds=6, compile=False)
    results = {r.config.label: r for r in bench.bench_setting("resnet20", (2, 8, 10), "fp32", args,
                                                                torch.device("cpu"))}
    assert list(results) == ["float", "lsq", "dsq"]
    assert results["lsq"].error.startswith("round 2: RuntimeError: `zero_point`"), results["lsq"].error
    assert len(results["lsq"].ratios) == 2
    assert results["float"].error is None and len(results["float"].ratios) == 6
    assert results["dsq"].error is None and len(results["dsq"].ratios) == 6
