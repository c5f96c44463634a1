"""onnxruntime latency and throughput of the int8 (QDQ) model against its float twin, on this CPU, in one run.

    .venv/bin/python scripts/bench_int8.py --run <a `qrun mode=export` run directory>
    .venv/bin/python scripts/bench_int8.py            # no run: builds and calibrates an affine cnn_bn in place

Latency: median wall time of single-image inference (batch 1). Throughput: images per second at --batch.
Both models run in the same process with the same session options, alternating, so CPU frequency and load
affect them alike. Prints the int8/fp32 latency ratio (< 1 means int8 is faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qrun.int8.export import INPUT, count_ops, ort_session  # noqa: E402
from qrun.int8.modes import ONNX_FILE, ONNX_FP32_FILE  # noqa: E402


def build_example_models(folder: Path, model_name: str, bits: int) -> tuple[Path, Path]:
    """An affine model (untrained weights, calibrated on random images): enough to time the kernels."""
    import torch

    from qrun import quant
    from qrun.int8.export import export_onnx
    from qrun.int8.ptq import calibrate_model
    from qrun.models import get_model

    torch.manual_seed(0)
    model = quant.quantize_model(get_model(model_name, num_classes=10, in_channels=1), "affine", bits, bits, True,
                                 "quantize")
    calibrate_model(model, [torch.randn(64, 1, 28, 28) for _ in range(4)])
    example = torch.randn(1, 1, 28, 28)
    return (export_onnx(model, folder / ONNX_FILE, example, quantize=True),
            export_onnx(model, folder / ONNX_FP32_FILE, example, quantize=False))


def time_runs(session, batch: np.ndarray, repeats: int) -> list[float]:
    session.run(None, {INPUT: batch})  # warm-up: first-run allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {INPUT: batch})
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="folder holding model.onnx and model_fp32.onnx (qrun mode=export)")
    parser.add_argument("--model", default="cnn_bn", help="network for the built-in example (no --run)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--latency-repeats", type=int, default=300)
    parser.add_argument("--throughput-repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all)")
    args = parser.parse_args()
    if args.run:
        int8_path, fp32_path = args.run / ONNX_FILE, args.run / ONNX_FP32_FILE
        for path in (int8_path, fp32_path):
            if not path.is_file():
                sys.exit(f"{path} not found: --run takes the folder of a `qrun mode=export` run")
    else:
        int8_path, fp32_path = build_example_models(Path(tempfile.mkdtemp()), args.model, 8)
    sessions = {"fp32": ort_session(fp32_path, args.threads), "int8": ort_session(int8_path, args.threads)}
    shape = sessions["fp32"].get_inputs()[0].shape
    rng = np.random.default_rng(0)
    single = rng.standard_normal((1, *shape[1:]), dtype=np.float32)
    batch = rng.standard_normal((args.batch, *shape[1:]), dtype=np.float32)
    latency = {k: [] for k in sessions}
    throughput = {k: [] for k in sessions}
    for _ in range(3):  # alternate so drift hits both
        for name, session in sessions.items():
            latency[name] += time_runs(session, single, args.latency_repeats // 3)
            throughput[name] += time_runs(session, batch, max(args.throughput_repeats // 3, 1))
    print(f"CPU: {os.cpu_count()} logical cores; onnxruntime threads: {args.threads or 'default'}")
    print(f"int8 graph ops: {count_ops(int8_path)}")
    print(f"files: int8 {int8_path.stat().st_size / 1024:.0f} KiB, fp32 {fp32_path.stat().st_size / 1024:.0f} KiB")
    print(f"{'model':6} {'latency b=1 (ms, median)':>26} {'throughput b=' + str(args.batch) + ' (img/s)':>26}")
    results = {}
    for name in sessions:
        lat = statistics.median(latency[name]) * 1e3
        thr = args.batch / statistics.median(throughput[name])
        results[name] = (lat, thr)
        print(f"{name:6} {lat:26.3f} {thr:26.0f}")
    ratio = results["int8"][0] / results["fp32"][0]
    print(f"int8/fp32 latency ratio: {ratio:.2f} (throughput ratio {results['int8'][1] / results['fp32'][1]:.2f})")


if __name__ == "__main__":
    main()
